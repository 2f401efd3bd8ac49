"""Many seeds at once: `trainer.seeds=[0,1,2,3]` trains one member per seed, as one batched
computation, and leaves each member's run directory beside the aggregate.

Member k is what a run with trainer.seed=seeds[k] would be: its own initialization (the model
built after seeding with its seed, as a single run builds it), shuffle order, dropout masks and
augmentation draws; every other setting is shared. The members' weights are stacked along a new
first axis (torch.func.stack_module_state) and one forward pass over all of them is vmapped
(torch.func.functional_call), each member on its own batch. The optimizers dnnrun offers are
elementwise, so one optimizer over the stacked weights updates every member as its own would;
what is not elementwise is done per member: clipping by norm (each member's own global norm),
max-norm, early stopping (a stopped member keeps its weights), divergence (a member whose loss is
not finite is recorded as diverged and stops; the others go on).

    members/seed_N/   metrics.jsonl, summary.json (with its diagnosis), checkpoints/best.pt and
                      last.pt (weights, config with trainer.seed=N, preprocessing; written when the
                      run ends): what dnnrun-report, mode=evaluate, mode=predict, transfer and
                      dnnrun-export read
    summary.json      the members' metrics as mean and std, and the deep ensemble's test accuracy
                      and NLL (the members' probabilities averaged)
    checkpoints/last.pt  after each epoch: everything the members' training goes on from
                      (trainer.resume=auto), written atomically. SIGINT/SIGTERM stop after the step
                      under way; a resume redoes that epoch from its start, exactly.

The stacked weight matrices are laid out as the batched matmul's gradients come (each member's
matrix column-major, _grad_layout), so that no step copies and transposes them.
Batch norm keeps each member's running statistics in its slice of the stacked buffers.
schedule=performance reduces each member's rate on its own plateaus: the shared optimizer steps at
the base rate and each member's update is scaled by its rate over it (the update of every
optimizer dnnrun offers is proportional to its rate). Not supported with trainer.seeds (refused
with the reason, config.py): pretraining, transfer and model=zoo, torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import logging.handlers
import math
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from rich.table import Table

from dnnrun.config.schema import Choice
from dnnrun.data.augment import Augment
from dnnrun.data.datasets import Split
from dnnrun.errors import Interrupted, UserError
from dnnrun.insight import diagnosis
from dnnrun.insight.console import console
from dnnrun.optim import optimizers as optim
from dnnrun.optim.schedules import SCHEDULES, Schedule
from dnnrun.store import checkpoint
from dnnrun.store.rundir import RunDir, now
from dnnrun.techniques.init import affine_layers
from dnnrun.techniques.regularizers import cap_norms_, is_weight_matrix
from dnnrun.training import loop as train, runtime
from dnnrun.training.early_stopping import EarlyStopping
from dnnrun.training.signals import StopFlag
from dnnrun.training.state import TrainState

if TYPE_CHECKING:
    from dnnrun.config.run_config import RunConfig

log = logging.getLogger("dnnrun")


@dataclasses.dataclass
class Member:
    seed: int
    run: RunDir
    state: TrainState
    shuffle: torch.Generator
    augment: Augment | None
    stopped: str | None = None  # why it stopped updating (early stopping, divergence)
    diverged_at: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None  # its weights and buffers at its best epoch


@dataclasses.dataclass
class Stack:
    """The members as one computation: the architecture (on the meta device), their stacked weights
    and buffers, one optimizer and schedule over them, and the batched forward passes."""

    template: torch.nn.Module
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    rates: list | None  # schedule=performance: each member's (schedules.Performance); else None
    reg: Any  # regularizers.Regularization
    decay: set[str]  # the weight matrices: weight decay and penalties
    constrained: list[str]  # the affine layers' weights: max-norm
    train_forward: Callable
    eval_forward: Callable
    train_eval: Split | None  # trainer.eval_train's subset of the training set (train.train_eval_subset)


def steps_per_epoch(cfg: RunConfig, n: int) -> int:
    batches = math.ceil(n / cfg.trainer.batch_size)
    return min(batches, cfg.trainer.limit_batches or batches)


def run(cfg: RunConfig, run_dir: str | Path, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train the members of trainer.seeds; write their run directories, the aggregate and run.log.
    What can refuse the run (the device, the data, the memory, the checkpoint to resume) is checked
    before `on_start` and any write."""
    tc, parent = cfg.trainer, RunDir(run_dir)
    runtime.warm_up()
    early_log = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)  # until run.log
    with train.logging_to(early_log):
        device = runtime.resolve_device(tc.device)
        if tc.threads is not None:
            torch.set_num_threads(tc.threads)
        data = runtime.load_data(cfg.data, cfg.model, device)
        stack = _stack(cfg, data, device)
        members = [
            Member(
                seed,
                RunDir(parent.path / "members" / f"seed_{seed}"),
                TrainState(),
                torch.Generator().manual_seed(seed),
                Augment(cfg.data.augment, seed) if cfg.data.augment else None,
            )
            for seed in tc.seeds
        ]
        resumed = _resumable(cfg, parent, device)
    parent.path.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start()
    with train.run_log(parent, early_log):
        for stale in parent.remove_stale_temporaries():
            log.warning("removed %s, left by a process that stopped while writing it", stale)
        first, step = 1, 0
        if resumed is not None:
            first, step = _restore(resumed, stack, members) + 1, resumed["step"]
        for m in members:
            m.run.path.mkdir(parents=True, exist_ok=True)
            m.run.rewrite_metrics(m.state.history)  # exactly the epochs of the checkpoint it goes on from
        log.info(
            "run directory: %s (%d members: trainer.seed=%s, on %s)",
            parent,
            len(members),
            ",".join(map(str, tc.seeds)),
            runtime.device_name(device),
        )
        log.info("%s", cfg.options())
        started, stop = time.perf_counter(), StopFlag(deferring=True)
        with stop.installed():
            _epochs(
                cfg,
                data,
                members,
                stack,
                EarlyStopping(tc.early_stopping, tc.monitor),
                parent,
                range(first, tc.epochs + 1),
                step,
                stop,
            )
        return _finish(cfg, parent, members, stack, data, time.perf_counter() - started)


def _stack(cfg: RunConfig, data, device: torch.device) -> Stack:
    """The members' models, each initialized as a single run with its seed initializes it, stacked;
    one optimizer and schedule over them. Refused (UserError) when they do not fit the device."""
    tc = cfg.trainer
    with torch.device("meta"):  # the architecture that functional_call runs with each member's weights
        template, reg = runtime.build_model(cfg, data)
    if (too_big := runtime.memory_problem(template, cfg, device, data.shape, len(tc.seeds))) is not None:
        raise UserError(too_big)
    models = []
    for seed in tc.seeds:
        runtime.seed_everything(seed, tc.deterministic)
        models.append(runtime.build_model(cfg, data)[0].to(device))
    params, buffers = torch.func.stack_module_state(models)
    params = {n: _grad_layout(p) for n, p in params.items()}
    decay = {n for n, p in models[0].named_parameters() if is_weight_matrix(p)}  # as a single run decides
    affine = {id(m) for m in affine_layers(models[0])}
    constrained = [f"{name}.weight" for name, m in models[0].named_modules() if id(m) in affine]
    optimizer = optim.build(cfg.optimizer, models[0], tensors=params)  # grouped as a single run's
    steps = steps_per_epoch(cfg, len(data.train))
    rates = None
    if cfg.schedule.name == "performance":  # the optimizer at the base rate, each member's update scaled
        rates = [
            SCHEDULES["performance"].build(optimizer.param_groups[0]["lr"], tc.epochs, **cfg.schedule.params)
            for _ in tc.seeds
        ]
        schedule = Schedule(Choice("constant"), optimizer, steps, tc.epochs)
    else:
        schedule = Schedule(cfg.schedule, optimizer, steps, tc.epochs)

    def forward(p, b, x):
        return torch.func.functional_call(template, (p, b), (x,), tie_weights=False)  # none are tied

    return Stack(
        template,
        params,
        buffers,
        optimizer,
        schedule,
        rates,
        reg,
        decay,
        constrained,
        train_forward=torch.func.vmap(forward, randomness="different"),  # own dropout masks per member
        eval_forward=torch.func.vmap(forward, in_dims=(0, 0, None)),
        train_eval=train.train_eval_subset(cfg, data.train, models[0]),
    )


def _epochs(
    cfg: RunConfig,
    data,
    members: list[Member],
    stack: Stack,
    early: EarlyStopping,
    parent: RunDir,
    epochs: range,
    step: int,
    stop: StopFlag,
) -> None:
    """The members' training loop; after each epoch the members' files and the parent's checkpoint."""
    tc, device = cfg.trainer, data.train.x.device
    for epoch in epochs:
        active = [k for k, m in enumerate(members) if m.stopped is None]
        if not active:
            break
        began = time.perf_counter()
        stack.template.train()
        orders = torch.stack([torch.randperm(len(data.train), generator=m.shuffle) for m in members]).to(device)
        sums = torch.zeros(len(members), device=device)
        correct = torch.zeros(len(members), device=device)
        seen = 0
        for b in range(steps_per_epoch(cfg, len(data.train))):
            step += 1
            idx = orders[:, b * tc.batch_size : (b + 1) * tc.batch_size]  # (K, B): each member's own batch
            xb, yb = data.train.x[idx], data.train.y[idx]
            if members[0].augment is not None:
                xb = torch.stack([m.augment(x, step) for m, x in zip(members, xb)])
            logits, losses, active = _step(cfg, members, stack, active, xb, yb, step)
            sums += losses * len(yb[0])
            correct += (logits.argmax(2) == yb).sum(1)
            seen += len(yb[0])
            if stop.signum:  # the last epoch's checkpoint is where a resume goes on from
                log.warning(
                    "stopped by %s during epoch %d: checkpoints/last.pt goes on from the start of this "
                    "epoch (trainer.resume=auto)",
                    signal.Signals(stop.signum).name,
                    epoch,
                )
                raise Interrupted(stop.signum)
        for k, record in _records(cfg, data, stack, active, epoch, step, sums / seen, correct / seen, began).items():
            _end_epoch(members[k], k, stack, early, record)
        stack.schedule.end_epoch({})
        _checkpoint(parent, cfg, epoch, step, stack, members)
        accs = [members[k].state.history[-1]["val/acc"] for k in active if members[k].state.history]
        log.info(
            "epoch %d/%d  %d members training  val/acc %s",
            epoch,
            tc.epochs,
            len(active),
            " ".join(f"{a:.4f}" for a in accs),
        )
        if stop.signum:
            raise Interrupted(stop.signum)


def _records(
    cfg: RunConfig,
    data,
    stack: Stack,
    active: list[int],
    epoch: int,
    step: int,
    losses: torch.Tensor,
    accs: torch.Tensor,
    began: float,
) -> dict[int, dict[str, Any]]:
    """The training members' metrics.jsonl records of an epoch, as a single run's: validation, and
    with trainer.eval_train the training subset, in evaluation mode (times: each member's share)."""
    if not active:  # every member diverged during this epoch
        return {}
    tc = cfg.trainer
    stack.template.eval()
    val_loss, val_acc = _evaluate(stack.eval_forward, stack.params, stack.buffers, data.val, tc.eval_batch_size)
    epoch_s = (time.perf_counter() - began) / len(active)
    extra: list[dict[str, float]] = [{} for _ in range(len(losses))]
    if stack.train_eval is not None:  # after the epoch's clock, as a single run's
        started = time.perf_counter()
        loss, acc = _evaluate(stack.eval_forward, stack.params, stack.buffers, stack.train_eval, tc.eval_batch_size)
        share = (time.perf_counter() - started) / len(active)
        extra = [{"train_eval/loss": a, "train_eval/acc": b, "time/eval_train_s": share} for a, b in zip(loss, acc)]
    lr = stack.optimizer.param_groups[0]["lr"]
    return {
        k: {
            "epoch": epoch,
            "step": step,
            "train/loss": losses[k].item(),
            "train/acc": accs[k].item(),
            "val/loss": val_loss[k],
            "val/acc": val_acc[k],
            "lr": stack.rates[k].lr if stack.rates else lr,
            "time/epoch_s": epoch_s,
            **extra[k],
        }
        for k in active
    }


def _step(
    cfg: RunConfig,
    members: list[Member],
    stack: Stack,
    active: list[int],
    xb: torch.Tensor,
    yb: torch.Tensor,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One update of every member on its own batch (K, B, ...): forward, each member's loss and
    penalty, backward, clipping, the optimizer step at each member's rate, max-norm. Stopped members
    keep their weights and batch-norm statistics. Returns (logits, each member's loss with 0 for a
    non-finite one, the members still training)."""
    params, buffers, reg, k = stack.params, stack.buffers, stack.reg, len(members)
    stopped = [i for i in range(k) if i not in active]
    kept_buffers = {n: b[stopped].clone() for n, b in buffers.items()} if stopped else {}  # batch norm's
    logits = stack.train_forward(params, buffers, xb)  # (K, B, classes); each member's batch-norm statistics
    losses = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(k, -1).mean(1)
    finite = torch.isfinite(losses)
    if not bool(finite.all()) and not bool(finite[active].all()):  # a device sync a step, as a single run's loss.item()
        for i in active:
            if not bool(finite[i]):
                _diverge(members[i], step, f"the training loss is {losses[i].item()}")
        active = [i for i in active if members[i].stopped is None]
    losses = torch.where(finite, losses, torch.zeros_like(losses))
    objective = losses.sum()  # each member's loss: the sum keeps their gradients apart
    penalty = reg.penalty_on([params[n] for n in stack.decay])
    stack.optimizer.zero_grad(set_to_none=True)
    (objective if penalty is None else objective + penalty).backward()
    _clip(params, cfg.trainer.clip_value, cfg.trainer.clip_norm, k)
    frozen = [i for i in range(k) if i not in active]
    kept = {n: p.detach()[frozen].clone() for n, p in params.items()} if frozen else {}
    scale = _rate_scales(stack, xb.device)
    before = {n: p.detach().clone() for n, p in params.items()} if scale is not None else {}
    stack.optimizer.step()
    with torch.no_grad():
        for n, old in before.items():  # each member's update at its own rate
            params[n].copy_(old + scale.reshape(-1, *[1] * (old.ndim - 1)) * (params[n] - old))
        if reg.max_norm is not None:
            for name in stack.constrained:
                cap_norms_(params[name], reg.max_norm, stacked=1)
        for n, old in kept.items():  # stopped members keep their weights ...
            params[n][frozen] = old
        for n, old in kept_buffers.items():  # ... and their running statistics
            buffers[n][stopped] = old
    stack.schedule.after_step()
    return logits.detach(), losses.detach(), active


def _end_epoch(m: Member, k: int, stack: Stack, early: EarlyStopping, record: dict[str, Any]) -> None:
    """Member k's epoch: its record, early stopping, its best weights (its checkpoints are written
    when the run ends; the parent's checkpoint holds them meanwhile), its rate."""
    if not math.isfinite(record["val/loss"]):
        _diverge(m, record["step"], f"the validation loss is {record['val/loss']}")
        return
    improved = early.end_epoch(m.state, record)
    m.state.epoch, m.state.step = record["epoch"], record["step"]
    m.state.history.append(record)
    m.run.append_metrics(record, durable=False)  # the parent's checkpoint is the durable record
    if improved:
        m.best_weights = _weights(stack.params, stack.buffers, k)
    if (reason := early.reason(m.state)) is not None:
        m.stopped = reason
    if stack.rates:
        stack.rates[k].observe(record)


def _grad_layout(p: torch.Tensor) -> torch.Tensor:
    """A stacked weight matrix (K, out, in) laid out as the gradient vmap's batched matmul gives it
    (each member's matrix column-major), so that backward neither copies nor transposes it."""
    if p.ndim != 3:
        return p
    return p.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(p.requires_grad)


def _rate_scales(stack: Stack, device: torch.device) -> torch.Tensor | None:
    """schedule=performance: each member's rate over the optimizer's (None while every member has it)."""
    if not stack.rates:
        return None
    base = stack.optimizer.param_groups[0]["lr"]
    scales = [rate.lr / base for rate in stack.rates]
    return None if all(s == 1.0 for s in scales) else torch.tensor(scales, device=device)


def _checkpoint(parent: RunDir, cfg: RunConfig, epoch: int, step: int, stack: Stack, members: list[Member]) -> None:
    """Everything the members' training goes on from, as plain data (read with weights_only=True)."""
    rates = stack.rates
    state = {
        "model": {n: p.detach() for n, p in stack.params.items()},
        "config": cfg.raw,
        "buffers": dict(stack.buffers),
        "optimizer": stack.optimizer.state_dict(),
        "schedule": stack.schedule.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "members": [
            {
                "seed": m.seed,
                "trainer": _trainer_entry(m.state),
                "shuffle": m.shuffle.get_state(),
                "stopped": m.stopped,
                "diverged_at": m.diverged_at,
                "best": m.best_weights,
                "rate": rates[k].state_dict() if rates else None,
            }
            for k, m in enumerate(members)
        ],
    }
    checkpoint.save(parent.last, state)


def _trainer_entry(state: TrainState) -> dict[str, Any]:
    """A member's counters, its history as one JSON text: the history of 16 members is thousands
    of numbers, each pickled on its own otherwise (the bulk of the checkpoint's time)."""
    return {**state.to_dict(), "history": json.dumps(state.history)}


def _resumable(cfg: RunConfig, parent: RunDir, device: torch.device) -> dict[str, Any] | None:
    """The members' checkpoint that trainer.resume names, checked to be one and to fit this config
    (before anything is written); None for a fresh start."""
    from dnnrun.training import checkpointing as resume

    path = resume.checkpoint_to_resume(cfg.trainer.resume, parent)
    if path is None:
        return None
    ckpt = checkpoint.load(path, map_location=device)
    if not isinstance(ckpt.get("members"), list):
        raise UserError(f"trainer.resume: {path} is a single run's checkpoint, not one of trainer.seeds' members")
    changes = resume.config_changes(ckpt["config"], cfg.raw)
    if changes and not cfg.trainer.force_resume:
        raise UserError(
            f"trainer.resume: {path} was trained with another config, and these changes alter the "
            "result:\n  - " + "\n  - ".join(changes) + "\nResume with the checkpoint's settings, or set "
            "trainer.force_resume=true to go on anyway."
        )
    if [m["seed"] for m in ckpt["members"]] != list(cfg.trainer.seeds):
        raise UserError(
            f"trainer.resume: {path} holds the members of seeds {[m['seed'] for m in ckpt['members']]}, "
            f"not {list(cfg.trainer.seeds)}"
        )
    return ckpt


def _restore(ckpt: dict[str, Any], stack: Stack, members: list[Member]) -> int:
    """Put the checkpoint back: weights, optimizer, schedule, each member's counters, history,
    shuffle and best weights, the random streams. Returns the epoch it ended."""
    with torch.no_grad():
        for n, p in stack.params.items():
            p.copy_(ckpt["model"][n])
        for n, b in stack.buffers.items():
            b.copy_(ckpt["buffers"][n])
    stack.optimizer.load_state_dict(ckpt["optimizer"])
    stack.schedule.load_state_dict(ckpt["schedule"])
    for k, (m, saved) in enumerate(zip(members, ckpt["members"])):
        if stack.rates:
            stack.rates[k].load_state_dict(saved["rate"])
        history = saved["trainer"]["history"]  # JSON text (a list in checkpoints before it)
        m.state = TrainState.from_dict(
            {**saved["trainer"], "history": json.loads(history) if isinstance(history, str) else history}
        )
        m.shuffle.set_state(saved["shuffle"].cpu())
        m.stopped, m.diverged_at, m.best_weights = saved["stopped"], saved["diverged_at"], saved["best"]
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
    log.info("resumed the members after epoch %d (step %d)", ckpt["epoch"], ckpt["step"])
    return ckpt["epoch"]


def _diverge(member: Member, step: int, what: str) -> None:
    member.stopped, member.diverged_at = f"diverged at step {step}: {what}", step
    log.warning("member seed=%d diverged at step %d (%s); the others go on", member.seed, step, what)


def _clip(params: dict[str, torch.Tensor], clip_value: float | None, clip_norm: float | None, k: int) -> None:
    """train.clip_gradients for each member on its own: by value, then by its own global norm."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    if clip_value is not None:  # elementwise: the same for stacked members
        torch.nn.utils.clip_grad_value_(params.values(), clip_value)
    if clip_norm is not None:
        norms = torch.stack([g.reshape(k, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (K,)
        factor = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(factor.reshape(k, *[1] * (g.ndim - 1)))


@torch.no_grad()
def _evaluate(forward, params, buffers, split, batch_size: int) -> tuple[list[float], list[float]]:
    """Every member's (mean cross-entropy, accuracy) over a split, in evaluation mode."""
    logits = _logits(forward, params, buffers, split.x, batch_size)
    k, n = logits.shape[:2]
    loss = F.cross_entropy(logits.flatten(0, 1), split.y.repeat(k), reduction="none").view(k, n).mean(1)
    acc = (logits.argmax(2) == split.y).float().mean(1)
    return loss.tolist(), acc.tolist()


@torch.no_grad()
def _logits(forward, params, buffers, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(K, N, classes): each member's outputs."""
    return torch.cat(
        [forward(params, buffers, x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)], dim=1
    )


def _weights(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Member k's weights and buffers as a single run's state_dict holds them (contiguous copies)."""
    return {n: t[k].detach().clone(memory_format=torch.contiguous_format) for n, t in {**params, **buffers}.items()}


def _save(path: Path, state: dict[str, torch.Tensor], cfg: RunConfig, seed: int, data) -> None:
    """A member's checkpoint as a single run's holds its weights (weights only: what evaluate,
    predict, transfer and export read)."""
    checkpoint.save(
        path,
        {
            "model": state,
            "config": member_config(cfg.raw, seed),
            "inputs": data.preprocess.to_dict() if data.preprocess else None,
        },
    )


def member_config(raw: dict[str, Any], seed: int) -> dict[str, Any]:
    """The config of the single run a member stands for."""
    trainer = {**raw["trainer"], "seed": seed, "seeds": None}
    return {**raw, "trainer": trainer}


def _finish(cfg: RunConfig, parent: RunDir, members: list[Member], stack: Stack, data, wall: float) -> dict[str, Any]:
    """Each member's checkpoints; each tested with its best weights (trainer.restore_best) and
    summarized; the aggregate and the ensemble in the parent's summary."""
    tc, params, buffers = cfg.trainer, stack.params, stack.buffers
    with torch.no_grad():
        for k, m in enumerate(members):
            _save(m.run.last, _weights(params, buffers, k), cfg, m.seed, data)
            if m.best_weights is not None:
                _save(m.run.best, m.best_weights, cfg, m.seed, data)
                if tc.restore_best:
                    for n, t in {**params, **buffers}.items():
                        if n in m.best_weights:
                            t[k] = m.best_weights[n]
    logits = _logits(stack.eval_forward, params, buffers, data.test.x, tc.eval_batch_size)  # (K, N, classes)
    probs, y = logits.softmax(2), data.test.y
    summaries = []
    for k, m in enumerate(members):
        nll = F.cross_entropy(logits[k], y).item()
        acc = (probs[k].argmax(1) == y).float().mean().item()
        best = next((r for r in m.state.history if r["epoch"] == m.state.best_epoch), {})
        found = diagnosis.diagnose(m.state.history, [], data.n_classes)
        if m.diverged_at is not None:
            found.insert(0, f"training {m.stopped}")
        summary = {
            "status": "diverged" if m.diverged_at is not None else "completed",
            "finished": now(),
            "seed": m.seed,
            "epochs_run": m.state.epoch,
            "steps": m.state.step,
            "stop_reason": m.stopped if m.diverged_at is None else None,
            "final": m.state.history[-1] if m.state.history else {},
            "best": {"monitor": tc.monitor, "value": m.state.best, **best},
            "test": None
            if m.diverged_at is not None
            else {"test/loss": nll, "test/acc": acc, "weights": "best" if tc.restore_best else "last"},
            "diagnosis": found,
            "run_dir": str(m.run),
        }
        if m.diverged_at is not None:
            summary["diverged_at_step"] = m.diverged_at
        m.run.write_summary(summary)
        summaries.append(summary)
    healthy = [k for k, s in enumerate(summaries) if s["test"] is not None]
    mean = probs[healthy].mean(0) if healthy else probs.mean(0)
    ensemble = {
        "members": len(healthy),
        "test/acc": (mean.argmax(1) == y).float().mean().item(),
        "test/loss": -mean.clamp_min(1e-45).log().gather(1, y[:, None]).mean().item(),
    }
    aggregate = {}
    for name in ("test/acc", "test/loss"):
        values = [s["test"][name] for s in summaries if s["test"] is not None]
        aggregate[name] = _mean_std(values)
    for name in ("val/loss", "val/acc", "train/loss", "train/acc"):
        aggregate[f"best {name}"] = _mean_std([s["best"][name] for s in summaries if name in s["best"]])
    best_values = [s["best"]["value"] for s in summaries if s["best"]["value"] is not None]
    summary = {
        "status": "completed" if healthy else "diverged",
        "finished": now(),
        "run_dir": str(parent),
        "seeds": list(tc.seeds),
        "members": [s["run_dir"] for s in summaries],
        "diverged": [s["seed"] for s in summaries if s["status"] == "diverged"],
        "aggregate": aggregate,
        "ensemble": ensemble,
        "best": {"monitor": tc.monitor, "value": statistics.fmean(best_values) if best_values else None},
        "test": {"test/acc": aggregate["test/acc"]["mean"], "test/loss": aggregate["test/loss"]["mean"]},
        "wall_time_s": wall,
        "versions": runtime.versions(),
    }
    parent.write_summary(summary)
    console.print(_table(summaries, aggregate, ensemble))
    log.info("run directory: %s (members under members/)", parent)
    if not healthy:
        raise UserError(f"every member diverged: {', '.join(s['diagnosis'][0] for s in summaries)}")
    return summary


def _mean_std(values: list[float]) -> dict[str, float | None]:
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def _table(summaries: list[dict[str, Any]], aggregate: dict[str, Any], ensemble: dict[str, Any]) -> Table:
    table = Table(title=f"dnnrun: {len(summaries)} members", title_justify="left")
    for column in ("seed", "status", "best epoch", "val/loss", "test/acc", "test/loss"):
        table.add_column(column, justify="right")
    for s in summaries:
        test = s["test"] or {}
        table.add_row(
            str(s["seed"]),
            s["status"],
            str(s["best"].get("epoch", "-")),
            _fmt(s["best"].get("val/loss")),
            _fmt(test.get("test/acc")),
            _fmt(test.get("test/loss")),
        )
    acc, loss = aggregate["test/acc"], aggregate["test/loss"]
    if acc["n"] > 1:
        table.add_row(
            "mean ± std", "", "", "", f"{acc['mean']:.4f} ± {acc['std']:.4f}", f"{loss['mean']:.4f} ± {loss['std']:.4f}"
        )
    table.add_row("ensemble", "", "", "", _fmt(ensemble["test/acc"]), _fmt(ensemble["test/loss"]))
    return table


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
