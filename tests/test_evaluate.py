"""Evaluating a checkpoint, with and without MC dropout."""

from __future__ import annotations

import json
import math
import shutil
import socket
from pathlib import Path

import pytest
import torch

from conftest import make_config, run_cli, write_mnist_like
from dnnrun.data.datasets import load
from dnnrun.errors import UserError
from dnnrun.inference import evaluate
from dnnrun.training import loop, metrics, runtime


def _model(*overrides: str):
    cfg = make_config(*overrides)
    data = load(cfg.data, torch.device("cpu"))
    torch.manual_seed(0)
    model, _ = runtime.build_model(cfg, data)
    return model, data


def test_mc_dropout_without_dropout_equals_the_deterministic_evaluation():
    model, data = _model("regularizer=[dropout]", "norm=batchnorm")  # dropout layers, then their rate set to 0
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(layers) == 3  # on the inputs and the two hidden layers: MC dropout turns them on
    for layer in layers:
        layer.p = 0.0
    deterministic = evaluate.predict(model, data.test.x, 64)
    passes = evaluate.predict(model, data.test.x, 64, samples=5)
    assert passes.shape == (5, *deterministic.shape)
    assert all(torch.equal(p, deterministic) for p in passes)


def test_mc_dropout_passes_differ_and_batch_norm_stays_in_evaluation_mode():
    model, data = _model("regularizer=[dropout]", "norm=batchnorm")
    running = model.hidden1.norm.running_mean.clone()
    passes = evaluate.predict(model, data.test.x, 64, samples=4)
    assert not torch.equal(passes[0], passes[1])
    assert torch.equal(model.hidden1.norm.running_mean, running)  # batch norm did not update its statistics
    assert not model.training and not model.hidden1.dropout.training  # back to evaluation mode afterwards


def test_scores_follow_their_definitions():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    y = torch.tensor([0, 1, 1, 0])
    s = metrics.scores(probs, y, bins=2)
    # predictions 0, 0, 1, 0 (a tie goes to the first class): 3 of 4 right
    assert s["accuracy"] == 0.75
    assert s["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.5)) / 4)
    entropy = lambda p: -sum(q * math.log(q) for q in p)  # noqa: E731
    assert s["entropy"] == pytest.approx(sum(entropy(p) for p in probs.tolist()) / 4)
    # bins (0, 0.5]: the 0.5 example, right, conf 0.5 -> |1 - 0.5| * 1/4;
    # (0.5, 1]: confidences 0.9, 0.6, 0.7, accuracy 2/3 -> |2/3 - 0.7333| * 3/4
    assert s["ece"] == pytest.approx(0.25 * 0.5 + 0.75 * abs(2 / 3 - (0.9 + 0.6 + 0.7) / 3))


def test_dnnrun_mode_evaluate_reports_deterministic_and_mc_dropout_figures(tmp_path: Path):
    summary = loop.run(make_config("regularizer=[dropout]", "trainer.epochs=3"), tmp_path / "trained")
    best = tmp_path / "trained" / "checkpoints" / "best.pt"
    run = tmp_path / "eval"
    result = run_cli(
        "mode=evaluate", f"evaluate.checkpoint={best}", "evaluate.mc_samples=10", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "MC dropout (10 passes)" in result.stdout
    said = " ".join(result.stdout.split())  # the console may wrap lines
    assert said.index(f"evaluate {best} on the test split; output directory: {run} (on cpu)") < said.index("MC dropout")
    assert "as trained: data=synthetic model=mlp init=he_normal act=relu" in said and "regularizer=[dropout]" in said
    assert f"written: {run / 'evaluation.json'}" in said
    report = json.loads((run / "evaluation.json").read_text())
    assert report["examples"] == 240 and report["split"] == "test"
    assert report["deterministic"]["accuracy"] == pytest.approx(summary["test"]["test/acc"])
    mc = report["mc_dropout"]
    assert mc["samples"] == 10 and mc["dropout_layers"] == 3 and mc["spread"] > 0
    for name in ("accuracy", "nll", "ece", "entropy"):
        assert math.isfinite(mc[name])
    # a run directory stands for its best.pt, as for mode=predict and dnnrun.load
    again = evaluate.run(make_config("mode=evaluate", f"evaluate.checkpoint={tmp_path / 'trained'}"), tmp_path / "e2")
    assert again["checkpoint"] == str(best) and again["deterministic"] == report["deterministic"]
    with pytest.raises(UserError, match="has no checkpoints/best.pt"):
        evaluate.run(make_config("mode=evaluate", f"evaluate.checkpoint={tmp_path / 'eval'}"), tmp_path / "e3")


def test_evaluate_without_a_checkpoint_exits_2(tmp_path: Path):
    result = run_cli("mode=evaluate", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 2 and "evaluate.checkpoint" in result.stderr


@pytest.mark.parametrize("mode", ["evaluate", "lr_find"])
def test_a_refused_evaluate_or_lr_find_leaves_no_directory(tmp_path: Path, mode):
    """They used to write .hydra/ and status.json before their checks."""
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    refused = {
        "evaluate": ["mode=evaluate", f"evaluate.checkpoint={tmp_path / 'bad.pt'}"],
        "lr_find": ["mode=lr_find", "data=synthetic", "data.val_size=100000"],
    }[mode]
    result = run_cli(*refused, f"hydra.run.dir={tmp_path / 'out' / 'run'}", f"outputs={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def offline(tmp_path: Path, monkeypatch) -> list:
    """No network, and a home of the test's own (so ~/.cache/dnnrun-data is empty): the connections
    tried (torchvision downloading) are recorded and refused."""
    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # looking a host name up
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DNNRUN_DATA", raising=False)
    return tried


def _train_on_fashion_mnist_files(tmp_path: Path, *overrides: str) -> Path:
    """One epoch on tiny Fashion-MNIST-format files; returns best.pt."""
    cfg = make_config("trainer.epochs=1", "data.val_size=8", *overrides, data="fashion_mnist")
    loop.run(cfg, tmp_path / "trained")
    return tmp_path / "trained" / "checkpoints" / "best.pt"


def test_evaluate_finds_the_data_through_dnnrun_data_as_training_did(tmp_path: Path, offline, monkeypatch):
    """`DNNRUN_DATA=... dnnrun mode=evaluate evaluate.checkpoint=...` looked under ~/.cache/dnnrun-data
    (the default digits group ignored DNNRUN_DATA) and tried to download."""
    write_mnist_like(tmp_path / "data" / "FashionMNIST" / "raw")
    monkeypatch.setenv("DNNRUN_DATA", str(tmp_path / "data"))
    best = _train_on_fashion_mnist_files(tmp_path)  # data.root from DNNRUN_DATA, download=true
    result = run_cli(
        "mode=evaluate",
        f"evaluate.checkpoint={best}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
        env={"DNNRUN_DATA": str(tmp_path / "data")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["examples"] == 12
    # on another machine (or after a move) DNNRUN_DATA wins over the root saved in the checkpoint
    (tmp_path / "data").rename(tmp_path / "moved")
    result = run_cli(
        "mode=evaluate",
        f"evaluate.checkpoint={best}",
        f"hydra.run.dir={tmp_path / 'eval2'}",
        cwd=tmp_path,
        env={"DNNRUN_DATA": str(tmp_path / "moved")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert offline == []  # no download tried


def test_evaluate_without_dnnrun_data_reads_the_checkpoints_root_and_download_setting(tmp_path: Path, offline):
    write_mnist_like(tmp_path / "data" / "FashionMNIST" / "raw")
    best = _train_on_fashion_mnist_files(tmp_path, f"data.root={tmp_path / 'data'}", "data.download=false")
    result = run_cli("mode=evaluate", f"evaluate.checkpoint={best}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert offline == []
    # the command line's data.root wins; download=false came from the checkpoint: no download tried
    result = run_cli(
        "mode=evaluate",
        f"evaluate.checkpoint={best}",
        f"data.root={tmp_path / 'elsewhere'}",
        f"hydra.run.dir={tmp_path / 'eval2'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and f"{tmp_path / 'elsewhere' / 'FashionMNIST'}" in result.stderr
    assert "and data.download=false" in result.stderr and offline == []


def test_nothing_is_downloaded_into_a_root_that_only_the_checkpoint_names(tmp_path: Path, offline):
    """A checkpoint from elsewhere names its data root and download=true: evaluating it creates no
    folder there and tries no download; it says where to point dnnrun instead."""
    write_mnist_like(tmp_path / "data" / "FashionMNIST" / "raw")
    best = _train_on_fashion_mnist_files(tmp_path, f"data.root={tmp_path / 'data'}")  # download=true
    shutil.rmtree(tmp_path / "data")
    result = run_cli("mode=evaluate", f"evaluate.checkpoint={best}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "data").exists() and offline == []
