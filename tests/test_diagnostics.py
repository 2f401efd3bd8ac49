"""Seeing inside training: per-layer statistics, the diagnosis, divergence, plots, TensorBoard."""

from __future__ import annotations

import itertools
import json
import math
import struct
from pathlib import Path

import pytest
import torch

from conftest import make_config, run_cli
from dnnrun.errors import Diverged, Interrupted
from dnnrun.insight import diagnosis, diagnostics, plots
from dnnrun.insight.console import console
from dnnrun.store.rundir import read_jsonl
from dnnrun.training import faults, loop

DEEP = ("model.depth=20", "model.width=16", "trainer.epochs=2", "trainer.diagnostics.every=10")


def _diagnosis(run_dir: Path, *overrides: str) -> list[str]:
    return loop.run(make_config(*overrides), run_dir)["diagnosis"]


def test_a_deep_sigmoid_net_with_standard_normal_weights_has_vanishing_gradients(tmp_path: Path):
    found = _diagnosis(tmp_path / "sigmoid", *DEEP, "act=sigmoid", "init=random_normal")
    assert any(s.startswith("gradients vanish: the first hidden layer's gradient norm is") for s in found), found
    for act in ("relu", "elu"):
        found = _diagnosis(tmp_path / act, *DEEP, f"act={act}", "init=he_normal")
        assert not any("vanish" in s for s in found), found


def test_an_interrupted_run_is_diagnosed_and_plotted_too(tmp_path: Path):
    sigint = faults.parse("int@epoch=1")  # SIGINT after the first epoch's checkpoint
    with pytest.raises(Interrupted):
        loop.run(
            make_config(*DEEP, "act=sigmoid", "init=random_normal", "trainer.diagnostics.plots=true"),
            tmp_path,
            hook=sigint,
        )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["test"] is None  # not tested: it did not finish
    assert any(s.startswith("gradients vanish") for s in summary["diagnosis"]), summary["diagnosis"]
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == sorted(f"{n}.png" for n in plots.RUN_PLOTS)


def test_a_relu_net_driven_with_a_huge_learning_rate_has_dead_units(tmp_path: Path):
    with console.capture() as printed:
        summary = loop.run(make_config("act=relu", "optimizer.lr=1", "trainer.diagnostics.every=10"), tmp_path)
    dead = [s for s in summary["diagnosis"] if "dead" in s]
    assert dead, summary["diagnosis"]
    assert dead[0].remedies == diagnosis.REMEDIES["dead_units"]
    assert json.loads((tmp_path / "summary.json").read_text())["diagnosis"] == summary["diagnosis"]  # the sentences
    lines = printed.get().splitlines()
    assert lines[lines.index(f"  - {dead[0]}") + 1].startswith("    try: act=leaky_relu, act=leaky_relu_0.2, ")
    last = read_jsonl(tmp_path / "diagnostics.jsonl")[-1]
    worst = max(stats.get("dead", 0) for stats in last["layers"].values())
    assert worst >= 0.5 and f"{worst:.0%} of units in layer" in dead[0]


def test_a_healthy_run_gets_no_diagnosis(tmp_path: Path):
    with console.capture() as printed:
        summary = loop.run(make_config("trainer.epochs=5", "trainer.diagnostics.every=10"), tmp_path)
    assert summary["test"]["test/acc"] > 0.8
    assert summary["diagnosis"] == []
    assert printed.get().splitlines()[-1] == "(no diagnosis: nothing unusual was seen)"  # the run's last word


def test_diagnostics_jsonl_holds_every_layer_every_n_steps(tmp_path: Path):
    loop.run(make_config("norm=batchnorm", "trainer.diagnostics.every=10", "trainer.epochs=2"), tmp_path / "relu")
    records = read_jsonl(tmp_path / "relu" / "diagnostics.jsonl")
    # 27 steps per epoch: every 10th, and each epoch's first and last
    assert [r["step"] for r in records] == [1, 10, 20, 27, 28, 30, 40, 50, 54]
    assert [r["epoch"] for r in records] == [1, 1, 1, 1, 2, 2, 2, 2, 2]
    hidden = {
        "grad_norm",
        "weight_norm",
        "update_ratio",
        "act_mean",
        "act_std",
        "dead",
        "bn_running_mean",
        "bn_running_var",
    }
    for r in records:
        assert list(r["layers"]) == ["hidden1", "hidden2", "output"]
        assert set(r["layers"]["hidden1"]) == hidden
        assert set(r["layers"]["output"]) == {"grad_norm", "weight_norm", "update_ratio"}
        assert all(0 < s["update_ratio"] < 1 and s["grad_norm"] > 0 for s in r["layers"].values())
    loop.run(make_config("act=tanh", "trainer.diagnostics.every=10", "trainer.epochs=1"), tmp_path / "tanh")
    layer = read_jsonl(tmp_path / "tanh" / "diagnostics.jsonl")[0]["layers"]["hidden1"]
    assert "saturated" in layer and "dead" not in layer


def test_a_run_shorter_than_the_cadence_still_has_statistics_to_diagnose(tmp_path: Path):
    """At the default cadence (every 100 steps) a 2-epoch run of 27 steps an epoch had none."""
    loop.run(
        make_config("trainer.epochs=2", "act=sigmoid", "init=random_normal", "model.depth=8", "model.width=16"),
        tmp_path,
    )
    assert [r["step"] for r in read_jsonl(tmp_path / "diagnostics.jsonl")] == [1, 27, 28, 54]
    assert any("saturated" in finding for finding in json.loads((tmp_path / "summary.json").read_text())["diagnosis"])


def test_diagnostics_off(tmp_path: Path):
    loop.run(make_config("trainer.diagnostics.every=0", "trainer.epochs=1"), tmp_path)
    assert read_jsonl(tmp_path / "diagnostics.jsonl") == []


def test_unit_statistics_follow_their_definitions():
    from dnnrun.techniques.activations import ACTIVATIONS

    out = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]])  # unit 0 is zero for every example
    stats = diagnostics.activation_stats(out, ACTIVATIONS["relu"])
    assert stats["dead"].item() == pytest.approx(1 / 3)
    sig = torch.tensor([[0.001, 0.5, 0.999], [0.005, 0.999, 0.3]])  # 4 of the 6 outputs within 0.02 of 0 or 1
    stats = diagnostics.activation_stats(sig, ACTIVATIONS["sigmoid"])
    assert stats["saturated"].item() == pytest.approx(4 / 6)
    tanh = torch.tensor([[-0.99, 0.0], [0.97, 0.5]])  # only the first is within 0.02 of -1 or 1
    assert diagnostics.activation_stats(tanh, ACTIVATIONS["tanh"])["saturated"].item() == pytest.approx(1 / 4)


def _history(val: list[float], train_loss: list[float], acc: float = 0.9) -> list[dict]:
    return [
        {"epoch": i + 1, "val/loss": v, "train/loss": t, "val/acc": acc}
        for i, (v, t) in enumerate(zip(val, train_loss))
    ]


def test_overfitting_and_not_learning_are_diagnosed_from_the_history():
    overfit = _history([1.0, 0.6, 0.5, 0.55, 0.6, 0.7], [1.0, 0.6, 0.4, 0.3, 0.2, 0.1])
    (sentence,) = diagnosis.diagnose(overfit, [], n_classes=10)
    assert sentence.startswith("validation loss rose for the last 3 epochs (0.500 at epoch 3 -> 0.700)")
    assert "while training loss fell (0.400 -> 0.100): overfitting" in sentence
    assert diagnosis.diagnose(_history([1.0, 0.6, 0.5, 0.55, 0.6], [1.0, 0.6, 0.4, 0.3, 0.2]), [], 10) == []
    noise = _history([1.0, 0.6, 0.5, 0.51, 0.52, 0.52], [1.0, 0.6, 0.4, 0.3, 0.2, 0.1])  # 4% above the best
    assert diagnosis.diagnose(noise, [], 10) == []
    stuck = _history([2.30, 2.30, 2.30], [2.31, 2.30, 2.30], acc=0.1)
    (sentence,) = diagnosis.diagnose(stuck, [], n_classes=10)
    assert sentence == (
        "the network is not learning: training loss went from 2.310 to 2.300 and validation "
        "accuracy is 10.0% (chance: 10.0%)"
    )


def test_exploding_gradients_are_diagnosed():
    records = [{"step": s, "layers": {"hidden1": {"grad_norm": 5e3}, "output": {"grad_norm": 1.0}}} for s in (1, 2, 3)]
    (sentence,) = diagnosis.diagnose([], records, n_classes=10)
    assert sentence == (
        "gradients explode: the first hidden layer's gradient norm is 5.0e+03 times the output "
        "layer's (median over 3 monitored steps)"
    )


# ---------------------------------------------------------------------------------------------
# Divergence


def test_a_nan_loss_stops_the_run_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    clean = tmp_path / "clean"
    loop.run(make_config("trainer.epochs=2"), clean)  # the same run, stopped by its budget after epoch 2
    run = tmp_path / "nan"
    result = run_cli(
        "data=synthetic", "trainer.epochs=4", f"hydra.run.dir={run}", cwd=tmp_path, env={"DNNRUN_FAULT": "nan@step=60"}
    )  # 27 steps per epoch: step 60 is in epoch 3
    assert result.returncode == 3, result.stdout + result.stderr
    assert "training diverged at step 60: the training loss is nan" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 60
    assert summary["diagnosis"][0] == "training diverged at step 60: the training loss is nan"
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (kept["trainer"]["epoch"], kept["trainer"]["step"]) == (2, 54)
    reference = torch.load(clean / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(kept["model"][k], reference[k]) for k in reference)
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


# 27 steps per epoch: step 5 is inside the first epoch, step 27 its last (validation comes next).
@pytest.mark.parametrize("poisoned_step", [5, 27])
def test_a_nan_gradient_under_a_finite_loss_stops_the_run_naming_its_step(poisoned_step, tmp_path: Path):
    class Poisoned(faults.Hook):
        def start(self, model, step):  # a NaN in one of the first layer's gradients
            calls = itertools.count(1)
            model.hidden1.linear.weight.register_hook(lambda g: g * float("nan") if next(calls) == poisoned_step else g)

    with pytest.raises(Diverged, match=f"at step {poisoned_step}: a gradient was NaN or infinite: the update made"):
        loop.run(make_config("trainer.diagnostics.every=0"), tmp_path, hook=Poisoned())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == poisoned_step
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # the broken weights were never saved


def test_a_nan_before_the_first_epoch_ends_leaves_no_checkpoint(tmp_path: Path):
    with pytest.raises(Diverged, match="step 3"):
        loop.run(make_config(), tmp_path, hook=faults.parse("nan@step=3"))
    assert not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_a_huge_learning_rate_diverges_on_its_own(tmp_path: Path):
    with pytest.raises(Diverged) as info:
        loop.run(make_config("optimizer.lr=1000"), tmp_path)
    assert info.value.step <= 27 and "the training loss is" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Plots


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


EXPECTED_SIZE = (plots.SIZE[0] * plots.DPI, plots.SIZE[1] * plots.DPI)


def test_plots_are_written_at_the_end_of_a_run_and_redrawn_by_dnnrun_plot(tmp_path: Path):
    run = tmp_path / "run"
    loop.run(make_config("trainer.diagnostics.plots=true", "trainer.diagnostics.every=10", "act=sigmoid"), run)
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert pngs == sorted(f"{name}.png" for name in plots.RUN_PLOTS)
    for name in pngs:
        assert (run / "plots" / name).stat().st_size > 10_000  # something was drawn
        assert _png_size(run / "plots" / name) == EXPECTED_SIZE
    snapshots = json.loads((run / "activations.json").read_text())
    assert set(snapshots) == {"start", "end"} and set(snapshots["end"]) == {"hidden1", "hidden2"}
    for path in (run / "plots").glob("*.png"):
        path.unlink()
    result = run_cli_plot(str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == pngs


def test_dnnrun_plot_draws_the_activation_functions(tmp_path: Path):
    result = run_cli_plot("--activations", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _png_size(tmp_path / "out" / "activation_functions.png") == EXPECTED_SIZE


def test_dnnrun_plot_refuses_a_folder_that_is_not_a_run(tmp_path: Path):
    result = run_cli_plot(str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "not a dnnrun run directory" in result.stderr


def run_cli_plot(*args: str, cwd: Path):
    """dnnrun-plot's main, as its console script runs it: (exit code, what it printed to stderr)."""
    import contextlib
    import io
    import subprocess

    err = io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stderr(err):
        code = plots.main(list(args))
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


# ---------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_event_files_hold_the_metrics_and_histograms(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loop.run(make_config("logger=tensorboard", "trainer.epochs=2", "trainer.diagnostics.every=20"), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for tag in (
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "lr",
        "time/epoch_s",
        "test/loss",
        "test/acc",
        "diagnostics/hidden1/grad_norm",
        "diagnostics/hidden2/dead",
        "diagnostics/output/update_ratio",
    ):
        assert tag in tags["scalars"], tag
    assert "weights/hidden1.linear.weight" in tags["histograms"]
    assert "gradients/output.weight" in tags["histograms"]
    history = read_jsonl(tmp_path / "metrics.jsonl")
    logged = events.Scalars("val/loss")
    assert [e.step for e in logged] == [r["step"] for r in history]
    assert [e.value for e in logged] == pytest.approx([r["val/loss"] for r in history], rel=1e-6)
    steps = [e.step for e in events.Scalars("diagnostics/hidden1/grad_norm")]
    recorded = [r["step"] for r in read_jsonl(tmp_path / "diagnostics.jsonl")]
    assert steps == recorded == [1, 20, 27, 28, 40, 54]
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))


def _records(ratios: list[float], saturated: list[float], steps: int = 5) -> list[dict]:
    """Per-layer records of a 6-layer net: each hidden layer's gradient norm (the output's is 1)."""
    layers = {f"hidden{i + 1}": {"grad_norm": r, "saturated": s} for i, (r, s) in enumerate(zip(ratios, saturated))}
    output = {"grad_norm": 1.0}
    return [{"step": 10 * (k + 1), "epoch": 1, "layers": {**layers, "output": output}} for k in range(steps)]


FADING = [1e-5, 1e-5, 1e-5, 1e-4, 0.5, 0.5]  # lost between layers 5 and 4


@pytest.mark.parametrize(
    "saturated, cause",
    [
        ([0.9, 0.9, 0.9, 0.9, 0.0, 0.0], True),  # saturation up to layer 4
        ([0.0] * 6, False),  # no saturation: vanishing, no cause named
        ([0.0, 0.0, 0.0, 0.0, 0.0, 0.9], False),
    ],
)  # saturated, but above
def test_per_layer_gradients_say_where_they_vanish_and_saturation_there_is_named_as_the_cause(saturated, cause):
    (finding, *rest) = diagnosis.diagnose([], _records(FADING, saturated), n_classes=10)
    assert finding.rule == "vanishing_gradients"
    assert finding.startswith("gradients vanish: the first hidden layer's gradient norm is 1.0e-05 of the output")
    assert "it is under 0.001 of it from layer 4 down" in finding
    assert ("layer 4 there is saturated" in finding and "the saturation makes it vanish" in finding) is cause
    assert [f.rule for f in rest] == (["saturated_units"] if any(saturated) else [])


def test_saturation_that_leaves_the_gradients_flowing_is_not_called_vanishing():
    """A 20x100 sigmoid net with N(0, 1) weights on Fashion-MNIST (measured over 2 epochs: 49-88% of
    each layer's outputs saturated at the end, every layer's weight gradient 0.2-2.5x the output
    layer's, median 0.8) is saturated, and learns slowly, but its gradients do not vanish: the
    diagnosis says the first, not the second."""
    found = diagnosis.diagnose([], _records([0.9, 0.6, 0.7, 0.5, 0.8, 1.1], [0.88, 0.57, 0.6, 0.55, 0.5, 0.6]), 10)
    assert [f.rule for f in found] == ["saturated_units"]
    assert diagnosis.diagnose([], _records([0.9, 0.6, 0.7, 0.5, 0.8, 1.1], [0.0] * 6), 10) == []


def test_a_conv_blocks_unit_is_a_channel_dead_when_zero_everywhere():
    from dnnrun.techniques.activations import ACTIVATIONS

    out = torch.ones(2, 3, 2, 2)
    out[:, 0] = 0  # channel 0: zero for every example at every position
    out[0, 1, 0, 0] = 0  # channel 1: zero somewhere only
    assert diagnostics.activation_stats(out, ACTIVATIONS["relu"])["dead"].item() == pytest.approx(1 / 3)
