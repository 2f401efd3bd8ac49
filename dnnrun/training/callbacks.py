"""The features the loop calls at its fixed points, Keras- and Lightning-style: each a small object
in the module of its concern, called in the order the loop lists them.

    train_start     training begins, after set-up and resume (`loop.state.step` steps behind it)
    epoch_start     an epoch begins (the engine is in training mode)
    step_start      before a step's forward pass; `edge`: the epoch's first or last step
    after_backward  the gradients as backpropagation made them, before clipping and the update
    step_end        the step's update is done
    epoch_end       the epoch's records are kept (`records`: member index -> metrics.jsonl record)
    train_end       the loop is over, however it ended (before the run's end is recorded)
    state_dict, load_state_dict   its own resumable state, the checkpoint's `callbacks.NAME`

    EarlyStopping (early_stopping.py), Unfreezing (transfer.py), LayerStats (insight/diagnostics.py),
    EpochBar (insight/console.py), Loggers (insight/loggers.py), Checkpoints (checkpointing.py),
    Hook (faults.py: tests act on a run through it)

Explicit calls in a fixed order, not an event bus: early stopping decides before the checkpoint is
written, the fault hook acts after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dnnrun.training.loop import Loop


class Callback:
    """Every hook does nothing here; a callback overrides those it needs. `name`: its entry in the
    checkpoint, when it has state to save."""

    name: str | None = None

    def train_start(self, loop: Loop) -> None:
        pass

    def epoch_start(self, loop: Loop, epoch: int) -> None:
        pass

    def step_start(self, loop: Loop, step: int, edge: bool) -> None:
        pass

    def after_backward(self, loop: Loop, step: int) -> None:
        pass

    def step_end(self, loop: Loop, step: int, epoch: int) -> None:
        pass

    def epoch_end(self, loop: Loop, epoch: int, records: dict[int, dict[str, Any]]) -> None:
        pass

    def train_end(self, loop: Loop) -> None:
        pass

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        pass


class Callbacks:
    """The loop's callbacks, each hook called on each in order."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def train_start(self, loop: Loop) -> None:
        for c in self.callbacks:
            c.train_start(loop)

    def epoch_start(self, loop: Loop, epoch: int) -> None:
        for c in self.callbacks:
            c.epoch_start(loop, epoch)

    def step_start(self, loop: Loop, step: int, edge: bool) -> None:
        for c in self.callbacks:
            c.step_start(loop, step, edge)

    def after_backward(self, loop: Loop, step: int) -> None:
        for c in self.callbacks:
            c.after_backward(loop, step)

    def step_end(self, loop: Loop, step: int, epoch: int) -> None:
        for c in self.callbacks:
            c.step_end(loop, step, epoch)

    def epoch_end(self, loop: Loop, epoch: int, records: dict[int, dict[str, Any]]) -> None:
        for c in self.callbacks:
            c.epoch_end(loop, epoch, records)

    def train_end(self, loop: Loop) -> None:
        for c in self.callbacks:
            c.train_end(loop)

    def state_dict(self) -> dict[str, Any]:
        """The `callbacks` entry of a checkpoint: each named callback's state."""
        return {c.name: state for c in self.callbacks if c.name and (state := c.state_dict()) is not None}

    def load_state_dict(self, entry: dict[str, Any], path: Path) -> None:
        """Each named callback's state, which a checkpoint of this run must hold."""
        from dnnrun.errors import UserError

        for c in self.callbacks:
            if c.name and c.state_dict() is not None:
                if c.name not in entry:
                    raise UserError(f"{path} is not a usable dnnrun checkpoint: it has no 'callbacks.{c.name}' entry")
                c.load_state_dict(entry[c.name], path)
