"""Weight initializers, applied to the weight of every affine layer, Linear or Conv (biases start at zero).

Glorot, He and LeCun are one function, `variance_scaling_`, with different data: the presets in
conf/init/ set its scale, mode and distribution. Fans follow PyTorch's (out, in, *kernel) layout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal

from dnnrun.config.schema import POSITIVE, Choice, Problems, check_rules, parse as parse_schema, unknown

if TYPE_CHECKING:
    import torch
    from torch import nn

# The initializers below are called under torch.no_grad() (initialize); torch is imported where
# they run, not here: checking a config must not wait for it.

# A truncated normal cut at two standard deviations has variance 0.87962566^2 of the untruncated
# one; dividing the standard deviation by it makes the variance after truncation the target.
_TRUNCATED_STD = 0.87962566103423978


def variance_scaling_(
    weight: torch.Tensor,
    scale: float = 1.0,
    mode: Literal["fan_in", "fan_out", "fan_avg"] = "fan_in",
    distribution: Literal["normal", "truncated_normal", "uniform"] = "truncated_normal",
) -> None:
    """Draw weights with variance scale / fan (Glorot: 1/fan_avg, He: 2/fan_in, LeCun: 1/fan_in).

    `normal` is the plain normal; `truncated_normal` cuts at +-2 std (Keras' choice, no outliers);
    `uniform` uses the limit sqrt(3 * variance), which has the same variance.
    """
    receptive = math.prod(weight.shape[2:])
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    variance = scale / fan
    if distribution == "normal":
        weight.normal_(0.0, math.sqrt(variance))
    elif distribution == "truncated_normal":
        from torch import nn

        std = math.sqrt(variance) / _TRUNCATED_STD
        nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)
    else:
        limit = math.sqrt(3 * variance)
        weight.uniform_(-limit, limit)


def random_normal_(weight: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> None:
    """N(mean, std^2) whatever the layer's size: the pre-2010 habit that makes deep nets fail."""
    weight.normal_(mean, std)


def random_uniform_(weight: torch.Tensor, low: float = -1.0, high: float = 1.0) -> None:
    weight.uniform_(low, high)


def orthogonal_(weight: torch.Tensor, gain: float = 1.0) -> None:
    """A (semi-)orthogonal matrix times gain (Saxe et al. 2014): W W^T = gain^2 I for the smaller side."""
    from torch import nn

    nn.init.orthogonal_(weight, gain)


def torch_default_(weight: torch.Tensor) -> None:
    """What nn.Linear does by itself: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1 / (3 fan_in).
    (dnnrun still starts the biases at zero.)"""
    from torch import nn

    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


INITIALIZERS = {
    "variance_scaling": variance_scaling_,  # Glorot, He, LeCun: presets in conf/init/
    "random_normal": random_normal_,
    "random_uniform": random_uniform_,
    "orthogonal": orthogonal_,
    "torch_default": torch_default_,
}


@dataclasses.dataclass(frozen=True)
class InitConfig(Choice):
    """The init group: the hidden layers' initializer (a registry entry and its settings) and the
    output layer's (`output`)."""

    # the output layer's: glorot_uniform (the seeds' table: Glorot for a softmax or linear output
    # layer, whatever the hidden layers use), glorot_normal, or same (as the hidden layers)
    output: str = "glorot_uniform"


# init.output's choices: conf/init's options of the same names (tests/test_init.py holds them equal)
OUTPUT = {
    "glorot_uniform": Choice("variance_scaling", {"scale": 1.0, "mode": "fan_avg", "distribution": "uniform"}),
    "glorot_normal": Choice("variance_scaling", {"scale": 1.0, "mode": "fan_avg", "distribution": "truncated_normal"}),
    "same": None,
}


def output_choice(choice: Choice) -> Choice:
    """The initializer of the output layer under this init config."""
    return OUTPUT.get(getattr(choice, "output", "same")) or choice


def is_lecun(choice: Choice) -> bool:
    """Variance 1 / fan_in: what SELU's self-normalization assumes."""
    p = choice.params
    return choice.name == "variance_scaling" and p.get("scale", 1.0) == 1.0 and p.get("mode", "fan_in") == "fan_in"


RULES = {"scale": POSITIVE, "std": POSITIVE, "gain": POSITIVE}


def parse(raw, key: str, problems: Problems) -> InitConfig | None:
    choice = parse_schema(InitConfig, raw, key, problems, registry=INITIALIZERS, kind="initializer")
    if choice is not None and choice.output not in OUTPUT:
        problems.add(f"{key}.output", unknown("output-layer initializer", choice.output, OUTPUT))
    if choice is not None:
        check_rules(choice.params, RULES, key, problems)
        if choice.params.get("low", -1.0) >= choice.params.get("high", 1.0):
            problems.add(f"{key}.low", "must be below high")
    return choice


def affine_layers(model: nn.Module) -> list[nn.Module]:
    """Every Linear and Conv layer in a module (itself included), in order: the layers with a
    weight that initializers set."""
    from torch import nn

    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def initialize(model: nn.Module, choice: Choice, output: nn.Module | None = None) -> None:
    """Apply the chosen initializer to every affine layer's weight and zero its bias; the output
    layer (`output`, else the model's `output` module) gets init.output's (output_choice)."""
    import torch

    output = output if output is not None else getattr(model, "output", None)
    with torch.no_grad():
        for layer in affine_layers(model):
            use = output_choice(choice) if layer is output else choice
            INITIALIZERS[use.name](layer.weight, **use.params)
            if layer.bias is not None:
                layer.bias.zero_()
