"""Checkpointing and resume.

After every epoch checkpoints/last.pt holds everything a run needs to go on exactly where it was
(weights, optimizer, schedule, gradient scaler, `TrainState`, every RNG state, the config), and
best.pt the same for the best epoch so far. A signal in the middle of an epoch saves last.pt
there. `trainer.resume=auto` (or a path) continues from one, once its config is known to compute
the same thing as this run's.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dnnrun.config.schema import flatten
from dnnrun.errors import UserError
from dnnrun.store import checkpoint
from dnnrun.store.rundir import RESULT_NEUTRAL, RunDir, atomic_write
from dnnrun.training.state import TrainState

if TYPE_CHECKING:
    from dnnrun.config.run_config import RunConfig
    from dnnrun.optim.schedules import Schedule

log = logging.getLogger("dnnrun")

# What a resume may change besides the result-neutral settings: how long the run goes on, when it
# stops and what it does at its end, and the settings of the other modes.
MAY_CHANGE_ON_RESUME = (
    *RESULT_NEUTRAL,
    "trainer.epochs",
    "trainer.early_stopping",
    "trainer.restore_best",
    "mode",
    "lr_find",
    "evaluate",
    "predict",
)


def checkpoint_to_resume(resume: str | None, run: RunDir) -> Path | None:
    """The checkpoint trainer.resume names: None for a fresh start (refused when the directory
    already holds a run's checkpoint), the directory's last.pt for `auto`, or a path."""
    if resume is None:
        if run.last.exists():
            raise UserError(
                f"{run} already holds a checkpoint; continue it with trainer.resume=auto, "
                f"or start a new run in another directory (hydra.run.dir=...)"
            )
        return None
    if resume == "auto":
        if run.last.exists():
            return run.last
        log.warning("trainer.resume=auto: no checkpoint in %s; starting fresh", run.checkpoints)
        return None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise UserError(f"trainer.resume: no checkpoint file at {path}")
    return path


def load_resumable(path: Path, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """The checkpoint to resume from, once it is known to be one and to fit this config."""
    ckpt = checkpoint.load(path, map_location=device, training=True)  # refuses weights-only files too
    changes = config_changes(ckpt["config"], cfg.raw)
    if changes and not cfg.trainer.force_resume:
        raise UserError(
            f"trainer.resume: {path} was trained with another config, and these changes alter the result:\n  - "
            + "\n  - ".join(changes)
            + "\nResume with the checkpoint's settings, or set trainer.force_resume=true to go on anyway."
        )
    for change in changes:
        log.warning("resuming despite a changed setting (trainer.force_resume): %s", change)
    return ckpt


def config_changes(saved: dict[str, Any], now: dict[str, Any], where: str = "the checkpoint") -> list[str]:
    """'key: X in the checkpoint, Y now' for each setting that differs and alters the result."""
    old, new = flatten(saved), flatten(now)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key.endswith(".option"):
            continue  # the name of an option's YAML: a label; the settings it holds are compared
        if old.get(key) != new.get(key) and not any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME):
            changes.append(f"{key}: {old.get(key, '(unset)')!r} in {where}, {new.get(key, '(unset)')!r} now")
    return changes


class Checkpoints:
    """Writes and reads a run's training checkpoints; everything it saves is listed in `_contents`."""

    def __init__(
        self,
        run_dir: RunDir,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        scaler: torch.amp.GradScaler | None,
        shuffle: torch.Generator,
        config: dict[str, Any],
        before_rename=None,
        inputs: dict[str, Any] | None = None,
    ):
        self.run_dir, self.model, self.optimizer, self.schedule = run_dir, model, optimizer, schedule
        self.scaler, self.shuffle, self.config, self.before_rename = scaler, shuffle, config, before_rename
        self.inputs = inputs  # data.Preprocess.to_dict(): what applying the model to new inputs needs

    def _contents(self, state: TrainState) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "trainer": state.to_dict(),
            "rng": checkpoint.rng_state(self.shuffle),
            "config": self.config,
            "inputs": self.inputs,
        }

    def save(self, state: TrainState, improved: bool) -> None:
        """best.pt when the monitored metric improved, then last.pt: one serialization, two atomic
        writes. A crash between the two leaves last.pt an epoch behind best.pt; resuming redoes that
        epoch exactly, so the two agree again."""
        blob = checkpoint.serialize(self._contents(state))
        for path in (self.run_dir.best, self.run_dir.last) if improved else (self.run_dir.last,):
            atomic_write(path, lambda f: f.write(blob), self.before_rename)

    def save_weights(self, path: Path) -> None:
        """The model and the config alone (what evaluate and transfer read), e.g. pretrained.pt."""
        checkpoint.save(path, {"model": self.model.state_dict(), "config": self.config, "inputs": self.inputs})

    def restore(self, ckpt: dict[str, Any], path: Path) -> TrainState:
        """Load a checkpoint into the model, optimizer, schedule, scaler and RNGs; its TrainState.
        A checkpoint from another directory brings its best.pt along."""
        checkpoint.load_into(self.model, ckpt["model"], path)
        checkpoint.load_into(self.optimizer, ckpt["optimizer"], path, "optimizer")
        checkpoint.load_into(self.schedule, ckpt["schedule"], path, "schedule")
        if self.scaler is not None and ckpt.get("scaler"):
            checkpoint.load_into(self.scaler, ckpt["scaler"], path, "gradient scaler")
        checkpoint.restore_rng(ckpt["rng"], self.shuffle)
        best = path.with_name(self.run_dir.best.name)  # the best epoch's checkpoint beside it
        if path.resolve() != self.run_dir.last.resolve() and best.exists():
            self.run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(best, self.run_dir.best)
        state = TrainState.from_dict(ckpt["trainer"])
        log.info("resumed from %s after epoch %d (step %d)", path, state.epoch, state.step)
        return state

    def restore_best(self, state: TrainState, device: torch.device, monitor: str) -> str:
        """At the end of a run: the best epoch's weights into the model, if another epoch was last;
        which weights the model then holds ("best" or "last")."""
        if state.best_epoch in (None, state.epoch):
            return "last"
        if not self.run_dir.best.exists():
            log.warning("no %s to restore the best epoch from; testing the last weights", self.run_dir.best)
            return "last"
        self.model.load_state_dict(checkpoint.load(self.run_dir.best, map_location=device)["model"])
        log.info("restored the weights of epoch %d (best %s)", state.best_epoch, monitor)
        return "best"
