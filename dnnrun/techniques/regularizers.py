"""Regularizers, composable: `regularizer=[l2,dropout]` selects several at once.

Each registry entry takes its YAML's keyword arguments and returns the settings it contributes to
one `Regularization`: the model builder reads the dropout settings, the training step adds the
penalty and applies the after-step constraint. Two entries may not set the same thing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dnnrun.config.schema import FRACTION, NON_NEGATIVE, POSITIVE, Choice, Problems, check_rules, parse_choice
from dnnrun.techniques.init import affine_layers

if TYPE_CHECKING:
    import torch
    from torch import nn


def is_weight_matrix(p: torch.Tensor) -> bool:
    """Penalties and weight decay apply to weight matrices only: biases and normalization scales
    and shifts (all 1-D) are exempt."""
    return p.ndim > 1


def weight_matrices(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if is_weight_matrix(p)]


def _none() -> dict[str, Any]:
    return {}


def l1(factor: float = 1e-4) -> dict[str, Any]:
    """Adds factor * sum |w| over the weight matrices (never biases or normalization parameters)."""
    return {"l1": factor}


def l2(factor: float = 1e-4) -> dict[str, Any]:
    """Adds factor * sum w^2 over the weight matrices (never biases or normalization parameters)."""
    return {"l2": factor}


def l1_l2(l1: float = 1e-5, l2: float = 1e-4) -> dict[str, Any]:
    return {"l1": l1, "l2": l2}


def dropout(rate: float = 0.2, input_rate: float = 0.2, spatial: bool = False) -> dict[str, Any]:
    """Zeroes each unit with probability rate in training and scales the rest by 1 / (1 - rate);
    spatial: in conv blocks, whole channels (Dropout2d), as neighbouring pixels are correlated."""
    return {"dropout": rate, "input_dropout": input_rate, "dropout_layer": "Dropout", "spatial": spatial}


def alpha_dropout(rate: float = 0.1, input_rate: float = 0.1, spatial: bool = False) -> dict[str, Any]:
    """Dropout that keeps the mean and variance of its inputs: the kind that SELU nets need
    (spatial: whole channels of conv blocks, FeatureAlphaDropout)."""
    return {"dropout": rate, "input_dropout": input_rate, "dropout_layer": "AlphaDropout", "spatial": spatial}


def max_norm(max_value: float = 1.0) -> dict[str, Any]:
    """After every optimizer step, each unit's incoming weight vector is rescaled to norm <= max_value."""
    return {"max_norm": max_value}


REGULARIZERS = {
    "none": _none,
    "l1": l1,
    "l2": l2,
    "l1_l2": l1_l2,
    "dropout": dropout,
    "alpha_dropout": alpha_dropout,
    "max_norm": max_norm,
}

RULES = {
    "factor": NON_NEGATIVE,
    "l1": NON_NEGATIVE,
    "l2": NON_NEGATIVE,
    "rate": FRACTION,
    "input_rate": FRACTION,
    "max_value": POSITIVE,
}


@dataclasses.dataclass
class Regularization:
    l1: float = 0.0
    l2: float = 0.0
    dropout: float = 0.0  # rate after every hidden layer's activation (never after the output layer)
    input_dropout: float = 0.0  # rate on the inputs
    dropout_layer: str = "Dropout"  # torch.nn's class
    spatial: bool = False  # conv blocks drop whole channels
    max_norm: float | None = None

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """The loss term added in training: l1 * sum |w| + l2 * sum w^2 over the weight matrices."""
        return self.penalty_on(weight_matrices(model)) if self.l1 or self.l2 else None

    def penalty_on(self, weights: list[torch.Tensor]) -> torch.Tensor | None:
        """penalty() of these weight matrices (training/members.py: each stacked over the members, whose
        penalties the sum keeps apart)."""
        if not (self.l1 or self.l2):
            return None
        import torch

        total = torch.zeros((), device=weights[0].device)
        if self.l1:
            total = total + self.l1 * sum(w.abs().sum() for w in weights)
        if self.l2:
            total = total + self.l2 * sum(w.pow(2).sum() for w in weights)
        return total

    def after_step(self, model: nn.Module) -> None:
        """Max-norm: each unit's (or conv filter's) incoming weights rescaled to norm <= max_norm."""
        if self.max_norm is None:
            return
        import torch

        with torch.no_grad():
            for layer in affine_layers(model):
                if layer.weight.requires_grad:  # frozen layers stay as they are
                    cap_norms_(layer.weight, self.max_norm)


def cap_norms_(w: torch.Tensor, max_value: float, stacked: int = 0) -> None:
    """Rescale each unit's (conv filter's) incoming weights to norm <= max_value, in place. `w` is
    (out, in, *kernel), after `stacked` leading axes of copies (training/members.py: one, the members)."""
    units = stacked + 1
    norms = w.flatten(units).norm(dim=units).reshape(*w.shape[:units], *[1] * (w.ndim - units))
    w.mul_((max_value / norms.clamp_min(1e-12)).clamp(max=1.0))


def parse(raw: Any, key: str, problems: Problems) -> list[Choice] | None:
    """`regularizer` maps each selected option to its settings (a list picks several)."""
    if not isinstance(raw, Mapping):
        problems.add(key, f"expected a mapping of regularizers, got {raw!r}")
        return None
    choices = {}
    for option, spec in raw.items():
        choice = parse_choice(spec, REGULARIZERS, f"{key}.{option}", "regularizer", problems)
        if choice is not None:
            check_rules(choice.params, RULES, f"{key}.{option}", problems)
            choices[option] = choice
    setters: dict[str, str] = {}
    clashes: dict[tuple[str, str], list[str]] = {}
    for option, choice in choices.items():
        for setting in REGULARIZERS[choice.name](**choice.params):
            if setting in setters:
                clashes.setdefault((setters[setting], option), []).append(setting)
            setters[setting] = option
    for (first, second), settings in clashes.items():
        problems.add(key, f"{first} and {second} both set {', '.join(settings)}; keep one of them")
    return list(choices.values()) if len(choices) == len(raw) else None


def combine(choices: list[Choice]) -> Regularization:
    settings: dict[str, Any] = {}
    for choice in choices:
        settings.update(REGULARIZERS[choice.name](**choice.params))
    return Regularization(**settings)
