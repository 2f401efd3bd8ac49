"""A model too big for the device is refused before anything is allocated or created, with the
estimate; a very deep one is trained with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import make_config, run_cli
from dnnrun.data.datasets import Data, Split
from dnnrun.training import runtime

CPU = torch.device("cpu")


def _meta_model(cfg):
    split = Split(torch.zeros(4, 8), torch.zeros(4, dtype=torch.int64))
    data = Data(split, split, split, n_features=8, n_classes=3, shape=None, unlabeled=split.x)
    with torch.device("meta"):
        return runtime.build_model(cfg, data)[0]


def test_the_estimate_counts_weights_gradients_optimizer_state_and_a_batch(monkeypatch):
    cfg = make_config("model.hidden=[100]", "optimizer=adam", "trainer.batch_size=10", "trainer.eval_batch_size=10")
    params = 8 * 100 + 100 + 100 * 3 + 3
    needed = 4 * (params * (2 + 3) + 4 * 10 * (100 + 3))  # Adam: m, v (and max v with amsgrad)
    monkeypatch.setattr(runtime, "free_memory", lambda device: needed)
    assert runtime.memory_problem(_meta_model(cfg), cfg, CPU) is None
    monkeypatch.setattr(runtime, "free_memory", lambda device: needed - 1)
    problem = runtime.memory_problem(_meta_model(cfg), cfg, CPU)
    assert f"({params:,} parameters: weights, gradients and adam's state" in problem
    monkeypatch.setattr(runtime, "free_memory", lambda device: None)  # unknown (MPS): no refusal
    assert runtime.memory_problem(_meta_model(cfg), cfg, CPU) is None


def test_members_need_that_many_models_memory_and_are_refused_before_any_write(monkeypatch, tmp_path: Path):
    from dnnrun.errors import UserError
    from dnnrun.training import loop

    cfg = make_config("trainer.seeds=[0,1,2,3]", data="digits")
    single = make_config(data="digits")
    data = runtime.load_data(cfg.data, cfg.model, CPU)
    with torch.device("meta"):
        model = runtime.build_model(cfg, data)[0]
    low, needed = 0, 2**40  # halved down to the least memory one model fits in
    while low < needed:
        mid = (low + needed) // 2
        monkeypatch.setattr(runtime, "free_memory", lambda device, m=mid: m)
        low, needed = (
            (low, mid) if runtime.memory_problem(model, single, CPU, data.shape) is None else (mid + 1, needed)
        )
    monkeypatch.setattr(runtime, "free_memory", lambda device: 4 * needed)
    assert runtime.memory_problem(model, cfg, CPU, data.shape, members=4) is None
    monkeypatch.setattr(runtime, "free_memory", lambda device: 4 * needed - 1)
    with pytest.raises(
        UserError,
        match=r"4 members of the model need about .*, lower trainer.batch_size and trainer.eval_batch_size "
        r"or list fewer trainer.seeds$",
    ):
        loop.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_very_deep_model_gets_a_warning_with_its_depth(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "SLOW_LAYERS", 5)
    cfg = make_config("model.depth=6", "model.width=4")
    with caplog.at_level(logging.WARNING, logger="dnnrun"):
        assert runtime.memory_problem(_meta_model(cfg), cfg, CPU) is None
    assert "the model has 7 layers: every step runs them one after another" in caplog.text


def test_a_model_too_big_for_memory_exits_2_with_the_estimate_and_leaves_nothing(tmp_path: Path):
    """model.hidden=[1000000000] ended in an allocator traceback, with a run directory left behind."""
    result = run_cli("data=synthetic", "model.hidden=[1000000000]", f"outputs={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the model needs about" in result.stderr and "GiB free" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, most",
    [
        ("sgd", {"momentum": 0.9}),
        ("adagrad", {}),
        ("rmsprop", {"momentum": 0.9, "centered": True}),
        ("adam", {"amsgrad": True}),
        ("adamax", {}),
        ("nadam", {}),
        ("adamw", {"amsgrad": True}),
        ("radam", {}),
    ],
)
def test_the_state_an_optimizer_declares_covers_what_it_keeps(name, most):
    """optim.OPTIMIZERS' `state` (tensors of a parameter's size) is what torch keeps at the most."""
    from dnnrun.optim import optimizers as optim

    w = torch.nn.Parameter(torch.ones(5, 5))
    opt = getattr(torch.optim, optim.OPTIMIZERS[name].cls)([w], lr=0.1, **most)
    w.grad = torch.ones_like(w)
    opt.step()
    assert (
        sum(1 for v in opt.state[w].values() if torch.is_tensor(v) and v.shape == w.shape)
        == optim.OPTIMIZERS[name].state
    )


def test_a_conv_nets_activations_are_measured_at_the_size_of_its_maps(monkeypatch):
    """Each conv layer's outputs are channels x H x W per example: a pass on the meta device counts them."""
    cfg = make_config(
        "model=cnn",
        "model.channels=[4]",
        "model.head=[]",
        "model.pool=none",
        "trainer.batch_size=10",
        "trainer.eval_batch_size=10",
        data="digits",
    )
    split = Split(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64))
    with torch.device("meta"):
        net = runtime.build_model(cfg, Data(split, split, split, 64, 10, (1, 8, 8), split.x))[0]
    params = 4 * 9 + 4 + 4 * 64 * 10 + 10
    values = 4 * 64 + 4 * 64 + 4 * 64 + 10  # conv, relu, flatten outputs, then the output layer's
    needed = 4 * (params * (2 + 1) + 10 * values)  # SGD keeps a momentum buffer
    monkeypatch.setattr(runtime, "free_memory", lambda device: needed)
    assert runtime.memory_problem(net, cfg, CPU, (1, 8, 8)) is None
    monkeypatch.setattr(runtime, "free_memory", lambda device: needed - 1)
    assert runtime.memory_problem(net, cfg, CPU, (1, 8, 8)) is not None
    bn = make_config("model=cnn", "norm=batchnorm", data="digits")  # batch norm cannot train on one example
    with torch.device("meta"):
        net = runtime.build_model(bn, Data(split, split, split, 64, 10, (1, 8, 8), split.x))[0]
    assert runtime._output_values(net, (1, 8, 8)) > 0 and net.training
