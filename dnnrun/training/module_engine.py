"""The engine of a single run: one nn.Module, its optimizer and schedule, mixed precision,
channels-last, torch.compile and, under torchrun, DistributedDataParallel (engine.py lists what
the loop asks of an engine)."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dnnrun.optim import optimizers
from dnnrun.optim.schedules import Schedule
from dnnrun.store import checkpoint
from dnnrun.training import distributed, engine, metrics, runtime
from dnnrun.training.engine import MODULE, Step

if TYPE_CHECKING:
    from dnnrun.config.run_config import RunConfig
    from dnnrun.data.datasets import Split
    from dnnrun.techniques.regularizers import Regularization


class ModuleEngine:
    capabilities = MODULE
    k = 1

    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        reg: Regularization,
        device: torch.device,
        steps_per_epoch: int,
        reused: Collection[str] = (),
    ):
        tc = cfg.trainer
        self.cfg, self.reg, self.device = cfg, reg, device
        self.clip_value, self.clip_norm = tc.clip_value, tc.clip_norm
        self.rank, self.world = distributed.rank_world()
        if self.world > 1 and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
        self.channels_last = runtime.channels_last(tc.channels_last, device, model)
        model.to(device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.model = model
        self.optimizer = optimizers.build(cfg.optimizer, model, reused)  # reused: param groups of their own
        self.schedule = Schedule(cfg.schedule, self.optimizer, steps_per_epoch, tc.epochs)
        self.autocast, self.scaler = runtime.mixed_precision(tc.amp, device, runtime.has_conv(model))
        # Read the loss on the host each step where that costs nothing (the CPU) or where the processes
        # must agree on every step anyway (torchrun): a non-finite loss then skips its own update.
        self.guard = device.type in engine.READ_EACH_STEP or self.world > 1
        self._lr = self.optimizer.param_groups[0]["lr"]
        self.forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # refresh() builds it

    def _forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What the training forward pass runs: under torchrun, DistributedDataParallel over the
        trainable parameters (wrapping also broadcasts rank 0's weights), else the model itself;
        through torch.compile with trainer.compile=true."""
        module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        return runtime.Compiled(module) if self.cfg.trainer.compile else module

    def refresh(self) -> None:
        """The training forward pass, built once the trained parameters are known (the loop calls
        this as training starts, and Unfreezing when that set grows: DDP must then average the
        unfrozen parameters' gradients too)."""
        if self.forward is None or self.world > 1:
            self.forward = self._forward()

    @property
    def module(self) -> nn.Module:
        """The module the hooks of callbacks attach to (diagnostics, faults)."""
        return self.model

    def member_module(self, k: int) -> nn.Module:
        return self.model

    def train(self) -> None:
        self.model.train()

    def step(
        self,
        xb: torch.Tensor,
        yb: torch.Tensor,
        active: list[int],
        after_backward: Callable[[], None],
        stopping: bool,
    ) -> Step:
        """One update on a mini-batch (under torchrun, on this rank's slice of the global batch):
        forward, loss, backward, clipping, optimizer step, constraints, schedule."""
        global_size = len(yb)
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
        predicted, loss = logits.detach().argmax(1), loss.detach()
        if self.guard:
            nonfinite = not math.isfinite(loss.item())
            if self.world > 1:  # every rank must stop at the same step, or the others would wait for it for ever
                agreed = distributed.sum_across([float(nonfinite), float(stopping)], xb.device)
                nonfinite, stopping = agreed[0] > 0, agreed[1] > 0
            if nonfinite:
                return Step(loss, predicted, yb, None, [0], stopping)
        penalty = self.reg.penalty(self.model)  # l1/l2 on the weights: in the gradient, not in the reported loss
        objective = objective if penalty is None else objective + penalty
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(objective).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        else:
            objective.backward()
        after_backward()  # the gradients as backpropagation made them, before any clipping
        norm = clip_gradients(self.model.parameters(), self.clip_value, self.clip_norm)
        if norm is not None and self.scaler is not None:
            norm = None  # fp16's loss scaling skips the updates whose gradients overflowed
        if self.guard and norm is not None and not math.isfinite(norm.item()):
            return Step(loss, predicted, yb, norm, [0], stopping)
        self._lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.reg.after_step(self.model)  # e.g. max-norm
        self.schedule.after_step()
        return Step(loss, predicted, yb, norm, [] if self.guard else None, stopping)

    def lr(self, k: int) -> float:
        return self._lr

    def end_epoch(self, records: dict[int, dict[str, Any]]) -> None:
        if 0 in records:
            self.schedule.end_epoch(records[0])

    def evaluate(self, split: Split, batch_size: int) -> tuple[list[float], list[float]]:
        loss, acc = metrics.loss_and_accuracy(self.model, split, batch_size, self.autocast)
        return [loss], [acc]

    def weights_finite(self, k: int) -> bool:
        return all(torch.isfinite(p).all() for p in self.model.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        checkpoint.load_into(self.model, state["model"], path)
        checkpoint.load_into(self.optimizer, state["optimizer"], path, "optimizer")
        checkpoint.load_into(self.schedule, state["schedule"], path, "schedule")
        if self.scaler is not None and state.get("scaler"):
            checkpoint.load_into(self.scaler, state["scaler"], path, "gradient scaler")

    def weights(self, k: int) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_weights(self, k: int, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)

    def retire(self, k: int, saved: dict[str, Any] | None) -> None:
        """A single run ends when its member diverges: nothing to keep apart."""


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
