"""Batch norm and layer norm inside the MLP behave as defined."""

from __future__ import annotations

import torch
from torch import nn

from conftest import make_config
from dnnrun.models import registry as model
from dnnrun.models.registry import Inputs, Layers
from dnnrun.techniques.regularizers import combine


def _model(*overrides: str, in_features: int = 8) -> nn.Sequential:
    cfg = make_config("model.hidden=[16,12]", *overrides)
    layers = Layers(cfg.act, cfg.norm, cfg.init, combine(cfg.regularizer))
    return model.build(cfg.model, Inputs(features=in_features, classes=3), layers)


def test_batchnorm_layers_have_two_learned_vectors_two_running_buffers_and_no_bias_before_them():
    net = _model("norm=batchnorm")
    for block in (net.hidden1, net.hidden2):
        bn = block.norm
        assert isinstance(bn, nn.BatchNorm1d) and block.linear.bias is None
        assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
        assert {n for n, b in bn.named_buffers() if b.is_floating_point()} == {"running_mean", "running_var"}


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_evaluation():
    torch.manual_seed(0)
    bn = _model("norm=batchnorm", "norm.momentum=0.1").hidden1.norm
    x = torch.randn(256, 16) * 3 + 5
    out = bn.train()(x)
    assert torch.allclose(out.mean(0), torch.zeros(16), atol=1e-5)
    assert torch.allclose(out.var(0, unbiased=False), torch.ones(16), atol=1e-3)
    # running = 0.9 * running + 0.1 * batch (running_var uses the unbiased batch variance)
    assert torch.allclose(bn.running_mean, 0.1 * x.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * x.var(0, unbiased=True), atol=1e-5)
    y = torch.randn(4, 16)
    expected = (y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(bn.eval()(y), expected, atol=1e-6)  # weight 1, bias 0 before training


def test_batchnorm_placement_after_the_activation():
    block = _model("norm=batchnorm", "norm.placement=after").hidden1
    assert list(block._modules) == ["linear", "act", "norm"] and block.linear.bias is not None


def test_a_batchnorm_layer_on_the_inputs_in_place_of_standardizing():
    net = _model("norm=batchnorm", "norm.on_inputs=true", "data.scaling=none")
    assert list(net._modules)[0] == "input_norm"
    assert isinstance(net.input_norm, nn.BatchNorm1d) and net.input_norm.num_features == 8


def test_layernorm_normalizes_each_example_the_same_in_training_and_evaluation():
    block = _model("norm=layernorm").hidden1
    assert block.linear.bias is not None  # layer norm does not cancel a per-unit bias
    x = torch.randn(5, 16) * 4 + 2
    out = block.norm(x)
    assert torch.allclose(out.mean(1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(out.var(1, unbiased=False), torch.ones(5), atol=1e-3)
    assert torch.equal(block.norm.eval()(x), block.norm.train()(x))


def test_declared_parameters_are_torchs():
    """As the optimizers': what a config may set of a norm layer is torch's signature, less the
    layer's size and where it lives."""
    from test_optim import _declared_matches_torch

    from dnnrun.techniques.norms import NORMS

    for name, norm in NORMS.items():
        if norm.layer is not None:
            cls = getattr(nn, norm.layer)
            assert _declared_matches_torch(cls, norm.params, {"device", "dtype"}) == [], name
