"""Models by name. A builder gets its own config, what the data looks like (`Inputs`) and the
technique groups every layer follows (`Layers`: activation, norm, init, regularization), and
returns a `Network` (network.py): named blocks, input to output, that diagnostics, transfer, pretraining and
max-norm find by name instead of assuming a fixed stack of nn.Linear.

    MODELS = {"mlp": Architecture(MLPConfig, mlp, mlp_fitting)}

Adding a model is one builder, one config dataclass and one YAML in conf/model/.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dnnrun import activations
from dnnrun.init import initialize
from dnnrun.norms import NormConfig
from dnnrun.regularizers import Regularization
from dnnrun.schema import Choice, Problems, parse as parse_schema

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dnnrun.network import Network

# The configs and the registry are read without torch (checking a config must not wait for it);
# the builders import it, and the modules they build from (network.py).


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a model is built for."""

    features: int  # values per example, flattened
    classes: int
    shape: tuple[int, ...] | None = None  # one example's shape before flattening: (H, W) or (H, W, C), for images


@dataclasses.dataclass(frozen=True)
class Layers:
    """The choices every builder applies to each of its layers."""

    act: Choice
    norm: NormConfig
    init: Choice
    reg: Regularization


# ---------------------------------------------------------------------------------------------
# The multilayer perceptron


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    name: str
    hidden: list[int] = dataclasses.field(default_factory=lambda: [300, 100])  # widths, input to output
    depth: int | None = None  # with width: `depth` hidden layers of `width` units, replacing `hidden`
    width: int | None = None
    option: str | None = None  # the YAML it came from (conf/model/OPTION.yaml)

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


def mlp(cfg: MLPConfig, inputs: Inputs, layers: Layers) -> Network:
    """Per hidden layer Linear -> [norm] -> activation -> [dropout] (or the norm after the activation)."""
    from torch import nn

    from dnnrun.network import OUTPUT, Block, Network

    norm, reg = layers.norm, layers.reg
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    if norm.on_inputs:
        modules["input_norm"] = norm.layer(inputs.features)
    if reg.input_dropout > 0:
        modules["input_dropout"] = getattr(nn, reg.dropout_layer)(reg.input_dropout)
    width_in = inputs.features
    for i, width in enumerate(cfg.widths, start=1):
        block: OrderedDict[str, nn.Module] = OrderedDict()
        block["linear"] = nn.Linear(width_in, width, bias=not norm.drops_bias)
        norm_layer = norm.layer(width)
        if norm_layer is not None and norm.placement == "before":
            block["norm"] = norm_layer
        block["act"] = activations.build(layers.act, width)
        if norm_layer is not None and norm.placement == "after":
            block["norm"] = norm_layer
        if reg.dropout > 0:
            block["dropout"] = getattr(nn, reg.dropout_layer)(reg.dropout)
        modules[f"hidden{i}"] = Block(block)
        width_in = width
    modules[OUTPUT] = nn.Linear(width_in, inputs.classes)
    model = Network(modules)
    initialize(model, layers.init)
    return model


def mlp_fitting(cfg: MLPConfig, state: dict[str, torch.Tensor]) -> MLPConfig:
    """The config whose hidden widths are those of these weights (a transferred model's widths come
    from its source, not from model.hidden)."""
    return dataclasses.replace(cfg, hidden=hidden_widths(state), depth=None, width=None)


def hidden_widths(state: dict[str, torch.Tensor]) -> list[int]:
    """The output widths of hidden1, hidden2, ... in a state dict, as long as they run on."""
    widths = []
    while (weight := affine_weight(state, f"hidden{len(widths) + 1}")) is not None:
        widths.append(weight.shape[0])
    return widths


def affine_weight(state: dict[str, torch.Tensor], block: str) -> torch.Tensor | None:
    """A block's affine weight in a state dict (None when the block is not there)."""
    return next((state[k] for k in (f"{block}.linear.weight", f"{block}.conv.weight") if k in state), None)


# ---------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True)
class Architecture:
    config: type  # the dataclass its YAML fills
    build: Callable[[Any, Inputs, Layers], Network]
    fitting: Callable[[Any, dict[str, torch.Tensor]], Any]  # the config whose shapes fit a state dict


MODELS = {"mlp": Architecture(MLPConfig, mlp, mlp_fitting)}


def parse(raw, key: str, problems: Problems):
    """The model's config, checked against the chosen architecture's dataclass."""
    name = raw.get("name") if isinstance(raw, dict) else None
    config = MODELS[name].config if isinstance(name, str) and name in MODELS else MLPConfig
    return parse_schema(config, raw, key, problems, registry=MODELS, kind="model")


def build(cfg, inputs: Inputs, layers: Layers) -> Network:
    return MODELS[cfg.name].build(cfg, inputs, layers)


def fitting_config(cfg, state: dict[str, torch.Tensor]):
    """The model config of this architecture whose layers have the shapes of these weights."""
    return MODELS[cfg.name].fitting(cfg, state)
