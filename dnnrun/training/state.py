"""The state a resume needs besides the modules, optimizer, schedule and RNGs: one dataclass,
from which a checkpoint's `trainer` entry is written and against which it is checked when read."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class EpochProgress:
    """How far an epoch has got: what a checkpoint written mid-epoch needs to continue it exactly."""

    shuffle_state: torch.Tensor  # the shuffle generator at the epoch's start: it draws the same order again
    batches: int = 0  # optimizer steps taken in this epoch
    loss_sum: float = (
        0.0  # sums over the training examples so far (under torchrun: this rank's, all ranks' in a checkpoint)
    )
    correct: int = 0
    seen: int = 0
    lr: float = 0.0  # the rate of the last step


@dataclasses.dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps of the finished epochs
    best: float | None = None  # the best value of trainer.monitor so far ...
    best_epoch: int | None = None  # ... and its epoch
    bad_epochs: int = 0  # epochs since it last improved (early stopping)
    history: list = dataclasses.field(default_factory=list)  # the metrics.jsonl records
    reused_layers: list = dataclasses.field(default_factory=list)  # transfer: the source's hidden layers kept (1-based)
    reused: list = dataclasses.field(default_factory=list)  # transfer: the parameter names copied from the source
    unfrozen: bool = False  # transfer: the reused layers were unfrozen
    progress: EpochProgress | None = None  # set in a checkpoint written in the middle of an epoch

    def to_dict(self) -> dict[str, Any]:
        """A checkpoint's `trainer` entry: plain data and tensors (weights_only-safe); `progress`
        only in a checkpoint written in the middle of an epoch."""
        entry = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # shallow: saved at once
        if self.progress is None:
            del entry["progress"]
        else:
            entry["progress"] = dataclasses.asdict(self.progress)
        return entry

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> TrainState:
        """From a checkpoint's `trainer` entry, checked beforehand by checkpoint.load(training=True)."""
        progress = entry.get("progress")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in entry.items() if k in fields}
        return cls(**{**values, "progress": EpochProgress(**progress) if progress else None})
