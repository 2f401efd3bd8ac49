"""Image models end to end, as a user runs them: the CLI on files the tests write, then the
commands that use a trained conv net (evaluate with MC dropout, lr_find, export)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import run_cli, write_cifar_like, write_mnist_like
from dnnrun.store import checkpoint


def test_a_cnn_on_fashion_mnist_files(tmp_path: Path):
    write_mnist_like(tmp_path / "data" / "FashionMNIST" / "raw", n_train=200, n_test=50)
    run = tmp_path / "run"
    result = run_cli(
        "model=cnn",
        "data=fashion_mnist",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        "data.val_size=20",
        "model.channels=[4,8]",
        "trainer.epochs=2",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["data"]["features"] == 784
    layers = json.loads((run / "diagnostics.jsonl").read_text().splitlines()[-1])["layers"]
    assert {"hidden1", "hidden2", "hidden3", "output"} <= set(layers) and "dead" in layers["hidden1"]  # channels


def test_the_cifar10_resnet_preset_then_evaluate_lr_find_and_export(tmp_path: Path, cifar_files_accepted):
    write_cifar_like(tmp_path / "data", per_batch=40, n_test=40)
    data = [f"data.root={tmp_path / 'data'}", "data.download=false", "data.val_size=20"]
    run = tmp_path / "run"
    # the preset's ResNet-20 trains in test_catalogue.py's preset test; here the smallest of its family
    result = run_cli(
        "experiment=cifar10_resnet",
        "model.depth=8",
        *data,
        "trainer.epochs=1",
        "regularizer=[dropout]",
        "regularizer.dropout.spatial=true",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["parameters"] == 78_042  # ResNet-8 at width 16
    assert (
        "data=cifar10 model=resnet init=he_normal act=relu norm=batchnorm optimizer=nesterov schedule=onecycle"
        in (run / "run.log").read_text()
    )
    best = run / "checkpoints" / "best.pt"

    result = run_cli(
        "mode=evaluate",
        f"evaluate.checkpoint={best}",
        "evaluate.mc_samples=3",
        data[0],
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    mc = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["mc_dropout"]
    # on the inputs, after the stem and after each of the three residual blocks
    assert mc["samples"] == 3 and mc["dropout_layers"] == 5 and math.isfinite(mc["nll"])

    result = run_cli(
        "mode=lr_find",
        "experiment=cifar10_resnet",
        "model.depth=8",
        *data,
        "lr_find.steps=10",
        f"hydra.run.dir={tmp_path / 'lr'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr

    from dnnrun.inference.export import main as export

    assert export([str(run)]) == 0
    exported = checkpoint.load(run / "checkpoints" / "best.safetensors")
    assert exported["config"]["model"]["name"] == "resnet"
    assert exported["model"]["hidden2.inner.conv1.weight"].shape == (16, 16, 3, 3)
