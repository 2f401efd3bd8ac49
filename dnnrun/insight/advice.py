"""Combinations that defeat their own purpose: dnnrun warns about them and trains anyway."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dnnrun.models.registry import MODELS
from dnnrun.techniques.init import is_lecun
from dnnrun.techniques.regularizers import combine

if TYPE_CHECKING:
    from dnnrun.config.run_config import RunConfig


def warnings(cfg: RunConfig) -> list[str]:
    found = []
    t = cfg.transfer
    reuses = t.source is not None or getattr(cfg.model, "weights", None) is not None  # model=zoo: model.weights
    if not reuses and (
        t.freeze or t.unfreeze_after is not None or t.layers is not None or t.replace is not None or t.add
    ):
        found.append("transfer settings without transfer.source have no effect: this run trains from scratch")
    if MODELS[cfg.model.name].own_layers:
        reg = combine(cfg.regularizer)
        unused = [f"act={cfg.act.name}"] if cfg.act.name != "relu" else []  # relu: the default, nothing chosen
        unused += [f"norm={cfg.norm.name}"] if cfg.norm.name != "none" else []
        unused += ["the dropout regularizers"] if reg.dropout > 0 or reg.input_dropout > 0 else []
        if unused:
            found.append(
                f"model={cfg.model.name} keeps its architecture's own activations, normalization and dropout, so "
                f"these settings do nothing here: {', '.join(unused)} (l1, l2 and max_norm do apply)"
            )
    if cfg.norm.on_inputs and cfg.data.scaling == "standardize":
        found.append(
            "norm.on_inputs=true with data.scaling=standardize: the input BN layer is meant to replace "
            "standardizing (use data.scaling=none, or unit for images)"
        )
    if cfg.act.name == "selu":
        # SELU keeps activations at mean 0 / variance 1 layer after layer (Klambauer et al. 2017) only
        # under LeCun initialization, standardized inputs and a plain stack of dense layers.
        if cfg.norm.name != "none":
            found.append(
                f"act=selu with norm={cfg.norm.name}: SELU normalizes by itself; the norm layers "
                "undo its self-normalization (use norm=none)"
            )
        if not is_lecun(cfg.init):
            found.append(
                "act=selu without LeCun initialization (variance 1 / fan_in): the network will not "
                "self-normalize (use init=lecun_normal)"
            )
        reg = combine(cfg.regularizer)
        if reg.dropout_layer == "Dropout" and (reg.dropout > 0 or reg.input_dropout > 0):
            found.append(
                "act=selu with plain dropout: it shifts the mean and variance SELU relies on "
                "(use regularizer=[alpha_dropout])"
            )
        if cfg.data.scaling != "standardize" and not cfg.norm.on_inputs:
            found.append(
                f"act=selu with data.scaling={cfg.data.scaling}: self-normalization assumes "
                "standardized inputs (use data.scaling=standardize)"
            )
    return found
