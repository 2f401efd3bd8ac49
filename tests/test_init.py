"""Each initializer's empirical variance matches its formula on a large layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_config
from dnnrun.cli import CONFIG_DIR
from dnnrun.config.schema import Choice
from dnnrun.techniques import init
from dnnrun.techniques.init import initialize, variance_scaling_

FAN_IN, FAN_OUT = 500, 1000  # nn.Linear(500, 1000): weight (1000, 500); distinct fans tell the modes apart
FAN_AVG = (FAN_IN + FAN_OUT) / 2

# option -> (variance, distribution); the formulas, written out independently of the presets
EXPECTED = {
    "glorot_normal": (1 / FAN_AVG, "truncated_normal"),
    "glorot_uniform": (1 / FAN_AVG, "uniform"),
    "he_normal": (2 / FAN_IN, "truncated_normal"),
    "he_uniform": (2 / FAN_IN, "uniform"),
    "lecun_normal": (1 / FAN_IN, "truncated_normal"),
    "lecun_uniform": (1 / FAN_IN, "uniform"),
    "variance_scaling": (1 / FAN_IN, "truncated_normal"),
    "random_normal": (1.0, "normal"),
    "random_uniform": (1 / 3, "uniform"),  # U(-1, 1)
    "torch_default": (1 / (3 * FAN_IN), "uniform"),
    "orthogonal": (1 / FAN_OUT, "orthogonal"),  # 500 orthonormal columns of length 1000
}
OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "init").glob("*.yaml"))


def test_every_init_option_has_an_expected_variance():
    assert sorted(EXPECTED) == OPTIONS


def _initialized(option: str, *overrides: str) -> torch.Tensor:
    torch.manual_seed(0)
    layer = nn.Linear(FAN_IN, FAN_OUT)
    initialize(layer, make_config(f"init={option}", *overrides).init)
    assert torch.count_nonzero(layer.bias) == 0
    return layer.weight.detach().double()


def _check(w: torch.Tensor, variance: float, distribution: str) -> None:
    assert w.var().item() == pytest.approx(variance, rel=0.03)
    assert w.mean().item() == pytest.approx(0.0, abs=0.01 * math.sqrt(variance))
    if distribution == "uniform":
        limit = math.sqrt(3 * variance)
        assert w.abs().max().item() <= limit + 1e-9
        assert w.abs().max().item() > 0.99 * limit
    elif distribution == "truncated_normal":
        std = math.sqrt(variance) / 0.87962566103423978  # the untruncated normal's
        assert w.abs().max().item() <= 2 * std + 1e-9
    elif distribution == "normal":
        assert w.abs().max().item() > 4 * math.sqrt(variance)  # 500,000 draws reach 4 std
    elif distribution == "orthogonal":
        assert torch.allclose(w.T @ w, torch.eye(FAN_IN, dtype=w.dtype), atol=1e-5)


@pytest.mark.parametrize("option", OPTIONS)
def test_initializer_variance_matches_its_formula(option):
    _check(_initialized(option), *EXPECTED[option])


@pytest.mark.parametrize("mode, fan", [("fan_in", FAN_IN), ("fan_out", FAN_OUT), ("fan_avg", FAN_AVG)])
@pytest.mark.parametrize("distribution", ["normal", "truncated_normal", "uniform"])
def test_variance_scaling_overrides(mode, fan, distribution):
    w = _initialized("variance_scaling", "init.scale=2", f"init.mode={mode}", f"init.distribution={distribution}")
    _check(w, 2 / fan, distribution)


def test_initialize_sets_every_affine_layer_conv_included():
    net = nn.Sequential(nn.Conv2d(32, 64, 3), nn.Flatten(), nn.Linear(64, 10))
    initialize(net, make_config("init=he_normal").init)
    conv, linear = net[0], net[2]
    assert conv.weight.var().item() == pytest.approx(2 / (32 * 9), rel=0.05)  # fan_in = C_in x k x k
    assert torch.count_nonzero(conv.bias) == 0 and torch.count_nonzero(linear.bias) == 0


def test_fans_follow_pytorchs_layout_for_conv_kernels():
    w = torch.empty(64, 32, 3, 3)  # (out, in, kh, kw): fan_in = 32 * 9
    variance_scaling_(w, scale=2.0, mode="fan_in", distribution="normal")
    assert w.var().item() == pytest.approx(2 / (32 * 9), rel=0.05)


@pytest.mark.parametrize("name", [n for n in init.OUTPUT if n != "same"])
def test_the_output_layers_choices_are_the_init_options_of_their_names(name):
    option = make_config(f"init={name}").init
    assert init.OUTPUT[name] == Choice(option.name, option.params)


def test_the_output_layer_is_glorot_whatever_the_hidden_layers_use_unless_same():
    """The seeds' table: Glorot for a softmax (or linear) output layer."""
    from dnnrun.data.datasets import Data, Split
    from dnnrun.training import runtime

    split = Split(torch.zeros(2, 400), torch.zeros(2, dtype=torch.int64))
    data = Data(split, split, split, 400, 300, None, split.x)

    def weights(*overrides):
        torch.manual_seed(0)
        net = runtime.build_model(make_config("model.hidden=[500]", *overrides), data)[0]
        return net.hidden1.linear.weight, net.output.weight

    hidden, output = weights("init=he_normal")
    assert hidden.var().item() == pytest.approx(2 / 400, rel=0.05)
    limit = math.sqrt(6 / (500 + 300))  # Glorot uniform: U(-limit, limit), variance 2 / (fan_in + fan_out)
    assert output.abs().max().item() <= limit and output.var().item() == pytest.approx(2 / 800, rel=0.05)
    _, same = weights("init=he_normal", "init.output=same")
    assert same.var().item() == pytest.approx(2 / 500, rel=0.05)
    _, normal = weights("init=lecun_normal", "init.output=glorot_normal")
    assert normal.var().item() == pytest.approx(2 / 800, rel=0.05) and normal.abs().max().item() > limit
