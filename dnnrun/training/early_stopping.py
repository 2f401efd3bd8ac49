"""Which epoch is best, and early stopping: after each epoch the monitored metric
(trainer.monitor) either improves by more than min_delta (a new best: best.pt is written) or
counts as a bad epoch; `patience` bad epochs in a row stop the run (Keras' EarlyStopping)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from dnnrun.training.metrics import better

if TYPE_CHECKING:
    from dnnrun.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int | None = None  # epochs without improvement of trainer.monitor before stopping; null: never
    min_delta: float = 0.0  # a smaller change does not count as an improvement


class EarlyStopping:
    def __init__(self, cfg: EarlyStoppingConfig, monitor: str):
        self.cfg, self.monitor = cfg, monitor

    def end_epoch(self, state: TrainState, record: dict[str, Any]) -> bool:
        """Record the epoch's value in `state`; whether it is a new best."""
        value = record[self.monitor]
        improved = state.best is None or better(self.monitor, value, state.best, self.cfg.min_delta)
        if improved:
            state.best, state.best_epoch, state.bad_epochs = value, record["epoch"], 0
        else:
            state.bad_epochs += 1
        return improved

    def reason(self, state: TrainState) -> str | None:
        """Why the run stops early, once patience has run out (also for a resumed run that had stopped)."""
        patience = self.cfg.patience
        if patience is not None and state.bad_epochs >= patience:
            return f"early stopping: {self.monitor} did not improve for {patience} epochs"
        return None
