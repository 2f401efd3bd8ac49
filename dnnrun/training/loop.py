"""Training: `run(cfg, run_dir)` trains one model and leaves a complete run directory.

    run            checks what the run starts from (`prepare`), takes the directory, records how it ended
    Trainer()      setup: seeds, model, optimizer, schedule, and the features the loop calls
    Trainer.fit    the loop: epochs, steps, validation, decisions
    Trainer.finish the end, whatever ended the run: best weights, test, diagnosis, plots, summary

Each feature the loop uses is a small object from its own module, called at fixed points:
checkpoints and resume (resume.Checkpoints), early stopping (early_stopping), unfreezing reused
layers (transfer.Unfreezing), per-layer statistics (diagnostics.LayerStats), the progress bar
(console.EpochBar), loggers, signals (signals.StopFlag) and the test hook (faults.Hook).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import logging.handlers
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from dnnrun.data.augment import Augment
from dnnrun.data.datasets import Data, Split
from dnnrun.errors import Diverged, Interrupted, RunError, UserError
from dnnrun.insight import advice, diagnosis, diagnostics, loggers
from dnnrun.insight.console import EpochBar, console, print_diagnosis, results_table
from dnnrun.models import zoo
from dnnrun.models.network import DROPOUTS, count_parameters
from dnnrun.models.registry import fitting_config
from dnnrun.optim import optimizers as optim
from dnnrun.optim.schedules import Schedule
from dnnrun.store import checkpoint
from dnnrun.store.rundir import RunDir, now
from dnnrun.techniques.activations import ACTIVATIONS
from dnnrun.techniques.norms import is_batch_norm
from dnnrun.training import checkpointing as resume, distributed, metrics, pretrain, runtime, transfer
from dnnrun.training.early_stopping import EarlyStopping
from dnnrun.training.faults import Hook
from dnnrun.training.signals import StopFlag
from dnnrun.training.state import EpochProgress, TrainState

if TYPE_CHECKING:
    from dnnrun.config.run_config import RunConfig

log = logging.getLogger("dnnrun")


def run(
    cfg: RunConfig, run_dir: str | os.PathLike, on_start: Callable[[], None] | None = None, hook: Hook | None = None
) -> dict[str, Any]:
    """Train as configured; write metrics, checkpoints, summary and log under run_dir.

    Everything that can refuse the run (device, resume path, the checkpoint and its config, the
    data, the transfer source) is checked before the first write, so a refused run leaves its
    directory as it was. `on_start` runs once the run owns the directory (the CLI writes Hydra's
    config snapshot there); `hook` is called at fixed points of the loop (tests)."""
    run_dir = RunDir(run_dir)
    runtime.warm_up()
    device = runtime.resolve_device(cfg.trainer.device)
    # What the checks log before run.log exists is kept for it, and dropped if they refuse the run.
    early = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    with logging_to(early):
        start = prepare(cfg, run_dir, device)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start()
    summary: dict[str, Any] = {"status": "running", "started": now(), "run_dir": str(run_dir)}
    stop = StopFlag()
    with _recording(run_dir, summary), run_log(run_dir, early), stop.installed():
        trainer = Trainer(cfg, run_dir, device, start, summary, stop, hook or Hook())
        ending = None
        try:
            trainer.fit()
        except (Diverged, Interrupted) as exc:
            ending = exc
        return trainer.finish(ending)


@dataclasses.dataclass
class Start:
    """What a run starts from, each part checked before anything is written."""

    data: Data
    model_cfg: Any  # cfg.model, with the widths of the checkpoint or of the transfer source
    checkpoint: dict[str, Any] | None = None  # the checkpoint to resume ...
    resume_from: Path | None = None  # ... and its file
    source: dict[str, torch.Tensor] | None = None  # the transfer source's weights (model=zoo: model.weights)


def prepare(cfg: RunConfig, run_dir: RunDir, device: torch.device) -> Start:
    """The checkpoint to resume, the data, the transfer source, and the model's config, whose
    shapes their weights must fit (checked on the meta device: no memory, no random numbers)."""
    resume_from = resume.checkpoint_to_resume(cfg.trainer.resume, run_dir)
    ckpt = resume.load_resumable(resume_from, cfg, device) if resume_from is not None else None
    start = Start(runtime.load_data(cfg.data, cfg.model, device), cfg.model, ckpt, resume_from)
    if ckpt is not None:  # a resumed run has the reused weights in its checkpoint
        start.model_cfg = fitting_config(cfg.model, ckpt["model"])
    elif cfg.model.name == "zoo" and cfg.model.weights:
        start.source = zoo.load_weights(cfg.model)
    elif cfg.transfer.source:
        start.source, trained_with = transfer.load_source(cfg.transfer)
        act = (trained_with.get("act") or {}).get("name")
        if act is not None and act != cfg.act.name:  # it fits, but its weights were learned for another unit
            log.warning("transfer.source was trained with act=%s; this run uses act=%s", act, cfg.act.name)
        start.model_cfg = transfer.model_config(cfg.model, cfg.transfer, start.source)
    with torch.device("meta"):
        shapes, _ = runtime.build_model(cfg, start.data, start.model_cfg)
    if (too_big := runtime.memory_problem(shapes, cfg, device, start.data.shape)) is not None:
        raise UserError(too_big)
    if ckpt is not None or start.source is not None:
        if ckpt is not None:
            checkpoint.check_fits(shapes, ckpt["model"], resume_from)
        elif cfg.model.name == "zoo":
            zoo.fitting(start.source, shapes, cfg.transfer.layers, cfg.model.arch)
        else:
            transfer.check_fits(
                start.source,
                transfer.reused_layers(cfg.transfer, start.source),
                {name: t.shape for name, t in shapes.state_dict().items()},
            )
    return start


class Trainer:
    """One run's model, optimizer and features, from setup to finish."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: RunDir,
        device: torch.device,
        start: Start,
        summary: dict[str, Any],
        stop: StopFlag,
        hook: Hook,
    ):
        tc = cfg.trainer
        self.cfg, self.run_dir, self.device, self.data, self.summary, self.stop, self.hook = (
            cfg,
            run_dir,
            device,
            start.data,
            summary,
            stop,
            hook,
        )
        self.wall_start = time.perf_counter()
        for stale in run_dir.remove_stale_temporaries():
            log.warning("removed %s, left by a process that stopped while writing it", stale)
        runtime.seed_everything(tc.seed, tc.deterministic)
        torch.autograd.set_detect_anomaly(tc.detect_anomaly)
        if tc.threads is not None:
            torch.set_num_threads(tc.threads)
        summary["warnings"] = advice.warnings(cfg)
        for message in summary["warnings"]:
            log.warning(message)

        self.rank, self.world = distributed.rank_world()
        self.model, self.reg = runtime.build_model(cfg, self.data, start.model_cfg)
        if self.world > 1 and device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # batch statistics over the global batch
        self.channels_last = runtime.channels_last(tc.channels_last, device, self.model)
        self.model.to(device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.state = self._initial_state(start)
        self.optimizer = optim.build(cfg.optimizer, self.model, self.state.reused)
        batches = math.ceil(len(self.data.train) / tc.batch_size)
        self.steps_per_epoch = min(batches, tc.limit_batches or batches)
        self.schedule = Schedule(cfg.schedule, self.optimizer, self.steps_per_epoch, tc.epochs)
        self.autocast, self.scaler = runtime.mixed_precision(tc.amp, device, runtime.has_conv(self.model))
        self.shuffle = torch.Generator().manual_seed(tc.seed)
        self.checkpoints = resume.Checkpoints(
            run_dir,
            self.model,
            self.optimizer,
            self.schedule,
            self.scaler,
            self.shuffle,
            cfg.raw,
            hook.before_rename,
            self.data.preprocess.to_dict() if self.data.preprocess else None,
        )
        self.early_stopping = EarlyStopping(tc.early_stopping, tc.monitor)
        self.logger = loggers.build(cfg.logger, run_dir)
        self.layer_stats = diagnostics.LayerStats(
            self.model, ACTIVATIONS[cfg.act.name], tc.diagnostics.every, run_dir, self.logger
        )
        self.bar = EpochBar(tc.progress, tc.epochs)
        self.augment = Augment(cfg.data.augment, tc.seed) if cfg.data.augment else None
        self.probe = self.data.val.x[:512]  # a fixed batch for the activation snapshots
        self.train_eval = train_eval_subset(cfg, self.data.train, self.model)
        if start.checkpoint is not None:
            self.state = self.checkpoints.restore(start.checkpoint, start.resume_from)
            self.snapshots = run_dir.read_activations()
        else:
            if cfg.pretrain.name != "none":
                summary["pretrain"] = pretrain.run(
                    cfg.pretrain, self.model, self.data.unlabeled, self.data.shape, tc.seed
                )
                self.checkpoints.save_weights(run_dir.pretrained)
            self.snapshots = {"start": diagnostics.snapshot(self.model, self.probe)}  # where supervised training starts
        self.unfreezing = transfer.Unfreezing(cfg.transfer, self.model, self.state, self.schedule)
        self.forward = self._forward()
        self._predicted: list[tuple[torch.Tensor, torch.Tensor]] = []  # this epoch's (predictions, labels)
        # The files that run on from the checkpoint hold exactly its epochs and steps.
        run_dir.rewrite_metrics(self.state.history)
        run_dir.truncate_diagnostics(self.state.step + (self.state.progress.batches if self.state.progress else 0))
        self._record_start()

    def _initial_state(self, start: Start) -> TrainState:
        """A fresh state, with what transfer.source gives the model (or gave it: a resumed run)."""
        state, cfg = TrainState(), self.cfg
        if start.source is not None and cfg.model.name == "zoo":
            state.reused, state.reused_layers = zoo.reuse(
                self.model, start.source, cfg.transfer.layers, cfg.model.arch, cfg.model.weights
            )
        elif start.source is not None:
            state.reused_layers = transfer.reused_layers(cfg.transfer, start.source)
            state.reused = transfer.reuse(self.model, start.source, state.reused_layers, cfg.transfer.source)
        elif start.checkpoint is not None:
            state.reused_layers = start.checkpoint["trainer"]["reused_layers"]
            state.reused = start.checkpoint["trainer"]["reused"]
        if state.reused:
            self.summary["transfer"] = transfer.summary(cfg, state.reused_layers, start.model_cfg.widths)
        return state

    def _forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What the training forward pass runs: under torchrun, DistributedDataParallel over the
        trainable parameters (wrapping also broadcasts rank 0's weights), else the model itself;
        through torch.compile with trainer.compile=true."""
        module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        return runtime.Compiled(module) if self.cfg.trainer.compile else module

    def _record_start(self) -> None:
        data = self.data
        self.summary.update(
            parameters=count_parameters(self.model),
            device=runtime.device_name(self.device),
            threads=torch.get_num_threads(),
            processes=self.world,
            data={
                "train": len(data.train),
                "val": len(data.val),
                "test": len(data.test),
                "features": data.n_features,
                "classes": data.n_classes,
            },
        )
        self.run_dir.write_summary(self.summary)
        log.info("run directory: %s (on %s)", self.run_dir, self.summary["device"])
        log.info("%s", self.cfg.options())
        log.info(
            "%s: %d train / %d val / %d test examples, %d features, %d classes; %s parameters on %s",
            self.cfg.data.name,
            len(data.train),
            len(data.val),
            len(data.test),
            data.n_features,
            data.n_classes,
            f"{self.summary['parameters']:,}",
            self.summary["device"],
        )

    # -----------------------------------------------------------------------------------------
    # The loop

    def fit(self) -> None:
        """Epochs of shuffled mini-batches, one update each, then a validation pass, the checkpoint
        and the early-stopping decision. Raises Diverged at the first non-finite loss, and
        Interrupted once SIGINT or SIGTERM stopped the run (after saving where it stopped)."""
        state, tc = self.state, self.cfg.trainer
        self.stop.deferring = True  # from here on a signal lets the current step finish and is saved
        self.hook.start(self.model, state.step + (state.progress.batches if state.progress else 0))
        with self.bar:
            for epoch in range(state.epoch + 1, tc.epochs + 1):
                if self.early_stopping.reason(state) or self.stop.signum:
                    break
                if self.unfreezing.start_epoch(epoch, state) and self.world > 1:
                    self.forward = self._forward()  # DDP must now also average the unfrozen parameters' gradients
                began = time.perf_counter()
                progress = self._start_epoch(epoch)
                for xb, yb in self.data.train.batches(tc.batch_size, self.shuffle, start=progress.batches):
                    if progress.batches == self.steps_per_epoch:  # trainer.limit_batches
                        break
                    step = state.step + progress.batches + 1
                    self.layer_stats.before_step(step, edge=progress.batches in (0, self.steps_per_epoch - 1))
                    stopping = self.step(xb, yb, step, progress)
                    self.layer_stats.after_step(step, epoch)
                    self.bar.step(progress)
                    self.hook.after_step(step)
                    if stopping:
                        self._stop_mid_epoch(epoch, progress)
                state.step += progress.batches
                record = self._validate(epoch, progress, began)
                self.schedule.end_epoch(record)
                improved = self.early_stopping.end_epoch(state, record)
                state.epoch = epoch
                state.history.append(record)
                self.run_dir.append_metrics(record)
                self.logger.epoch(record)
                self.checkpoints.save(state, improved)
                self.hook.end_epoch(epoch)
                evaluated = f"  train_eval/loss {record['train_eval/loss']:.4f}" if "train_eval/loss" in record else ""
                log.info(
                    "epoch %d/%d  train/loss %.4f  train/acc %.4f%s  val/loss %.4f  val/acc %.4f  lr %.3g%s",
                    epoch,
                    tc.epochs,
                    record["train/loss"],
                    record["train/acc"],
                    evaluated,
                    record["val/loss"],
                    record["val/acc"],
                    record["lr"],
                    "  *" if improved else "",
                )
        if self.stop.signum:
            raise Interrupted(self.stop.signum)

    def step(self, xb: torch.Tensor, yb: torch.Tensor, step: int, progress: EpochProgress) -> bool:
        """One update on a mini-batch (under torchrun, on this rank's slice of the global batch):
        forward, loss, backward, clipping, optimizer step, constraints, schedule. Adds to the
        epoch's progress; returns whether SIGINT/SIGTERM asked to stop (after this step). Raises
        Diverged at a non-finite loss or gradient norm."""
        tc, global_size = self.cfg.trainer, len(yb)
        if self.augment is not None:  # the global batch, as one process would see it
            xb = self.augment(xb, step)
        if self.world > 1:
            xb, yb = xb[self.rank :: self.world], yb[self.rank :: self.world]
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.forward(xb)
            if self.world == 1:
                loss = objective = F.cross_entropy(logits, yb)
            else:
                # DDP averages the ranks' gradients: this rank's loss sum over the global batch size,
                # times the number of ranks, makes that the gradient of the global batch's mean loss,
                # also when the last global batch leaves a rank few examples or none.
                total = F.cross_entropy(logits, yb, reduction="sum")
                objective = total * (self.world / global_size)
                loss = total / max(len(yb), 1)  # this rank's mean, for the figures
        # Read every step (like Keras' TerminateOnNaN): a NaN must stop the run before it spreads.
        loss_value = loss.item()
        nonfinite, stopping = not math.isfinite(loss_value), bool(self.stop.signum)
        if self.world > 1:  # every rank must stop at the same step, or the others would wait for it for ever
            nonfinite, stopping = (
                v > 0 for v in distributed.sum_across([float(nonfinite), float(stopping)], xb.device)
            )
        if nonfinite:
            raise divergence(self.model, step, f"the training loss is {loss_value}", last_update=step - 1)
        penalty = self.reg.penalty(self.model)  # l1/l2 on the weights: in the gradient, not in the reported loss
        objective = objective if penalty is None else objective + penalty
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(objective).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        else:
            objective.backward()
        self.layer_stats.after_backward()  # the gradients as backpropagation made them, before any clipping
        total_norm = clip_gradients(self.model.parameters(), tc.clip_value, tc.clip_norm)
        if (
            total_norm is not None and self.scaler is None and not torch.isfinite(total_norm)
        ):  # fp16 scaling skips those
            raise Diverged(step, f"the gradient norm is {total_norm.item()}")
        progress.lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.reg.after_step(self.model)  # e.g. max-norm
        self.schedule.after_step()
        progress.batches += 1
        progress.seen += len(yb)
        progress.loss_sum += loss_value * len(yb)
        self._predicted.append((logits.detach().argmax(1), yb))  # compared once per epoch: fewer small ops per step
        return stopping

    def _start_epoch(self, epoch: int) -> EpochProgress:
        """The epoch's progress, from where a mid-epoch checkpoint stopped or from its start."""
        state = self.state
        progress, state.progress = state.progress or EpochProgress(shuffle_state=self.shuffle.get_state()), None
        if self.rank > 0:  # a mid-epoch checkpoint holds the sums over all ranks: rank 0 carries them
            progress.loss_sum, progress.correct, progress.seen = 0.0, 0, 0
        if self.world > 1:  # other dropout masks on every rank, the same after a resume
            torch.manual_seed(hash((self.cfg.trainer.seed, self.rank, epoch)) % 2**63)
        self.shuffle.set_state(progress.shuffle_state)  # draws the epoch's order (again, after a resume)
        self.unfreezing.train_mode()
        self.bar.start_epoch(epoch, self.steps_per_epoch, progress)
        return progress

    def _count_correct(self, progress: EpochProgress) -> None:
        if self._predicted:
            predicted, labels = (torch.cat(t) for t in zip(*self._predicted))
            progress.correct += int((predicted == labels).sum())
            self._predicted.clear()

    def _validate(self, epoch: int, progress: EpochProgress, began: float) -> dict[str, Any]:
        """The epoch's record: the training figures (summed over the ranks) and a validation pass."""
        self._count_correct(progress)
        self.bar.end_epoch(progress)
        loss_sum, correct, seen = distributed.sum_across(
            [progress.loss_sum, progress.correct, progress.seen], self.device
        )
        val_loss, val_acc = metrics.loss_and_accuracy(
            self.model, self.data.val, self.cfg.trainer.eval_batch_size, self.autocast
        )
        if not math.isfinite(val_loss):
            step = self.state.step
            raise divergence(self.model, step, f"the validation loss is {val_loss}", last_update=step)
        record = {
            "epoch": epoch,
            "step": self.state.step,
            "train/loss": loss_sum / seen,
            "train/acc": correct / seen,
            "val/loss": val_loss,
            "val/acc": val_acc,
            "lr": progress.lr,  # the rate of this epoch's last step
            "time/epoch_s": time.perf_counter() - began,
        }
        if self.train_eval is not None:  # after the epoch's clock: its cost is its own figure
            started = time.perf_counter()
            record["train_eval/loss"], record["train_eval/acc"] = metrics.loss_and_accuracy(
                self.model, self.train_eval, self.cfg.trainer.eval_batch_size, self.autocast
            )
            record["time/eval_train_s"] = time.perf_counter() - started
        return record

    def _stop_mid_epoch(self, epoch: int, progress: EpochProgress) -> NoReturn:
        """A signal during an epoch: its step is done; last.pt records where the epoch is, so that
        trainer.resume=auto goes on from that step exactly."""
        self._count_correct(progress)
        progress.loss_sum, progress.correct, progress.seen = distributed.sum_across(
            [progress.loss_sum, progress.correct, progress.seen], self.device
        )
        self.state.progress = progress
        self.checkpoints.save(self.state, improved=False)
        log.warning(
            "stopped by %s during epoch %d, after step %d: checkpoints/last.pt continues from there "
            "(trainer.resume=auto)",
            signal.Signals(self.stop.signum).name,
            epoch,
            self.state.step + progress.batches,
        )
        raise Interrupted(self.stop.signum)

    # -----------------------------------------------------------------------------------------
    # The end

    def finish(self, ending: Diverged | Interrupted | None) -> dict[str, Any]:
        """The end of the run, whatever ended it: best weights and the test pass (a run that
        completed), activation snapshots, the diagnosis, plots and the summary. Raises `ending`
        once it is recorded."""
        state, tc, summary = self.state, self.cfg.trainer, self.summary
        self.layer_stats.detach()  # a monitored step that raised leaves its hooks attached
        if ending is None and self.stop.signum:  # never report an interrupted run as completed
            ending = Interrupted(self.stop.signum)
        test = None
        if ending is None:
            weights = self.checkpoints.restore_best(state, self.device, tc.monitor) if tc.restore_best else "last"
            test_loss, test_acc = metrics.loss_and_accuracy(
                self.model, self.data.test, tc.eval_batch_size, self.autocast
            )
            test = {"test/loss": test_loss, "test/acc": test_acc, "weights": weights}
            self.logger.epoch({"step": state.step, "test/loss": test_loss, "test/acc": test_acc})
            self.snapshots["end"] = diagnostics.snapshot(self.model, self.probe)
        elif isinstance(ending, Diverged):
            kept = (
                f"checkpoints/last.pt (epoch {state.epoch}) is untouched"
                if state.epoch
                else "no epoch had finished, so there is no checkpoint"
            )
            log.error("%s; the run stops here: %s", ending, kept)
        self.run_dir.write_activations(self.snapshots)

        found = diagnosis.diagnose(state.history, self.run_dir.read_diagnostics(), self.data.n_classes)
        if isinstance(ending, Diverged):
            found.insert(0, f"training diverged at step {ending.step}: {ending.what}")
            summary["diverged_at_step"] = ending.step
        best = next((r for r in state.history if r["epoch"] == state.best_epoch), {})
        summary.update(
            epochs_run=state.epoch,
            steps=state.step,
            stop_reason=self.early_stopping.reason(state),
            final=state.history[-1] if state.history else {},
            best={"monitor": tc.monitor, "value": state.best, **best},
            test=test,
            diagnosis=found,
            wall_time_s=time.perf_counter() - self.wall_start,
        )
        self.logger.summary(self.cfg, summary)  # TensorBoard's hparams: the options with the final, best, test metrics
        self.logger.close()
        if summary["stop_reason"]:
            log.info(summary["stop_reason"])
        if tc.diagnostics.plots and self.rank == 0:
            from dnnrun.insight.plots import plot_run  # matplotlib is imported only when plots are drawn

            plot_run(self.run_dir)
        if ending is not None:
            status = "diverged" if isinstance(ending, Diverged) else "interrupted"
            finish_summary(self.run_dir, summary, status, error=str(ending))
            print_diagnosis(found)
            raise ending
        finish_summary(self.run_dir, summary, "completed")
        console.print(results_table(summary))
        print_diagnosis(found)
        log.info("run directory: %s", self.run_dir)
        return summary


def train_eval_subset(cfg: RunConfig, train: Split, model: nn.Module) -> Split | None:
    """trainer.eval_train: a fixed random subset of the training set (the same every epoch, after a
    resume and for every seed), evaluated like the validation split; None when off. auto: when
    dropout or batch norm make the running training figures incomparable with validation's."""
    on = cfg.trainer.eval_train
    if on == "auto":
        on = any(isinstance(m, DROPOUTS) or is_batch_norm(m) for m in model.modules())
    if not on:
        return None
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.data.split_seed + 2))
    idx = pick[: cfg.trainer.eval_train_size].to(train.x.device)
    return Split(train.x[idx], train.y[idx])


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


def finish_summary(run_dir: RunDir, summary: dict[str, Any], status: str, error: str | None = None) -> None:
    """How the run ended, in summary.json. A run already failing (a full disk?) keeps its first
    error: a second one in writing the summary is logged, not raised."""
    summary.update(status=status, finished=now(), versions=runtime.versions())
    if error is not None:
        summary["error"] = error
    try:
        run_dir.write_summary(summary)
    except RunError as exc:
        if status == "completed":
            raise
        log.error("%s", exc)


@contextlib.contextmanager
def _recording(run_dir: RunDir, summary: dict[str, Any]):
    """A run that ends in an exception that finish() did not see is recorded too."""
    try:
        yield
    except Diverged:
        raise  # finish() has recorded it, with the diagnosis
    except (Interrupted, KeyboardInterrupt) as exc:
        if summary["status"] == "running":  # else finish() has recorded it
            finish_summary(run_dir, summary, "interrupted", error=str(exc) or "interrupted")
        raise
    except OSError as exc:  # a file the run writes (metrics, log, plots) could not be written
        failure = RunError(f"cannot write {exc.filename or run_dir}: {exc.strerror or exc}")
        finish_summary(run_dir, summary, "failed", error=str(failure))
        raise failure from exc
    except Exception as exc:
        finish_summary(run_dir, summary, "failed", error=f"{type(exc).__name__}: {exc}")
        raise


@contextlib.contextmanager
def logging_to(handler: logging.Handler):
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


@contextlib.contextmanager
def run_log(run_dir: RunDir, early: logging.handlers.MemoryHandler):
    """run.log, starting with what was logged before it existed."""
    handler = logging.FileHandler(run_dir.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    early.setTarget(handler)
    early.close()  # flushes into run.log
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
