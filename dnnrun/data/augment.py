"""Data augmentation on the device: `data.augment=[crop,flip]` changes each training batch (never a
validation or test one) with tensor operations where the batch already is.

Each step's random draws come from a generator seeded with (trainer.seed, the step's number), not
from a stream that runs on: a run resumed at any step, even in the middle of an epoch, draws what
the uninterrupted run drew, with nothing to keep in the checkpoint. The draws are a few numbers per
example, made on the CPU and moved to the device. Batches are images (B, C, H, W), as datasets.py keeps them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported where a batch is changed, not here: checking a config must not wait for it.


def crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random crop of the image padded with zeros by an eighth of its height (4 pixels for 32,
    3 for 28), as torchvision's RandomCrop(size, padding) with zero fill: the image shifted by up to
    that many pixels each way, what it leaves uncovered set to 0 (the mean, once standardized)."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = x.shape
    pad = max(1, h // 8)
    dy, dx = (torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device) for _ in range(2))
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (torch.arange(h, device=x.device) + dy[:, None])[:, None, :, None]  # (B, 1, H, 1)
    cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image mirrored left to right with probability 1/2."""
    import torch

    flipped = (torch.rand(len(x), generator=g) < 0.5).to(x.device)
    return torch.where(flipped[:, None, None, None], x.flip(-1), x)


def cutout(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A square of half the image's height set to 0 at a random centre, clipped at the borders
    (DeVries and Taylor 2017: 16 x 16 on 32 x 32 images)."""
    import torch

    b, _, h, w = x.shape
    side = max(1, h // 2)
    top = torch.randint(0, h, (b,), generator=g).to(x.device)[:, None, None, None] - side // 2  # centre - side/2
    left = torch.randint(0, w, (b,), generator=g).to(x.device)[:, None, None, None] - side // 2
    ys = torch.arange(h, device=x.device)[None, None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, None, :]
    hole = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
    return x.masked_fill(hole, 0.0)


AUGMENTATIONS = {"crop": crop, "flip": flip, "cutout": cutout}


class Augment:
    """The chosen augmentations, in the order given."""

    def __init__(self, names: list[str], seed: int):
        self.functions = [AUGMENTATIONS[name] for name in names]
        self.seed = seed

    def __call__(self, images: torch.Tensor, step: int) -> torch.Tensor:
        import torch

        g = torch.Generator().manual_seed((self.seed << 32) + step)  # seed < 2**32: one stream per (seed, step)
        for function in self.functions:
            images = function(images, g)
        return images
