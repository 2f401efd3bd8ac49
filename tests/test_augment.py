"""Augmentation on the device: each operation against its definition, the same draws for the same
(seed, step), only training batches, and a resumed run that ends where the uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_config
from dnnrun.data.augment import Augment, crop, cutout, flip
from dnnrun.errors import ConfigError, Interrupted
from dnnrun.training import faults, loop

IMAGES = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1  # no zeros of their own


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_flip_mirrors_some_images_left_to_right_and_leaves_the_others():
    out = flip(IMAGES.repeat(16, 1, 1, 1), _g())
    flipped = [bool(torch.equal(o, x.flip(-1))) for o, x in zip(out, IMAGES.repeat(16, 1, 1, 1))]
    kept = [bool(torch.equal(o, x)) for o, x in zip(out, IMAGES.repeat(16, 1, 1, 1))]
    assert all(f != k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 32


def test_crop_is_a_window_of_the_zero_padded_image():
    out = crop(IMAGES.repeat(8, 1, 1, 1), _g())
    padded = F.pad(IMAGES.repeat(8, 1, 1, 1), (1, 1, 1, 1))  # an eighth of 8 pixels
    windows = [(dy, dx) for dy in range(3) for dx in range(3)]
    offsets = [
        next(o for o in windows if torch.equal(out[i], padded[i, :, o[0] : o[0] + 8, o[1] : o[1] + 8]))
        for i in range(len(out))
    ]
    assert len(set(offsets)) > 1  # drawn per image


def test_cutout_zeroes_one_square_of_half_the_height_clipped_at_the_borders():
    out = cutout(IMAGES.repeat(8, 1, 1, 1), _g())
    for o, x in zip(out, IMAGES.repeat(8, 1, 1, 1)):
        hole = (o == 0).all(0)  # the same pixels in every channel
        assert torch.equal(o[:, ~hole], x[:, ~hole])
        ys, xs = hole.nonzero(as_tuple=True)
        assert 1 <= ys.max() - ys.min() + 1 <= 4 and 1 <= xs.max() - xs.min() + 1 <= 4
        assert hole.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # a rectangle, clipped square


def test_the_same_seed_and_step_draw_the_same():
    augment = Augment(["crop", "flip", "cutout"], seed=5)
    assert torch.equal(augment(IMAGES, 7), augment(IMAGES, 7))
    assert not torch.equal(augment(IMAGES, 7), augment(IMAGES, 8))
    only_flip = Augment(["flip"], seed=5)(IMAGES.repeat(8, 1, 1, 1), 3)
    assert all(torch.equal(o, x) or torch.equal(o, x.flip(-1)) for o, x in zip(only_flip, IMAGES.repeat(8, 1, 1, 1)))


def test_augmentation_needs_images_and_known_names():
    with pytest.raises(ConfigError) as info:
        make_config("data.augment=[flip,flp]")  # the synthetic set: vectors, not images
    assert info.value.problems == [
        "data.augment: unknown augmentation 'flp'; valid: crop, cutout, flip (did you mean 'flip'?)",
        "data.augment: augments images; synthetic's examples are not images",
    ]


def test_only_training_batches_are_augmented(tmp_path: Path, monkeypatch):
    seen = []
    original = Augment.__call__
    monkeypatch.setattr(Augment, "__call__", lambda self, x, step: seen.append(len(x)) or original(self, x, step))
    summary = loop.run(
        make_config("data.augment=[crop,flip]", "trainer.epochs=1", "trainer.batch_size=128", data="digits"), tmp_path
    )
    n = summary["data"]["train"]
    assert seen == [min(128, n - i) for i in range(0, n, 128)]  # each training batch once, nothing in evaluation


def test_a_run_with_augmentation_resumed_mid_epoch_ends_as_the_uninterrupted_one(tmp_path: Path):
    cfg = ("data.augment=[crop,flip,cutout]", "trainer.epochs=2", "trainer.batch_size=64")
    straight = loop.run(make_config(*cfg, data="digits"), tmp_path / "straight")
    with pytest.raises(Interrupted):
        loop.run(make_config(*cfg, data="digits"), tmp_path / "cut", hook=faults.parse("int@step=30"))  # epoch 2
    resumed = loop.run(make_config(*cfg, "trainer.resume=auto", data="digits"), tmp_path / "cut")
    untimed = ({k: v for k, v in run["final"].items() if not k.startswith("time/")} for run in (resumed, straight))
    assert next(untimed) == next(untimed)  # every figure to the last bit
    assert resumed["test"] == straight["test"]
