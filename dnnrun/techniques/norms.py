"""Normalization layers by name, and where they sit relative to the activation."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

from dnnrun.config.schema import FRACTION, POSITIVE, Problems, check_rules, parse

if TYPE_CHECKING:
    from torch import nn


def is_batch_norm(module: nn.Module) -> bool:
    """A layer with running statistics (of the batches it saw in training)."""
    from torch import nn

    return isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))


@dataclasses.dataclass(frozen=True)
class Norm:
    layer: str | None  # torch.nn's class, called with the layer width first; None: no layer
    cancels_bias: bool  # true when the layer subtracts a per-unit mean, so a bias before it is wasted
    conv: str | None = None  # its class for conv blocks, called with the channels first
    # what a config may set, by torch.nn's names (torch is imported only to build the layer)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


NORMS = {
    "none": Norm(layer=None, cancels_bias=False),
    # momentum is PyTorch's: running = (1 - momentum) * running + momentum * batch (Keras' 0.99 is 0.01)
    "batchnorm": Norm(
        "BatchNorm1d",
        cancels_bias=True,
        conv="BatchNorm2d",
        params={"eps": float, "momentum": float, "affine": bool, "track_running_stats": bool, "bias": bool},
    ),
    # normalizes each example over its units; a per-unit bias before it is not cancelled
    # for conv blocks one group of GroupNorm: each example normalized over (C, H, W), as LayerNorm over its units
    "layernorm": Norm(
        "LayerNorm",
        cancels_bias=False,
        conv="GroupNorm",
        params={"eps": float, "elementwise_affine": bool, "bias": bool},
    ),
}


@dataclasses.dataclass(frozen=True)
class NormConfig:
    name: str
    placement: Literal["before", "after"] = "before"  # before or after the activation
    on_inputs: bool = False  # also normalize the raw inputs with a layer of this kind (in place of standardizing)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    option: str | None = None  # the YAML it came from (conf/norm/OPTION.yaml)

    def check(self, problems: Problems, key: str) -> None:
        check_rules(self.params, {"eps": POSITIVE, "momentum": FRACTION}, key, problems)
        if self.on_inputs and NORMS.get(self.name, NORMS["none"]).layer is None:
            problems.add(f"{key}.on_inputs", f"needs a normalization layer; norm '{self.name}' has none")

    @property
    def drops_bias(self) -> bool:
        """The Linear before this norm needs no bias: the norm's own shift replaces it."""
        return NORMS[self.name].cancels_bias and self.placement == "before"

    def conv_layer(self, channels: int) -> nn.Module | None:
        """The norm for conv blocks, per channel: BatchNorm2d for batchnorm; for layernorm GroupNorm
        with one group, which normalizes each example over (C, H, W) as LayerNorm does over its units."""
        name = NORMS[self.name].conv
        if name is None:
            return None
        from torch import nn

        if name == "GroupNorm":  # LayerNorm's settings, by GroupNorm's names
            return nn.GroupNorm(
                1, channels, eps=self.params.get("eps", 1e-5), affine=self.params.get("elementwise_affine", True)
            )
        return getattr(nn, name)(channels, **self.params)

    def layer(self, width: int) -> nn.Module | None:
        name = NORMS[self.name].layer
        if name is None:
            return None
        from torch import nn

        return getattr(nn, name)(width, **self.params)


def parse_norm(raw, key: str, problems: Problems) -> NormConfig | None:
    return parse(NormConfig, raw, key, problems, registry=NORMS, kind="norm")
