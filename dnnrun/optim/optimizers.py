"""Optimizers by name. A YAML in conf/optimizer/ sets `name:` and the optimizer's own keyword
arguments (PyTorch's names: lr, momentum, nesterov, betas, eps, weight_decay, ...)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from dnnrun.config.schema import FRACTION, NON_NEGATIVE, POSITIVE, Choice, Problems, check_rules, parse_choice
from dnnrun.techniques.regularizers import is_weight_matrix

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """A class of torch.optim, and the keyword arguments a config may set (PyTorch's names and
    defaults). They are written out because reading the signature means importing torch, which
    checking a config must not wait for; a test holds them to torch's signatures."""

    cls: str
    params: dict[str, Any]
    state: int  # tensors of the parameters' size it keeps per parameter, at most (the memory estimate)
    # Each weight's update depends on its own gradient and state only, and is proportional to the
    # rate: one optimizer over stacked members updates each as its own would (trainer.seeds), and a
    # member's rate can scale its update (schedule=performance). Members refuse one that is not.
    elementwise: bool = True


_ADAM = {"lr": float, "betas": tuple, "eps": float, "weight_decay": float}

# Momentum and Nesterov are SGD with settings (conf/optimizer/momentum.yaml, nesterov.yaml).
OPTIMIZERS = {
    "sgd": Optimizer(
        "SGD", {"lr": float, "momentum": float, "dampening": float, "weight_decay": float, "nesterov": bool}, state=1
    ),  # the momentum buffer
    "adagrad": Optimizer(
        "Adagrad",
        {"lr": float, "lr_decay": float, "weight_decay": float, "initial_accumulator_value": float, "eps": float},
        state=1,
    ),
    "rmsprop": Optimizer(
        "RMSprop",
        {"lr": float, "alpha": float, "eps": float, "weight_decay": float, "momentum": float, "centered": bool},
        state=3,
    ),  # square avg, momentum, mean
    "adam": Optimizer("Adam", {**_ADAM, "amsgrad": bool, "decoupled_weight_decay": bool}, state=3),  # m, v, max v
    "adamax": Optimizer("Adamax", _ADAM, state=2),
    "nadam": Optimizer("NAdam", {**_ADAM, "momentum_decay": float, "decoupled_weight_decay": bool}, state=2),
    "adamw": Optimizer("AdamW", {**_ADAM, "amsgrad": bool}, state=3),
    "radam": Optimizer("RAdam", {**_ADAM, "decoupled_weight_decay": bool}, state=2),
}
# Settings of torch's optimizers that a config cannot set: how the step is computed, not what.
NOT_SETTABLE = {"maximize", "foreach", "differentiable", "fused", "capturable"}

RULES = {
    "lr": POSITIVE,
    "momentum": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "eps": POSITIVE,
    "alpha": FRACTION,
    "momentum_decay": NON_NEGATIVE,
    "initial_accumulator_value": NON_NEGATIVE,
}


def parse(raw, key: str, problems: Problems) -> Choice | None:
    choice = parse_choice(raw, OPTIMIZERS, key, "optimizer", problems)
    if choice is not None:
        check_rules(choice.params, RULES, key, problems)
        if choice.params.get("nesterov") and not choice.params.get("momentum"):
            problems.add(f"{key}.nesterov", "needs momentum > 0 (use optimizer=nesterov)")
        betas = choice.params.get("betas")
        if betas is not None and not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            problems.add(f"{key}.betas", f"must be two numbers in [0, 1), got {list(betas)}")
    return choice


def param_groups(model: nn.Module, reused: Collection[str] = (), tensors: dict | None = None) -> list[dict]:
    """Weight decay applies to weight matrices only, never to biases or normalization parameters.
    Parameters reused from a transfer source get groups of their own (marked "reused"), so that
    their learning rate can be scaled apart. Frozen parameters stay in: they get no gradient, so
    the optimizer leaves them alone until they are unfrozen. `tensors` (training/members.py: the members'
    stacked weights, by the model's names) are optimized in place of the model's own parameters,
    grouped as the model's are."""
    groups = []
    for is_reused in (False, True):
        for decay in (True, False):
            params = [
                tensors[n] if tensors is not None else p
                for n, p in model.named_parameters()
                if (n in reused) == is_reused and is_weight_matrix(p) == decay
            ]
            if params:
                groups.append({"params": params, "reused": is_reused, **({} if decay else {"weight_decay": 0.0})})
    return groups


def build(
    choice: Choice, model: nn.Module, reused: Collection[str] = (), tensors: dict | None = None
) -> torch.optim.Optimizer:
    import torch

    return getattr(torch.optim, OPTIMIZERS[choice.name].cls)(param_groups(model, reused, tensors), **choice.params)
