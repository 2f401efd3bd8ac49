"""Models by name. A builder gets its own config, what the data looks like (`Inputs`) and the
technique groups every layer follows (`Layers`: activation, norm, init, regularization), and
returns a `Network` (network.py): named blocks, input to output, that diagnostics, transfer,
pretraining and max-norm find by name instead of assuming a fixed stack of nn.Linear.

    MODELS = {"mlp": Architecture(MLPConfig, mlp, mlp_fitting), "cnn": ..., "resnet": ...}

Adding a model is one builder, one config dataclass and one YAML in conf/model/.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from dnnrun.config.schema import Choice, Problems, parse as parse_schema
from dnnrun.errors import UserError
from dnnrun.models import zoo
from dnnrun.models.zoo import ZooConfig
from dnnrun.techniques import activations
from dnnrun.techniques.init import initialize
from dnnrun.techniques.norms import NormConfig
from dnnrun.techniques.regularizers import Regularization

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dnnrun.models.network import Network

# The configs and the registry are read without torch (checking a config must not wait for it);
# the builders import it, and the modules they build from (network.py).


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a model is built for."""

    features: int  # values per example (C x H x W for images)
    classes: int
    shape: tuple[int, ...] | None = None  # one image's (C, H, W); None when the examples are vectors
    resize: int | None = None  # data.resize: images resized to resize x resize on the device, in the model


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
    """Per hidden layer Linear -> [norm] -> activation -> [dropout] (or the norm after the activation);
    images are flattened first."""
    from torch import nn

    norm, reg = layers.norm, layers.reg
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    if inputs.shape is not None:
        modules["flatten_inputs"] = nn.Flatten()
    if norm.on_inputs:
        modules["input_norm"] = norm.layer(inputs.features)
    if reg.input_dropout > 0:
        modules["input_dropout"] = getattr(nn, reg.dropout_layer)(reg.input_dropout)
    return _dense_to_output(modules, inputs.features, cfg.widths, 1, inputs, layers)


def _dense_to_output(
    modules: OrderedDict, width_in: int, widths: list[int], first: int, inputs: Inputs, layers: Layers
) -> Network:
    """Dense blocks hidden{first}... of these widths and the output layer after `modules`, all
    initialized: the MLP's body, a CNN's head."""
    from torch import nn

    from dnnrun.models.network import OUTPUT, Block, Network

    norm, reg = layers.norm, layers.reg
    for i, width in enumerate(widths, start=first):
        block = OrderedDict(linear=nn.Linear(width_in, width, bias=not norm.drops_bias))
        _finish_block(
            block,
            norm.layer(width),
            norm,
            layers,
            width,
            getattr(nn, reg.dropout_layer)(reg.dropout) if reg.dropout > 0 else None,
        )
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
    """A block's (first) affine weight in a state dict, or in a dict of shapes (None when the block is
    not there)."""
    names = (f"{block}.linear.weight", f"{block}.conv.weight", f"{block}.inner.conv1.weight")  # Block, Residual
    # a weight of fewer than 2 dimensions (a crafted file) is none: check_fits then says what differs
    return next((state[k] for k in names if k in state and len(getattr(state[k], "shape", state[k])) >= 2), None)


# ---------------------------------------------------------------------------------------------
# The convolutional net


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    name: str
    channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64])  # one stage each, input to output
    blocks: int = 1  # conv blocks per stage
    kernel: int = 3  # odd: "same" padding keeps the size within a stage
    pool: Literal["max", "avg", "none"] = "max"  # after each stage: halves height and width
    global_pool: bool = False  # average each channel of the last stage to one value (ResNet-style), else flatten
    head: list[int] = dataclasses.field(default_factory=lambda: [128])  # dense layers before the output
    option: str | None = None  # the YAML it came from (conf/model/OPTION.yaml)

    def check(self, problems: Problems, key: str) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            problems.add(f"{key}.channels", f"needs one width >= 1 per stage, got {self.channels}")
        if self.blocks < 1:
            problems.add(f"{key}.blocks", f"must be >= 1, got {self.blocks}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            problems.add(f"{key}.kernel", f"must be odd and >= 1, got {self.kernel}")
        if any(w < 1 for w in self.head):
            problems.add(f"{key}.head", f"every width must be >= 1, got {self.head}")

    @property
    def widths(self) -> list[int]:
        """The hidden blocks' widths (conv channels, then the head's units), as hidden1..N."""
        return [c for c in self.channels for _ in range(self.blocks)] + list(self.head)


def cnn(cfg: CNNConfig, inputs: Inputs, layers: Layers) -> Network:
    """Stages of conv blocks, Conv2d -> [norm] -> activation -> [dropout] (the norm per channel:
    BatchNorm2d, or for layernorm GroupNorm with one group, over (C, H, W) of each example), pooling
    after each stage, then the maps flattened (or averaged per channel), the head's dense blocks and
    the output layer. The blocks are hidden1..N, as the MLP's, so that diagnostics, transfer and
    max-norm find them."""
    from torch import nn

    from dnnrun.models.network import Block

    width_in, rows, cols = _image_shape(inputs, "cnn")
    norm, reg = layers.norm, layers.reg
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    if norm.on_inputs:
        modules["input_norm"] = norm.conv_layer(width_in)
    if reg.input_dropout > 0:
        modules["input_dropout"] = getattr(nn, reg.dropout_layer)(reg.input_dropout)
    dropout = _SPATIAL[reg.dropout_layer] if reg.spatial else reg.dropout_layer
    i = 0  # rows, cols: of the maps, as they shrink
    for stage, channels in enumerate(cfg.channels, start=1):
        for _ in range(cfg.blocks):
            i += 1
            block: OrderedDict[str, nn.Module] = OrderedDict()
            block["conv"] = nn.Conv2d(width_in, channels, cfg.kernel, padding=cfg.kernel // 2, bias=not norm.drops_bias)
            _finish_block(
                block,
                norm.conv_layer(channels),
                norm,
                layers,
                channels,
                getattr(nn, dropout)(reg.dropout) if reg.dropout > 0 else None,
            )
            modules[f"hidden{i}"] = Block(block)
            width_in = channels
        if cfg.pool != "none":
            modules[f"pool{stage}"] = (nn.MaxPool2d if cfg.pool == "max" else nn.AvgPool2d)(2, ceil_mode=True)
            rows, cols = -(-rows // 2), -(-cols // 2)  # ceil_mode
    if cfg.global_pool:
        modules["flatten"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    else:
        modules["flatten"] = nn.Flatten()
        width_in *= rows * cols
    return _dense_to_output(modules, width_in, cfg.head, i + 1, inputs, layers)


def _image_shape(inputs: Inputs, model: str) -> tuple[int, ...]:
    if inputs.shape is None:
        raise UserError(
            f"model={model} needs images; this data's examples are vectors (use an image set, or model=mlp)"
        )
    return inputs.shape


_SPATIAL = {"Dropout": "Dropout2d", "AlphaDropout": "FeatureAlphaDropout"}  # whole channels, for conv blocks


def _finish_block(block, norm_layer, norm: NormConfig, layers: Layers, width: int, dropout) -> None:
    """After the affine layer: [norm] -> activation -> [dropout], or the norm after the activation."""
    if norm_layer is not None and norm.placement == "before":
        block["norm"] = norm_layer
    block["act"] = activations.build(layers.act, width)
    if norm_layer is not None and norm.placement == "after":
        block["norm"] = norm_layer
    if dropout is not None:
        block["dropout"] = dropout


def from_config(cfg, state: dict[str, torch.Tensor]):
    """A conv net's shapes come from its config: a checkpoint or a transfer source of another shape
    does not fit, which check_fits says (transfer.add and a changed head are for MLPs)."""
    return cfg


# ---------------------------------------------------------------------------------------------
# The residual network


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    name: str
    depth: int = 20  # conv layers + the output layer: 6n + 2 for 3 stages (20, 32, 44, 56, 110: He et al. 2016)
    width: int = 16  # channels of the first stage, doubled at each stage after it
    stages: int = 3  # each after the first halves height and width (stride 2)
    head: list[int] = dataclasses.field(default_factory=list)  # dense layers between the pooled maps and the output
    option: str | None = None  # the YAML it came from (conf/model/OPTION.yaml)

    def check(self, problems: Problems, key: str) -> None:
        if self.stages < 1:
            problems.add(f"{key}.stages", f"must be >= 1, got {self.stages}")
        elif self.depth < 2 * self.stages + 2 or (self.depth - 2) % (2 * self.stages):
            problems.add(
                f"{key}.depth",
                f"must be {2 * self.stages}n + 2 with n >= 1 for {self.stages} stages "
                f"(e.g. {', '.join(str(2 * self.stages * n + 2) for n in (1, 2, 3, 5))}), "
                f"got {self.depth}",
            )
        if self.width < 1:
            problems.add(f"{key}.width", f"must be >= 1, got {self.width}")
        if any(w < 1 for w in self.head):
            problems.add(f"{key}.head", f"every width must be >= 1, got {self.head}")

    @property
    def per_stage(self) -> int:
        """Residual blocks per stage (two conv layers each)."""
        return (self.depth - 2) // (2 * self.stages)

    @property
    def widths(self) -> list[int]:
        """The hidden blocks' widths: the stem's channels, each residual block's, then the head's units."""
        stages = [self.width * 2**s for s in range(self.stages) for _ in range(self.per_stage)]
        return [self.width, *stages, *self.head]


def resnet(cfg: ResNetConfig, inputs: Inputs, layers: Layers) -> Network:
    """The CIFAR ResNet family: a 3x3 conv stem (hidden1), then residual blocks (hidden2..): two 3x3
    convs, each followed by the norm (BatchNorm2d, or one-group GroupNorm for layernorm), the
    activation between them and after the sum with the shortcut. The first block of each stage
    after the first halves the maps (stride 2) and doubles the channels, its shortcut a 1x1 conv
    (He et al.'s option B). Then each channel averaged, the head and the output layer."""
    from torch import nn

    from dnnrun.models.network import Block, Residual

    width_in, _, _ = _image_shape(inputs, "resnet")
    norm, reg = layers.norm, layers.reg
    before = norm.placement == "before"
    dropout = _SPATIAL[reg.dropout_layer] if reg.spatial else reg.dropout_layer

    def drop():
        return getattr(nn, dropout)(reg.dropout) if reg.dropout > 0 else None

    def conv(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> nn.Conv2d:
        return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=not norm.drops_bias)

    modules: OrderedDict[str, nn.Module] = OrderedDict()
    if norm.on_inputs:
        modules["input_norm"] = norm.conv_layer(width_in)
    if reg.input_dropout > 0:
        modules["input_dropout"] = getattr(nn, reg.dropout_layer)(reg.input_dropout)
    stem: OrderedDict[str, nn.Module] = OrderedDict(conv=conv(width_in, cfg.width))
    _finish_block(stem, norm.conv_layer(cfg.width), norm, layers, cfg.width, drop())
    modules["hidden1"] = Block(stem)
    width_in, i = cfg.width, 1
    for stage in range(cfg.stages):
        channels = cfg.width * 2**stage
        for b in range(cfg.per_stage):
            i += 1
            stride = 2 if stage > 0 and b == 0 else 1
            inner: OrderedDict[str, nn.Module] = OrderedDict(conv1=conv(width_in, channels, stride))
            _finish_block(inner, norm.conv_layer(channels), norm, layers, channels, None)
            inner["conv2"] = conv(channels, channels)
            if before and (second := norm.conv_layer(channels)) is not None:
                inner["norm2"] = second
            shortcut: nn.Module = nn.Identity()
            if stride != 1 or width_in != channels:
                projection = OrderedDict(conv=conv(width_in, channels, stride, kernel=1))
                if before and (short_norm := norm.conv_layer(channels)) is not None:
                    projection["norm"] = short_norm
                shortcut = nn.Sequential(projection)
            block = OrderedDict(inner=nn.Sequential(inner), shortcut=shortcut)
            _finish_block(block, None if before else norm.conv_layer(channels), norm, layers, channels, drop())
            modules[f"hidden{i}"] = Residual(block)
            width_in = channels
    modules["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return _dense_to_output(modules, width_in, cfg.head, i + 1, inputs, layers)


# ---------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True)
class OwnWeights:
    """Weights that an architecture's config names to start from (model=zoo: model.weights),
    reused as transfer.source's are, before the run writes anything:

    named(cfg)                     the file or name; None: random weights
    load(cfg)                      its state dict
    check(state, model, cfg, k)    refuse weights that do not fit the model (built on the meta device)
    reuse(model, state, cfg, k)    copy them: (the parameter names copied, the stages' 1-based indices)

    k: transfer.layers, the stages to reuse (None: all)."""

    named: Callable[[Any], str | None]
    load: Callable[[Any], dict[str, torch.Tensor]]
    check: Callable[[dict[str, torch.Tensor], Network, Any, int | None], Any]
    reuse: Callable[[Network, dict[str, torch.Tensor], Any, int | None], tuple[list[str], list[int]]]


@dataclasses.dataclass(frozen=True)
class Architecture:
    config: type  # the dataclass its YAML fills
    build: Callable[[Any, Inputs, Layers], Network]
    fitting: Callable[[Any, dict[str, torch.Tensor]], Any]  # the config whose shapes fit a state dict
    images: bool = False  # needs images (N, C, H, W): refused for data whose examples are vectors
    # takes pixels in [0, 1] and resizes and normalizes them itself (data.scaling does not apply)
    own_inputs: bool = False
    # keeps its own activations, normalization and dropout: act, norm and the dropout regularizers do not apply
    own_layers: bool = False
    weights: OwnWeights | None = None  # the weights its config names to start from
    # None: the members of trainer.seeds can be stacked (torch.func.stack_module_state); else why not
    members: str | None = None


ZOO_WEIGHTS = OwnWeights(
    named=lambda cfg: cfg.weights,
    load=zoo.load_weights,
    check=lambda state, model, cfg, k: zoo.fitting(state, model, k, cfg.arch),
    reuse=lambda model, state, cfg, k: zoo.reuse(model, state, k, cfg.arch, cfg.weights),
)

MODELS = {
    "mlp": Architecture(MLPConfig, mlp, mlp_fitting),
    "cnn": Architecture(CNNConfig, cnn, from_config, images=True),
    "resnet": Architecture(ResNetConfig, resnet, from_config, images=True),
    "zoo": Architecture(
        ZooConfig,
        zoo.build,
        from_config,
        images=True,
        own_inputs=True,
        own_layers=True,
        weights=ZOO_WEIGHTS,
        members="a zoo network starts from model.weights, and members start from their seeds' initializations",
    ),
}


def parse(raw, key: str, problems: Problems):
    """The model's config, checked against the chosen architecture's dataclass."""
    name = raw.get("name") if isinstance(raw, dict) else None
    config = MODELS[name].config if isinstance(name, str) and name in MODELS else MLPConfig
    return parse_schema(config, raw, key, problems, registry=MODELS, kind="model")


def build(cfg, inputs: Inputs, layers: Layers) -> Network:
    """The model; with data.resize, images resized first by a `resize` layer (a zoo network
    resizes in its own input layer)."""
    architecture = MODELS[cfg.name]
    if inputs.resize is None or inputs.shape is None or architecture.own_inputs:
        return architecture.build(cfg, inputs, layers)
    from dnnrun.models.network import Resize

    size, channels = inputs.resize, inputs.shape[0]
    resized = dataclasses.replace(inputs, shape=(channels, size, size), features=channels * size * size)
    net = architecture.build(cfg, resized, layers)
    return type(net)(OrderedDict([("resize", Resize(size)), *net.named_children()]))


def fitting_config(cfg, state: dict[str, torch.Tensor]):
    """The model config of this architecture whose layers have the shapes of these weights."""
    return MODELS[cfg.name].fitting(cfg, state)
