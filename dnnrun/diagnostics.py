"""Seeing inside training: per-layer statistics every N steps, activation snapshots, and a
diagnosis in plain sentences at the end of a run.

A "layer" is a block of the MLP (hidden1..hiddenN, then output). Every `every` optimizer steps the
monitor records, per layer: the L2 norm of its weight gradient, its weight norm, the size of the
update relative to the weights, the mean and std of its activations on that training batch, the
fraction of dead units (ReLU: zero for every example of the batch), the saturated fraction of its
outputs (sigmoid/tanh: units x examples within SATURATION of an asymptote, where the derivative is
near zero) and its batch norm's running statistics. Between those steps it costs one modulo per step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnnrun.activations import Activation
from dnnrun.metrics import jsonable, read_jsonl

SATURATION = 0.02  # distance to an asymptote under which a sigmoid/tanh output counts as saturated
HISTOGRAM_BINS = 60


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
    every: int = 100  # optimizer steps between per-layer statistics; 0: off
    plots: bool = True  # write plots/ at the end of the run

    def check(self, problems, key: str) -> None:
        if self.every < 0:
            problems.add(f"{key}.every", f"must be >= 0 (0: off), got {self.every}")


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The monitored layers: hidden blocks and the output layer, input to output."""
    return [(name, m) for name, m in model.named_children() if name.startswith("hidden") or name == "output"]


def _weight(block: nn.Module) -> torch.Tensor:
    return block.weight if isinstance(block, nn.Linear) else block.linear.weight


class Monitor:
    """Per-layer statistics on every `every`-th step, appended to diagnostics.jsonl."""

    def __init__(self, model: nn.Module, activation: Activation, every: int, path: Path, logger):
        self.model, self.activation, self.every, self.path, self.logger = model, activation, every, path, logger
        self.layers = blocks(model)
        self._outputs: dict[str, torch.Tensor] = {}
        self._hooks: list = []
        self._before: dict[str, torch.Tensor] = {}
        self._grad_norms: dict[str, torch.Tensor] = {}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    # The three calls a monitored step makes, in order: before the forward pass, between backward
    # and the optimizer step, and after the step.

    def detach(self) -> None:
        """Remove the activation hooks (a monitored step that raised leaves them attached)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._outputs.clear()

    def watch_activations(self) -> None:
        for name, block in self.layers:
            if name != "output":
                hook = block.act.register_forward_hook(lambda m, i, out, name=name: self._outputs.__setitem__(name, out.detach()))
                self._hooks.append(hook)

    def before_update(self) -> None:
        """Gradient norms now, and the weights as they are before the optimizer moves them."""
        for name, block in self.layers:
            w = _weight(block)
            if w.grad is not None:  # a frozen layer has none, and gets no grad_norm
                self._grad_norms[name] = w.grad.norm()
            self._before[name] = w.detach().clone()

    def record(self, step: int, epoch: int) -> dict[str, Any]:
        outputs = dict(self._outputs)
        self.detach()
        stats: dict[str, dict[str, torch.Tensor]] = {}
        for name, block in self.layers:
            w = _weight(block).detach()
            s = {"grad_norm": self._grad_norms[name]} if name in self._grad_norms else {}
            s["weight_norm"] = w.norm()
            s["update_ratio"] = (w - self._before[name]).norm() / s["weight_norm"].clamp_min(1e-12)
            out = outputs.get(name)
            if out is not None:
                s.update(activation_stats(out, self.activation))
            norm = getattr(block, "norm", None)
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_mean is not None:
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
        with open(self.path, "a") as f:
            f.write(json.dumps(jsonable(entry)) + "\n")
        self.logger.diagnostics(entry, self.model)
        return entry


def activation_stats(out: torch.Tensor, activation: Activation) -> dict[str, torch.Tensor]:
    """Mean, std, and (where the activation has them) the dead units' fraction and the saturated
    outputs' fraction of a (batch, units) activation tensor."""
    s = {"act_mean": out.mean(), "act_std": out.std()}
    if activation.can_die:
        s["dead"] = (out == 0).all(dim=0).float().mean()
    if activation.asymptotes is not None:
        low, high = activation.asymptotes
        near = torch.minimum(out - low, high - out) < SATURATION
        s["saturated"] = near.float().mean()  # over units and examples: where no gradient gets through
    return s


def truncate(path: Path, last_step: int) -> None:
    """On resume: drop records after the checkpoint, which the resumed run will write again."""
    kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


@torch.no_grad()
def snapshot(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """Histograms of every hidden layer's activations on a fixed batch, in evaluation mode."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        block.act.register_forward_hook(lambda m, i, out, name=name: outputs.__setitem__(name, out.float()))
        for name, block in blocks(model)
        if name != "output"
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


# ---------------------------------------------------------------------------------------------
# Diagnosis: rules over the metrics history and the per-layer records. Each rule speaks only when
# its numbers cross a threshold, so a healthy run gets an empty diagnosis.

VANISHING = 1e-3  # first hidden layer's gradient norm below this fraction of the output layer's
EXPLODING = 1e3  # ... or above this multiple
DEAD = 0.2  # fraction of dead units in a layer worth reporting
SATURATED = 0.2  # saturated fraction of a layer's outputs worth reporting
OVERFIT_EPOCHS = 3  # epochs of rising validation loss (with falling training loss) worth reporting ...
OVERFIT_RISE = 0.05  # ... when it ends at least this much (relative) above its best
ACTIVATION_DRIFT = 100.0  # activation std of the last hidden layer vs the first, either way


def diagnose(history: list[dict[str, Any]], records: list[dict[str, Any]], n_classes: int) -> list[str]:
    found: list[str] = []
    found += _gradient_flow(records)
    found += _unit_health(records)
    found += _activation_drift(records)
    found += _not_learning(history, n_classes)
    found += _overfitting(history)
    return found


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _gradient_flow(records: list[dict[str, Any]]) -> list[str]:
    """The lowest trained hidden layer's gradient norm against the output layer's (frozen layers,
    e.g. reused ones in transfer learning, have none)."""
    ratios, lowest = [], None
    for r in records:
        layers = r["layers"]
        trained = [name for name, s in layers.items() if name != "output" and "grad_norm" in s]
        last = layers.get("output", {}).get("grad_norm")
        if trained and last:
            lowest = trained[0]
            ratios.append(layers[lowest]["grad_norm"] / last)
    ratio = _median(ratios)
    if ratio is None:
        return []
    which = "the first hidden layer's" if lowest == "hidden1" else f"the lowest trained layer's ({lowest})"
    if ratio < VANISHING:
        return [f"gradients vanish: {which} gradient norm is {ratio:.1e} of the output "
                f"layer's (median over {len(ratios)} monitored steps)"]
    if ratio > EXPLODING:
        return [f"gradients explode: {which} gradient norm is {ratio:.1e} times the output "
                f"layer's (median over {len(ratios)} monitored steps)"]
    return []


def _unit_health(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    last = records[-1]
    found = []
    for key, threshold, alone, several, of, how in (
        ("dead", DEAD, "{f:.0%} of units in layer {i} are dead", "dead units in {n} layers ({layers})", "units",
         "zero for every example of the batch"),
        ("saturated", SATURATED, "layer {i} is saturated on {f:.0%} of its outputs",
         "saturated outputs in {n} layers ({layers})", "outputs", f"units x examples within {SATURATION} of an asymptote"),
    ):
        hit = [(int(layer.removeprefix("hidden")), s[key]) for layer, s in last["layers"].items()
               if s.get(key) is not None and s[key] >= threshold]
        if len(hit) == 1:
            (i, f), = hit
            found.append(alone.format(f=f, i=i) + f" ({how} at step {last['step']})")
        elif hit:
            worst_i, worst_f = max(hit, key=lambda h: h[1])
            found.append(several.format(n=len(hit), layers=_ranges([i for i, _ in hit]))
                         + f": up to {worst_f:.0%} of {of}, in layer {worst_i} ({how} at step {last['step']})")
    return found


def _ranges(indices: list[int]) -> str:
    """[4, 5, 6, 9, 11, 12] -> '4-6, 9, 11-12'"""
    parts, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts)


def _activation_drift(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    hidden = [(k, v["act_std"]) for k, v in records[-1]["layers"].items() if "act_std" in v]
    if len(hidden) < 2 or not all(s is not None for _, s in hidden):
        return []
    (first_name, first), (last_name, last) = hidden[0], hidden[-1]
    if first <= 0 or last <= 0:
        return []
    ratio = last / first
    if ratio > ACTIVATION_DRIFT or ratio < 1 / ACTIVATION_DRIFT:
        change = "grow" if ratio > 1 else "shrink"
        return [f"activations {change} through the network: their std goes from {first:.2g} in {first_name} "
                f"to {last:.2g} in {last_name}"]
    return []


def _not_learning(history: list[dict[str, Any]], n_classes: int) -> list[str]:
    if len(history) < 2:
        return []
    first, last = history[0], history[-1]
    chance = 1 / n_classes
    if last["val/acc"] is not None and last["val/acc"] < 1.5 * chance and last["train/loss"] > 0.9 * first["train/loss"]:
        return [f"the network is not learning: training loss went from {first['train/loss']:.3f} to "
                f"{last['train/loss']:.3f} and validation accuracy is {last['val/acc']:.1%} (chance: {chance:.1%})"]
    return []


def _overfitting(history: list[dict[str, Any]]) -> list[str]:
    if len(history) < OVERFIT_EPOCHS + 1:
        return []
    best = min(range(len(history)), key=lambda i: history[i]["val/loss"])
    rising = len(history) - 1 - best
    b, last = history[best], history[-1]
    rose = last["val/loss"] > (1 + OVERFIT_RISE) * b["val/loss"]
    if rising >= OVERFIT_EPOCHS and rose and last["train/loss"] < b["train/loss"]:
        return [f"validation loss rose for the last {rising} epochs ({b['val/loss']:.3f} at epoch {b['epoch']} -> "
                f"{last['val/loss']:.3f}) while training loss fell ({b['train/loss']:.3f} -> "
                f"{last['train/loss']:.3f}): overfitting (try early stopping or a regularizer)"]
    return []
