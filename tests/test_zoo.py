"""model=zoo: torchvision architectures by name, weights from a file the tests write (random
weights of resnet18), inputs made what the weights expect, the transfer options on its stages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision.models
from safetensors.torch import save_file

from conftest import last_weights, make_config, run_cli
from dnnrun.errors import ConfigError, UserError
from dnnrun.models import zoo
from dnnrun.models.network import ZooInputs
from dnnrun.training import loop

RESNET18_STAGES = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]


def test_the_allow_list_is_torchvisions_registry_of_classification_models():
    assert sorted(zoo.ARCHITECTURES) == sorted(torchvision.models.list_models(module=torchvision.models))


def test_an_architecture_is_named_never_imported():
    with pytest.raises(ConfigError) as info:
        make_config("model=zoo", "model.arch=resnet19", data="digits")
    assert info.value.problems[0].startswith("model.arch: unknown architecture 'resnet19'; valid: alexnet, ")
    assert "(did you mean 'resnet18'?)" in info.value.problems[0]
    with pytest.raises(ConfigError, match="unknown architecture 'torchvision.models.resnet18'"):
        make_config("model=zoo", "model.arch=torchvision.models.resnet18", data="digits")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A resnet18 trained on nothing: torchvision's random initialization with an ImageNet head, as
    its own weights files hold it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("zoo") / "resnet18.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), str(path))
    return path


def _zoo(weights: Path, *overrides: str):
    return make_config(
        "model=zoo",
        "model.arch=resnet18",
        f"model.weights={weights}",
        "data.resize=32",
        "data.val_size=32",
        "data.test_size=64",
        "trainer.epochs=2",
        "trainer.limit_batches=3",
        *overrides,
        data="digits",
    )


def test_frozen_reused_stages_keep_the_files_weights_and_statistics_while_the_new_head_learns(weights, tmp_path):
    from safetensors.torch import load_file

    summary = loop.run(_zoo(weights, "transfer.freeze=true", "trainer.epochs=1"), tmp_path)
    assert summary["status"] == "completed" and math.isfinite(summary["test"]["test/loss"])
    assert summary["transfer"]["reused_layers"] == [1, 2, 3, 4, 5, 6]
    assert summary["transfer"]["source"] == str(weights)
    given = load_file(str(weights))
    trained = last_weights(tmp_path)
    for name, tensor in given.items():
        if not name.startswith("fc."):  # weights and batch-norm running statistics alike
            assert torch.equal(trained[f"features.{name}"], tensor), name
    assert trained["output.weight"].shape == (10, 512)  # a new head for the ten digits
    assert not any(k.startswith("features.fc.") for k in trained)
    # evaluation rebuilds it from the checkpoint alone: the weights' mean and std are in it
    result = run_cli(
        "mode=evaluate",
        f"evaluate.checkpoint={tmp_path / 'checkpoints' / 'best.pt'}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["deterministic"]["accuracy"] == pytest.approx(summary["test"]["test/acc"])


def test_transfer_layers_counts_stages_and_the_rest_train_from_scratch(weights, tmp_path):
    from safetensors.torch import load_file

    summary = loop.run(_zoo(weights, "transfer.layers=2", "transfer.freeze=true", "trainer.epochs=1"), tmp_path)
    assert summary["transfer"]["reused_layers"] == [1, 2]
    given, trained = (
        load_file(str(weights)),
        last_weights(tmp_path),
    )
    assert torch.equal(trained["features.conv1.weight"], given["conv1.weight"])
    assert not torch.equal(trained["features.layer1.0.conv1.weight"], given["layer1.0.conv1.weight"])
    with pytest.raises(UserError, match=r"transfer.layers=7, but resnet18 has 6 stages \(conv1, bn1, layer1, "):
        loop.run(_zoo(weights, "transfer.layers=7"), tmp_path / "seven")


def test_unfreezing_trains_the_reused_stages_again(weights, tmp_path):
    from safetensors.torch import load_file

    loop.run(
        _zoo(weights, "transfer.freeze=true", "transfer.unfreeze_after=1", "transfer.unfreeze_lr_factor=0.1"), tmp_path
    )
    trained = last_weights(tmp_path)
    assert not torch.equal(trained["features.layer4.1.conv2.weight"], load_file(str(weights))["layer4.1.conv2.weight"])


def test_inputs_become_what_the_weights_expect():
    layer = ZooInputs(6, [0.5, 0.4, 0.3], [0.1, 0.2, 0.3])
    grey = torch.rand(2, 1, 3, 3)
    out = layer(grey)
    assert out.shape == (2, 3, 6, 6)  # three channels, resized
    up = torch.nn.functional.interpolate(grey, size=(6, 6), mode="bilinear", align_corners=False)
    for c, (m, s) in enumerate(zip([0.5, 0.4, 0.3], [0.1, 0.2, 0.3])):
        assert torch.allclose(out[:, c], (up[:, 0] - m) / s, atol=1e-6)
    assert zoo.recipe("resnet18")[0] == 224  # the default size: the weights' own
    assert set(dict(ZooInputs(6, [0.5] * 3, [1.0] * 3).state_dict())) == {"mean", "std"}  # saved with the model


def test_weights_that_do_not_fit_and_names_that_are_not_weights_are_refused_before_anything_is_written(tmp_path):
    other = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    result = run_cli(
        "model=zoo",
        "model.arch=resnet18",
        f"model.weights={other}",
        "data.resize=32",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.weights do not fit model.arch=resnet18:" in result.stderr
    assert "the file has 98 tensors resnet18 does not, e.g. fc.bias, fc.weight, layer1.2.bn1.bias" in result.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(
        UserError,
        match="model.weights=ResNet18_Weights.IMAGENET9K: neither a file nor weights of "
        "resnet18; valid names: ResNet18_Weights.IMAGENET1K_V1",
    ):
        loop.run(_zoo("ResNet18_Weights.IMAGENET9K"), tmp_path / "name")
    with pytest.raises(UserError, match="model.weights: no file at .*missing.safetensors"):
        loop.run(_zoo(tmp_path / "missing.safetensors"), tmp_path / "missing")
    with pytest.raises(ConfigError, match="transfer.freeze: keeps reused weights fixed, but model.weights is null"):
        make_config("model=zoo", "transfer.freeze=true", data="digits")


def test_data_resize_puts_a_resize_layer_in_front_of_any_image_model(tmp_path):
    summary = loop.run(
        make_config(
            "model=cnn",
            "model.channels=[4]",
            "data.resize=12",
            "trainer.epochs=1",
            "trainer.limit_batches=2",
            data="digits",
        ),
        tmp_path,
    )
    trained = last_weights(tmp_path)
    assert summary["status"] == "completed" and trained["hidden2.linear.weight"].shape[1] == 4 * 6 * 6  # 12 pooled once
    with pytest.raises(ConfigError, match="data.resize: resizes images; synthetic's examples are not images"):
        make_config("data.resize=12")


def test_the_new_output_layer_follows_init_output_as_every_model_s_does():
    """init=random_normal draws the hidden layers from N(0, 1); the output layer keeps init.output's
    Glorot uniform (limit sqrt(6 / (512 + 10)) for resnet18's 512 features), as in an MLP."""
    from dnnrun.training import runtime

    cfg = make_config("model=zoo", "model.arch=resnet18", "data.resize=32", "init=random_normal", data="digits")
    model, _ = runtime.build_model(cfg, runtime.load_data(cfg.data, cfg.model, torch.device("cpu")))
    limit = (6 / (512 + 10)) ** 0.5
    assert model.output.weight.abs().max() <= limit and model.output.weight.std() > limit / 3


def test_what_a_zoo_network_leaves_out_is_said_not_silently_dropped():
    from dnnrun.insight.advice import warnings

    cfg = make_config("model=zoo", "act=elu", "norm=batchnorm", "regularizer=[l2,dropout]", data="digits")
    (said,) = [w for w in warnings(cfg) if w.startswith("model=zoo")]
    assert "act=elu, norm=batchnorm, the dropout regularizers (l1, l2 and max_norm do apply)" in said
    assert not [w for w in warnings(make_config("model=zoo", "regularizer=[l2]", data="digits")) if "zoo" in w]
