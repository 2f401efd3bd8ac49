"""Each optimizer's first steps on a small quadratic equal the textbook rule computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_config
from dnnrun.cli import CONFIG_DIR
from dnnrun.optim import optimizers as optim

A = torch.tensor([[1.0, 4.0]], dtype=torch.float64)  # f(w) = 0.5 * sum(A * w^2): gradient A * w
W0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
STEPS = 2


class Quadratic(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(W0.clone())  # 2-D: a weight matrix, so weight decay applies to it

    def loss(self):
        return 0.5 * (A * self.w**2).sum()


def _sgd(p, steps):
    lr, mu, nesterov = p["lr"], p["momentum"], p["nesterov"]
    w, v = W0.clone(), torch.zeros_like(W0)
    for _ in range(steps):
        g = A * w
        if mu == 0:
            w = w - lr * g
        elif not nesterov:
            # Momentum (Polyak): m <- mu * m - lr * g; w <- w + m  (here v = -m / lr)
            v = mu * v + g
            w = w - lr * v
        else:
            # Nesterov in the form of Bengio et al. (2013), which tracks the look-ahead point:
            # v <- mu * v + g; w <- w - lr * (g + mu * v)
            v = mu * v + g
            w = w - lr * (g + mu * v)
    return w


def _adagrad(p, steps):
    w, s = W0.clone(), torch.full_like(W0, p["initial_accumulator_value"])
    for _ in range(steps):
        g = A * w
        s = s + g * g
        w = w - p["lr"] * g / (s.sqrt() + p["eps"])
    return w


def _rmsprop(p, steps):
    w, s, rho = W0.clone(), torch.zeros_like(W0), p["alpha"]
    for _ in range(steps):
        g = A * w
        s = rho * s + (1 - rho) * g * g
        w = w - p["lr"] * g / (s.sqrt() + p["eps"])
    return w


def _adam(p, steps, decoupled_decay=0.0):
    (b1, b2), w = p["betas"], W0.clone()
    m, s = torch.zeros_like(W0), torch.zeros_like(W0)
    for t in range(1, steps + 1):
        g = A * w
        w = w - p["lr"] * decoupled_decay * w  # AdamW: decay apart from the gradient
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * g * g
        m_hat, s_hat = m / (1 - b1**t), s / (1 - b2**t)
        w = w - p["lr"] * m_hat / (s_hat.sqrt() + p["eps"])
    return w


def _adamax(p, steps):
    (b1, b2), w = p["betas"], W0.clone()
    m, u = torch.zeros_like(W0), torch.zeros_like(W0)
    for t in range(1, steps + 1):
        g = A * w
        m = b1 * m + (1 - b1) * g
        u = torch.maximum(b2 * u, g.abs() + p["eps"])  # the infinity norm (eps keeps it off zero)
        w = w - p["lr"] / (1 - b1**t) * m / u
    return w


def _nadam(p, steps):
    # Dozat (2016): Nesterov momentum in Adam, with momentum mu_t = beta1 * (1 - 0.5 * 0.96^(t * psi)).
    (b1, b2), psi, w = p["betas"], p["momentum_decay"], W0.clone()
    m, s, mu_product = torch.zeros_like(W0), torch.zeros_like(W0), 1.0
    for t in range(1, steps + 1):
        g = A * w
        mu = b1 * (1 - 0.5 * 0.96 ** (t * psi))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
        mu_product *= mu
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * g * g
        denom = (s / (1 - b2**t)).sqrt() + p["eps"]
        w = w - p["lr"] * (1 - mu) / (1 - mu_product) * g / denom
        w = w - p["lr"] * mu_next / (1 - mu_product * mu_next) * m / denom
    return w


def _radam(p, steps):
    # Liu et al. (2019): Adam's adaptive rate times a rectification r_t once the length rho_t of the
    # approximated simple moving average exceeds 5; before that, momentum SGD on the bias-corrected m.
    (b1, b2), w = p["betas"], W0.clone()
    m, s = torch.zeros_like(W0), torch.zeros_like(W0)
    rho_inf = 2 / (1 - b2) - 1
    for t in range(1, steps + 1):
        g = A * w
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho > 5:
            r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            w = w - p["lr"] * r * m_hat * math.sqrt(1 - b2**t) / (s.sqrt() + p["eps"])
        else:
            w = w - p["lr"] * m_hat
    return w


BY_HAND = {
    "sgd": _sgd,
    "momentum": _sgd,
    "nesterov": _sgd,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
    "adam": _adam,
    "adamax": _adamax,
    "nadam": _nadam,
    "adamw": lambda p, steps: _adam(p, steps, decoupled_decay=p["weight_decay"]),
    "radam": _radam,
}
OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "optimizer").glob("*.yaml"))


def test_every_optimizer_option_has_a_hand_computed_rule():
    assert sorted(BY_HAND) == OPTIONS


@pytest.mark.parametrize("option", OPTIONS)
def test_steps_match_the_textbook_rule(option):
    choice = make_config(f"optimizer={option}").optimizer
    model = Quadratic()
    optimizer = optim.build(choice, model)
    for _ in range(STEPS):
        optimizer.zero_grad()
        model.loss().backward()
        optimizer.step()
    expected = BY_HAND[option](choice.params, STEPS)
    assert torch.allclose(model.w.detach(), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(model.w.detach(), W0)


def test_radam_rectifies_its_rate_once_the_variance_estimate_is_tractable():
    """STEPS is too few for rho_t to pass 5 (t = 6 with beta2 = 0.999): ten steps reach the rectified rule."""
    choice = make_config("optimizer=radam").optimizer
    model = Quadratic()
    optimizer = optim.build(choice, model)
    for _ in range(10):
        optimizer.zero_grad()
        model.loss().backward()
        optimizer.step()
    assert torch.allclose(model.w.detach(), _radam(choice.params, 10), atol=1e-6, rtol=0)
    assert not torch.allclose(_radam(choice.params, 10), _radam({**choice.params, "betas": [0.9, 0.0]}, 10))


def test_the_presets_hold_the_classic_hyperparameters():
    params = {o: make_config(f"optimizer={o}").optimizer.params for o in ("momentum", "nesterov", "rmsprop")}
    assert params["momentum"]["momentum"] == 0.9 and not params["momentum"]["nesterov"]
    assert params["nesterov"]["momentum"] == 0.9 and params["nesterov"]["nesterov"]
    assert params["rmsprop"]["alpha"] == 0.9  # Keras' rho


def test_weight_decay_never_applies_to_biases_or_norm_parameters():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.PReLU(), nn.Linear(8, 2))
    groups = optim.build(make_config("optimizer=adamw").optimizer, net).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(net[0].weight), id(net[3].weight)}
    assert math.isclose(groups[0]["weight_decay"], 0.01) and groups[1]["weight_decay"] == 0.0


def _declared_matches_torch(cls, declared: dict, not_settable: set[str]) -> list[str]:
    """What differs between the parameters a registry declares for a torch class and its signature."""
    import inspect

    params = {
        n: p.default for n, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty
    }
    found = [f"{n}: not in torch's signature" for n in declared if n not in params]
    found += [
        f"{n}: neither declared nor marked not settable" for n in params if n not in declared and n not in not_settable
    ]
    kind = {bool: bool, int: float, float: float, tuple: tuple}
    found += [
        f"{n}: declared {tp.__name__}, torch's default is {params[n]!r}"
        for n, tp in declared.items()
        if n in params and params[n] is not None and kind.get(type(params[n])) is not tp
    ]
    return found


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_declared_parameters_are_torchs(name):
    """The parameters a config may set are written out (reading them from torch's signature would
    import torch while checking a config); they must be torch's own, and torch's new ones noticed."""
    entry = optim.OPTIMIZERS[name]
    assert _declared_matches_torch(getattr(torch.optim, entry.cls), entry.params, optim.NOT_SETTABLE) == []
