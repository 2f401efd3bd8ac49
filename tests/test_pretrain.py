"""Unsupervised and self-supervised pretraining of the hidden layers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import make_config
from dnnrun.errors import ConfigError
from dnnrun.training import faults, loop, pretrain


@pytest.mark.parametrize(
    "method, overrides",
    [
        ("autoencoder", ["pretrain.epochs=3"]),
        ("rbm", ["act=sigmoid", "pretrain.epochs=3"]),
    ],
)
def test_layerwise_pretraining_lowers_each_layers_reconstruction_error(method, overrides, tmp_path: Path):
    summary = loop.run(
        make_config(f"pretrain={method}", "model.hidden=[48,24]", "trainer.epochs=1", *overrides), tmp_path
    )
    layers = summary["pretrain"]["layers"]
    assert [r["layer"] for r in layers] == ["hidden1", "hidden2"]
    assert layers[0]["reconstruction_after"] < 0.9 * layers[0]["reconstruction_before"], layers
    assert all(r["reconstruction_after"] < r["reconstruction_before"] for r in layers), layers
    if method == "rbm":  # standardized inputs: Gaussian visible units; sigmoid outputs: Bernoulli
        assert [r["visible"] for r in layers] == ["gaussian", "bernoulli"]


def test_fine_tuning_starts_from_the_pretrained_weights(tmp_path: Path):
    seen = {}

    class FirstWeights(faults.Hook):
        def start(self, model, step):
            seen.setdefault("start", {k: v.clone() for k, v in model.state_dict().items()})

    loop.run(
        make_config("pretrain=autoencoder", "pretrain.epochs=1", "trainer.epochs=1"),
        tmp_path / "pre",
        hook=FirstWeights(),
    )
    pretrained = torch.load(tmp_path / "pre" / "checkpoints" / "pretrained.pt", weights_only=True)["model"]
    assert all(torch.equal(seen["start"][k], pretrained[k]) for k in pretrained)
    seen.clear()
    loop.run(make_config("trainer.epochs=1"), tmp_path / "fresh", hook=FirstWeights())  # same seed, no pretraining
    assert not torch.equal(seen["start"]["hidden1.linear.weight"], pretrained["hidden1.linear.weight"])
    assert torch.equal(
        seen["start"]["output.weight"], pretrained["output.weight"]
    )  # the output layer is not pretrained


def test_pretraining_sees_every_training_input_even_with_few_labels(tmp_path: Path, monkeypatch):
    sizes = {}
    real = pretrain.run

    def spy(choice, model, x, shape, seed):
        sizes["inputs"] = len(x)
        return real(choice, model, x, shape, seed)

    monkeypatch.setattr(pretrain, "run", spy)
    summary = loop.run(
        make_config("pretrain=autoencoder", "pretrain.epochs=1", "data.max_train=50", "trainer.epochs=1"), tmp_path
    )
    assert summary["data"]["train"] == 50 and sizes["inputs"] == 864


def test_corrupted_examples_really_differ_and_the_rest_are_untouched():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 20)
    corrupted, labels = pretrain.corrupt(x, 0.3, g)
    changed = corrupted != x
    assert labels.float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert torch.all(changed[labels == 1].any(1))  # every corrupted example differs from its original
    assert not changed[labels == 0].any()  # the others are untouched
    assert changed[labels == 1].float().mean().item() == pytest.approx(0.3, abs=0.03)
    same = torch.ones(10, 5)  # identical examples cannot be corrupted: they keep label 0
    assert not pretrain.corrupt(same, 0.5, g)[1].any()


def test_rotation_labels_name_the_quarter_turns():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(200 * 2 * 9, dtype=torch.float32).reshape(200, 2, 3, 3)
    rotated, labels = pretrain.rotate(images, g)
    assert set(labels.tolist()) == {0, 1, 2, 3}
    for x, r, k in zip(images, rotated, labels):  # each channel turned alike
        assert torch.equal(torch.rot90(r, -int(k), dims=(1, 2)), x)


@pytest.mark.parametrize("method", ["corrupted", "rotation"])
def test_auxiliary_tasks_are_learned_then_the_lower_layers_are_reused(method, tmp_path: Path):
    summary = loop.run(
        make_config(f"pretrain={method}", "pretrain.epochs=10", "trainer.epochs=2", data="digits"), tmp_path
    )
    report = summary["pretrain"]
    assert report["accuracy_after"] > report["chance"] + 0.15, report
    assert summary["status"] == "completed" and math.isfinite(summary["test"]["test/loss"])


def test_rbm_needs_sigmoid_units_and_rotation_needs_images(tmp_path: Path):
    with pytest.raises(ConfigError, match="rbm pretraining needs sigmoid units"):
        make_config("pretrain=rbm")
    with pytest.raises(ConfigError, match="pretrain=rotation rotates square images; data=synthetic's examples are"):
        make_config("pretrain=rotation")  # vectors: refused before the run makes its directory
    with pytest.raises(ConfigError, match="pretraining and transfer.source both set"):
        make_config("pretrain=autoencoder", "transfer.source=x.pt")
