"""Models: an MLP of blocks Linear -> [norm] -> activation -> [dropout] (or norm after activation)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from torch import nn

from dnnrun import activations
from dnnrun.init import initialize
from dnnrun.norms import NormConfig
from dnnrun.regularizers import Regularization
from dnnrun.schema import Choice, Problems


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden: list[int] = dataclasses.field(default_factory=lambda: [300, 100])  # widths, input to output
    depth: int | None = None  # with width: `depth` hidden layers of `width` units, replacing `hidden`
    width: int | None = None

    def check(self, problems: Problems, key: str) -> None:
        if (self.depth is None) != (self.width is None):
            problems.add(key, "set both depth and width (or neither, to use hidden)")
        for name, value in (("depth", self.depth), ("width", self.width)):
            if value is not None and value < 1:
                problems.add(f"{key}.{name}", f"must be >= 1, got {value}")
        if any(w < 1 for w in self.hidden):
            problems.add(f"{key}.hidden", f"every width must be >= 1, got {self.hidden}")

    @property
    def widths(self) -> list[int]:
        if self.depth is not None and self.width is not None:
            return [self.width] * self.depth
        return list(self.hidden)


def mlp(
    cfg: ModelConfig,
    in_features: int,
    n_classes: int,
    act: Choice,
    norm: NormConfig,
    init: Choice,
    reg: Regularization,
) -> nn.Sequential:
    """Blocks are named hidden1..hiddenN, then `output`, so layers can be found by name."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if norm.on_inputs:
        layers["input_norm"] = norm.layer(in_features)
    if reg.input_dropout > 0:
        layers["input_dropout"] = reg.dropout_layer(reg.input_dropout)
    width_in = in_features
    for i, width in enumerate(cfg.widths, start=1):
        block: OrderedDict[str, nn.Module] = OrderedDict()
        block["linear"] = nn.Linear(width_in, width, bias=not norm.drops_bias)
        norm_layer = norm.layer(width)
        if norm_layer is not None and norm.placement == "before":
            block["norm"] = norm_layer
        block["act"] = activations.build(act, width)
        if norm_layer is not None and norm.placement == "after":
            block["norm"] = norm_layer
        if reg.dropout > 0:
            block["dropout"] = reg.dropout_layer(reg.dropout)
        layers[f"hidden{i}"] = nn.Sequential(block)
        width_in = width
    layers["output"] = nn.Linear(width_in, n_classes)
    model = nn.Sequential(layers)
    initialize(model, init)
    return model


MODELS = {"mlp": mlp}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
