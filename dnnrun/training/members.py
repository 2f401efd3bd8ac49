"""Many seeds at once: `trainer.seeds=[0,1,2,3]` trains one member per seed in one run, through the
same loop as a single run (loop.py), with this engine in place of a module's.

Member k is what a run with trainer.seed=seeds[k] would be: its own initialization (the model
built after seeding with its seed, as a single run builds it), shuffle order, dropout masks and
augmentation draws; every other setting is shared. The members' weights are stacked along a new
first axis (torch.func.stack_module_state) and one forward pass over all of them is vmapped
(torch.func.functional_call), each member on its own batch. One optimizer over the stacked
weights updates every member as its own would, which holds for optimizers whose update is
elementwise and proportional to the rate: each optimizer's registry entry declares it
(optim/optimizers.py), and members refuse the others. What is not elementwise is done per member:
clipping by norm (each member's own global norm), max-norm, and the schedules that react to a
member's metrics (schedule=performance: each member's rate on its own plateaus, the shared
optimizer at the base rate and each member's update scaled). A member that stopped early or
diverged keeps its weights and batch-norm statistics while the others train on.

    members/seed_N/   metrics.jsonl, summary.json (with its diagnosis), checkpoints/best.pt and
                      last.pt (weights, config with trainer.seed=N, preprocessing; written when the
                      run ends): what dnnrun-report, mode=evaluate, mode=predict, transfer and
                      dnnrun-export read
    summary.json      the members' metrics as mean and std, and the deep ensemble's test accuracy
                      and NLL (the members' probabilities averaged)
    checkpoints/last.pt  the run's checkpoint, as a single run's (store/checkpoint.py)

The stacked weight matrices are laid out as the batched matmul's gradients come (each member's
matrix column-major, _grad_layout), so that no step copies and transposes them. What members do
not support is declared in engine.STACKED and refused with the reason (config/run_config.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from rich.table import Table

from dnnrun.config.schema import Choice
from dnnrun.errors import UserError
from dnnrun.optim import optimizers
from dnnrun.optim.schedules import SCHEDULES, Schedule
from dnnrun.store import checkpoint
from dnnrun.techniques.init import affine_layers
from dnnrun.techniques.regularizers import cap_norms_, is_weight_matrix
from dnnrun.training import engine, metrics, runtime
from dnnrun.training.engine import STACKED, Step

if TYPE_CHECKING:
    from dnnrun.config.run_config import RunConfig
    from dnnrun.data.datasets import Data, Split


class StackedEngine:
    """K members' weights stacked, one optimizer and schedule over them, the vmapped forward passes."""

    capabilities = STACKED

    def __init__(self, cfg: RunConfig, data: Data, device: torch.device, steps_per_epoch: int):
        tc = cfg.trainer
        self.k = len(tc.seeds)
        self.clip_value, self.clip_norm = tc.clip_value, tc.clip_norm
        with torch.device("meta"):  # the architecture that functional_call runs with each member's weights
            self.template, self.reg = runtime.build_model(cfg, data)
        models = []
        for seed in tc.seeds:  # each initialized as a single run with its seed initializes it
            runtime.seed_everything(seed, tc.deterministic)
            models.append(runtime.build_model(cfg, data)[0].to(device))
        params, self.buffers = torch.func.stack_module_state(models)
        self.params = {n: _grad_layout(p) for n, p in params.items()}
        self.shell = models[0]  # a real module: a member's weights go into it for the activation snapshots
        self.decay = [n for n, p in self.shell.named_parameters() if is_weight_matrix(p)]  # as a single run decides
        affine = {id(m) for m in affine_layers(self.shell)}
        self.constrained = [f"{name}.weight" for name, m in self.shell.named_modules() if id(m) in affine]
        self.optimizer = optimizers.build(cfg.optimizer, self.shell, tensors=self.params)  # grouped as a single run's
        kind = SCHEDULES[cfg.schedule.name]
        self.rates = None
        if kind.reacts:  # the optimizer at the base rate, each member's update scaled by its own rate
            lr0 = self.optimizer.param_groups[0]["lr"]
            self.rates = [kind.build(lr0, tc.epochs, **cfg.schedule.params) for _ in tc.seeds]
            self.schedule = Schedule(Choice("constant"), self.optimizer, steps_per_epoch, tc.epochs)
        else:
            self.schedule = Schedule(cfg.schedule, self.optimizer, steps_per_epoch, tc.epochs)
        self.autocast, self.scaler = runtime.mixed_precision(tc.amp, device, runtime.has_conv(self.template))
        self.guard = device.type in engine.READ_EACH_STEP  # read each step's losses where that costs nothing
        self._lr = self.optimizer.param_groups[0]["lr"]

        def forward(p, b, x):
            return torch.func.functional_call(self.template, (p, b), (x,), tie_weights=False)  # none are tied

        self.train_forward = torch.func.vmap(forward, randomness="different")  # own dropout masks per member
        self.eval_forward = torch.func.vmap(forward, in_dims=(0, 0, None))

    @property
    def module(self) -> torch.nn.Module:
        """The module the hooks of callbacks attach to: the template the vmapped pass runs."""
        return self.template

    def member_module(self, k: int) -> torch.nn.Module:
        """A module holding member k's weights (a copy): what activation snapshots look into."""
        self.shell.load_state_dict(self.weights(k))
        return self.shell

    def train(self) -> None:
        self.template.train()

    def refresh(self) -> None:
        pass

    def step(
        self,
        xb: torch.Tensor,
        yb: torch.Tensor,
        active: list[int],
        after_backward: Callable[[], None],
        stopping: bool,
    ) -> Step:
        """One update of the active members, each on its own batch (K, B, ...): forward, each
        member's loss and penalty, backward, clipping, the optimizer step at each member's rate,
        max-norm, the schedule. The other members keep their weights and batch-norm statistics."""
        params, buffers, k = self.params, self.buffers, self.k
        stopped = [i for i in range(k) if i not in active]
        kept_buffers = {n: b[stopped].clone() for n, b in buffers.items()} if stopped else {}  # batch norm's
        with self.autocast():
            logits = self.train_forward(params, buffers, xb)  # (K, B, classes); each member's batch-norm statistics
            losses = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(k, -1).mean(1)
        skipped = None
        if self.guard:  # the loop retires them (their batch-norm statistics too)
            finite = torch.isfinite(losses).tolist()
            skipped = [i for i in active if not finite[i]]
        # Each member's loss: the sum keeps their gradients apart (a non-finite one counts 0, and its
        # member's update is left out: here, or once the loop sees it)
        objective = torch.where(torch.isfinite(losses), losses, 0.0).sum()
        penalty = self.reg.penalty_on([params[n] for n in self.decay])
        self.optimizer.zero_grad(set_to_none=True)
        objective = objective if penalty is None else objective + penalty
        if self.scaler is not None:
            self.scaler.scale(objective).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            objective.backward()
        after_backward()
        norms = self._clip()
        if norms is not None and self.scaler is not None:
            norms = None  # fp16's loss scaling skips the updates whose gradients overflowed
        if self.guard and norms is not None:
            finite = torch.isfinite(norms).tolist()
            skipped += [i for i in active if not finite[i] and i not in skipped]
        frozen = stopped + (skipped or [])
        if frozen:  # their optimizer state stays finite, their weights are put back below
            for p in params.values():
                if p.grad is not None:
                    p.grad[frozen] = 0
        kept = {n: p.detach()[frozen].clone() for n, p in params.items()} if frozen else {}
        scale = self._rate_scales(xb.device)
        before = {n: p.detach().clone() for n, p in params.items()} if scale is not None else {}
        self._lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            for n, old in before.items():  # each member's update at its own rate
                params[n].copy_(old + scale.reshape(-1, *[1] * (old.ndim - 1)) * (params[n] - old))
            if self.reg.max_norm is not None:
                for name in self.constrained:
                    cap_norms_(params[name], self.reg.max_norm, stacked=1)
            for n, old in kept.items():  # stopped members keep their weights ...
                params[n][frozen] = old
            for n, old in kept_buffers.items():  # ... and their running statistics
                buffers[n][stopped] = old
        self.schedule.after_step()
        return Step(losses.detach(), logits.detach().argmax(2), yb, norms, skipped, stopping)

    def _clip(self) -> torch.Tensor | None:
        """module_engine.clip_gradients for each member on its own: by value, then by its own
        global norm. Returns each member's norm before clipping by norm, when that is done."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if self.clip_value is not None:  # elementwise: the same for stacked members
            torch.nn.utils.clip_grad_value_(self.params.values(), self.clip_value)
        if self.clip_norm is None:
            return None
        norms = torch.stack([g.reshape(self.k, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (K,)
        factor = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_'s formula
        for g in grads:
            g.mul_(factor.reshape(self.k, *[1] * (g.ndim - 1)))
        return norms

    def _rate_scales(self, device: torch.device) -> torch.Tensor | None:
        """schedule=performance: each member's rate over the optimizer's (None while every member has it)."""
        if not self.rates:
            return None
        base = self.optimizer.param_groups[0]["lr"]
        scales = [rate.lr / base for rate in self.rates]
        return None if all(s == 1.0 for s in scales) else torch.tensor(scales, device=device)

    def lr(self, k: int) -> float:
        return self.rates[k].lr if self.rates else self._lr

    def end_epoch(self, records: dict[int, dict[str, Any]]) -> None:
        if self.rates:
            for k, record in records.items():
                self.rates[k].observe(record)
        else:
            self.schedule.end_epoch(next(iter(records.values()), {}))

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(K, N, classes): each member's outputs, in evaluation mode."""
        self.template.eval()
        batches = []
        for i in range(0, len(x), batch_size):
            with self.autocast():
                batches.append(self.eval_forward(self.params, self.buffers, x[i : i + batch_size]).float())
        return torch.cat(batches, dim=1)

    def evaluate(self, split: Split, batch_size: int) -> tuple[list[float], list[float]]:
        self.template.eval()
        return metrics.members_loss_and_accuracy(
            lambda xb: self.eval_forward(self.params, self.buffers, xb), split, batch_size, self.autocast
        )

    def weights_finite(self, k: int) -> bool:
        return all(torch.isfinite(p[k]).all() for p in self.params.values())

    def state_dict(self) -> dict[str, Any]:
        schedule = self.schedule.state_dict()
        if self.rates:
            schedule["rates"] = [rate.state_dict() for rate in self.rates]
        return {
            "model": {**{n: p.detach() for n, p in self.params.items()}, **self.buffers},
            "optimizer": self.optimizer.state_dict(),
            "schedule": schedule,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        model, own = state["model"], {**self.params, **self.buffers}
        problems = [f"{n} is missing from the checkpoint" for n in own if n not in model]
        problems += [f"{n} is in the checkpoint but not in the members' model" for n in model if n not in own]
        problems += [
            f"size mismatch for {n}: checkpoint {list(model[n].shape)}, members {list(t.shape)}"
            for n, t in own.items()
            if n in model and model[n].shape != t.shape
        ]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(f"{path} does not fit these members: {problems[0]}{more}")
        with torch.no_grad():
            for n, t in own.items():
                t.copy_(model[n])
        checkpoint.load_into(self.optimizer, state["optimizer"], path, "optimizer")
        checkpoint.load_into(self.schedule, state["schedule"], path, "schedule")
        if self.rates:
            for rate, saved in zip(self.rates, state["schedule"]["rates"], strict=True):
                rate.load_state_dict(saved)
        if self.scaler is not None and state.get("scaler"):
            checkpoint.load_into(self.scaler, state["scaler"], path, "gradient scaler")

    def weights(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights and buffers as a single run's state_dict holds them (contiguous copies)."""
        return {
            n: t[k].detach().clone(memory_format=torch.contiguous_format)
            for n, t in {**self.params, **self.buffers}.items()
        }

    @torch.no_grad()
    def load_weights(self, k: int, weights: dict[str, torch.Tensor]) -> None:
        for n, t in {**self.params, **self.buffers}.items():
            t[k] = weights[n]

    @torch.no_grad()
    def retire(self, k: int, saved: dict[str, Any] | None) -> None:
        """Member k diverged: its weights go back to those of the run's last checkpoint (`saved`,
        its last finished epoch), or are zeroed where they are not finite when there is none; its
        optimizer state is zeroed where it is not finite. Nothing non-finite reaches a checkpoint."""
        for n, t in {**self.params, **self.buffers}.items():
            if saved is not None:
                t[k] = saved["model"][n][k].to(t.device)
            elif t.is_floating_point():
                t[k] = t[k].nan_to_num(0.0, 0.0, 0.0)
        for entry in self.optimizer.state.values():
            for t in entry.values():
                if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == self.k and t.is_floating_point():
                    t[k] = t[k].nan_to_num(0.0, 0.0, 0.0)


def _grad_layout(p: torch.Tensor) -> torch.Tensor:
    """A stacked weight matrix (K, out, in) laid out as the gradient vmap's batched matmul gives it
    (each member's matrix column-major), so that backward neither copies nor transposes it."""
    if p.ndim != 3:
        return p
    return p.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(p.requires_grad)


def member_config(raw: dict[str, Any], seed: int) -> dict[str, Any]:
    """The config of the single run a member stands for."""
    trainer = {**raw["trainer"], "seed": seed, "seeds": None}
    return {**raw, "trainer": trainer}


# ---------------------------------------------------------------------------------------------
# The members' run's summary


def aggregate(summaries: list[dict[str, Any]], logits: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The members' test and best metrics as mean and std, and the deep ensemble (the healthy
    members' probabilities averaged) from their test logits (K, N, classes)."""
    probs = logits.softmax(2)
    healthy = [k for k, s in enumerate(summaries) if s["test"] is not None]
    mean = probs[healthy].mean(0) if healthy else probs.mean(0)
    ensemble = {
        "members": len(healthy),
        "test/acc": (mean.argmax(1) == y).float().mean().item(),
        "test/loss": -mean.clamp_min(1e-45).log().gather(1, y[:, None]).mean().item(),
    }
    figures = {name: _mean_std([s["test"][name] for s in summaries if s["test"]]) for name in ("test/acc", "test/loss")}
    for name in ("val/loss", "val/acc", "train/loss", "train/acc"):
        figures[f"best {name}"] = _mean_std([s["best"][name] for s in summaries if name in s["best"]])
    best_values = [s["best"]["value"] for s in summaries if s["best"]["value"] is not None]
    return {
        "members": [s["run_dir"] for s in summaries],
        "diverged": [s["seed"] for s in summaries if s["status"] == "diverged"],
        "aggregate": figures,
        "ensemble": ensemble,
        "best": {
            "monitor": summaries[0]["best"]["monitor"],
            "value": statistics.fmean(best_values) if best_values else None,
        },
        "test": {"test/acc": figures["test/acc"]["mean"], "test/loss": figures["test/loss"]["mean"]},
    }


def _mean_std(values: list[float]) -> dict[str, float | None]:
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def table(summaries: list[dict[str, Any]], figures: dict[str, Any], ensemble: dict[str, Any]) -> Table:
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
    acc, loss = figures["test/acc"], figures["test/loss"]
    if acc["n"] > 1:
        table.add_row(
            "mean ± std", "", "", "", f"{acc['mean']:.4f} ± {acc['std']:.4f}", f"{loss['mean']:.4f} ± {loss['std']:.4f}"
        )
    table.add_row("ensemble", "", "", "", _fmt(ensemble["test/acc"]), _fmt(ensemble["test/loss"]))
    return table


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
