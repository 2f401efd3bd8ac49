"""The learning-rate range test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_config, run_cli
from dnnrun.data.datasets import load
from dnnrun.optim import optimizers as optim
from dnnrun.training import lr_find, runtime


def test_the_curve_falls_then_explodes_and_the_suggestion_lies_where_it_falls():
    cfg = make_config()  # the default range and steps, as `dnnrun mode=lr_find` runs them
    data = load(cfg.data, torch.device("cpu"))
    torch.manual_seed(0)
    model, _ = runtime.build_model(cfg, data)
    result = lr_find.find(
        model, optim.build(cfg.optimizer, model), data.train, 32, cfg.lr_find, torch.Generator().manual_seed(0)
    )
    lrs, smoothed = result["lrs"], result["smoothed"]
    low = smoothed.index(min(smoothed))
    assert 10 < low < len(lrs) - 1
    assert smoothed[low] < 0.5 * smoothed[0]  # it falls ...
    assert result["stopped"] != "reached end_lr" and len(lrs) < cfg.lr_find.steps  # ... then explodes, which stops it
    assert smoothed[-1] > 4 * smoothed[low] or "non-finite" in result["stopped"]
    suggestion = result["suggestion"]
    assert lrs[0] < suggestion < result["min_loss_lr"] == lrs[low]
    assert suggestion == pytest.approx(lrs[low] / 10, rel=0.1)  # a decade below the minimum
    i = lrs.index(suggestion)
    # inside the falling region: well below where it started, and still falling a decade later
    assert smoothed[i] < smoothed[0] - 0.2 * (smoothed[0] - smoothed[low])
    assert smoothed[low] < smoothed[i]


def test_the_suggestion_never_lies_below_the_range():
    lrs = [1e-3 * 2**t for t in range(10)]
    smoothed = [2.0, 1.5, 1.2, 1.0, 3.0, 5.0, 8.0, 9.0, 9.5, 9.9]  # lowest at the 4th step, 8x the first rate
    assert lr_find.suggest(lrs, smoothed)["suggestion"] == lrs[0]


def test_dnnrun_mode_lr_find_writes_its_results_and_no_checkpoint(tmp_path: Path):
    run = tmp_path / "find"
    result = run_cli(
        "mode=lr_find",
        "data=synthetic",
        "optimizer=nesterov",
        "lr_find.steps=100",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Suggested: optimizer=nesterov optimizer.lr=" in result.stdout  # the option, not its registry name (sgd)
    said = " ".join(result.stdout.split())  # the console may wrap lines
    assert said.index(f"lr_find: output directory {run} (on cpu)") < said.index("Suggested:")
    assert "data=synthetic model=mlp init=he_normal" in said
    assert f"written: {run / 'lr_find.json'}, {run / 'plots' / 'lr_find.png'}" in said
    found = json.loads((run / "lr_find.json").read_text())
    assert len(found["lrs"]) == len(found["losses"]) == found["steps"] and found["suggestion"] > 0
    assert (run / "plots" / "lr_find.png").stat().st_size > 10_000
    assert not (run / "checkpoints").exists()
    assert json.loads((run / "summary.json").read_text())["mode"] == "lr_find"
