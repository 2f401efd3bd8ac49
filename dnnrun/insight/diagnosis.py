"""The diagnosis at the end of a run: rules over the metrics history (metrics.jsonl) and the
per-layer records (diagnostics.jsonl), each a plain sentence with what to try. A rule speaks only
when its numbers cross a threshold, so a healthy run gets an empty diagnosis.

A finding is a `Finding`: a str (the sentence, which is what summary.json stores) that also knows
its rule and that rule's remedies, dnnrun overrides (REMEDIES below, and WHEN, when each rule speaks:
docs/reference/diagnosis.md is made from both; tests/test_remedies.py composes every remedy against conf/)."""

from __future__ import annotations

import dataclasses
import math
import shlex
import statistics
from typing import TYPE_CHECKING, Any

from dnnrun.insight.diagnostics import SATURATION

if TYPE_CHECKING:
    from typing import Self

VANISHING = 1e-3  # first hidden layer's gradient norm below this fraction of the output layer's
EXPLODING = 1e3  # ... or above this multiple
DEAD = 0.2  # fraction of dead units in a layer worth reporting
SATURATED = 0.2  # saturated fraction of a layer's outputs worth reporting
OVERFIT_EPOCHS = 3  # epochs of rising validation loss (with falling training loss) worth reporting ...
OVERFIT_RISE = 0.05  # ... when it ends at least this much (relative) above its best
ACTIVATION_DRIFT = 100.0  # activation std of the last hidden layer vs the first, either way


@dataclasses.dataclass(frozen=True)
class Remedy:
    overrides: tuple[str, ...]  # command-line overrides that go together, e.g. ("act=selu", "init=lecun_normal")
    note: str = ""  # where it applies, or what it is for

    def __str__(self) -> str:  # as typed in a shell: 'regularizer=[l2]' quoted, act=elu not
        command = " ".join(shlex.quote(o) for o in self.overrides)
        return f"{command} ({self.note})" if self.note else command


def _each(*overrides: str) -> tuple[Remedy, ...]:
    return tuple(Remedy((o,)) for o in overrides)


_SELU = Remedy(("act=selu", "init=lecun_normal"))  # SELU self-normalizes only with LeCun init
_LR_RANGE_TEST = Remedy(("mode=lr_find",), "the learning-rate range test, to pick optimizer.lr")
# Initializations that keep the signal's variance through the layers, each for its activations.
_SCALED_INIT = (
    Remedy(("init=he_normal",), "ReLU family, ELU"),
    Remedy(("init=glorot_uniform",), "tanh; sigmoid still fades in deep nets"),
    _SELU,
)

# rule -> what to try, in this order (docs/reference/diagnosis.md: which remedy for which problem).
REMEDIES: dict[str, tuple[Remedy, ...]] = {
    "vanishing_gradients": (*_SCALED_INIT, *_each("norm=batchnorm")),
    "exploding_gradients": (*_SCALED_INIT, *_each("norm=batchnorm", "trainer.clip_norm=1.0")),
    "activation_drift": (*_SCALED_INIT, *_each("norm=batchnorm")),
    "saturated_units": (*_each("act=relu", "act=elu"), _SELU, *_each("norm=batchnorm")),
    # A ReLU dies when a large step leaves its input negative for every example: a leak keeps a
    # gradient flowing, a lower rate (the range test shows which) keeps the steps small.
    "dead_units": (*_each("act=leaky_relu", "act=leaky_relu_0.2", "act=rrelu", "act=prelu", "act=elu"), _LR_RANGE_TEST),
    "not_learning": (
        *_each(
            "optimizer=momentum",
            "optimizer=nesterov",
            "optimizer=rmsprop",
            "optimizer=adam",
            "optimizer=nadam",
            "schedule=onecycle",
            "schedule=performance",
            "schedule=exponential",
        ),
        _LR_RANGE_TEST,
    ),
    "overfitting": _each(
        "regularizer=[l2]", "regularizer=[dropout]", "regularizer=[max_norm]", "trainer.early_stopping.patience=10"
    ),
}


# rule -> when it speaks, from the thresholds above (docs/reference/diagnosis.md).
WHEN: dict[str, str] = {
    "vanishing_gradients": f"the first hidden layer's gradient norm is under {VANISHING:g} of the output layer's "
    "(median over the monitored steps)",
    "exploding_gradients": f"the first hidden layer's gradient norm is over {EXPLODING:g} times the output layer's "
    "(median over the monitored steps)",
    "activation_drift": f"the last hidden layer's activation std is over {ACTIVATION_DRIFT:g} times the first's, or "
    f"under 1/{ACTIVATION_DRIFT:g} of it",
    "saturated_units": f"over {SATURATED:.0%} of a layer's outputs (units x examples) lie within {SATURATION:g} of "
    "an asymptote of sigmoid or tanh",
    "dead_units": f"over {DEAD:.0%} of a layer's units output 0 for every example of the monitored batch",
    "not_learning": "validation accuracy under 1.5 x chance at the end, and training loss over 0.9 x its first epoch's",
    "overfitting": f"validation loss rose for {OVERFIT_EPOCHS} epochs or more, to over {OVERFIT_RISE:.0%} above its "
    "best, while training loss fell",
}


class Finding(str):
    """One sentence of the diagnosis, with the rule that found it and that rule's remedies. A str,
    so that it is stored (summary.json), compared and printed as the sentence it is."""

    rule: str
    remedies: tuple[Remedy, ...]

    def __new__(cls, rule: str, sentence: str) -> Self:
        self = super().__new__(cls, sentence)
        self.rule, self.remedies = rule, REMEDIES[rule]
        return self

    def __getnewargs__(self) -> tuple[str, str]:  # copy and pickle call __new__ with these
        return self.rule, str(self)


def diagnose(history: list[dict[str, Any]], records: list[dict[str, Any]], n_classes: int) -> list[Finding]:
    found: list[Finding] = []
    found += _gradient_flow(records)
    found += _unit_health(records)
    found += _activation_drift(records)
    found += _not_learning(history, n_classes)
    found += _overfitting(history)
    return found


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _gradient_flow(records: list[dict[str, Any]]) -> list[Finding]:
    """The lowest trained hidden layer's gradient norm against the output layer's (frozen layers,
    e.g. reused ones in transfer learning, have none). Where it vanishes, each layer's median ratio
    says from which layer down; a saturated layer at the top of that stretch is named as the cause
    (a sigmoid or tanh unit near its asymptote passes back almost none of the gradient it gets),
    one elsewhere is not."""
    ratios, lowest = [], None
    per_layer: dict[str, list[float]] = {}
    for r in records:
        layers = r["layers"]
        trained = [name for name, s in layers.items() if name != "output" and "grad_norm" in s]
        last = layers.get("output", {}).get("grad_norm")
        if trained and last:
            lowest = trained[0]
            ratios.append(layers[lowest]["grad_norm"] / last)
            for name in trained:
                per_layer.setdefault(name, []).append(layers[name]["grad_norm"] / last)
    ratio = _median(ratios)
    if ratio is None:
        return []
    which = "the first hidden layer's" if lowest == "hidden1" else f"the lowest trained layer's ({lowest})"
    if ratio < VANISHING:
        sentence = (
            f"gradients vanish: {which} gradient norm is {ratio:.1e} of the output layer's (median over "
            f"{len(ratios)} monitored steps)"
        )
        faint = [int(name.removeprefix("hidden")) for name, rs in per_layer.items() if _median(rs) < VANISHING]
        top = max(faint, default=int(lowest.removeprefix("hidden")))
        if top > int(lowest.removeprefix("hidden")):
            sentence += f"; it is under {VANISHING:g} of it from layer {top} down"
        # the gradient is lost passing back through the layer where the faint stretch begins, or the one above
        cause = [
            int(name.removeprefix("hidden"))
            for name, s in records[-1]["layers"].items()
            if (s.get("saturated") or 0) >= SATURATED and top <= int(name.removeprefix("hidden")) <= top + 1
        ]
        if cause:
            sentence += (
                f"; layer {_ranges(cause)} there is saturated, and a saturated unit passes back almost none "
                f"of the gradient it gets: the saturation makes it vanish"
            )
        return [Finding("vanishing_gradients", sentence)]
    if ratio > EXPLODING:
        return [
            Finding(
                "exploding_gradients",
                f"gradients explode: {which} gradient norm is {ratio:.1e} times "
                f"the output layer's (median over {len(ratios)} monitored steps)",
            )
        ]
    return []


def _unit_health(records: list[dict[str, Any]]) -> list[Finding]:
    if not records:
        return []
    last = records[-1]
    found = []
    for key, rule, threshold, alone, several, of, how in (
        (
            "dead",
            "dead_units",
            DEAD,
            "{f:.0%} of units in layer {i} are dead",
            "dead units in {n} layers ({layers})",
            "units",
            "zero for every example of the batch",
        ),
        (
            "saturated",
            "saturated_units",
            SATURATED,
            "layer {i} is saturated on {f:.0%} of its outputs",
            "saturated outputs in {n} layers ({layers})",
            "outputs",
            f"units x examples within {SATURATION} of an asymptote",
        ),
    ):
        hit = [
            (int(layer.removeprefix("hidden")), s[key])
            for layer, s in last["layers"].items()
            if s.get(key) is not None and s[key] >= threshold
        ]
        if len(hit) == 1:
            ((i, f),) = hit
            found.append(Finding(rule, alone.format(f=f, i=i) + f" ({how} at step {last['step']})"))
        elif hit:
            worst_i, worst_f = max(hit, key=lambda h: h[1])
            found.append(
                Finding(
                    rule,
                    several.format(n=len(hit), layers=_ranges([i for i, _ in hit]))
                    + f": up to {worst_f:.0%} of {of}, in layer {worst_i} ({how} at step {last['step']})",
                )
            )
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


def _activation_drift(records: list[dict[str, Any]]) -> list[Finding]:
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
        return [
            Finding(
                "activation_drift",
                f"activations {change} through the network: their std goes from "
                f"{first:.2g} in {first_name} to {last:.2g} in {last_name}",
            )
        ]
    return []


def _train_loss(record: dict[str, Any]) -> float:
    """The training loss comparable with the validation loss: in evaluation mode (trainer.eval_train)
    where the run measured it, else the running loss over the epoch's batches."""
    return record.get("train_eval/loss", record["train/loss"])


def _not_learning(history: list[dict[str, Any]], n_classes: int) -> list[Finding]:
    if len(history) < 2:
        return []
    first, last = history[0], history[-1]
    chance = 1 / n_classes
    if last["val/acc"] is not None and last["val/acc"] < 1.5 * chance and _train_loss(last) > 0.9 * _train_loss(first):
        return [
            Finding(
                "not_learning",
                f"the network is not learning: training loss went from "
                f"{_train_loss(first):.3f} to {_train_loss(last):.3f} and validation accuracy is "
                f"{last['val/acc']:.1%} (chance: {chance:.1%})",
            )
        ]
    return []


def _overfitting(history: list[dict[str, Any]]) -> list[Finding]:
    if len(history) < OVERFIT_EPOCHS + 1:
        return []
    best = min(range(len(history)), key=lambda i: history[i]["val/loss"])
    rising = len(history) - 1 - best
    b, last = history[best], history[-1]
    rose = last["val/loss"] > (1 + OVERFIT_RISE) * b["val/loss"]
    if rising >= OVERFIT_EPOCHS and rose and _train_loss(last) < _train_loss(b):
        return [
            Finding(
                "overfitting",
                f"validation loss rose for the last {rising} epochs ({b['val/loss']:.3f} at "
                f"epoch {b['epoch']} -> {last['val/loss']:.3f}) while training loss fell "
                f"({_train_loss(b):.3f} -> {_train_loss(last):.3f}): overfitting",
            )
        ]
    return []
