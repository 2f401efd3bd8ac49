"""Points where a test may act on a run, and fault injection through them.

The training loop calls a `Hook` at a few fixed points (a callback, callbacks.py); the default one
does nothing. Tests pass their own to `loop.run(..., hook=...)`, or a `Faults` made from
DNNRUN_FAULT, which the CLI reads so that tests can break a real process:

DNNRUN_FAULT=KIND@POINT=N[,KIND@POINT=N...]
KIND   nan    the training loss becomes NaN (POINT must be step)
       arrive create the file DNNRUN_FAULT_ARRIVE/PID
       hold   stop right there, as a process that hangs would (InjectedFault after WAIT_S seconds)
       wait   wait until DNNRUN_FAULT_WAIT=GLOB:COUNT matches COUNT files (at most WAIT_S seconds).
              With arrive, a barrier between the processes of a sweep, so that what a test sees
              does not depend on which process is faster. Faults at one point fire in the order given.
       raise  an exception
       enospc the write fails as on a full disk (POINT must be save or status)
       kill   SIGKILL: the process dies on the spot
       term, int, usr2   the process sends itself SIGTERM, SIGINT or SIGUSR2, as a scheduler,
              `docker stop`, Ctrl-C or Slurm would
POINT  step=N   right after the N-th optimizer step of the run (counting from 1, across resumes)
       epoch=N  right after epoch N's checkpoint is written
       save=N   inside the N-th checkpoint write of this process: the temporary file is complete
                and fsynced, the rename has not happened
       status=1 as the CLI records how the run ended (status.json), after training
A resumed run passes a given step or epoch only once, so such a fault does not fire again after
the resume.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import re
import signal
import time
from typing import TYPE_CHECKING, Any

from dnnrun.errors import UserError
from dnnrun.training.callbacks import Callback

if TYPE_CHECKING:
    from torch import nn

    from dnnrun.training.loop import Loop


class Hook(Callback):
    """What tests act through, called by the loop as a callback at the points below; each of
    them does nothing here."""

    def start(self, model: nn.Module, step: int) -> None:
        """Training begins (after any pretraining and resume) with `step` optimizer steps behind it."""

    def after_step(self, step: int) -> None:
        """The `step`-th optimizer step of the run is done."""

    def end_epoch(self, epoch: int) -> None:
        """Epoch `epoch` is done and its checkpoint written."""

    def before_rename(self) -> None:
        """A checkpoint file is written and fsynced, not yet renamed into place."""

    def train_start(self, loop: Loop) -> None:
        progress = loop.state.progress
        self.start(loop.engine.module, loop.state.step + (progress.batches if progress else 0))

    def step_end(self, loop: Loop, step: int, epoch: int) -> None:
        self.after_step(step)

    def epoch_end(self, loop: Loop, epoch: int, records: dict[int, dict[str, Any]]) -> None:
        self.end_epoch(epoch)


KINDS = ("nan", "arrive", "hold", "wait", "raise", "enospc", "kill", "term", "int", "usr2")
POINTS = ("step", "epoch", "save", "status")
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT, "usr2": signal.SIGUSR2}
ONLY_AT = {"nan": ("step",), "enospc": ("save", "status")}
WAIT_S = 120


class InjectedFault(RuntimeError):
    """What DNNRUN_FAULT=raise@... raises."""


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    point: str
    n: int

    def fire(self) -> None:
        if self.kind == "arrive":
            folder = os.environ.get("DNNRUN_FAULT_ARRIVE", "")
            if not folder:
                raise UserError("DNNRUN_FAULT=arrive@...: set DNNRUN_FAULT_ARRIVE to a folder")
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, str(os.getpid())), "w").close()
        if self.kind == "hold":
            time.sleep(WAIT_S)
            raise InjectedFault(f"DNNRUN_FAULT: held for {WAIT_S} s at {self.point} {self.n}")
        if self.kind == "wait":
            wait_for(os.environ.get("DNNRUN_FAULT_WAIT", ""))
        if self.kind == "raise":
            raise InjectedFault(f"DNNRUN_FAULT: injected failure at {self.point} {self.n}")
        if self.kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.kind in SIGNALS:
            os.kill(os.getpid(), SIGNALS[self.kind])  # handlers run before the next Python instruction


class Faults(Hook):
    """The faults of this run, and the checkpoint writes counted so far."""

    def __init__(self, faults: list[Fault]):
        self.faults = faults
        self.saves = 0

    def start(self, model: nn.Module, step: int) -> None:
        """A NaN loss at step N: the model's output at the N-th training-mode forward pass becomes NaN
        (evaluation passes run in eval mode and are not counted)."""
        nan_at = {f.n for f in self.faults if f.kind == "nan"}
        if not nan_at:
            return
        passes = [step]

        def poison(module, inputs, output):
            if not module.training:
                return output
            passes[0] += 1
            return output * float("nan") if passes[0] in nan_at else output

        model.register_forward_hook(poison)

    def at(self, point: str, n: int) -> None:
        for fault in self.faults:
            if fault.point == point and fault.n == n and fault.kind != "nan":
                fault.fire()

    def after_step(self, step: int) -> None:
        self.at("step", step)

    def end_epoch(self, epoch: int) -> None:
        self.at("epoch", epoch)

    def before_rename(self) -> None:
        self.saves += 1
        self.at("save", self.saves)


def wait_for(spec: str) -> None:
    """Block until GLOB matches at least COUNT files (spec "GLOB:COUNT")."""
    pattern, _, count = spec.rpartition(":")
    if not pattern or not count.isdigit():
        raise UserError(f"DNNRUN_FAULT_WAIT={spec!r}: expected GLOB:COUNT, e.g. /tmp/sweep/*/run.log:2")
    deadline = time.monotonic() + WAIT_S
    while len(glob.glob(pattern)) < int(count):
        if time.monotonic() > deadline:
            raise InjectedFault(f"DNNRUN_FAULT: waited {WAIT_S} s for {count} files matching {pattern}")
        time.sleep(0.02)


def parse(spec: str) -> Faults:
    faults = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\w+)@(\w+)=(\d+)", item.strip())
        if (
            not match
            or match[1] not in KINDS
            or match[2] not in POINTS
            or match[2] not in ONLY_AT.get(match[1], POINTS)
        ):
            raise UserError(
                f"DNNRUN_FAULT={spec!r}: expected KIND@POINT=N[,...] with KIND one of {', '.join(KINDS)} and POINT "
                f"one of {', '.join(POINTS)} (nan only at step, enospc only at save or status)"
            )
        faults.append(Fault(match[1], match[2], int(match[3])))
    return Faults(faults)


def from_env() -> Faults | None:
    spec = os.environ.get("DNNRUN_FAULT", "").strip()
    return parse(spec) if spec else None
