"""Activation functions by name. A YAML in conf/act/ sets `name:` and the keyword arguments."""

from __future__ import annotations

import inspect

from torch import nn

from dnnrun.schema import Choice, Problems, parse_choice

ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,  # alpha: the value ELU tends to for very negative inputs is -alpha
}


def parse(raw, key: str, problems: Problems) -> Choice | None:
    return parse_choice(raw, ACTIVATIONS, key, "activation", problems)


def build(choice: Choice, width: int) -> nn.Module:
    """One activation module for a layer of `width` units (factories that need it take num_features)."""
    factory = ACTIVATIONS[choice.name]
    if "num_features" in inspect.signature(factory).parameters:
        return factory(width, **choice.params)
    return factory(**choice.params)
