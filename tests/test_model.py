"""The MLP builder: block structure, norm placement, bias handling and initialization."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_config
from dnnrun.config.schema import Choice
from dnnrun.errors import ConfigError
from dnnrun.models import registry as model
from dnnrun.models.network import count_parameters
from dnnrun.models.registry import Inputs, Layers, MLPConfig, fitting_config, mlp
from dnnrun.techniques.norms import NormConfig
from dnnrun.techniques.regularizers import Regularization, combine

HE = Choice("variance_scaling", {"scale": 2.0, "mode": "fan_in", "distribution": "truncated_normal"})
GLOROT_UNIFORM = Choice("variance_scaling", {"scale": 1.0, "mode": "fan_avg", "distribution": "uniform"})
BN = NormConfig("batchnorm", "before", params={"momentum": 0.2, "eps": 1e-3})


NO_NORM, RELU = NormConfig("none"), Choice("relu")


def build(hidden=(30, 20), norm=NO_NORM, init=HE, act=RELU, **kw):
    return mlp(
        MLPConfig("mlp", list(hidden), **kw), Inputs(features=16, classes=5), Layers(act, norm, init, Regularization())
    )


def test_blocks_are_named_and_ordered():
    net = build()
    assert [name for name, _ in net.named_children()] == ["hidden1", "hidden2", "output"]
    assert [type(m) for m in net.hidden1] == [nn.Linear, nn.ReLU]
    assert (net.hidden1.linear.in_features, net.hidden2.linear.in_features, net.output.out_features) == (16, 30, 5)
    assert net(torch.randn(7, 16)).shape == (7, 5)


def test_depth_times_width_replaces_hidden():
    net = build(hidden=(300, 100), depth=4, width=8)
    assert [m.linear.out_features for m in list(net)[:-1]] == [8, 8, 8, 8]


def test_batchnorm_before_the_activation_drops_the_linear_bias():
    net = build(norm=BN)
    assert [type(m) for m in net.hidden1] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert net.hidden1.linear.bias is None and net.output.bias is not None
    assert (net.hidden1.norm.momentum, net.hidden1.norm.eps) == (0.2, 1e-3)  # the YAML's, not PyTorch's defaults
    assert "input_norm" not in net._modules


def test_batchnorm_after_the_activation_keeps_the_bias():
    net = build(norm=NormConfig("batchnorm", "after"))
    assert [type(m) for m in net.hidden1] == [nn.Linear, nn.ReLU, nn.BatchNorm1d]
    assert net.hidden1.linear.bias is not None


def test_initializer_applies_to_every_linear_weight_and_biases_start_at_zero():
    net = build(hidden=(1000, 1000), init=HE)
    for layer in (net.hidden2.linear, net.output):
        fan_in = layer.in_features
        assert layer.weight.var().item() == pytest.approx(2 / fan_in, rel=0.05)
        assert torch.count_nonzero(layer.bias) == 0
    glorot = build(hidden=(1000, 1000), init=GLOROT_UNIFORM).hidden2.linear.weight
    assert glorot.abs().max().item() <= math.sqrt(6 / 2000)
    assert glorot.var().item() == pytest.approx(1 / 1000, rel=0.05)


def test_count_parameters():
    assert count_parameters(build()) == (16 * 30 + 30) + (30 * 20 + 20) + (20 * 5 + 5)


def test_the_network_names_its_blocks_and_what_lies_below_each():
    net = build(hidden=(30, 20, 10))
    assert [name for name, _ in net.blocks()] == ["hidden1", "hidden2", "hidden3", "output"]
    assert [name for name, _ in net.hidden()] == ["hidden1", "hidden2", "hidden3"]
    assert net.below("hidden3")(torch.randn(4, 16)).shape == (4, 20)  # the input through hidden1 and hidden2
    assert net.body()(torch.randn(4, 16)).shape == (4, net.head_width) == (4, 10)


def test_a_state_dict_gives_back_the_config_whose_shapes_fit_it():
    """What resume, evaluate and transfer rebuild a model from: the widths the weights have."""
    state = build(hidden=(30, 20, 10)).state_dict()
    fitted = fitting_config(MLPConfig("mlp", [300, 100], depth=4, width=8), state)
    assert fitted.widths == [30, 20, 10]
    rebuilt = mlp(
        fitted, Inputs(features=16, classes=5), Layers(Choice("relu"), NormConfig("none"), HE, Regularization())
    )
    rebuilt.load_state_dict(state)  # every key and shape fits


def test_the_cnn_has_named_conv_blocks_pools_and_a_head():
    from torch import nn

    from dnnrun.models.registry import CNNConfig, cnn

    cfg = make_config(
        "model=cnn", "model.channels=[4,8]", "model.blocks=2", "model.head=[16]", "norm=batchnorm", data="digits"
    )
    layers = Layers(cfg.act, cfg.norm, cfg.init, combine(cfg.regularizer))
    net = cnn(cfg.model, Inputs(features=3 * 8 * 8, classes=10, shape=(3, 8, 8)), layers)
    assert list(net._modules) == [
        "hidden1",
        "hidden2",
        "pool1",
        "hidden3",
        "hidden4",
        "pool2",
        "flatten",
        "hidden5",
        "output",
    ]
    assert net.hidden5.linear.in_features == 8 * 2 * 2  # 8x8 maps pooled twice
    assert [type(b.affine) for _, b in net.hidden()] == [nn.Conv2d] * 4 + [nn.Linear]
    assert net.hidden1.conv.bias is None and isinstance(net.hidden1.norm, nn.BatchNorm2d)  # the norm's shift instead
    assert isinstance(cfg.model, CNNConfig) and cfg.model.widths == [4, 4, 8, 8, 16]
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_the_resnet_is_the_cifar_family_with_named_residual_blocks():
    from dnnrun.models.network import Residual

    cfg = make_config("model=resnet", "norm=batchnorm", data="digits")  # ResNet-20: 3 stages of 3 blocks
    layers = Layers(cfg.act, cfg.norm, cfg.init, combine(cfg.regularizer))
    net = model.build(cfg.model, Inputs(features=3 * 32 * 32, classes=10, shape=(3, 32, 32)), layers)
    assert list(net._modules) == ["hidden1", *[f"hidden{i}" for i in range(2, 11)], "pool", "output"]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # the depth counts the 3x3 convs and the output layer
    assert (
        all(isinstance(b, Residual) for _, b in net.hidden()[1:])
        and cfg.model.widths == [16] + [16] * 3 + [32] * 3 + [64] * 3
    )
    # the first block of stages 2 and 3 halves the maps and projects the shortcut with a 1x1 conv
    assert net.hidden5.affine.stride == (2, 2) and isinstance(net.hidden5.shortcut.conv, nn.Conv2d)
    assert isinstance(net.hidden3.shortcut, nn.Identity)
    assert net.hidden2.inner.conv1.bias is None and isinstance(net.hidden2.inner.norm, nn.BatchNorm2d)
    seen = {}
    net.hidden10.register_forward_hook(lambda m, i, o: seen.__setitem__("maps", o.shape))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10) and seen["maps"] == (2, 64, 8, 8)
    small = model.build(cfg.model, Inputs(features=28 * 28, classes=10, shape=(1, 28, 28)), layers)
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_residual_block_adds_its_input_to_what_its_convs_make():
    from dnnrun.models.network import Residual

    cfg = make_config("model=resnet", "model.depth=8", "model.width=4", data="digits")
    layers = Layers(cfg.act, cfg.norm, cfg.init, combine(cfg.regularizer))
    net = model.build(cfg.model, Inputs(features=64, classes=10, shape=(1, 8, 8)), layers)
    block = net.hidden2
    assert isinstance(block, Residual) and list(block._modules) == ["inner", "shortcut", "act"]
    x = torch.randn(3, 4, 8, 8)
    assert torch.equal(block(x), torch.relu(block.inner(x) + x))


def test_resnet_depth_must_fit_its_stages():
    with pytest.raises(ConfigError) as info:
        make_config("model=resnet", "model.depth=21", data="digits")
    assert info.value.problems == ["model.depth: must be 6n + 2 with n >= 1 for 3 stages (e.g. 8, 14, 20, 32), got 21"]
    with pytest.raises(ConfigError, match="model=resnet needs images; data=synthetic's examples are vectors"):
        make_config("model=resnet")


def test_prelu_in_a_conv_block_has_one_slope_per_channel():
    cfg = make_config("model=cnn", "model.channels=[4]", "act=prelu", "act.per_unit=true", data="digits")
    layers = Layers(cfg.act, cfg.norm, cfg.init, combine(cfg.regularizer))
    act = model.build(cfg.model, Inputs(features=64, classes=10, shape=(1, 8, 8)), layers).hidden1.act
    assert act.weight.shape == (4,)
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.0, 0.1, 0.2, 0.3]))
    out = act(-torch.ones(2, 4, 3, 3))
    assert all(torch.equal(out[:, c], torch.full((2, 3, 3), -0.1 * c)) for c in range(4))
