"""The loop's own state, what a resume needs besides the engine (weights, optimizer, schedule), the
callbacks' states and the random streams: dataclasses, from which a checkpoint's `trainer` entry
is written and against which it is checked when read (store/checkpoint.py)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

# A field whose checkpoint entry has another type than the field (`stored_as`): a member's history
# is one JSON text there (16 members' histories are thousands of numbers, each pickled on its own
# otherwise: the bulk of a checkpoint's time).
JSON_TEXT = {"stored_as": str}


@dataclasses.dataclass
class MemberState:
    """One member: a single run's only member, or the member of trainer.seeds with this seed."""

    seed: int
    epoch: int = 0  # the epochs it trained (a member that stopped early or diverged trains no more)
    step: int = 0  # its optimizer steps at the end of them
    history: list = dataclasses.field(default_factory=list, metadata=JSON_TEXT)  # its metrics.jsonl records
    diverged: str | None = None  # what was not finite (the training loss is nan) ...
    diverged_at: int | None = None  # ... at this step

    def to_dict(self) -> dict[str, Any]:
        entry = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        entry["history"] = json.dumps(self.history)
        return entry

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> MemberState:
        return cls(**{**entry, "history": json.loads(entry["history"])})


@dataclasses.dataclass
class MemberProgress:
    """How far a member has got in an epoch, in a checkpoint written in its middle."""

    shuffle_state: torch.Tensor  # its shuffle generator at the epoch's start: it draws the same order again
    loss_sum: float = 0.0  # sums over its training examples so far (under torchrun: all ranks')
    correct: int = 0
    seen: int = 0
    lr: float = 0.0  # the rate of its last step


@dataclasses.dataclass
class EpochProgress:
    batches: int = 0  # steps taken in this epoch
    members: list[MemberProgress] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps of the finished epochs
    members: list[MemberState] = dataclasses.field(default_factory=list)
    progress: EpochProgress | None = None  # set in a checkpoint written in the middle of an epoch

    def position(self) -> str:
        """Where the run is, as the logs say it: after an epoch, or within one after a step."""
        if self.progress is None:
            return f"after epoch {self.epoch} (step {self.step})"
        return f"during epoch {self.epoch + 1}, after step {self.step + self.progress.batches}"

    def to_dict(self) -> dict[str, Any]:
        """A checkpoint's `trainer` entry: plain data and tensors (weights_only-safe); `progress`
        only in a checkpoint written in the middle of an epoch."""
        entry: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "members": [m.to_dict() for m in self.members]}
        if self.progress is not None:
            entry["progress"] = {
                "batches": self.progress.batches,
                "members": [dataclasses.asdict(m) for m in self.progress.members],
            }
        return entry

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> TrainState:
        """From a checkpoint's `trainer` entry, checked beforehand by checkpoint.load(training=True)."""
        progress = entry.get("progress")
        if progress is not None:
            progress = EpochProgress(progress["batches"], [MemberProgress(**m) for m in progress["members"]])
        members = [MemberState.from_dict(m) for m in entry["members"]]
        return cls(epoch=entry["epoch"], step=entry["step"], members=members, progress=progress)
