"""Normalization layers by name, and where they sit relative to the activation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from dnnrun.schema import FRACTION, POSITIVE, Problems, check_rules, parse


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # layers with running statistics


@dataclasses.dataclass(frozen=True)
class Norm:
    build: Callable[..., nn.Module] | None  # called with the layer width first; None: no layer
    cancels_bias: bool  # true when the layer subtracts a per-unit mean, so a bias before it is wasted


NORMS = {
    "none": Norm(build=None, cancels_bias=False),
    # momentum is PyTorch's: running = (1 - momentum) * running + momentum * batch (Keras' 0.99 is 0.01)
    "batchnorm": Norm(build=nn.BatchNorm1d, cancels_bias=True),
    # normalizes each example over its units; a per-unit bias before it is not cancelled
    "layernorm": Norm(build=nn.LayerNorm, cancels_bias=False),
}


@dataclasses.dataclass(frozen=True)
class NormConfig:
    name: str
    placement: Literal["before", "after"] = "before"  # before or after the activation
    on_inputs: bool = False  # also normalize the raw inputs with a layer of this kind (in place of standardizing)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def check(self, problems: Problems, key: str) -> None:
        check_rules(self.params, {"eps": POSITIVE, "momentum": FRACTION}, key, problems)
        if self.on_inputs and NORMS.get(self.name, NORMS["none"]).build is None:
            problems.add(f"{key}.on_inputs", f"needs a normalization layer; norm '{self.name}' has none")

    @property
    def drops_bias(self) -> bool:
        """The Linear before this norm needs no bias: the norm's own shift replaces it."""
        return NORMS[self.name].cancels_bias and self.placement == "before"

    def layer(self, width: int) -> nn.Module | None:
        build = NORMS[self.name].build
        return None if build is None else build(width, **self.params)


def parse_norm(raw, key: str, problems: Problems) -> NormConfig | None:
    return parse(NormConfig, raw, key, problems, registry=NORMS, kind="norm")
