"""Every option of every group, and every experiment preset, trains on synthetic data.

Parametrized over the YAML files and the registries, so a new option is covered automatically.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import COMPANIONS, compose_raw, make_config, write_cifar_like, write_mnist_like
from dnnrun.cli import CONFIG_DIR
from dnnrun.cli.help import group_options
from dnnrun.data import datasets as data
from dnnrun.errors import ConfigError
from dnnrun.insight import advice, loggers
from dnnrun.models import registry as model
from dnnrun.optim import optimizers as optim, schedules
from dnnrun.techniques import activations, init, norms, regularizers
from dnnrun.techniques.regularizers import combine
from dnnrun.training import loop, pretrain
from test_members import COMPARED

REGISTRIES = {
    "data": data.DATASETS,
    "model": model.MODELS,
    "init": init.INITIALIZERS,
    "act": activations.ACTIVATIONS,
    "norm": norms.NORMS,
    "optimizer": optim.OPTIMIZERS,
    "schedule": schedules.SCHEDULES,
    "regularizer": regularizers.REGULARIZERS,
    "pretrain": pretrain.PRETRAINERS,
    "logger": loggers.LOGGERS,
}
TRAINABLE = ["model", "init", "act", "norm", "optimizer", "schedule", "regularizer", "pretrain", "logger", "trainer"]
OPTIONS = [(g, p.stem) for g in TRAINABLE for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]
EXPERIMENTS = [option for option, _ in group_options("experiment")]  # chapter/prelu for a file in a folder
# The book's transfer net is SELU with Keras' Glorot init on pixels / 255, as the book built it: dnnrun says so.
AS_THE_BOOK_DID = {f"chapter/{name}" for name in ("transfer_a", "transfer_b", "transfer_b_reuse")}


def _names_in_yaml(group: str) -> set[str]:
    names = set()
    for path in (CONFIG_DIR / group).glob("*.yaml"):
        node = OmegaConf.to_container(OmegaConf.load(path))
        nodes = node.values() if group == "regularizer" else [node]  # regularizer files nest under their name
        names |= {n["name"] for n in nodes}
    return names


@pytest.mark.parametrize("group", REGISTRIES)
def test_every_registry_entry_has_a_yaml_and_every_yaml_a_registry_entry(group):
    assert _names_in_yaml(group) == set(REGISTRIES[group])


# The options that tests/test_members.py's parity matrix trains as single runs on an MLP, and compares
# with the members' records (a loss that is not finite fails the comparison): the others train here.
ALONE = [(g, o) for g, o in OPTIONS if f"{g}={o}" not in COMPARED]


@pytest.mark.parametrize("group, option", ALONE, ids=[f"{g}={o}" for g, o in ALONE])
def test_every_option_trains_a_few_steps_with_a_finite_loss(group, option, tmp_path):
    value = f"[{option}]" if group == "regularizer" else option
    overrides = [f"{group}={value}", "trainer.epochs=2", "trainer.limit_batches=4"]
    overrides += ["model.hidden=[32,16]"] if group != "model" else []
    if group == "pretrain" and option != "none":
        overrides.append("pretrain.epochs=1")
    companions = COMPANIONS.get(f"{group}={option}", [])
    data = next((c.removeprefix("data=") for c in companions if c.startswith("data=")), "synthetic")
    overrides += [c for c in companions if not c.startswith("data=")]
    summary = loop.run(make_config(*overrides, data=data), tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == 8
    for name in ("train/loss", "val/loss"):
        assert math.isfinite(summary["final"][name])
    assert math.isfinite(summary["test"]["test/loss"])


CONV_OPTIONS = [(g, o) for g, o in OPTIONS if g != "model"]
DENSE_ONLY = {"pretrain=autoencoder", "pretrain=rbm"}  # layer-wise pretraining of dense layers


@pytest.mark.parametrize("group, option", CONV_OPTIONS, ids=[f"{g}={o}" for g, o in CONV_OPTIONS])
def test_every_option_trains_a_conv_net_too(group, option, tmp_path):
    """The same groups on model=cnn (8x8 digits, two stages): norms per channel, dropout (spatial
    too), init fans over the receptive field, max-norm per filter, pretraining on images."""
    value = f"[{option}]" if group == "regularizer" else option
    overrides = [
        f"{group}={value}",
        "model=cnn",
        "model.channels=[4,8]",
        "trainer.epochs=2",
        "trainer.limit_batches=4",
        *[c for c in COMPANIONS.get(f"{group}={option}", []) if not c.startswith("data=")],
    ]
    if group == "pretrain" and option != "none":
        overrides.append("pretrain.epochs=1")
    if f"{group}={option}" in DENSE_ONLY:
        with pytest.raises(
            ConfigError,
            match=f"pretrain={option} pretrains dense layers one by one: model=mlp only; "
            "for model=cnn use pretrain=rotation or pretrain=corrupted",
        ):
            make_config(*overrides, data="digits")
        return
    summary = loop.run(make_config(*overrides, data="digits"), tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert all(math.isfinite(summary["final"][name]) for name in ("train/loss", "val/loss"))


# What the residual block builds itself (norms and their placement, the shortcut's norm, activations,
# dropout after the sum); penalties and max-norm act on every conv alike: the CNN's catalogue covers them.
RESNET_CASES = [
    *[f"norm={o}" for o in norms.NORMS],
    "norm=batchnorm norm.placement=after",
    "norm=layernorm norm.on_inputs=true",
    "act=prelu",
    "act=selu regularizer=[alpha_dropout]",
    "regularizer=[dropout,max_norm] regularizer.dropout.spatial=true",
    "pretrain=rotation",
]


@pytest.mark.parametrize("case", RESNET_CASES)
def test_the_groups_that_build_layers_build_a_resnet(case, tmp_path):
    """The residual blocks apply the norm (either placement, the shortcut's too), the activation
    (PReLU per channel), dropout and the constraints as the CNN's blocks do."""
    overrides = [
        *case.split(),
        *COMPANIONS["model=resnet"][1:],
        "model=resnet",
        "trainer.epochs=2",
        "trainer.limit_batches=4",
        "pretrain.epochs=1" if "pretrain" in case else "trainer.seed=0",
    ]
    summary = loop.run(make_config(*overrides, data="digits"), tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert all(math.isfinite(summary["final"][name]) for name in ("train/loss", "val/loss"))


def test_spatial_dropout_and_the_conv_norms_are_the_channelwise_kinds():
    from torch import nn

    from dnnrun.training.runtime import build_model

    def kinds(*overrides):
        cfg = make_config("model=cnn", "model.channels=[4]", *overrides, data="digits")
        split = data.Split(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64))
        net, _ = build_model(cfg, data.Data(split, split, split, 64, 10, (1, 8, 8), split.x))
        return [type(m) for m in net.hidden1]

    assert kinds("norm=batchnorm", "regularizer=[dropout]", "regularizer.dropout.spatial=true") == [
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.Dropout2d,
    ]
    assert kinds("norm=layernorm", "regularizer=[dropout]") == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.Dropout]
    assert (
        kinds("act=selu", "regularizer=[alpha_dropout]", "regularizer.alpha_dropout.spatial=true")[-1]
        is nn.FeatureAlphaDropout
    )


TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _preset_config(experiment: str, tmp_path, *overrides: str):
    """A preset on small data: synthetic, or tiny files for presets that pick an MNIST-like set or
    CIFAR-10 (its MD5 check passed by the cifar_files_accepted fixture)."""
    data_name = compose_raw(f"experiment={experiment}")["data"]["name"]
    if data_name == "cifar10":
        write_cifar_like(tmp_path / "data", per_batch=40, n_test=40)
    elif data_name not in TORCHVISION_FOLDERS:  # the preset leaves the data alone
        return make_config(f"experiment={experiment}", "data=synthetic", *overrides)
    else:
        write_mnist_like(tmp_path / "data" / TORCHVISION_FOLDERS[data_name] / "raw", n_train=400, n_test=100)
    return make_config(
        f"experiment={experiment}",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        "data.val_size=0.1",
        *overrides,
        data=None,
    )


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_trains(experiment, tmp_path, cifar_files_accepted):
    overrides = ["trainer.epochs=2" if experiment.startswith("chapter/") else "trainer.epochs=4"]
    if make_config(f"experiment={experiment}", data=None).transfer.source:  # needs its source run first
        source = "chapter/transfer_a" if experiment.startswith("chapter/") else "transfer_task_a"
        loop.run(_preset_config(source, tmp_path, "trainer.epochs=2"), tmp_path / "source")
        overrides.append(f"transfer.source={tmp_path / 'source' / 'checkpoints' / 'last.pt'}")
    cfg = _preset_config(experiment, tmp_path, *overrides)
    summary = loop.run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["epochs_run"] >= 1
    assert math.isfinite(summary["test"]["test/loss"])
    if cfg.data.name == "synthetic":  # the tiny IDX files hold random pixels: nothing to learn there
        assert summary["test"]["test/acc"] > 0.5  # chance is 0.25 on four classes
    if experiment in AS_THE_BOOK_DID:
        assert summary["warnings"] and all("act=selu" in w for w in summary["warnings"])
    else:
        assert summary["warnings"] == []  # no preset combines options that defeat each other


def test_presets_set_what_they_promise():
    cnn = make_config("experiment=fashion_cnn", data=None)
    assert (cnn.data.name, cnn.model.name, cnn.norm.name, cnn.optimizer.name) == (
        "fashion_mnist",
        "cnn",
        "batchnorm",
        "adam",
    )
    assert (
        combine(cnn.regularizer).spatial and combine(cnn.regularizer).dropout == 0.1 and cnn.schedule.name == "cosine"
    )
    dnn = make_config("experiment=default_dnn")
    assert (dnn.act.name, dnn.norm.name, dnn.schedule.name, dnn.optimizer.params["momentum"]) == (
        "elu",
        "batchnorm",
        "onecycle",
        0.9,
    )
    assert dnn.init.params == {"scale": 2.0, "mode": "fan_in", "distribution": "truncated_normal"}
    assert [c.name for c in dnn.regularizer] == ["l2"] and dnn.trainer.early_stopping.patience == 10
    resnet = make_config("experiment=cifar10_resnet", data=None)
    assert (resnet.data.name, resnet.data.augment, resnet.model.name, resnet.model.depth, resnet.norm.name) == (
        "cifar10",
        ["crop", "flip"],
        "resnet",
        20,
        "batchnorm",
    )
    assert (resnet.optimizer.params["nesterov"], resnet.schedule.name, resnet.schedule.params["max_lr"]) == (
        True,
        "onecycle",
        0.1,
    )
    snn = make_config("experiment=self_normalizing")
    assert (snn.act.name, snn.norm.name, snn.data.scaling) == ("selu", "none", "standardize") and init.is_lecun(
        snn.init
    )
    fast = make_config("experiment=fast_default")
    assert (fast.act.name, fast.norm.name, fast.optimizer.name, fast.schedule.name) == (
        "elu",
        "batchnorm",
        "adam",
        "constant",
    )
    assert [c.name for c in fast.regularizer] == ["dropout"]


def test_selu_warnings_name_what_defeats_self_normalization():
    found = advice.warnings(
        make_config("act=selu", "norm=batchnorm", "init=he_normal", "regularizer=[dropout]", "data.scaling=unit")
    )
    assert len(found) == 4
    text = "\n".join(found)
    for hint in ("norm=none", "init=lecun_normal", "regularizer=[alpha_dropout]", "data.scaling=standardize"):
        assert hint in text
    assert advice.warnings(make_config("experiment=self_normalizing", "regularizer=[alpha_dropout]")) == []
    assert advice.warnings(make_config("act=relu", "norm=batchnorm", "regularizer=[dropout]")) == []


def test_a_bn_layer_on_the_inputs_and_standardizing_them_too_is_warned_about():
    (found,) = advice.warnings(make_config("norm=batchnorm", "norm.on_inputs=true"))
    assert found.startswith("norm.on_inputs=true with data.scaling=standardize") and "data.scaling=none" in found
    assert advice.warnings(make_config("norm=batchnorm", "norm.on_inputs=true", "data.scaling=none")) == []


def test_warnings_do_not_refuse_and_are_recorded(tmp_path):
    summary = loop.run(make_config("act=selu", "trainer.epochs=1"), tmp_path)
    assert summary["status"] == "completed"
    assert any("LeCun" in w for w in summary["warnings"])
