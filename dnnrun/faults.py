"""Fault injection for tests: DNNRUN_FAULT=KIND@POINT=N makes a run fail on purpose, once.

KIND   nan (the training loss becomes NaN; POINT must be step), raise (an exception), kill (SIGKILL),
       term, int, usr2 (the process sends itself SIGTERM, SIGINT or SIGUSR2, as a scheduler would)
POINT  step=N   right after the N-th optimizer step of the run (counting from 1, across resumes)
       epoch=N  right after epoch N's checkpoint is written
       save=N   inside the N-th checkpoint write of this process: the temporary file is complete
                and fsynced, the rename has not happened
Unset, it costs a comparison per step. A resumed run passes the same step or epoch only once, so a
fault at a step or epoch does not fire again after the resume.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal

from dnnrun.errors import UserError

KINDS = ("nan", "raise", "kill", "term", "int", "usr2")
POINTS = ("step", "epoch", "save")
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT, "usr2": signal.SIGUSR2}


class InjectedFault(RuntimeError):
    """What DNNRUN_FAULT=raise@... raises."""


@dataclasses.dataclass
class Fault:
    kind: str
    point: str
    n: int
    saves: int = 0  # checkpoint writes seen so far, for point=save

    def at(self, point: str, n: int) -> bool:
        return self.point == point and self.n == n

    def on_save(self) -> None:
        """Called by a checkpoint write between the temporary file's fsync and its rename."""
        if self.point == "save":
            self.saves += 1
            if self.saves == self.n:
                self.fire()

    def fire(self) -> None:
        if self.kind == "raise":
            raise InjectedFault(f"DNNRUN_FAULT: injected failure at {self.point} {self.n}")
        if self.kind in SIGNALS:
            os.kill(os.getpid(), SIGNALS[self.kind])  # handlers run before the next Python instruction


def from_env() -> Fault | None:
    spec = os.environ.get("DNNRUN_FAULT", "").strip()
    if not spec:
        return None
    match = re.fullmatch(r"(\w+)@(\w+)=(\d+)", spec)
    if not match or match[1] not in KINDS or match[2] not in POINTS or (match[1] == "nan" and match[2] != "step"):
        raise UserError(
            f"DNNRUN_FAULT={spec!r}: expected KIND@POINT=N with KIND one of {', '.join(KINDS)} and POINT one of "
            f"{', '.join(POINTS)} (nan only at step)"
        )
    return Fault(match[1], match[2], int(match[3]))
