"""Checkpointing and resume.

After every epoch checkpoints/last.pt holds everything a run needs to go on exactly where it was
(the engine's weights, optimizer, schedule and gradient scaler, the loop's `TrainState`, the
callbacks' states, every RNG state, the config: store/checkpoint.py), and a single run's best.pt
the same for its best epoch so far (members keep their best weights in last.pt and write their
own best.pt and last.pt when the run ends). A signal in the middle of an epoch saves last.pt
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
from dnnrun.training.callbacks import Callback
from dnnrun.training.state import TrainState

if TYPE_CHECKING:
    from dnnrun.config.run_config import RunConfig
    from dnnrun.training.early_stopping import EarlyStopping
    from dnnrun.training.loop import Loop

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
        left = [p.name for p in (run.best, run.metrics) if p.exists() and p.stat().st_size]
        if left:  # killed before last.pt was written, or it was deleted: a fresh start would overwrite the run
            raise UserError(
                f"trainer.resume=auto: {run} holds a run ({', '.join(left)}) but no checkpoints/last.pt to go on "
                f"from; go on from its best epoch in another directory (trainer.resume={run.best} "
                f"hydra.run.dir=NEW), or remove {run} to start it again"
            )
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
    saved, seeds = [m["seed"] for m in ckpt["trainer"]["members"]], list(cfg.trainer.seeds or [cfg.trainer.seed])
    if len(saved) != len(seeds) or (len(seeds) > 1 and saved != seeds):
        what = f"the members of trainer.seeds={saved}" if len(saved) > 1 else "a single run"
        now = f"trainer.seeds={seeds}" if len(seeds) > 1 else "a single run"
        raise UserError(f"trainer.resume: {path} holds {what}; this is {now}")
    return ckpt


# Settings added after checkpoints were first written, each with the value that does what a
# checkpoint without it did: a config that lacks one (a saved one, a YAML of its own) reads as having it.
ADDED_SETTINGS = {"data.val_from": "random"}


def config_changes(saved: dict[str, Any], now: dict[str, Any], where: str = "the checkpoint") -> list[str]:
    """'key: X in the checkpoint, Y now' for each setting that differs and alters the result."""
    old, new = ADDED_SETTINGS | flatten(saved), ADDED_SETTINGS | flatten(now)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key.endswith(".option"):
            continue  # the name of an option's YAML: a label; the settings it holds are compared
        if old.get(key) != new.get(key) and not any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME):
            changes.append(f"{key}: {old.get(key, '(unset)')!r} in {where}, {new.get(key, '(unset)')!r} now")
    return changes


class Checkpoints(Callback):
    """Writes and reads a run's training checkpoints (`contents` lists what they hold): after every
    epoch, where a signal stopped the run, and, for members, their own files at the end. Its own
    state: the members' best weights (a single run keeps them in best.pt)."""

    name = "checkpoints"

    def __init__(
        self,
        run_dir: RunDir,
        members: list[RunDir],
        config: dict[str, Any],
        inputs: dict[str, Any] | None,
        early_stopping: EarlyStopping,
        before_rename=None,
    ):
        self.run_dir, self.members, self.config, self.inputs = run_dir, members, config, inputs
        self.early_stopping, self.before_rename = early_stopping, before_rename
        self.best: list[dict[str, torch.Tensor] | None] = [None] * len(members)  # members' (K > 1)

    def epoch_end(self, loop: Loop, epoch: int, records: dict[int, dict[str, Any]]) -> None:
        improved = [k for k in records if self.early_stopping.improved[k]]
        if len(self.members) > 1:
            for k in improved:
                self.best[k] = loop.engine.weights(k)
        self.save(loop, best=len(self.members) == 1 and bool(improved))

    def contents(self, loop: Loop) -> dict[str, Any]:
        return {
            **loop.engine.state_dict(),  # model, optimizer, schedule, scaler
            "trainer": loop.state.to_dict(),
            "callbacks": loop.callbacks.state_dict(),
            "rng": checkpoint.rng_state(loop.shuffles),
            "config": self.config,
            "inputs": self.inputs,
        }

    def save(self, loop: Loop, best: bool = False) -> None:
        """last.pt, and best.pt first when a single run's monitored metric improved: one
        serialization, two atomic writes. A crash between the two leaves last.pt an epoch behind
        best.pt; resuming redoes that epoch exactly, so the two agree again."""
        blob = checkpoint.serialize(self.contents(loop))
        for path in (self.run_dir.best, self.run_dir.last) if best else (self.run_dir.last,):
            atomic_write(path, lambda f: f.write(blob), self.before_rename)

    def last_saved(self, device: torch.device) -> dict[str, Any] | None:
        """The run's last checkpoint, where a diverged member's weights go back to (None before one)."""
        if not self.run_dir.last.exists():
            return None
        return checkpoint.load(self.run_dir.last, map_location=device, training=True)

    def state_dict(self) -> dict[str, Any] | None:
        return {"best": self.best} if len(self.members) > 1 else None

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        checkpoint.check_entry(path, f"callbacks.{self.name}", state, {"best": list})
        if len(state["best"]) != len(self.members):
            raise UserError(
                f"{path} holds the best weights of {len(state['best'])} members, this run has {len(self.members)}"
            )
        self.best = state["best"]

    def restore(self, loop: Loop, ckpt: dict[str, Any], path: Path) -> TrainState:
        """Load a checkpoint into the engine, the callbacks and the RNGs; its TrainState. A
        checkpoint from another directory brings its best.pt along."""
        loop.engine.load_state_dict(ckpt, path)
        loop.callbacks.load_state_dict(ckpt["callbacks"], path)
        checkpoint.restore_rng(ckpt["rng"], loop.shuffles)
        best = path.with_name(self.run_dir.best.name)  # the best epoch's checkpoint beside it
        if path.resolve() != self.run_dir.last.resolve() and best.exists():
            self.run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(best, self.run_dir.best)
        state = TrainState.from_dict(ckpt["trainer"])
        log.info("resumed from %s %s", path, state.position())
        return state

    def restore_best(self, loop: Loop, k: int) -> str:
        """At the end of a run: member k's best epoch's weights into the engine, if another epoch
        was its last; which weights it then holds ("best" or "last")."""
        member, best_epoch = loop.state.members[k], self.early_stopping.members[k].best_epoch
        if best_epoch in (None, member.epoch):
            return "last"
        if len(self.members) > 1:
            weights = self.best[k]
        elif self.run_dir.best.exists():
            weights = checkpoint.load(self.run_dir.best, map_location=loop.device)["model"]
        else:
            log.warning("no %s to restore the best epoch from; testing the last weights", self.run_dir.best)
            return "last"
        loop.engine.load_weights(k, weights)
        log.info("restored the weights of epoch %d (best %s)%s", best_epoch, self.early_stopping.monitor,
                 f" of member seed={member.seed}" if len(self.members) > 1 else "")  # fmt: skip
        return "best"

    def write_members(self, loop: Loop, last: list[dict[str, torch.Tensor] | None]) -> None:
        """Each member's own checkpoints (weights only, as a single run's hold its weights: what
        evaluate, predict, transfer and export read): last.pt, the weights of its last trained
        epoch (`last[k]`, None for a member that never finished one), and best.pt."""
        from dnnrun.training.members import member_config

        for k, (run, member) in enumerate(zip(self.members, loop.state.members)):
            config = member_config(self.config, member.seed)
            for path, weights in ((run.last, last[k]), (run.best, self.best[k])):
                if weights is not None:
                    checkpoint.save(path, {"model": weights, "config": config, "inputs": self.inputs})
