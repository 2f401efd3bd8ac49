"""What every model builder returns: a `Network` of named blocks, input to output, that
diagnostics, transfer, pretraining and max-norm find by name (registry.py builds them)."""

from __future__ import annotations

import torch
from torch import nn

OUTPUT = "output"  # the name of every network's last layer
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class Block(nn.Sequential):
    """A hidden layer: its affine layer first (named `linear`, or `conv`), then `norm`, `act` and
    `dropout` where present, in the order they apply."""

    @property
    def affine(self) -> nn.Module:
        return self[0]


class Residual(Block):
    """A ResNet's hidden block (He et al. 2016): `inner` (conv -> [norm] -> activation -> conv ->
    [norm]) added to the `shortcut` (the identity, or a strided 1x1 conv where the shape changes),
    then `act`, a `norm` placed after it, and `dropout`, where present. Diagnostics read it as a
    Block: its affine layer is the first conv, its activation the one after the sum."""

    @property
    def affine(self) -> nn.Module:
        return self.inner[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.inner(x) + self.shortcut(x))
        for name in ("norm", "dropout"):
            if name in self._modules:
                y = self._modules[name](y)
        return y


class Network(nn.Sequential):
    """A model as dnnrun's features see it: optional input layers (`input_norm`, `input_dropout`),
    hidden blocks named hidden1..hiddenN, then the `output` layer. State-dict keys follow the names
    (hidden2.linear.weight), so checkpoints and transfer find layers by name."""

    def hidden(self) -> list[tuple[str, Block]]:
        return [(name, m) for name, m in self.named_children() if isinstance(m, Block)]

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The layers diagnostics watch: the hidden blocks, then the output layer."""
        return [*self.hidden(), (OUTPUT, self.output)]

    def below(self, name: str) -> nn.Sequential:
        """Everything in front of the named block: the input layers and the hidden blocks before it."""
        names = list(self._modules)
        return nn.Sequential(*[self._modules[n] for n in names[: names.index(name)]])

    def stages(self) -> list[tuple[str, nn.Module]]:
        """What transfer.layers counts and transfer.freeze holds: the hidden blocks."""
        return list(self.hidden())

    def body(self) -> nn.Sequential:
        """Everything but the output layer: the features a head on top would see."""
        return self.below(OUTPUT)

    @property
    def head_width(self) -> int:
        """The number of features the output layer takes."""
        return self.output.in_features


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The main weight of a block or of the output layer: its affine layer's."""
    return (layer.affine if isinstance(layer, Block) else layer).weight


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Resize(nn.Module):
    """data.resize: images (B, C, H, W) resized to size x size (bilinear, antialiased when shrinking)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize(x, self.size)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    shrink = x.shape[-1] > size or x.shape[-2] > size
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


class ZooInputs(nn.Module):
    """A zoo network's input layer (zoo.py): images (B, C, H, W) with pixels in [0, 1] made what
    the weights expect: grey repeated to 3 channels, resized (bilinear, antialiased when shrinking)
    to size x size, normalized per channel. The mean and std are buffers, so that checkpoints and
    exports hold them."""

    def __init__(self, size: int, mean: list[float], std: list[float]):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (resize(x, self.size) - self.mean) / self.std


class ZooNetwork(Network):
    """inputs (ZooInputs), features (a torchvision architecture, its classifier replaced by the
    identity), output. It has no hidden blocks of dnnrun's own (diagnostics watch the output layer);
    its stages are the architecture's top-level children with weights."""

    def hidden(self) -> list[tuple[str, Block]]:
        return []

    def stages(self) -> list[tuple[str, nn.Module]]:
        return [(f"features.{n}", m) for n, m in self.features.named_children() if any(True for _ in m.parameters())]
