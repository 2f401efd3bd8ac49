"""Fault injection for tests: DNNRUN_FAULT=KIND@POINT=N[,KIND@POINT=N...] makes a run fail on purpose.

KIND   nan    the training loss becomes NaN (POINT must be step)
       raise  an exception
       enospc the write fails as on a full disk (POINT must be save)
       kill   SIGKILL: the process dies on the spot
       term, int, usr2   the process sends itself SIGTERM, SIGINT or SIGUSR2, as a scheduler,
              `docker stop`, Ctrl-C or Slurm would
POINT  step=N   right after the N-th optimizer step of the run (counting from 1, across resumes)
       epoch=N  right after epoch N's checkpoint is written
       save=N   inside the N-th checkpoint write of this process: the temporary file is complete
                and fsynced, the rename has not happened
       status=1 as the CLI records how the run ended (status.json), after training
Unset, it costs a comparison per step. A resumed run passes a given step or epoch only once, so
such a fault does not fire again after the resume.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import signal

from dnnrun.errors import UserError

KINDS = ("nan", "raise", "enospc", "kill", "term", "int", "usr2")
POINTS = ("step", "epoch", "save", "status")
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT, "usr2": signal.SIGUSR2}
ONLY_AT = {"nan": "step", "enospc": "save"}


class InjectedFault(RuntimeError):
    """What DNNRUN_FAULT=raise@... raises."""


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    point: str
    n: int

    def fire(self) -> None:
        if self.kind == "raise":
            raise InjectedFault(f"DNNRUN_FAULT: injected failure at {self.point} {self.n}")
        if self.kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.kind in SIGNALS:
            os.kill(os.getpid(), SIGNALS[self.kind])  # handlers run before the next Python instruction


class Faults:
    """The faults of this run, and the checkpoint writes counted so far."""

    def __init__(self, faults: list[Fault]):
        self.faults = faults
        self.saves = 0

    def nan_at(self, step: int) -> bool:
        return any(f.kind == "nan" and f.n == step for f in self.faults)

    def at(self, point: str, n: int) -> None:
        for fault in self.faults:
            if fault.point == point and fault.n == n and fault.kind != "nan":
                fault.fire()

    def on_save(self) -> None:
        """Called by a checkpoint write between the temporary file's fsync and its rename."""
        self.saves += 1
        self.at("save", self.saves)


def from_env() -> Faults | None:
    spec = os.environ.get("DNNRUN_FAULT", "").strip()
    if not spec:
        return None
    faults = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\w+)@(\w+)=(\d+)", item.strip())
        if not match or match[1] not in KINDS or match[2] not in POINTS or ONLY_AT.get(match[1], match[2]) != match[2]:
            raise UserError(
                f"DNNRUN_FAULT={spec!r}: expected KIND@POINT=N[,...] with KIND one of {', '.join(KINDS)} and POINT "
                f"one of {', '.join(POINTS)} (nan only at step, enospc only at save)"
            )
        faults.append(Fault(match[1], match[2], int(match[3])))
    return Faults(faults)
