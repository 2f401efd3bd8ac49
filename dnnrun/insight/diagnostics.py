"""Seeing inside training: per-layer statistics every N steps and activation snapshots (diagnosis.py
turns them into sentences at the end of a run).

A "layer" is one of the network's blocks (hidden1..hiddenN, then output). Every `every` optimizer
steps `LayerStats` records, per layer: the L2 norm of its weight gradient, its weight norm, the size
of the update relative to the weights, the mean and std of its activations on that training batch, the
fraction of dead units (ReLU: zero for every example of the batch), the saturated fraction of its
outputs (sigmoid/tanh: units x examples within SATURATION of an asymptote, where the derivative is
near zero) and its batch norm's running statistics. Between those steps it costs one modulo per step.
It is a callback of the loop (training/callbacks.py) that a module's engine supports (engine.py).
"""

from __future__ import annotations

from typing import Any

import torch

from dnnrun.models.network import Network, weight_of
from dnnrun.store.rundir import RunDir
from dnnrun.techniques.activations import Activation
from dnnrun.techniques.norms import is_batch_norm
from dnnrun.training.callbacks import Callback

SATURATION = 0.02  # distance to an asymptote under which a sigmoid/tanh output counts as saturated
HISTOGRAM_BINS = 60


class LayerStats(Callback):
    """Per-layer statistics on every `every`-th step and on each epoch's first and last step (so
    that a run shorter than `every` steps still has some to diagnose), appended to
    diagnostics.jsonl. The loop calls it three times a step: before the forward pass, between
    backward and the optimizer step, and after the step; on the other steps each call costs one
    comparison."""

    def __init__(self, model: Network, activation: Activation, every: int, run: RunDir, logger):
        self.model, self.activation, self.every, self.run, self.logger = model, activation, every, run, logger
        self.layers = model.blocks()
        self.due = False  # this step is recorded
        self._outputs: dict[str, torch.Tensor] = {}
        self._hooks: list = []
        self._before: dict[str, torch.Tensor] = {}
        self._grad_norms: dict[str, torch.Tensor] = {}

    def step_start(self, loop, step: int, edge: bool) -> None:
        self.before_step(step, edge)

    def after_backward(self, loop, step: int) -> None:
        if self.due:
            self._before_update()

    def step_end(self, loop, step: int, epoch: int) -> None:
        if self.due:
            self._record(step, epoch)

    def train_end(self, loop) -> None:
        self.detach()  # a monitored step that raised leaves its hooks attached

    def before_step(self, step: int, edge: bool = False) -> None:
        """`edge`: the step is an epoch's first or last."""
        self.due = self.every > 0 and (edge or step % self.every == 0)
        if self.due:
            self._watch_activations()

    def detach(self) -> None:
        """Remove the activation hooks (a monitored step that raised leaves them attached)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._outputs.clear()

    def _watch_activations(self) -> None:
        for name, block in self.layers[:-1]:  # the hidden blocks: the output layer has no activation
            hook = block.act.register_forward_hook(
                lambda m, i, out, name=name: self._outputs.__setitem__(name, out.detach())
            )
            self._hooks.append(hook)

    def _before_update(self) -> None:
        """Gradient norms now, and the weights as they are before the optimizer moves them."""
        for name, block in self.layers:
            w = weight_of(block)
            if w.grad is not None:  # a frozen layer has none, and gets no grad_norm
                self._grad_norms[name] = w.grad.norm()
            self._before[name] = w.detach().clone()

    def _record(self, step: int, epoch: int) -> dict[str, Any]:
        outputs = dict(self._outputs)
        self.detach()
        stats: dict[str, dict[str, torch.Tensor]] = {}
        for name, block in self.layers:
            w = weight_of(block).detach()
            s = {"grad_norm": self._grad_norms[name]} if name in self._grad_norms else {}
            s["weight_norm"] = w.norm()
            s["update_ratio"] = (w - self._before[name]).norm() / s["weight_norm"].clamp_min(1e-12)
            out = outputs.get(name)
            if out is not None:
                s.update(activation_stats(out, self.activation))
            norm = next((m for m in block.modules() if is_batch_norm(m)), None)  # the block's first
            if norm is not None and norm.running_mean is not None:
                s["bn_running_mean"] = norm.running_mean.mean()
                s["bn_running_var"] = norm.running_var.mean()
            stats[name] = s
        # One transfer for the whole record: a single device sync per monitored step.
        names = [(layer, key) for layer, s in stats.items() for key in s]
        values = torch.stack([stats[layer][key].float() for layer, key in names]).tolist()
        layers: dict[str, dict[str, float]] = {}
        for (layer, key), value in zip(names, values):
            layers.setdefault(layer, {})[key] = value
        entry = {"step": step, "epoch": epoch, "layers": layers}
        self._before.clear()
        self._grad_norms.clear()
        self.run.append_diagnostics(entry)
        self.logger.diagnostics(entry, self.model)
        return entry


def activation_stats(out: torch.Tensor, activation: Activation) -> dict[str, torch.Tensor]:
    """Mean, std, and (where the activation has them) the dead units' fraction and the saturated
    outputs' fraction of a (batch, units) activation tensor, or (batch, channels, H, W) of a conv
    block, where a unit is a channel: dead when it is 0 for every example at every position."""
    s = {"act_mean": out.mean(), "act_std": out.std()}
    if activation.can_die:
        units = out.transpose(0, 1).reshape(out.shape[1], -1) if out.ndim > 2 else out.T
        s["dead"] = (units == 0).all(dim=1).float().mean()
    if activation.asymptotes is not None:
        low, high = activation.asymptotes
        near = torch.minimum(out - low, high - out) < SATURATION
        s["saturated"] = near.float().mean()  # over units and examples: where no gradient gets through
    return s


@torch.no_grad()
def snapshot(model: Network, x: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """Histograms of every hidden layer's activations on a fixed batch, in evaluation mode."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        block.act.register_forward_hook(lambda m, i, out, name=name: outputs.__setitem__(name, out.float()))
        for name, block in model.hidden()
    ]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    histograms = {}
    for name, out in outputs.items():
        finite = out[torch.isfinite(out)]
        low, high = (finite.min().item(), finite.max().item()) if finite.numel() else (0.0, 1.0)
        if high - low < 1e-6:
            low, high = low - 0.5, high + 0.5
        counts = torch.histc(finite, bins=HISTOGRAM_BINS, min=low, max=high)
        histograms[name] = {"low": low, "high": high, "counts": counts.tolist()}
    return histograms
