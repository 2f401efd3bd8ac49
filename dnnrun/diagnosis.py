"""The diagnosis at the end of a run: rules over the metrics history (metrics.jsonl) and the
per-layer records (diagnostics.jsonl), each a plain sentence. A rule speaks only when its numbers
cross a threshold, so a healthy run gets an empty diagnosis."""

from __future__ import annotations

import math
import statistics
from typing import Any

from dnnrun.diagnostics import SATURATION

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
