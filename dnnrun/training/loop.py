"""The training loop: `run(cfg, run_dir)` trains one model, or K members together
(trainer.seeds), and leaves a complete run directory.

    run          checks what the run starts from (setup.prepare), takes the directory, records how it ended
    Loop()       set-up: the engine (setup.build), the state, the callbacks, a checkpoint to resume
    Loop.fit     the loop: epochs, steps, the epoch's end; what ended it early, if anything
    Loop.finish  the end, whatever ended the run: best weights, test, diagnosis, plots, summaries

A single run and the members share every line here; what differs is the engine (engine.py): a
module's (module_engine.py) or the members' stacked one (members.py). Each feature is a callback
(callbacks.py) called at fixed points: early stopping, unfreezing reused layers, per-layer
statistics, the progress bar, loggers, checkpoints, and the test hook (faults.Hook).
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
from typing import TYPE_CHECKING, Any

import torch

from dnnrun.data.augment import Augment
from dnnrun.data.datasets import Split
from dnnrun.errors import Diverged, Interrupted, Pruned, RunError
from dnnrun.insight import advice, diagnosis, diagnostics, loggers
from dnnrun.insight.console import EpochBar, Running, console, print_diagnosis, results_table
from dnnrun.models.network import DROPOUTS, count_parameters
from dnnrun.store.rundir import RunDir, now
from dnnrun.techniques.activations import ACTIVATIONS
from dnnrun.techniques.norms import is_batch_norm
from dnnrun.training import distributed, members, runtime, setup
from dnnrun.training.callbacks import Callbacks
from dnnrun.training.checkpointing import Checkpoints
from dnnrun.training.early_stopping import EarlyStopping
from dnnrun.training.engine import Step
from dnnrun.training.faults import Hook
from dnnrun.training.pruning import Pruning, Trial
from dnnrun.training.signals import StopFlag
from dnnrun.training.state import EpochProgress, MemberProgress, MemberState, TrainState
from dnnrun.training.transfer import Unfreezing

if TYPE_CHECKING:
    from dnnrun.config.run_config import RunConfig

log = logging.getLogger("dnnrun")

# Steps between two readings of the losses where reading one waits for the device (CUDA): a
# divergence is seen at most this many steps late, and always before a checkpoint is written.
CHECK_EVERY = 32


def run(
    cfg: RunConfig,
    run_dir: str | os.PathLike,
    on_start: Callable[[], None] | None = None,
    hook: Hook | None = None,
    trial: Trial | None = None,
) -> dict[str, Any]:
    """Train as configured; write metrics, checkpoints, summary and log under run_dir; return the
    summary. Raises Diverged, Interrupted or Pruned, once recorded, for a run that ended so.

    Everything that can refuse the run (device, resume path, the checkpoint and its config, the
    data, the transfer source, the memory) is checked before the first write, so a refused run
    leaves its directory as it was. `on_start` runs once the run owns the directory (the CLI writes
    Hydra's config snapshot there); `hook` is called at fixed points of the loop (tests); `trial`:
    the search's trial this run is, told each epoch's monitored value (pruning.py)."""
    run_dir = RunDir(run_dir)
    runtime.warm_up()
    device = runtime.resolve_device(cfg.trainer.device)
    # What the checks log before run.log exists is kept for it, and dropped if they refuse the run.
    early = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    with logging_to(early):
        start = setup.prepare(cfg, run_dir, device)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start()
    summary: dict[str, Any] = {"status": "running", "started": now(), "run_dir": str(run_dir)}
    stop = StopFlag()
    with _recording(run_dir, summary), run_log(run_dir, early), stop.installed():
        loop = Loop(cfg, run_dir, device, start, summary, stop, hook or Hook(), trial)
        ending = loop.fit()
        summary = loop.finish(ending)
    if ending is not None:
        raise ending
    return summary


class Tally:
    """An epoch's running sums for each member (loss times examples, correct predictions,
    examples) and the steps whose losses have not been looked at yet. Where reading a loss costs
    nothing (the engine's `guard`: the CPU) each step's is read at once; on a GPU they stay on the
    device and are read every CHECK_EVERY steps and at the epoch's end."""

    def __init__(self, progress: EpochProgress, eager: bool):
        self.eager, self.start = eager, progress  # where this process took the epoch up
        self.loss_sum = [m.loss_sum for m in progress.members]
        self.correct = [m.correct for m in progress.members]
        self.seen = [m.seen for m in progress.members]
        self.batches = progress.batches
        self.steps = 0  # taken in this process
        self._loss: torch.Tensor | None = None  # (K,) summed on the device (not eager)
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (step, loss, norm) not yet read
        self._predicted: list[tuple[torch.Tensor, torch.Tensor]] = []  # compared once per epoch

    def add(self, step: int, out: Step) -> list[tuple[int, int, str]]:
        """A step's figures; the members found not finite so far: (member, step, what)."""
        n = out.labels.shape[-1]  # each member's examples (under torchrun: this rank's)
        self.batches, self.steps = self.batches + 1, self.steps + 1
        self._predicted.append((out.predicted, out.labels))
        for k in range(len(self.seen)):
            self.seen[k] += n
        if self.eager:
            losses = out.loss.reshape(-1).tolist()
            for k, value in enumerate(losses):
                self.loss_sum[k] += value * n
            if not out.skipped:
                return []
            norms = out.norm.reshape(-1).tolist() if out.norm is not None else None
            return [(k, step, _what(losses[k], norms[k] if norms else None)) for k in out.skipped]
        # in float64 as the host's sums (MPS has no float64)
        weighted = out.loss.reshape(-1).to(torch.float32 if out.loss.device.type == "mps" else torch.float64) * n
        self._loss = weighted if self._loss is None else self._loss + weighted
        self._pending.append((step, out.loss, out.norm))
        return self.check() if len(self._pending) >= CHECK_EVERY else []

    def check(self) -> list[tuple[int, int, str]]:
        """Read the pending steps' losses (one wait for the device): each member's first step whose
        loss or gradient norm was not finite."""
        if not self._pending:
            return []
        steps = [s for s, _, _ in self._pending]
        losses = torch.stack([loss.reshape(-1) for _, loss, _ in self._pending]).tolist()
        norms = None
        if self._pending[0][2] is not None:
            norms = torch.stack([norm.reshape(-1) for _, _, norm in self._pending]).tolist()
        self._pending.clear()
        found = {}
        for i, step in enumerate(steps):
            for k, value in enumerate(losses[i]):
                norm = norms[i][k] if norms else None
                if k not in found and not (math.isfinite(value) and (norm is None or math.isfinite(norm))):
                    found[k] = (k, step, _what(value, norm))
        return list(found.values())

    def read(self) -> None:
        """The sums on the host: the device's loss sums, the predictions compared."""
        if self._loss is not None:
            for k, value in enumerate(self._loss.tolist()):
                self.loss_sum[k] += value
            self._loss = None
        if self._predicted:
            predicted, labels = (torch.cat(t, dim=-1) for t in zip(*self._predicted))
            hits = (predicted == labels).reshape(len(self.seen), -1).sum(1).tolist()
            self._predicted.clear()
            for k, h in enumerate(hits):
                self.correct[k] += h

    def lr(self, engine, k: int) -> float:
        """The rate member k's last step used: the engine's, or the saved one when this process
        took no step of the epoch (a resume at its very end)."""
        return engine.lr(k) if self.steps else self.start.members[k].lr

    def running(self) -> Running:
        """The epoch so far for the progress bar, the mean over the members (a read of the device)."""
        loss = sum(v for v in self.loss_sum if math.isfinite(v))  # a diverged member's is not
        if self._loss is not None:
            loss += float(torch.where(self._loss.isfinite(), self._loss, 0).sum())
        return Running(self.batches, self.seen[0], loss / len(self.seen))


def _what(loss: float, norm: float | None) -> str:
    return f"the training loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"


class Loop:
    """One run's engine, state and callbacks, from set-up to finish."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: RunDir,
        device: torch.device,
        start: setup.Start,
        summary: dict[str, Any],
        stop: StopFlag,
        hook: Hook,
        trial: Trial | None = None,
    ):
        tc = cfg.trainer
        self.cfg, self.run_dir, self.device, self.data, self.summary, self.stop = (
            cfg, run_dir, device, start.data, summary, stop,
        )  # fmt: skip
        self.wall_start = time.perf_counter()
        for stale in run_dir.remove_stale_temporaries():
            log.warning("removed %s, left by a process that stopped while writing it", stale)
        summary["warnings"] = advice.warnings(cfg)
        for message in summary["warnings"]:
            log.warning(message)
        seeds = setup.seeds(tc)
        self.k = len(seeds)
        self.dirs = [run_dir] if self.k == 1 else [RunDir(run_dir.path / "members" / f"seed_{s}") for s in seeds]
        self.rank, self.world = distributed.rank_world()
        self.steps_per_epoch = setup.steps_per_epoch(tc, len(self.data.train))
        self.engine, reuse = setup.build(cfg, start, device, self.steps_per_epoch, summary, run_dir)
        self.state = TrainState(members=[MemberState(s) for s in seeds])
        self.shuffles = [torch.Generator().manual_seed(s) for s in seeds]
        self.augments = [Augment(cfg.data.augment, s) for s in seeds] if cfg.data.augment else None
        self.probe = self.data.val.x[:512]  # a fixed batch for the activation snapshots
        plots = tc.diagnostics.plots
        self.plots = self.rank == 0 and (plots is True or (plots == "auto" and self.k == 1))
        self.snapshotted = self.k == 1 or self.plots  # members': for their plots only (16 members: 32 passes)
        self.train_eval = train_eval_subset(cfg, self.data.train, self.engine.member_module(0))
        self.tally: Tally | None = None  # the running epoch's (made at its start)

        self.early_stopping = EarlyStopping(tc.early_stopping, tc.monitor, self.k)
        self.loggers = loggers.Loggers(cfg.logger, self.dirs)
        inputs = self.data.preprocess.to_dict() if self.data.preprocess else None
        self.checkpoints = Checkpoints(run_dir, self.dirs, cfg.raw, inputs, self.early_stopping, hook.before_rename)
        self.pruning = Pruning(trial, tc.monitor) if trial is not None else None
        features = [Unfreezing(cfg.transfer, reuse), self.early_stopping, self.pruning]  # in the order they are called
        if every := diagnostics_every(cfg, self.engine):
            module, unit = self.engine.module, ACTIVATIONS[cfg.act.name]
            features.append(diagnostics.LayerStats(module, unit, every, run_dir, self.loggers.each[0]))
        self.callbacks = Callbacks(
            [*filter(None, features), EpochBar(tc.progress, tc.epochs), self.loggers, self.checkpoints, hook]
        )
        if start.checkpoint is not None:
            self.state = self.checkpoints.restore(self, start.checkpoint, start.resume_from)
            self.snapshots = [d.read_activations() for d in self.dirs]
        else:  # where supervised training starts
            self.snapshots = [{"start": self._snapshot(k)} if self.snapshotted else {} for k in range(self.k)]
        # The files that run on from the checkpoint hold exactly its epochs and steps.
        for d, member in zip(self.dirs, self.state.members):
            d.path.mkdir(parents=True, exist_ok=True)
            d.rewrite_metrics(member.history)
        progress = self.state.progress
        if self.k == 1:  # the per-layer statistics are a module's
            run_dir.truncate_diagnostics(self.state.step + (progress.batches if progress else 0))
        self._record_start()

    def _record_start(self) -> None:
        data, seeds = self.data, [m.seed for m in self.state.members]
        module = self.engine.member_module(0)
        self.summary.update(
            parameters=count_parameters(module),
            device=runtime.device_name(self.device),
            threads=torch.get_num_threads(),
            processes=self.world,
            data={"train": len(data.train), "val": len(data.val), "test": len(data.test),
                  "features": data.n_features, "classes": data.n_classes},
        )  # fmt: skip
        if self.k > 1:
            self.summary["seeds"] = seeds
        self.run_dir.write_summary(self.summary)
        members = f"{self.k} members: trainer.seed={','.join(map(str, seeds))}, " if self.k > 1 else ""
        log.info("run directory: %s (%son %s)", self.run_dir, members, self.summary["device"])
        log.info("%s", self.cfg.options())
        log.info(
            "%s: %d train / %d val / %d test examples, %d features, %d classes; %s parameters%s on %s",
            self.cfg.data.name, len(data.train), len(data.val), len(data.test), data.n_features, data.n_classes,
            f"{self.summary['parameters']:,}", f" in each of {self.k} members" if self.k > 1 else "",
            self.summary["device"],
        )  # fmt: skip

    # -----------------------------------------------------------------------------------------
    # The loop

    def active(self) -> list[int]:
        """The members that train on: neither diverged nor stopped early (nor pruned)."""
        if self.pruning is not None and self.pruning.pruned is not None:
            return []
        return [
            k for k, m in enumerate(self.state.members) if m.diverged is None and self.early_stopping.reason(k) is None
        ]

    def fit(self) -> Diverged | Interrupted | Pruned | None:
        """Epochs of shuffled mini-batches, one update each, then validation, the epoch's records,
        checkpoint and decisions. Returns what ended the run early: Diverged (a single run's first
        non-finite loss, or the last member's), Interrupted (SIGINT or SIGTERM, once where it
        stopped is saved), Pruned (a search's pruner stopped the trial), or None."""
        state, tc = self.state, self.cfg.trainer
        self.stop.deferring = True  # from here on a signal lets the current step finish and is saved
        self.callbacks.train_start(self)
        self.engine.refresh()  # the forward pass, once the trained parameters are known (DDP)
        try:
            for epoch in range(state.epoch + 1, tc.epochs + 1):
                active = self.active()
                if not active or self.stop.signum:
                    break
                ending = self._epoch(epoch, active)
                if ending is not None:
                    return ending
        finally:
            self.callbacks.train_end(self)
        if self.stop.signum:
            return Interrupted(self.stop.signum)
        if all(m.diverged for m in state.members):  # members: the last of them diverged
            return Diverged(max(m.diverged_at for m in state.members), "every member diverged")
        return self.pruning.pruned if self.pruning is not None else None

    def _epoch(self, epoch: int, active: list[int]) -> Diverged | Interrupted | None:
        state = self.state
        began = time.perf_counter()
        orders = self._start_epoch(epoch)
        last = self.steps_per_epoch - 1
        for b in range(self.tally.batches, self.steps_per_epoch):
            step = state.step + b + 1
            xb, yb = self._batch(orders, b, step)
            self.callbacks.step_start(self, step, b in (0, last))
            out = self.engine.step(xb, yb, active, lambda: self.callbacks.after_backward(self, step),
                                   bool(self.stop.signum))  # fmt: skip
            found = self.tally.add(step, out)
            if found and (ending := self._diverged(found, active)):
                return ending
            self.callbacks.step_end(self, step, epoch)
            if out.stopping or (self.world == 1 and self.stop.signum):
                return self._stop_mid_epoch(active)
        if (found := self.tally.check()) and (ending := self._diverged(found, active)):
            return ending
        self.tally.read()
        state.step += self.tally.batches
        records = self._records(epoch, active, began)
        for k in [k for k in records if not math.isfinite(records[k]["val/loss"])]:
            what = f"the validation loss is {records.pop(k)['val/loss']}"
            if ending := self._diverged([(k, state.step, what)], active, last_update=state.step):
                return ending
        if not records:
            return None
        self.engine.end_epoch(records)  # the schedules that count epochs
        state.epoch, state.progress = epoch, None
        for k, record in records.items():
            member = state.members[k]
            member.history.append(record)
            member.epoch, member.step = epoch, state.step
            self.dirs[k].append_metrics(record, durable=self.k == 1)  # members': the run's checkpoint is durable
        self.callbacks.epoch_end(self, epoch, records)  # early stopping, the checkpoint, loggers, the test hook
        self._log_epoch(epoch, records)
        return None

    def _start_epoch(self, epoch: int) -> torch.Tensor:
        """The epoch's progress, from where a mid-epoch checkpoint stopped or from its start; each
        member's order of the training examples: (N,), or (K, N) for members."""
        state = self.state
        progress = state.progress or EpochProgress(0, [MemberProgress(g.get_state()) for g in self.shuffles])
        state.progress = None
        if self.rank > 0:  # a mid-epoch checkpoint holds the sums over all ranks: rank 0 carries them
            progress.members = [dataclasses.replace(m, loss_sum=0.0, correct=0, seen=0) for m in progress.members]
        if self.world > 1:  # other dropout masks on every rank, the same after a resume
            torch.manual_seed(hash((self.cfg.trainer.seed, self.rank, epoch)) % 2**63)
        orders = []
        for g, m in zip(self.shuffles, progress.members):
            g.set_state(m.shuffle_state)  # draws the epoch's order (again, after a resume)
            orders.append(torch.randperm(len(self.data.train), generator=g))
        self.tally = Tally(progress, eager=self.engine.guard)
        self.engine.train()
        self.callbacks.epoch_start(self, epoch)
        return (orders[0] if self.k == 1 else torch.stack(orders)).to(self.data.train.x.device)

    def _batch(self, orders: torch.Tensor, b: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch b of the epoch: (B, ...) examples, or (K, B, ...), each member's own; augmented
        with draws fixed by (the member's seed, the step)."""
        bs = self.cfg.trainer.batch_size
        idx = orders[..., b * bs : (b + 1) * bs]
        xb, yb = self.data.train.x[idx], self.data.train.y[idx]
        if self.augments is not None:  # the global batch, as one process would see it
            if self.k == 1:
                xb = self.augments[0](xb, step)
            else:
                xb = torch.stack([augment(x, step) for augment, x in zip(self.augments, xb)])
        return xb, yb

    def _diverged(
        self, found: list[tuple[int, int, str]], active: list[int], last_update: int | None = None
    ) -> Diverged | None:
        """Members found not finite at a step: a single run ends there (Diverged); a member of
        several stops, its weights back to the run's last checkpoint, and the others go on (Diverged
        once none is left). A non-finite loss under weights that the previous update made
        non-finite names that update's step, where the loss was read before any update (the CPU)."""
        for k, step, what in found:
            if k not in active:
                continue
            exact = self.engine.guard or last_update is not None  # the weights as the non-finite loss saw them
            if self.k == 1 and exact and not self.engine.weights_finite(k):
                step, what = (
                    step - 1 if last_update is None else last_update,
                    ("a gradient was NaN or infinite: the update made the weights non-finite"),
                )
            member = self.state.members[k]
            member.diverged, member.diverged_at = what, step
            active.remove(k)
            if self.k == 1:
                return Diverged(step, what)
            log.warning("member seed=%d diverged at step %d (%s); the others go on", member.seed, step, what)
            self.engine.retire(k, self.checkpoints.last_saved(self.device))
        if not active:
            return Diverged(max(m.diverged_at or 0 for m in self.state.members), "every member diverged")
        return None

    def _records(self, epoch: int, active: list[int], began: float) -> dict[int, dict[str, Any]]:
        """The training members' metrics.jsonl records of the epoch: the training figures (summed
        over the ranks), a validation pass, and with trainer.eval_train the training subset in
        evaluation mode (times: each member's share)."""
        tc, tally = self.cfg.trainer, self.tally
        totals = distributed.sum_across([*tally.loss_sum, *tally.correct, *tally.seen], self.device)
        loss_sum, correct, seen = (totals[i * self.k : (i + 1) * self.k] for i in range(3))
        lrs = [tally.lr(self.engine, k) for k in range(self.k)]
        val_loss, val_acc = self.engine.evaluate(self.data.val, tc.eval_batch_size)
        elapsed = time.perf_counter() - began
        records = {
            k: {"epoch": epoch, "step": self.state.step, "train/loss": loss_sum[k] / seen[k],
                "train/acc": correct[k] / seen[k], "val/loss": val_loss[k], "val/acc": val_acc[k],
                "lr": lrs[k],  # the rate of this epoch's last step
                "time/epoch_s": elapsed / len(active)}
            for k in active
        }  # fmt: skip
        if self.train_eval is not None:  # after the epoch's clock: its cost is its own figure
            started = time.perf_counter()
            loss, acc = self.engine.evaluate(self.train_eval, tc.eval_batch_size)
            share = (time.perf_counter() - started) / len(active)
            for k, record in records.items():
                record.update({"train_eval/loss": loss[k], "train_eval/acc": acc[k], "time/eval_train_s": share})
        return records

    def _log_epoch(self, epoch: int, records: dict[int, dict[str, Any]]) -> None:
        epochs = self.cfg.trainer.epochs
        if self.k > 1:
            accs = " ".join(f"{records[k]['val/acc']:.4f}" if k in records else "-" for k in range(self.k))
            log.info("epoch %d/%d  %d members training  val/acc %s", epoch, epochs, len(records), accs)
            return
        record, improved = records[0], self.early_stopping.improved[0]
        evaluated = f"  train_eval/loss {record['train_eval/loss']:.4f}" if "train_eval/loss" in record else ""
        log.info(
            "epoch %d/%d  train/loss %.4f  train/acc %.4f%s  val/loss %.4f  val/acc %.4f  lr %.3g%s",
            epoch, epochs, record["train/loss"], record["train/acc"], evaluated, record["val/loss"],
            record["val/acc"], record["lr"], "  *" if improved else "",
        )  # fmt: skip

    def _stop_mid_epoch(self, active: list[int]) -> Diverged | Interrupted:
        """A signal during an epoch: its step is done; last.pt records where the epoch is, so that
        trainer.resume=auto goes on from that step exactly."""
        state, tally = self.state, self.tally
        if (found := tally.check()) and (ending := self._diverged(found, active)):
            return ending
        tally.read()
        totals = distributed.sum_across([*tally.loss_sum, *tally.correct, *tally.seen], self.device)
        state.progress = EpochProgress(
            tally.batches,
            [
                MemberProgress(tally.start.members[k].shuffle_state, totals[k], int(totals[self.k + k]),
                               int(totals[2 * self.k + k]), tally.lr(self.engine, k))
                for k in range(self.k)
            ],
        )  # fmt: skip
        self.checkpoints.save(self)
        signum = self.stop.signum or signal.SIGTERM  # a rank that was told by another: as torchrun's SIGTERM
        log.warning(
            "stopped by %s %s: checkpoints/last.pt continues from there (trainer.resume=auto)",
            signal.Signals(signum).name,
            state.position(),
        )
        return Interrupted(signum)

    # -----------------------------------------------------------------------------------------
    # The end

    def finish(self, ending: Diverged | Interrupted | Pruned | None) -> dict[str, Any]:
        """The end of the run, whatever ended it: each member's best weights and test pass (a run
        that completed; not a pruned trial), activation snapshots, diagnosis, and summary; for
        members their own checkpoints and the aggregate with the ensemble; plots. Returns the run's
        summary."""
        tc, state, summary = self.cfg.trainer, self.state, self.summary
        if ending is None and self.stop.signum:  # never report an interrupted run as completed
            ending = Interrupted(self.stop.signum)
        if isinstance(ending, Diverged) and self.k == 1:
            kept = (
                f"checkpoints/last.pt (epoch {state.epoch}) is untouched"
                if state.epoch
                else "no epoch had finished, so there is no checkpoint"
            )
            log.error("%s; the run stops here: %s", ending, kept)
        tested = [k for k, m in enumerate(state.members) if ending is None and m.diverged is None]
        last = [self.engine.weights(k) if self.k > 1 and state.members[k].epoch else None for k in range(self.k)]
        weights = {k: self.checkpoints.restore_best(self, k) if tc.restore_best else "last" for k in tested}
        test_loss, test_acc = self.engine.evaluate(self.data.test, tc.eval_batch_size) if tested else ([], [])
        summaries = []
        for k, member in enumerate(state.members):
            if self.snapshotted:
                if k in tested:
                    self.snapshots[k]["end"] = self._snapshot(k)
                self.dirs[k].write_activations(self.snapshots[k])
            test = {"test/loss": test_loss[k], "test/acc": test_acc[k], "weights": weights[k]} if k in tested else None
            summaries.append(self._member_summary(k, member, test))
        if self.k == 1:
            summary.update(summaries[0], epochs_run=state.epoch, steps=state.step)
            if isinstance(ending, Pruned):  # members in a search are refused (cli/app.py)
                summary["stop_reason"] = str(ending)
        else:
            self.checkpoints.write_members(self, last)
            logits = self.engine.logits(self.data.test.x, tc.eval_batch_size)
            for k, (run, s) in enumerate(zip(self.dirs, summaries)):
                s.update(status=_status(ending, state.members[k]), finished=now(), seed=state.members[k].seed,
                         run_dir=str(run))  # fmt: skip
                run.write_summary(s)
            summary.update(members.aggregate(summaries, logits, self.data.test.y))
        summary["wall_time_s"] = time.perf_counter() - self.wall_start
        for k, s in enumerate(summaries):
            self.loggers.finish(k, self.cfg, summary if self.k == 1 else s)
        if summary.get("stop_reason"):
            log.info(summary["stop_reason"])
        if self.plots:
            from dnnrun.insight.plots import plot_run  # matplotlib is imported only when plots are drawn

            for run in self.dirs:
                plot_run(run)
        failure = str(ending) if ending is not None and not isinstance(ending, Pruned) else None
        finish_summary(self.run_dir, summary, _status(ending), error=failure)
        if self.k > 1:
            console.print(members.table(summaries, summary["aggregate"], summary["ensemble"]))
            log.info("run directory: %s (members under members/)", self.run_dir)
            return summary
        if ending is None:
            console.print(results_table(summary))
        print_diagnosis(summary["diagnosis"])
        if ending is None:
            log.info("run directory: %s", self.run_dir)
        return summary

    def _snapshot(self, k: int) -> dict[str, Any]:
        return diagnostics.snapshot(self.engine.member_module(k), self.probe)

    def _member_summary(self, k: int, member: MemberState, test: dict[str, Any] | None) -> dict[str, Any]:
        history, tc = member.history, self.cfg.trainer
        records = self.run_dir.read_diagnostics() if self.k == 1 else []  # the per-layer statistics: a module's
        found = diagnosis.diagnose(history, records, self.data.n_classes)
        if member.diverged is not None:
            found.insert(0, f"training diverged at step {member.diverged_at}: {member.diverged}")
        best = self.early_stopping.members[k]
        best_record = next((r for r in history if r["epoch"] == best.best_epoch), {})
        entry = {
            "epochs_run": member.epoch,
            "steps": member.step,
            "stop_reason": self.early_stopping.reason(k) if member.diverged is None else None,
            "final": history[-1] if history else {},
            "best": {"monitor": tc.monitor, "value": best.best, **best_record},
            "test": test,
            "diagnosis": found,
        }
        if member.diverged is not None:
            entry["diverged_at_step"] = member.diverged_at
        return entry


def _status(ending: Diverged | Interrupted | Pruned | None, member: MemberState | None = None) -> str:
    """How the run (or, given, one of its members) ended, as summary.json says it."""
    if isinstance(ending, Diverged) or (member is not None and member.diverged is not None):
        return "diverged"
    if isinstance(ending, Pruned):
        return "pruned"
    return "interrupted" if isinstance(ending, Interrupted) else "completed"


def diagnostics_every(cfg: RunConfig, engine) -> int:
    """trainer.diagnostics.every: auto is 100 steps where the engine supports the per-layer
    statistics (a module's), off where it does not (members: the config check refuses a number)."""
    every = cfg.trainer.diagnostics.every
    if every == "auto":
        return 100 if engine.capabilities.diagnostics is None else 0
    return every


def train_eval_subset(cfg: RunConfig, train: Split, model: torch.nn.Module) -> Split | None:
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


class RunLog(logging.FileHandler):
    """run.log. A line that cannot be written (a full disk) ends the run as any file the run cannot
    write does (RunError: exit 1, the path and the reason), once: the handler leaves the logger
    first, so that saying so goes to the terminal only."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        import sys

        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            return super().handleError(record)
        log.removeHandler(self)
        raise RunError(f"cannot write {self.baseFilename}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last lines, on a disk that is full: the failure is the run's already
            pass


@contextlib.contextmanager
def run_log(run_dir: RunDir, early: logging.handlers.MemoryHandler):
    """run.log, starting with what was logged before it existed."""
    handler = RunLog(run_dir.log)
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
