"""Each activation's values and derivatives at sample points match its formula."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_config
from dnnrun.cli import CONFIG_DIR
from dnnrun.techniques import activations

SELU_LAMBDA, SELU_ALPHA = 1.0507009873554805, 1.6732632423543772  # Klambauer et al. 2017


def _sigmoid(z):
    return 1 / (1 + math.exp(-z))


def _phi(z):  # standard normal density and CDF
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _Phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _softplus(z):
    return math.log1p(math.exp(z))


def _leaky(alpha):
    return (lambda z: z if z > 0 else alpha * z), (lambda z: 1.0 if z > 0 else alpha)


# option -> (f, f'); in evaluation mode (RReLU's slope is then the mean of its range)
FORMULAS = {
    "sigmoid": (_sigmoid, lambda z: _sigmoid(z) * (1 - _sigmoid(z))),
    "tanh": (math.tanh, lambda z: 1 - math.tanh(z) ** 2),
    "relu": (lambda z: max(z, 0.0), lambda z: 1.0 if z > 0 else 0.0),
    "leaky_relu": _leaky(0.01),
    "leaky_relu_0.2": _leaky(0.2),
    "rrelu": _leaky((1 / 8 + 1 / 3) / 2),
    "prelu": _leaky(0.25),  # its slope before training
    "elu": (lambda z: z if z > 0 else math.exp(z) - 1, lambda z: 1.0 if z > 0 else math.exp(z)),
    "selu": (
        lambda z: SELU_LAMBDA * (z if z > 0 else SELU_ALPHA * (math.exp(z) - 1)),
        lambda z: SELU_LAMBDA * (1.0 if z > 0 else SELU_ALPHA * math.exp(z)),
    ),
    "gelu": (lambda z: z * _Phi(z), lambda z: _Phi(z) + z * _phi(z)),
    "silu": (lambda z: z * _sigmoid(z), lambda z: _sigmoid(z) * (1 + z * (1 - _sigmoid(z)))),
    "mish": (
        lambda z: z * math.tanh(_softplus(z)),
        lambda z: math.tanh(_softplus(z)) + z * (1 - math.tanh(_softplus(z)) ** 2) * _sigmoid(z),
    ),
}
OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "act").glob("*.yaml"))
POINTS = [-4.0, -1.5, -0.5, -0.1, 0.1, 0.5, 1.5, 4.0]


def _module(option: str, width: int = len(POINTS), *overrides: str) -> torch.nn.Module:
    return activations.build(make_config(f"act={option}", *overrides).act, width).double()


def test_every_activation_option_has_a_formula():
    assert sorted(FORMULAS) == OPTIONS


@pytest.mark.parametrize("option", OPTIONS)
def test_values_and_derivatives_match_the_formula(option):
    f, df = FORMULAS[option]
    module = _module(option).eval()
    z = torch.tensor(POINTS, dtype=torch.float64, requires_grad=True)
    out = module(z)
    out.sum().backward()
    assert torch.allclose(out.detach(), torch.tensor([f(p) for p in POINTS], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(z.grad, torch.tensor([df(p) for p in POINTS], dtype=torch.float64), atol=1e-6)


def test_rrelu_draws_slopes_in_training_and_uses_their_mean_in_evaluation():
    module = _module("rrelu")
    z = -torch.ones(10_000, dtype=torch.float64)
    slopes = module.train()(z) / z
    assert slopes.min() >= 1 / 8 and slopes.max() <= 1 / 3
    assert slopes.std() > 0.03  # drawn, not fixed: U(1/8, 1/3) has std 0.06
    eval_slopes = module.eval()(z) / z
    assert torch.allclose(eval_slopes, torch.full_like(eval_slopes, (1 / 8 + 1 / 3) / 2))


@pytest.mark.parametrize("per_unit, shape", [(False, (1,)), (True, (5,))])
def test_prelu_learns_its_slope(per_unit, shape):
    module = _module("prelu", 5, f"act.per_unit={str(per_unit).lower()}")
    assert module.weight.shape == shape
    before = module.weight.detach().clone()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module(-torch.ones(3, 5, dtype=torch.float64)).sum().backward()
    assert module.weight.grad is not None and torch.all(module.weight.grad != 0)
    optimizer.step()
    assert not torch.equal(module.weight.detach(), before)


def test_gelu_takes_only_the_approximations_torch_has():
    from dnnrun.errors import ConfigError

    assert make_config("act=gelu", "act.approximate=tanh").act.params == {"approximate": "tanh"}
    with pytest.raises(ConfigError) as info:
        make_config("act=gelu", "act.approximate=foo")
    assert info.value.problems == ["act.approximate: expected one of 'none', 'tanh', got 'foo'"]
