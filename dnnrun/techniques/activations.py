"""Activation functions by name. A YAML in conf/act/ sets `name:` and the keyword arguments."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from dnnrun.config.schema import NON_NEGATIVE, Choice, Problems, check_rules, parse_choice

if TYPE_CHECKING:
    from torch import nn

# torch is imported when a unit is built, not here: checking a config must not wait for it.


def _unit(name: str) -> Callable[[], nn.Module]:
    """A unit with nothing to set: torch.nn's class of that name, e.g. Sigmoid."""

    def build() -> nn.Module:
        from torch import nn

        return getattr(nn, name)()

    return build


def leaky_relu(alpha: float = 0.01) -> nn.Module:
    """z for z > 0, alpha * z below: the leak keeps units from dying."""
    from torch import nn

    return nn.LeakyReLU(alpha)


def elu(alpha: float = 1.0) -> nn.Module:
    """z for z > 0, alpha * (exp(z) - 1) below: tends to -alpha for very negative z."""
    from torch import nn

    return nn.ELU(alpha)


def rrelu(lower: float = 1 / 8, upper: float = 1 / 3) -> nn.Module:
    """Randomized leaky ReLU: in training each negative input's slope is drawn from U(lower, upper);
    in evaluation the slope is fixed to (lower + upper) / 2."""
    from torch import nn

    return nn.RReLU(lower, upper)


def prelu(num_features: int, per_unit: bool = False, init: float = 0.25) -> nn.Module:
    """Parametric leaky ReLU: the slope is learned, one shared by the layer or one per unit."""
    from torch import nn

    return nn.PReLU(num_features if per_unit else 1, init)


def gelu(approximate: Literal["none", "tanh"] = "none") -> nn.Module:
    """z * Phi(z), Phi the standard normal CDF; `tanh` uses the faster tanh approximation of Phi."""
    from torch import nn

    return nn.GELU(approximate)


@dataclasses.dataclass(frozen=True)
class Activation:
    build: Callable[..., nn.Module]
    # Saturating units: near these outputs the derivative is ~0, so a unit stuck there stops learning.
    asymptotes: tuple[float, float] | None = None
    # Units that output exactly 0 over a whole half-line can die: zero output (and gradient) for every input.
    can_die: bool = False
    # None: the members of trainer.seeds can run it under torch.func.vmap; else why not
    members: str | None = None


ACTIVATIONS = {
    "sigmoid": Activation(_unit("Sigmoid"), asymptotes=(0.0, 1.0)),
    "tanh": Activation(_unit("Tanh"), asymptotes=(-1.0, 1.0)),
    "relu": Activation(_unit("ReLU"), can_die=True),
    "leaky_relu": Activation(leaky_relu),
    "rrelu": Activation(rrelu, members="torch.func.vmap does not batch its random slopes (aten::rrelu)"),
    "prelu": Activation(prelu),
    "elu": Activation(elu),
    # fixed lambda and alpha: self-normalizing with LeCun init and standardized inputs
    "selu": Activation(_unit("SELU")),
    "gelu": Activation(gelu),
    "silu": Activation(_unit("SiLU")),  # also called swish: z * sigmoid(z)
    "mish": Activation(_unit("Mish")),  # z * tanh(softplus(z))
}


def parse(raw, key: str, problems: Problems) -> Choice | None:
    choice = parse_choice(raw, ACTIVATIONS, key, "activation", problems)
    if choice is not None:
        check_rules(choice.params, {"alpha": NON_NEGATIVE, "lower": NON_NEGATIVE}, key, problems)
        if choice.name == "rrelu" and choice.params.get("lower", 1 / 8) > choice.params.get("upper", 1 / 3):
            problems.add(f"{key}.lower", "must not exceed upper")
    return choice


def build(choice: Choice, width: int) -> nn.Module:
    """One activation module for a layer of `width` units (factories that need it take num_features)."""
    factory = ACTIVATIONS[choice.name].build
    if "num_features" in inspect.signature(factory).parameters:
        return factory(width, **choice.params)
    return factory(**choice.params)
