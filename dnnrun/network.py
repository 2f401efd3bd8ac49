"""What every model builder returns: a `Network` of named blocks, input to output, that
diagnostics, transfer, pretraining and max-norm find by name (model.py builds them)."""

from __future__ import annotations

import torch
from torch import nn

OUTPUT = "output"  # the name of every network's last layer


class Block(nn.Sequential):
    """A hidden layer: its affine layer first (named `linear`, or `conv`), then `norm`, `act` and
    `dropout` where present, in the order they apply."""

    @property
    def affine(self) -> nn.Module:
        return self[0]


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


class Images(nn.Module):
    """Flattened examples back to images (B, C, H, W), from their shape (H, W) or (H, W, C): the
    data keeps each example as one row in that layout."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = (*shape, 1) if len(shape) == 2 else tuple(shape)

    @property
    def channels(self) -> int:
        return self.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), *self.shape).permute(0, 3, 1, 2)
