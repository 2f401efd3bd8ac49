"""The training loop: `run(cfg, run_dir)` trains one model and leaves a complete run directory.

Read `run` top to bottom: set up, maybe resume, then epochs of shuffled mini-batches with a
validation pass, a checkpoint and an early-stopping check after each, and a test pass at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import logging.handlers
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dnnrun import (advice, checkpoint, data as data_mod, diagnostics, distributed, faults, loggers, optim,
                    pretrain, regularizers, transfer)
from dnnrun.activations import ACTIVATIONS
from dnnrun.console import EpochBar, console, print_diagnosis, results_table
from dnnrun.diagnostics import DiagnosticsConfig, Monitor
from dnnrun.errors import Diverged, Interrupted, RunError, UserError
from dnnrun.metrics import MetricsLog, better, describe_device, read_jsonl, versions, write_json
from dnnrun.model import MODELS, count_parameters
from dnnrun.schedules import Schedule
from dnnrun.schema import Problems

if TYPE_CHECKING:
    from dnnrun.config import RunConfig

log = logging.getLogger("dnnrun")


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    patience: int | None = None  # epochs without improvement of trainer.monitor before stopping; null: never
    min_delta: float = 0.0  # a smaller change does not count as an improvement


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    epochs: int = 20
    batch_size: int = 32
    eval_batch_size: int = 1024  # evaluation only: larger is faster and changes nothing
    device: str = "auto"  # auto (CUDA if present, else CPU) | cpu | cuda | cuda:N | mps
    seed: int = 0  # one seed for initialization, shuffling and dropout
    deterministic: bool = False  # deterministic kernels only (slower on GPU)
    amp: bool = False  # mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling)
    clip_value: float | None = None  # clip each gradient element to [-v, v]
    clip_norm: float | None = None  # rescale the gradients when their global L2 norm exceeds this
    monitor: Literal["val/loss", "val/acc"] = "val/loss"  # picks best.pt and drives early stopping
    early_stopping: EarlyStopping = dataclasses.field(default_factory=EarlyStopping)
    restore_best: bool = True  # test (and leave in memory) the best epoch's weights, not the last
    resume: str | None = None  # null: fresh start | auto: last.pt in the run directory | a checkpoint path
    force_resume: bool = False  # resume even when settings that change the result differ from the checkpoint's
    limit_batches: int | None = None  # train on at most this many batches per epoch (debugging)
    detect_anomaly: bool = False  # autograd anomaly detection: names the op that made a NaN (slow)
    progress: bool = True  # Rich progress bar (on terminals only)
    threads: int | None = None  # CPU threads for torch; null: PyTorch's choice (a parallel sweep divides the cores)
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)

    def check(self, problems: Problems, key: str) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "limit_batches", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.add(f"{key}.{name}", f"must be >= 1, got {value}")
        for name in ("clip_value", "clip_norm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.add(f"{key}.{name}", f"must be > 0 or null, got {value}")
        if not 0 <= self.seed < 2**32:  # what numpy's generator takes
            problems.add(f"{key}.seed", f"must be in [0, 2**32), got {self.seed}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            problems.add(f"{key}.device", f"expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        patience = self.early_stopping.patience
        if patience is not None and patience < 1:
            problems.add(f"{key}.early_stopping.patience", f"must be >= 1 or null, got {patience}")
        if self.early_stopping.min_delta < 0:
            problems.add(f"{key}.early_stopping.min_delta", f"must be >= 0, got {self.early_stopping.min_delta}")


# ---------------------------------------------------------------------------------------------
# Set-up helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.rank_world()[1] > 1:
        name = f"cuda:{distributed.local_rank()}"  # under torchrun, each rank on its own GPU
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name}, but no CUDA device is available; use trainer.device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"trainer.device={name}, but there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("trainer.device=mps, but MPS is not available; use trainer.device=auto or cpu")
    return device


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    last = run_dir / "checkpoints" / "last.pt"
    if resume is None:
        if last.exists():
            raise UserError(
                f"{run_dir} already holds a checkpoint; continue it with trainer.resume=auto, "
                f"or start a new run in another directory (hydra.run.dir=...)"
            )
        return None
    if resume == "auto":
        if last.exists():
            return last
        log.warning("trainer.resume=auto: no checkpoint in %s; starting fresh", last.parent)
        return None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise UserError(f"trainer.resume: no checkpoint file at {path}")
    return path


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.are_deterministic_algorithms_enabled() != deterministic:  # the call imports torch._inductor (1.5 s)
        torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS


def mixed_precision(enabled: bool, device: torch.device):
    """(autocast context factory, GradScaler or None). fp16 needs loss scaling; bf16 does not."""
    if not enabled:
        return contextlib.nullcontext, None
    if device.type != "cuda":
        log.warning("trainer.amp=true works on CUDA only; training in float32 on %s", device)
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


# ---------------------------------------------------------------------------------------------
# One epoch, one evaluation


def clip_gradients(params, clip_value: float | None, clip_norm: float | None) -> torch.Tensor | None:
    """Clip by value (each element into [-v, v]), then by norm (rescale if the global L2 norm > n).
    Returns the global norm before clipping by norm, when that is done."""
    if clip_value is None and clip_norm is None:
        return None
    params = [p for p in params if p.grad is not None]
    if clip_value is not None:
        nn.utils.clip_grad_value_(params, clip_value)
    if clip_norm is not None:
        return nn.utils.clip_grad_norm_(params, clip_norm)
    return None


def divergence(model: nn.Module, step: int, what: str, last_update: int) -> Diverged:
    """What to raise for a non-finite loss at `step`. A NaN or infinite gradient under a finite
    loss shows later, in the weights that its update (at step `last_update`) made non-finite: then
    that step is named. (Measuring every gradient on every step cost ~20% at batch 32 on a CPU.)"""
    if all(torch.isfinite(p).all() for p in model.parameters()):
        return Diverged(step, what)
    return Diverged(last_update, "a gradient was NaN or infinite: the update made the weights non-finite")


class StopFlag:
    """SIGINT and SIGTERM during a run. Before training starts they stop it at once (there is
    nothing to save); once training has started (`deferring`) they only set `signum`, and the loop
    finishes its step, writes a checkpoint and stops. Nothing is raised then from inside the
    handler, so a second signal during that write is harmless."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self.deferring = False

    def __call__(self, signum: int, frame) -> None:
        if not self.deferring:
            raise Interrupted(signum)
        self.signum = self.signum or signum

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            yield self
            return
        previous = {sig: signal.signal(sig, self) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclasses.dataclass
class Parts:
    """What an optimizer step works with."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    reg: regularizers.Regularization
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None
    monitor: Monitor
    faults: faults.Faults | None = None
    stop: StopFlag = dataclasses.field(default_factory=StopFlag)
    frozen: list[nn.Module] = dataclasses.field(default_factory=list)  # norm layers kept in eval mode (transfer.freeze)
    forward: nn.Module | None = None  # the model wrapped in DistributedDataParallel under torchrun, else the model
    rank: int = 0
    world: int = 1


@dataclasses.dataclass
class EpochProgress:
    """How far an epoch has got: what a checkpoint written mid-epoch needs to continue it exactly."""

    shuffle_state: torch.Tensor  # the shuffle generator at the epoch's start: it draws the same order again
    batches: int = 0  # optimizer steps taken in this epoch
    loss_sum: float = 0.0  # sums over this rank's training examples so far
    correct: int = 0
    seen: int = 0
    lr: float = 0.0  # the rate of the last step


def train_epoch(
    p: Parts, split: data_mod.Split, tc: TrainerConfig, shuffle: torch.Generator, bar: EpochBar, step: int,
    epoch: int, progress: EpochProgress,
) -> bool:
    """Go on with an epoch over the shuffled training split from `progress`, which it updates;
    `step` counts the optimizer steps of the earlier epochs.

    Returns True when the epoch is complete, False when SIGINT/SIGTERM asked to stop (after the
    current step). Raises Diverged at the first non-finite loss (see `divergence` for gradients).
    """
    model, optimizer = p.model, p.optimizer
    model.train()
    for module in p.frozen:  # frozen batch norm keeps its running statistics
        module.eval()
    predictions, targets = [], []  # compared once at the end: fewer small ops per step
    forward = p.forward or model
    step += progress.batches
    shuffle.set_state(progress.shuffle_state)
    batches = split.batches(tc.batch_size, shuffle, start=progress.batches)  # under torchrun: the same on every rank
    complete = True
    for xb, yb in batches:
        if tc.limit_batches is not None and progress.batches >= tc.limit_batches:
            break
        step += 1
        global_size = len(yb)
        if p.world > 1:  # this rank's slice of the global batch
            xb, yb = xb[p.rank :: p.world], yb[p.rank :: p.world]
        watch = p.monitor.due(step)
        if watch:
            p.monitor.watch_activations()
        with p.autocast():
            logits = forward(xb)
            if p.world == 1:
                loss = objective = F.cross_entropy(logits, yb)
            else:
                # DDP averages the ranks' gradients: this rank's loss sum over the global batch size,
                # times the number of ranks, makes that the gradient of the global batch's mean loss,
                # also when the last global batch leaves a rank few examples or none.
                total = F.cross_entropy(logits, yb, reduction="sum")
                objective = total * (p.world / global_size)
                loss = total / max(len(yb), 1)  # this rank's mean, for the figures
        if p.faults is not None and p.faults.nan_at(step):  # tests' fault injection
            loss = objective = loss * float("nan")
        # Read every step (like Keras' TerminateOnNaN): a NaN must stop the run before it spreads.
        loss_value = loss.item()
        nonfinite, stopping = not math.isfinite(loss_value), bool(p.stop.signum)
        if p.world > 1:  # every rank must stop at the same step, or the others would wait for it for ever
            nonfinite, stopping = (v > 0 for v in distributed.sum_across([float(nonfinite), float(stopping)], xb.device))
        if nonfinite:
            raise divergence(model, step, f"the training loss is {loss_value}", last_update=step - 1)
        penalty = p.reg.penalty(model)  # l1/l2 on the weights: in the gradient, not in the reported loss
        objective = objective if penalty is None else objective + penalty
        optimizer.zero_grad(set_to_none=True)
        if p.scaler is not None:
            p.scaler.scale(objective).backward()
            p.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        else:
            objective.backward()
        if watch:
            p.monitor.before_update()  # the gradients as backpropagation made them, before any clipping
        total_norm = clip_gradients(model.parameters(), tc.clip_value, tc.clip_norm)
        if total_norm is not None and p.scaler is None and not torch.isfinite(total_norm):  # fp16 scaling skips those
            raise Diverged(step, f"the gradient norm is {total_norm.item()}")
        progress.lr = optimizer.param_groups[0]["lr"]
        if p.scaler is not None:
            p.scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
            p.scaler.update()
        else:
            optimizer.step()
        p.reg.after_step(model)  # e.g. max-norm
        if p.schedule.per == "step":
            p.schedule.step()
        if watch:
            p.monitor.record(step, epoch)
        progress.batches += 1
        progress.seen += len(yb)
        progress.loss_sum += loss_value * len(yb)
        predictions.append(logits.detach().argmax(1))
        targets.append(yb)
        bar.step(progress.batches, loss_value, len(yb))
        if p.faults is not None:
            p.faults.at("step", step)
        if stopping:  # SIGINT/SIGTERM before this step: it is done, the caller saves and stops
            complete = False
            break
    if predictions:
        progress.correct += int((torch.cat(predictions) == torch.cat(targets)).sum())
    bar.end_epoch(progress.batches, progress.loss_sum / max(progress.seen, 1))
    return complete


@torch.no_grad()
def evaluate(model: nn.Module, split: data_mod.Split, batch_size: int, autocast) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole split, in evaluation mode."""
    model.eval()
    loss_sum = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), device=split.x.device, dtype=torch.int64)
    for xb, yb in split.batches(batch_size):
        with autocast():
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return (loss_sum / len(split)).item(), (correct / len(split)).item()


# ---------------------------------------------------------------------------------------------
# The run


def run(cfg: RunConfig, run_dir: str | os.PathLike, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train as configured; write metrics, checkpoints, summary and log under run_dir.

    Everything that can refuse the run (device, resume path, the checkpoint and its config) is
    checked before the first write, so a refused run leaves its directory as it was. `on_start`
    runs once the run owns the directory (the CLI writes Hydra's config snapshot there).
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.trainer.device)
    # What is logged before run.log exists (the checks below) is kept for it, and dropped if they refuse the run.
    early = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    log.addHandler(early)
    try:
        ckpt, resume_from, data, source, model_cfg = _prepare(cfg, run_dir, device)
    finally:
        log.removeHandler(early)
    run_dir.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start()
    summary: dict[str, Any] = {"status": "running", "started": _now(), "run_dir": str(run_dir)}
    stop = StopFlag()
    handler = None
    try:
        handler = logging.FileHandler(run_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        early.setTarget(handler)
        early.close()  # flushes into run.log
        with stop.installed():
            return _train(cfg, run_dir, summary, stop, device, ckpt, resume_from, data, source, model_cfg)
    except Diverged:
        raise  # _train has recorded it, with the diagnosis
    except (Interrupted, KeyboardInterrupt) as exc:
        if summary["status"] == "running":  # else _train has recorded it, with the diagnosis
            _finish(run_dir, summary, "interrupted", error=str(exc) or "interrupted")
        raise
    except OSError as exc:  # a file the run writes (metrics, log, plots) could not be written
        failure = RunError(f"cannot write {exc.filename or run_dir}: {exc.strerror or exc}")
        _finish(run_dir, summary, "failed", error=str(failure))
        raise failure from exc
    except Exception as exc:
        _finish(run_dir, summary, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _prepare(cfg: RunConfig, run_dir: Path, device: torch.device):
    """What the run starts from, each part checked before anything is written: the checkpoint to
    resume, the data, the transfer source, and the model's config (with the widths of the
    checkpoint or of the source) whose shapes their weights must fit."""
    resume_from = resolve_resume(cfg.trainer.resume, run_dir)
    ckpt = _resumable(resume_from, cfg, device) if resume_from is not None else None
    data = data_mod.load(cfg.data, device)
    source, model_cfg = None, cfg.model
    if ckpt is not None:  # a resumed run has the reused weights in its checkpoint
        model_cfg = dataclasses.replace(cfg.model, hidden=transfer.source_widths(ckpt["model"]), depth=None, width=None)
    elif cfg.transfer.source:
        source, trained_with = transfer.load_source(cfg.transfer)
        act = (trained_with.get("act") or {}).get("name")
        if act is not None and act != cfg.act.name:  # it fits, but its weights were learned for another unit
            log.warning("transfer.source was trained with act=%s; this run uses act=%s", act, cfg.act.name)
        model_cfg = transfer.model_config(cfg.model, cfg.transfer, source)
    if ckpt is not None or source is not None:
        with torch.device("meta"):  # the model's shapes alone: no memory, no random numbers
            shapes, _ = build_model(cfg, data, model_cfg)
        if ckpt is not None:
            checkpoint.check_fits(shapes, ckpt["model"], resume_from)
        else:
            transfer.check_fits(source, transfer.reused_layers(cfg.transfer, source), data.n_features,
                                {name: t.shape for name, t in shapes.state_dict().items()})
    return ckpt, resume_from, data, source, model_cfg


def _train(
    cfg: RunConfig, run_dir: Path, summary: dict[str, Any], stop: StopFlag, device: torch.device,
    ckpt: dict[str, Any] | None, resume_from: Path | None, data: data_mod.Data, source: dict[str, torch.Tensor] | None,
    model_cfg,
) -> dict[str, Any]:
    tc = cfg.trainer
    wall_start = time.perf_counter()
    for stale in checkpoint.remove_stale_temporaries(run_dir):
        log.warning("removed %s, left by a process that stopped while writing it", stale)
    injected = faults.from_env()
    seed_everything(tc.seed, tc.deterministic)
    torch.autograd.set_detect_anomaly(tc.detect_anomaly)
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    summary["warnings"] = advice.warnings(cfg)
    for message in summary["warnings"]:
        log.warning(message)

    model, reg = build_model(cfg, data, model_cfg)
    rank, world = distributed.rank_world()
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
    model.to(device)
    # Counters and early-stopping state: everything besides modules that a resume must restore.
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "bad_epochs": 0, "history": [],
                             "reused_layers": [], "reused": [], "unfrozen": False}
    if source is not None:
        state["reused_layers"] = transfer.reused_layers(cfg.transfer, source)
        state["reused"] = transfer.reuse(model, source, state["reused_layers"], data.n_features, cfg.transfer.source)
    elif ckpt is not None:
        state["reused_layers"], state["reused"] = ckpt["trainer"]["reused_layers"], ckpt["trainer"]["reused"]
    if state["reused"]:
        summary["transfer"] = transfer.describe(cfg.transfer, state["reused_layers"], model_cfg.widths)
    optimizer = optim.build(cfg.optimizer, model, state["reused"])
    steps_per_epoch = math.ceil(len(data.train) / tc.batch_size)
    if tc.limit_batches is not None:
        steps_per_epoch = min(steps_per_epoch, tc.limit_batches)
    autocast, scaler = mixed_precision(tc.amp, device)
    logger = loggers.build(cfg.logger, run_dir)
    diag_path = run_dir / "diagnostics.jsonl"
    monitor = Monitor(model, ACTIVATIONS[cfg.act.name], tc.diagnostics.every, diag_path, logger)
    p = Parts(model, optimizer, Schedule(cfg.schedule, optimizer, steps_per_epoch, tc.epochs), reg,
              autocast, scaler, monitor, injected, stop, rank=rank, world=world)
    shuffle = torch.Generator().manual_seed(tc.seed)
    probe = data.val.x[:512]  # a fixed batch for the activation snapshots

    ckpt_dir = run_dir / "checkpoints"
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    snapshots_path = run_dir / "activations.json"
    if ckpt is not None:
        state = _resume(ckpt, resume_from, p, shuffle, ckpt_dir)
        snapshots = json.loads(snapshots_path.read_text()) if snapshots_path.exists() else {}
    else:
        if cfg.pretrain.name != "none":
            summary["pretrain"] = pretrain.run(cfg.pretrain, model, data.unlabeled, data.shape, tc.seed)
            checkpoint.save(ckpt_dir / "pretrained.pt", {"model": model.state_dict(), "config": cfg.raw})
        snapshots = {"start": diagnostics.snapshot(model, probe)}  # where supervised training starts
    reused = state["reused"]
    frozen = bool(reused) and cfg.transfer.freeze and not state["unfrozen"]
    if frozen:
        transfer.set_frozen(model, reused, True)
        p.frozen = transfer.frozen_modules(model, state["reused_layers"], reused)
    if world > 1:  # wrapped last: DDP starts every rank from rank 0's (pretrained, resumed) weights
        p.forward = _ddp(model, device)
    metrics.rewrite(state["history"])
    diagnostics.truncate(diag_path, state["step"] + state.get("progress", {}).get("batches", 0))

    summary.update(
        parameters=count_parameters(model),
        device=describe_device(device),
        threads=torch.get_num_threads(),
        processes=world,
        data={"train": len(data.train), "val": len(data.val), "test": len(data.test),
              "features": data.n_features, "classes": data.n_classes},
    )
    write_json(run_dir / "summary.json", summary)
    log.info(
        "%s: %d train / %d val / %d test examples, %d features, %d classes; %s parameters on %s",
        cfg.data.name, len(data.train), len(data.val), len(data.test), data.n_features, data.n_classes,
        f"{summary['parameters']:,}", summary["device"],
    )

    patience = tc.early_stopping.patience
    stop_reason = diverged = interrupted = None
    if patience is not None and state["bad_epochs"] >= patience:  # a resumed run that had stopped early
        stop_reason = f"early stopping: {tc.monitor} did not improve for {patience} epochs"
    stop.deferring = True  # from here on a signal lets the current step finish and is saved
    try:
        with EpochBar(tc.progress, tc.epochs) as bar:
            for epoch in range(state["epoch"] + 1, tc.epochs + 1):
                if stop_reason:
                    break
                if stop.signum:  # between epochs checkpoints/last.pt is already current
                    raise Interrupted(stop.signum)
                if frozen and not transfer.is_frozen(cfg.transfer, epoch - 1):
                    transfer.set_frozen(model, reused, False)
                    frozen, p.frozen = False, []
                    p.schedule.scale_reused(cfg.transfer.unfreeze_lr_factor)  # saved with the schedule's state
                    state["unfrozen"] = True
                    if world > 1:  # DDP must now also average the unfrozen parameters' gradients
                        p.forward = _ddp(model, device)
                    log.info("transfer: reused layers unfrozen for epoch %d, their learning rate x %g",
                             epoch, cfg.transfer.unfreeze_lr_factor)
                if world > 1:  # other dropout masks on every rank, the same after a resume
                    torch.manual_seed(hash((tc.seed, rank, epoch)) % 2**63)
                epoch_start = time.perf_counter()
                # An epoch that a checkpoint stopped in the middle of goes on from there.
                progress = EpochProgress(**state.pop("progress")) if state.get("progress") else \
                    EpochProgress(shuffle_state=shuffle.get_state())
                if rank > 0:  # a mid-epoch checkpoint holds the sums over all ranks: rank 0 carries them
                    progress.loss_sum, progress.correct, progress.seen = 0.0, 0, 0
                bar.start_epoch(epoch, steps_per_epoch, done=progress.batches)
                if not train_epoch(p, data.train, tc, shuffle, bar, state["step"], epoch, progress):
                    progress.loss_sum, progress.correct, progress.seen = distributed.sum_across(
                        [progress.loss_sum, progress.correct, progress.seen], device)
                    state["progress"] = dataclasses.asdict(progress)
                    _save_checkpoints(ckpt_dir, p, state, shuffle, cfg.raw, improved=False)
                    log.warning("stopped by %s during epoch %d, after step %d: checkpoints/last.pt continues from "
                                "there (trainer.resume=auto)", signal.Signals(stop.signum).name, epoch,
                                state["step"] + progress.batches)
                    raise Interrupted(stop.signum)
                state["step"] += progress.batches
                loss_sum, correct, seen = distributed.sum_across([progress.loss_sum, progress.correct, progress.seen],
                                                                 device)
                train_loss, train_acc, lr = loss_sum / seen, correct / seen, progress.lr
                val_loss, val_acc = evaluate(model, data.val, tc.eval_batch_size, autocast)
                if not math.isfinite(val_loss):
                    raise divergence(model, state["step"], f"the validation loss is {val_loss}", last_update=state["step"])
                record = {
                    "epoch": epoch,
                    "step": state["step"],
                    "train/loss": train_loss,
                    "train/acc": train_acc,
                    "val/loss": val_loss,
                    "val/acc": val_acc,
                    "lr": lr,  # the rate of this epoch's last step
                    "time/epoch_s": time.perf_counter() - epoch_start,
                }
                if p.schedule.per == "epoch":
                    p.schedule.step(record)

                improved = state["best"] is None or better(tc.monitor, record[tc.monitor], state["best"],
                                                           tc.early_stopping.min_delta)
                if improved:
                    state.update(best=record[tc.monitor], best_epoch=epoch, bad_epochs=0)
                else:
                    state["bad_epochs"] += 1
                state["epoch"] = epoch
                state["history"].append(record)
                metrics.append(record)
                logger.epoch(record)
                _save_checkpoints(ckpt_dir, p, state, shuffle, cfg.raw, improved)
                if injected is not None:
                    injected.at("epoch", epoch)
                log.info(
                    "epoch %d/%d  train/loss %.4f  train/acc %.4f  val/loss %.4f  val/acc %.4f  lr %.3g%s",
                    epoch, tc.epochs, train_loss, train_acc, val_loss, val_acc, lr, "  *" if improved else "",
                )
                if patience is not None and state["bad_epochs"] >= patience:
                    stop_reason = f"early stopping: {tc.monitor} did not improve for {patience} epochs"
                    log.info(stop_reason)
        if stop.signum:
            raise Interrupted(stop.signum)
    except Diverged as exc:
        diverged = exc
        monitor.detach()
        kept = (f"checkpoints/last.pt (epoch {state['epoch']}) is untouched" if state["epoch"]
                else "no epoch had finished, so there is no checkpoint")
        log.error("%s; the run stops here: %s", exc, kept)
    except Interrupted as exc:  # checkpoints/last.pt holds where it stopped; the diagnosis still helps
        interrupted = exc
        monitor.detach()

    # End of the run, whatever ended it: test, snapshots, diagnosis, plots, summary.
    test = None
    if diverged is None and interrupted is None:
        weights = "last"
        best_file = ckpt_dir / "best.pt"
        if tc.restore_best and state["best_epoch"] not in (None, state["epoch"]):
            if best_file.exists():
                model.load_state_dict(checkpoint.load(best_file, map_location=device)["model"])
                weights = "best"
                log.info("restored the weights of epoch %d (best %s)", state["best_epoch"], tc.monitor)
            else:
                log.warning("no %s to restore the best epoch from; testing the last weights", best_file)
        test_loss, test_acc = evaluate(model, data.test, tc.eval_batch_size, autocast)
        test = {"test/loss": test_loss, "test/acc": test_acc, "weights": weights}
        logger.epoch({"step": state["step"], "test/loss": test_loss, "test/acc": test_acc})
        snapshots["end"] = diagnostics.snapshot(model, probe)
    write_json(snapshots_path, snapshots)
    logger.close()

    history = state["history"]
    found = diagnostics.diagnose(history, read_jsonl(diag_path), data.n_classes)
    if diverged is not None:
        found.insert(0, f"training diverged at step {diverged.step}: {diverged.what}")
    best = next((r for r in history if r["epoch"] == state["best_epoch"]), {})
    summary.update(
        epochs_run=state["epoch"],
        steps=state["step"],
        stop_reason=stop_reason,
        final=history[-1] if history else {},
        best={"monitor": tc.monitor, "value": state["best"], **best},
        test=test,
        diagnosis=found,
        wall_time_s=time.perf_counter() - wall_start,
    )
    if tc.diagnostics.plots and rank == 0:
        from dnnrun.plots import plot_run  # matplotlib is imported only when plots are drawn

        plot_run(run_dir)
    if diverged is not None:
        summary["diverged_at_step"] = diverged.step
        _finish(run_dir, summary, "diverged", error=str(diverged))
        print_diagnosis(found)
        raise diverged
    if interrupted is not None:
        _finish(run_dir, summary, "interrupted", error=str(interrupted))
        print_diagnosis(found)
        raise interrupted
    if stop.signum:  # never report an interrupted run as completed
        raise Interrupted(stop.signum)
    _finish(run_dir, summary, "completed")
    console.print(results_table(summary))
    print_diagnosis(found)
    log.info("run directory: %s", run_dir)
    return summary


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable parameters (wrapping also broadcasts rank 0's weights)."""
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def build_model(cfg: RunConfig, data: data_mod.Data, model_cfg=None) -> tuple[nn.Module, regularizers.Regularization]:
    """The model the config describes, for this data (`model_cfg` replaces cfg.model, e.g. for transfer)."""
    reg = regularizers.combine(cfg.regularizer)
    model_cfg = model_cfg or cfg.model
    model = MODELS[model_cfg.name](model_cfg, data.n_features, data.n_classes, cfg.act, cfg.norm, cfg.init, reg)
    return model, reg


def _resumable(path: Path, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
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


def _resume(ckpt: dict[str, Any], path: Path, p: Parts, shuffle: torch.Generator, ckpt_dir: Path) -> dict[str, Any]:
    """Load a checkpoint into the parts and the RNGs; returns the trainer state it holds."""
    checkpoint.load_into(p.model, ckpt["model"], path)
    checkpoint.load_into(p.optimizer, ckpt["optimizer"], path, "optimizer")
    checkpoint.load_into(p.schedule, ckpt["schedule"], path, "schedule")
    if p.scaler is not None and ckpt.get("scaler"):
        checkpoint.load_into(p.scaler, ckpt["scaler"], path, "gradient scaler")
    checkpoint.restore_rng(ckpt["rng"], shuffle)
    if path.resolve() != (ckpt_dir / "last.pt").resolve() and (path.parent / "best.pt").exists():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path.parent / "best.pt", ckpt_dir / "best.pt")
    state = ckpt["trainer"]
    log.info("resumed from %s after epoch %d (step %d)", path, state["epoch"], state["step"])
    return state


def _save_checkpoints(ckpt_dir: Path, p: Parts, state: dict, shuffle: torch.Generator, config: dict, improved: bool) -> None:
    """best.pt when the monitored metric improved, then last.pt: one serialization, two atomic
    writes. A crash between the two leaves last.pt an epoch behind best.pt; resuming redoes that
    epoch exactly, so the two agree again."""
    before_rename = p.faults.on_save if p.faults is not None else None
    blob = checkpoint.serialize({
        "model": p.model.state_dict(),
        "optimizer": p.optimizer.state_dict(),
        "schedule": p.schedule.state_dict(),
        "scaler": p.scaler.state_dict() if p.scaler is not None else None,
        "trainer": state,
        "rng": checkpoint.rng_state(shuffle),
        "config": config,
    })
    for name in ("best.pt", "last.pt") if improved else ("last.pt",):
        checkpoint.atomic_write(ckpt_dir / name, lambda f: f.write(blob), before_rename)


# Settings that may change between a checkpoint and its resume without changing what is computed.
MAY_CHANGE_ON_RESUME = (
    "trainer.epochs", "trainer.resume", "trainer.force_resume", "trainer.progress", "trainer.threads", "trainer.device",
    "trainer.eval_batch_size", "trainer.detect_anomaly", "trainer.diagnostics", "trainer.early_stopping",
    "trainer.restore_best", "logger", "mode", "lr_find", "evaluate", "outputs", "data.root", "data.download",
)


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: X in the checkpoint, Y now' for each setting that differs and alters the result."""
    old, new = _flatten(saved), _flatten(now)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key) and not any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME):
            changes.append(f"{key}: {old.get(key, '(unset)')!r} in the checkpoint, {new.get(key, '(unset)')!r} now")
    return changes


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _finish(run_dir: Path, summary: dict[str, Any], status: str, error: str | None = None) -> None:
    summary.update(status=status, finished=_now(), versions=versions())
    if error is not None:
        summary["error"] = error
    try:
        write_json(run_dir / "summary.json", summary)
    except RunError as exc:
        if status == "completed":
            raise
        log.error("%s", exc)  # already failing (a full disk?): the first error is the one to report


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
