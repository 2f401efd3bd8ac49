"""A trial of a hyperparameter search, told after every epoch how it compares with the others.

The search (dnnrun/cli/search.py, which talks to Optuna) hands the loop a Trial: its
`report(epoch, value)` records the epoch's monitored metric in the study and says whether the
study's pruner stops the trial there. A pruned trial ends after that epoch's checkpoint, without its test pass,
as the loop's `Pruned` ending (errors.py): status "pruned", exit code 0."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from dnnrun.errors import Pruned
from dnnrun.training.callbacks import Callback

if TYPE_CHECKING:
    from dnnrun.training.loop import Loop


class Trial(Protocol):
    pruner: str  # its name, for the message

    def report(self, epoch: int, value: float) -> bool:
        """Record the epoch's monitored value; whether the pruner stops the trial here."""
        ...


class Pruning(Callback):
    def __init__(self, trial: Trial, monitor: str):
        self.trial, self.monitor = trial, monitor
        self.pruned: Pruned | None = None

    def epoch_end(self, loop: Loop, epoch: int, records: dict[int, dict[str, Any]]) -> None:
        value = records[0][self.monitor]  # one member: members in a search are refused (cli/app.py)
        if self.trial.report(epoch, value) and epoch < loop.cfg.trainer.epochs:
            self.pruned = Pruned(epoch, self.monitor, value, self.trial.pruner)
