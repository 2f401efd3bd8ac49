"""Which epoch is best, and early stopping: after each epoch the monitored metric
(trainer.monitor) either improves by more than min_delta (a new best: best.pt is written) or
counts as a bad epoch; `patience` bad epochs in a row stop the member (Keras' EarlyStopping)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dnnrun.training.callbacks import Callback
from dnnrun.training.metrics import better

if TYPE_CHECKING:
    from dnnrun.training.loop import Loop


@dataclasses.dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int | None = None  # epochs without improvement of trainer.monitor before stopping; null: never
    min_delta: float = 0.0  # a smaller change does not count as an improvement


@dataclasses.dataclass
class Best:
    """A member's best value of the monitored metric so far, its epoch, and the epochs since."""

    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0


class EarlyStopping(Callback):
    name = "early_stopping"

    def __init__(self, cfg: EarlyStoppingConfig, monitor: str, members: int):
        self.cfg, self.monitor = cfg, monitor
        self.members = [Best() for _ in range(members)]
        self.improved = [False] * members  # in the epoch that just ended

    def epoch_end(self, loop: Loop, epoch: int, records: dict[int, dict[str, Any]]) -> None:
        self.improved = [False] * len(self.members)
        for k, record in records.items():
            self.improved[k] = self.observe(k, record)

    def observe(self, k: int, record: dict[str, Any]) -> bool:
        """Member k's epoch; whether it is a new best."""
        value, m = record[self.monitor], self.members[k]
        improved = m.best is None or better(self.monitor, value, m.best, self.cfg.min_delta)
        if improved:
            m.best, m.best_epoch, m.bad_epochs = value, record["epoch"], 0
        else:
            m.bad_epochs += 1
        return improved

    def reason(self, k: int) -> str | None:
        """Why member k stops, once patience has run out (also for a resumed run that had stopped;
        a resume may raise the patience)."""
        patience = self.cfg.patience
        if patience is not None and self.members[k].bad_epochs >= patience:
            return f"early stopping: {self.monitor} did not improve for {patience} epochs"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"members": [dataclasses.asdict(m) for m in self.members]}

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        from dnnrun.store import checkpoint

        checkpoint.check_entry(
            path, f"callbacks.{self.name}", state, {"members": checkpoint.ListOf(checkpoint.entries(Best))}
        )
        if len(state["members"]) != len(self.members):
            from dnnrun.errors import UserError

            raise UserError(
                f"{path} holds {len(state['members'])} members' early stopping, this run {len(self.members)}"
            )
        self.members = [Best(**m) for m in state["members"]]
