"""Penalties, dropout, alpha dropout and max-norm do what their definitions say."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import last_weights, make_config
from dnnrun.errors import ConfigError
from dnnrun.models import registry as model
from dnnrun.models.registry import Inputs, Layers
from dnnrun.techniques.regularizers import Regularization, combine


def _model_and_reg(*overrides: str):
    cfg = make_config("model.hidden=[16,12]", *overrides)
    reg = combine(cfg.regularizer)
    return model.build(cfg.model, Inputs(features=8, classes=3), Layers(cfg.act, cfg.norm, cfg.init, reg)), reg


def _nonzero_biases(net: nn.Module) -> None:
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.fill_(3.0)  # a penalty that counted biases or norm parameters would show it


@pytest.mark.parametrize("option, l1, l2", [("l1", 1e-3, 0.0), ("l2", 0.0, 1e-3), ("l1_l2", 1e-3, 2e-3)])
def test_penalties_sum_over_weight_matrices_only(option, l1, l2):
    overrides = {
        "l1": ["regularizer.l1.factor=1e-3"],
        "l2": ["regularizer.l2.factor=1e-3"],
        "l1_l2": ["regularizer.l1_l2.l1=1e-3", "regularizer.l1_l2.l2=2e-3"],
    }[option]
    net, reg = _model_and_reg(f"regularizer=[{option}]", "norm=batchnorm", *overrides)
    _nonzero_biases(net)
    weights = [net.hidden1.linear.weight, net.hidden2.linear.weight, net.output.weight]
    expected = l1 * sum(w.abs().sum() for w in weights) + l2 * sum((w**2).sum() for w in weights)
    assert torch.allclose(reg.penalty(net), expected)


def test_no_penalty_without_l1_or_l2():
    _, reg = _model_and_reg("regularizer=[dropout]")
    assert reg.penalty(nn.Linear(2, 2)) is None


def test_dropout_sits_on_the_inputs_and_hidden_layers_never_after_the_output():
    net, _ = _model_and_reg(
        "regularizer=[dropout]", "regularizer.dropout.rate=0.3", "regularizer.dropout.input_rate=0.1"
    )
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Dropout)]
    assert names == ["input_dropout", "hidden1.dropout", "hidden2.dropout"]
    assert net.input_dropout.p == 0.1 and net.hidden1.dropout.p == 0.3
    assert list(net._modules)[-1] == "output"


def test_dropout_zeroes_about_rate_and_scales_the_rest_in_training_only():
    torch.manual_seed(0)
    net, _ = _model_and_reg("regularizer=[dropout]", "regularizer.dropout.rate=0.3")
    layer = net.hidden1.dropout
    x = torch.ones(200_000)
    y = layer.train()(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.3, abs=0.005)
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))
    assert torch.equal(layer.eval()(x), x)


def test_alpha_dropout_keeps_mean_and_variance_of_standardized_inputs():
    torch.manual_seed(0)
    net, _ = _model_and_reg("regularizer=[alpha_dropout]", "regularizer.alpha_dropout.rate=0.2", "act=selu")
    layer = net.hidden1.dropout
    assert isinstance(layer, nn.AlphaDropout)
    x = torch.randn(500_000)
    y = layer.train()(x)
    # dropped units all take the same value (alpha' after the affine correction): about rate of them
    _, counts = y.unique(return_counts=True)
    assert counts.max().item() / len(y) == pytest.approx(0.2, abs=0.005)
    assert y.mean().item() == pytest.approx(0.0, abs=0.01)
    assert y.var().item() == pytest.approx(1.0, abs=0.01)
    assert torch.equal(layer.eval()(x), x)


def test_max_norm_caps_every_units_incoming_weights_after_a_step():
    net, reg = _model_and_reg("regularizer=[max_norm]", "regularizer.max_norm.max_value=0.5")
    optimizer = torch.optim.SGD(net.parameters(), lr=10.0)
    net(torch.randn(32, 8)).pow(2).sum().backward()
    optimizer.step()
    before = net.hidden1.linear.weight.norm(dim=1)
    assert before.max() > 0.5  # the large step pushed rows past the cap
    reg.after_step(net)
    for layer in (net.hidden1.linear, net.hidden2.linear, net.output):
        norms = layer.weight.norm(dim=1)
        assert torch.all(norms <= 0.5 + 1e-6)
    small = before <= 0.5  # rows already within the cap are left unchanged
    after = net.hidden1.linear.weight.norm(dim=1)
    assert torch.allclose(after[small], before[small])


def test_max_norm_caps_each_conv_filter_and_penalties_count_conv_kernels():
    """Affine layers other than Linear: a conv weight (out, in, kh, kw) is capped per output filter,
    and its kernel is a weight matrix for l1/l2 (its bias is not)."""
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([0.1, 10.0, 0.2, 20.0]).view(4, 1, 1, 1))
        conv.bias.fill_(5.0)
    before = conv.weight.detach().flatten(1).norm(dim=1)
    Regularization(max_norm=1.0).after_step(conv)
    after = conv.weight.detach().flatten(1).norm(dim=1)
    assert torch.allclose(after, torch.minimum(before, torch.ones(4)))  # filters 1 and 3 capped at 1, 0 and 2 kept
    assert Regularization(l2=1.0).penalty(conv).item() == pytest.approx(conv.weight.pow(2).sum().item())


def test_regularizers_compose():
    _, reg = _model_and_reg("regularizer=[l2,dropout,max_norm]")
    assert (reg.l2, reg.dropout, reg.max_norm) == (1e-4, 0.2, 1.0)


def test_two_regularizers_setting_the_same_thing_is_a_config_error():
    with pytest.raises(ConfigError, match="dropout and alpha_dropout both set dropout, input_dropout, dropout_layer"):
        make_config("regularizer=[dropout,alpha_dropout]")


# ---------------------------------------------------------------------------------------------
# The same, through the training loop: each must act on the weights a run leaves, and each test
# has the run without it as its control.


def _trained(tmp_path, name: str, *overrides: str) -> dict[str, torch.Tensor]:
    from dnnrun.training import loop

    loop.run(make_config("trainer.epochs=1", *overrides), tmp_path / name)
    return last_weights(tmp_path / name)


def _initial(*overrides: str) -> dict[str, torch.Tensor]:
    """The weights the run above starts from (it seeds with trainer.seed=0, then builds)."""
    from dnnrun.data.datasets import load
    from dnnrun.training import runtime

    cfg = make_config(*overrides)
    torch.manual_seed(0)
    return runtime.build_model(cfg, load(cfg.data, torch.device("cpu")))[0].state_dict()


def _rows(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.norm(dim=1) for name, w in weights.items() if name.endswith("weight") and w.dim() == 2])


def test_training_applies_max_norm_after_every_step(tmp_path):
    capped = _trained(tmp_path, "capped", "regularizer=[max_norm]", "regularizer.max_norm.max_value=0.5")
    assert _rows(capped).max() <= 0.5 + 1e-6
    assert _rows(_trained(tmp_path, "free")).max() > 0.5


def test_training_adds_the_l2_penalty_to_the_gradient(tmp_path):
    free, decayed = (
        _trained(tmp_path, "free"),
        _trained(tmp_path, "l2", "regularizer=[l2]", "regularizer.l2.factor=0.1"),
    )
    weights = [n for n in free if n.endswith("weight")]
    assert sum(decayed[n].pow(2).sum() for n in weights) < 0.9 * sum(free[n].pow(2).sum() for n in weights)


@pytest.mark.parametrize("clip", ["trainer.clip_value=1e-4", "trainer.clip_norm=1e-4"])
def test_training_clips_every_step(tmp_path, clip):
    start = _initial()
    steps, lr = 27, 0.01  # one epoch of the synthetic set at batch 32, plain SGD
    clipped, free = _trained(tmp_path, "clipped", clip), _trained(tmp_path, "free")
    moved = max((clipped[n] - start[n]).abs().max() for n in start)
    # No element moved more than the clipped steps allow (plus float32 rounding on each addition).
    assert moved <= steps * lr * 1e-4 * 1.1
    assert max((free[n] - start[n]).abs().max() for n in start) > 1e-3
