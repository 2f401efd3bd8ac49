"""Regularizers, composable: `regularizer=[l2,dropout]` selects several at once.

Each registry entry takes its YAML's keyword arguments and returns the settings it contributes to
one `Regularization`, which the model builder (dropout layers) and the training step (penalty,
after-step constraint) read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from dnnrun.schema import Choice, Problems, parse_choice


def _none() -> dict[str, Any]:
    return {}


REGULARIZERS = {
    "none": _none,
}


@dataclasses.dataclass
class Regularization:
    dropout: float = 0.0  # rate on the inputs and every hidden layer, never the output
    dropout_layer: type[nn.Module] = nn.Dropout


def parse(raw: Any, key: str, problems: Problems) -> list[Choice] | None:
    """`regularizer` is a mapping from the selected options to their settings."""
    if not isinstance(raw, Mapping):
        problems.add(key, f"expected a mapping of regularizers, got {raw!r}")
        return None
    choices = [parse_choice(v, REGULARIZERS, f"{key}.{k}", "regularizer", problems) for k, v in raw.items()]
    return None if any(c is None for c in choices) else choices


def combine(choices: list[Choice]) -> Regularization:
    settings: dict[str, Any] = {}
    for choice in choices:
        settings.update(REGULARIZERS[choice.name](**choice.params))
    return Regularization(**settings)
