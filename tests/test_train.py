"""`loop.run` in-process on synthetic data: the run directory, checkpoints, early stopping, resume."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import last_weights, make_config, run_cli
from dnnrun.errors import Interrupted, UserError
from dnnrun.store import checkpoint
from dnnrun.store.rundir import read_jsonl
from dnnrun.training import faults, loop, metrics
from dnnrun.training.module_engine import clip_gradients


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_run_writes_metrics_summary_log_and_checkpoints(run_dir: Path):
    summary = loop.run(make_config("trainer.epochs=3"), run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [27, 54, 81]  # 864 training examples / 32 per batch
    assert all(0 <= r["val/acc"] <= 1 and r["lr"] == 0.01 and r["time/epoch_s"] > 0 for r in records)
    assert records[-1]["train/loss"] < records[0]["train/loss"]

    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == summary["status"] == "completed"
    assert on_disk["final"] == records[-1]
    assert on_disk["best"]["monitor"] == "val/loss"
    assert on_disk["best"]["value"] == min(r["val/loss"] for r in records)
    assert on_disk["test"]["test/acc"] > 0.6
    assert on_disk["parameters"] == 32 * 300 + 300 + 300 * 100 + 100 + 100 * 4 + 4
    assert on_disk["device"] == "cpu" and on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["data"] == {"train": 864, "val": 96, "test": 240, "features": 32, "classes": 4}
    assert "epoch 3/3" in (run_dir / "run.log").read_text()


def test_checkpoints_are_plain_data_loaded_with_weights_only(run_dir: Path):
    cfg = make_config("trainer.epochs=2", "norm=batchnorm", "optimizer=adam")
    loop.run(cfg, run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["format"] == "dnnrun-checkpoint" and ckpt["version"] == 2
    assert set(ckpt) >= {"model", "optimizer", "schedule", "trainer", "callbacks", "rng", "config"}
    assert ckpt["config"] == cfg.raw and isinstance(ckpt["config"], dict)
    assert (ckpt["trainer"]["epoch"], ckpt["trainer"]["step"]) == (2, 54)
    assert "hidden1.norm.running_mean" in ckpt["model"] and "hidden1.linear.bias" not in ckpt["model"]
    assert set(ckpt["rng"]) == {"torch", "cuda", "shuffle", "python", "numpy"}
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # no temporary file left behind


def test_early_stopping_stops_after_patience_and_restores_the_best_weights(run_dir: Path, monkeypatch):
    real_evaluate = metrics.loss_and_accuracy
    val_losses = iter([1.0, 0.5, 0.7, 0.6, 0.8, 0.4])

    def scripted(model, split, batch_size, autocast):
        loss, acc = real_evaluate(model, split, batch_size, autocast)
        return (next(val_losses), acc) if len(split) == 96 else (loss, acc)  # the validation split

    monkeypatch.setattr(metrics, "loss_and_accuracy", scripted)
    cfg = make_config("trainer.epochs=6", "trainer.early_stopping.patience=3")
    summary = loop.run(cfg, run_dir)
    assert summary["epochs_run"] == 5 and summary["best"]["epoch"] == 2
    assert "did not improve for 3 epochs" in summary["stop_reason"]
    assert summary["test"]["weights"] == "best"
    best = _weights(run_dir / "checkpoints" / "best.pt")
    last = _weights(run_dir / "checkpoints" / "last.pt")
    assert torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["trainer"]["epoch"] == 2
    assert not all(torch.equal(best[k], last[k]) for k in best)


def test_a_run_that_stopped_early_stays_stopped_when_resumed(run_dir: Path, monkeypatch):
    accs = iter([0.5, 0.4, 0.3, 0.9, 0.9, 0.9])  # no improvement after epoch 1: stops after epoch 2
    monkeypatch.setattr(
        metrics, "loss_and_accuracy", lambda m, s, b, a: (1.0, next(accs)) if len(s) == 96 else (1.0, 0.0)
    )
    settings = ("trainer.epochs=6", "trainer.monitor=val/acc", "trainer.early_stopping.patience=1")
    assert loop.run(make_config(*settings), run_dir)["epochs_run"] == 2
    resumed = loop.run(make_config(*settings, "trainer.resume=auto"), run_dir)
    assert resumed["epochs_run"] == 2 and "did not improve" in resumed["stop_reason"]


def test_min_delta_and_accuracy_monitoring(run_dir: Path, monkeypatch):
    accs = iter([0.5, 0.505, 0.7, 0.69])
    monkeypatch.setattr(
        metrics, "loss_and_accuracy", lambda m, s, b, a: (1.0, next(accs)) if len(s) == 96 else (1.0, 0.0)
    )
    cfg = make_config("trainer.epochs=4", "trainer.monitor=val/acc", "trainer.early_stopping.min_delta=0.01")
    summary = loop.run(cfg, run_dir)
    assert summary["best"]["epoch"] == 3 and summary["best"]["value"] == 0.7  # 0.505 is within min_delta


def _interrupt_after_epoch(k: int) -> faults.Faults:
    """Ctrl-C right after the k-th epoch's checkpoint is written (the fault hook sends SIGINT)."""
    return faults.parse(f"int@epoch={k}")


# Batch norm (running buffers), Adam (moment estimates), 1cycle (step counter, momentum) and dropout
# (the global RNG) all carry state that a resume must restore.
RESUMABLE = (
    "trainer.epochs=4",
    "trainer.diagnostics.every=10",
    "norm=batchnorm",
    "optimizer=momentum",
    "schedule=onecycle",
    "regularizer=[dropout]",
    "model.hidden=[64,32]",
)


def _straight_and_interrupted(tmp_path: Path, monkeypatch) -> None:
    """`straight` runs all four epochs; `resumed` is interrupted after the second."""
    loop.run(make_config(*RESUMABLE), tmp_path / "straight")
    with pytest.raises(Interrupted):
        loop.run(make_config(*RESUMABLE), tmp_path / "resumed", hook=_interrupt_after_epoch(2))


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path: Path, monkeypatch):
    _straight_and_interrupted(tmp_path, monkeypatch)
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["status"] == "interrupted"
    summary = loop.run(make_config(*RESUMABLE, "trainer.resume=auto"), tmp_path / "resumed")

    assert summary["status"] == "completed"
    straight = _weights(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = _weights(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]  # nothing lost, nothing duplicated
    assert [r["val/loss"] for r in a] == [r["val/loss"] for r in b]
    # The per-layer statistics after the resume are those of the uninterrupted run, once each.
    assert read_jsonl(tmp_path / "resumed" / "diagnostics.jsonl") == read_jsonl(
        tmp_path / "straight" / "diagnostics.jsonl"
    )


def test_resuming_without_the_rng_state_does_not_match(tmp_path: Path, monkeypatch):
    """The control for the test above: it can fail, because the shuffling order matters."""
    _straight_and_interrupted(tmp_path, monkeypatch)
    monkeypatch.setattr(checkpoint, "restore_rng", lambda state, shuffle: None)
    loop.run(make_config(*RESUMABLE, "trainer.resume=auto"), tmp_path / "resumed")
    straight = _weights(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = _weights(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert not all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_from_a_path_continues_in_a_new_directory(tmp_path: Path):
    loop.run(make_config("trainer.epochs=2"), tmp_path / "first")
    source = tmp_path / "first" / "checkpoints" / "last.pt"
    summary = loop.run(make_config("trainer.epochs=3", f"trainer.resume={source}"), tmp_path / "second")
    assert summary["epochs_run"] == 3
    assert [r["epoch"] for r in read_jsonl(tmp_path / "second" / "metrics.jsonl")] == [1, 2, 3]
    assert (tmp_path / "second" / "checkpoints" / "best.pt").is_file()


def test_resume_auto_without_a_checkpoint_starts_fresh_with_a_warning(run_dir: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="dnnrun"):
        summary = loop.run(make_config("trainer.epochs=1", "trainer.resume=auto"), run_dir)
    assert summary["epochs_run"] == 1
    assert "no checkpoint" in caplog.text and "starting fresh" in caplog.text
    assert "starting fresh" in (run_dir / "run.log").read_text()  # said before run.log existed, and kept there


def test_resume_from_a_missing_file_is_a_user_error(run_dir: Path):
    with pytest.raises(UserError, match="trainer.resume: no checkpoint file at /no/such.pt"):
        loop.run(make_config("trainer.resume=/no/such.pt"), run_dir)


def test_a_fresh_run_never_overwrites_an_existing_run(run_dir: Path):
    loop.run(make_config("trainer.epochs=1"), run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a checkpoint; continue it with trainer.resume=auto"):
        loop.run(make_config("trainer.epochs=1"), run_dir)
    with pytest.raises(UserError, match="these changes alter the result"):
        loop.run(make_config("trainer.epochs=1", "trainer.resume=auto", "optimizer.lr=0.5"), run_dir)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # not a byte changed


def test_the_cli_refuses_a_directory_holding_another_run_and_changes_nothing(tmp_path: Path):
    run = tmp_path / "run"
    assert run_cli("data=synthetic", "trainer.epochs=1", f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for extra in ([], ["mode=lr_find"], ["trainer.resume=auto", "optimizer.lr=0.5"]):
        refused = run_cli("data=synthetic", "trainer.epochs=1", *extra, f"hydra.run.dir={run}", cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # snapshot, summary, status alike


def test_a_failure_is_recorded_in_the_summary(run_dir: Path):
    class Broken(faults.Hook):
        def after_step(self, step: int) -> None:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        loop.run(make_config(), run_dir, hook=Broken())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: disk on fire"


def test_same_seed_same_run_other_seed_other_run(tmp_path: Path):
    a = loop.run(make_config("trainer.epochs=2", "trainer.deterministic=true"), tmp_path / "a")
    b = loop.run(make_config("trainer.epochs=2", "trainer.deterministic=true"), tmp_path / "b")
    c = loop.run(make_config("trainer.epochs=2", "trainer.seed=1"), tmp_path / "c")
    assert a["final"]["val/loss"] == b["final"]["val/loss"]
    assert a["final"]["val/loss"] != c["final"]["val/loss"]


def test_limit_batches_and_amp_on_cpu(run_dir: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="dnnrun"):
        summary = loop.run(make_config("trainer.epochs=2", "trainer.limit_batches=5", "trainer.amp=true"), run_dir)
    assert summary["steps"] == 10
    assert "amp=true works on CUDA only" in caplog.text


def test_amp_and_channels_last_by_default_only_where_they_pay(caplog):
    from dnnrun.training import runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="dnnrun"):
        assert runtime.mixed_precision("auto", cpu, conv=True)[1] is None  # float32, silently
        assert runtime.mixed_precision("auto", cuda, conv=False) == (contextlib.nullcontext, None)  # an MLP on CUDA
        conv_net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
        assert not runtime.channels_last("auto", cpu, conv_net) and runtime.channels_last("auto", cuda, conv_net)
        assert runtime.channels_last(True, cpu, conv_net) and not runtime.channels_last(False, cuda, conv_net)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="dnnrun"):
        assert not runtime.channels_last(True, cpu, torch.nn.Linear(2, 2))
    assert "channels_last=true applies to conv layers; this model has none" in caplog.text


def test_channels_last_trains_the_same_conv_net(tmp_path: Path):
    """NHWC changes how the convolutions lay out memory, not what they compute."""
    runs = [
        loop.run(
            make_config(
                "model=cnn",
                "model.channels=[4,8]",
                "trainer.epochs=1",
                "trainer.limit_batches=6",
                f"trainer.channels_last={on}",
                data="digits",
            ),
            tmp_path / str(on),
        )
        for on in (False, True)
    ]
    assert runs[0]["final"]["train/loss"] == pytest.approx(runs[1]["final"]["train/loss"], rel=1e-4)
    weights = last_weights(tmp_path / "True")
    assert weights["hidden2.conv.weight"].shape == (8, 4, 3, 3)  # saved as any checkpoint: loads anywhere


def test_compile_trains_through_torch_compile_or_falls_back_with_a_warning(tmp_path: Path, monkeypatch, caplog):
    calls = []
    eager_compile = functools.partial(torch.compile, backend="eager")  # traced by dynamo, no C++ compiler needed
    monkeypatch.setattr(torch, "compile", lambda module: calls.append(module) or eager_compile(module))
    summary = loop.run(
        make_config("trainer.epochs=1", "trainer.limit_batches=3", "trainer.compile=true"), tmp_path / "compiled"
    )
    assert summary["status"] == "completed" and len(calls) == 1

    def broken(module):
        def fails(x):
            raise RuntimeError("Compiler: cc not found")

        return fails

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="dnnrun"):
        summary = loop.run(
            make_config("trainer.epochs=1", "trainer.limit_batches=3", "trainer.compile=true"), tmp_path / "fallback"
        )
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert "torch.compile failed here (Compiler: cc not found); training without it" in caplog.text


def test_clipping_by_value_and_by_norm():
    def grad_after(clip_value, clip_norm):
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor([0.9, 100.0])
        clip_gradients([p], clip_value, clip_norm)
        return p.grad

    assert torch.allclose(grad_after(1.0, None), torch.tensor([0.9, 1.0]))
    assert torch.allclose(grad_after(None, 1.0), torch.tensor([0.00899964, 0.9999595]), atol=1e-7)


def test_training_with_clipping_runs(run_dir: Path):
    summary = loop.run(make_config("trainer.epochs=1", "trainer.clip_value=0.5", "trainer.clip_norm=1.0"), run_dir)
    assert summary["status"] == "completed"


@pytest.mark.parametrize("weights, column", [("best", 2), ("last", 1)])
def test_the_results_table_puts_the_test_figures_under_the_weights_tested(weights, column):
    from dnnrun.insight.console import results_table

    summary = {
        "status": "completed",
        "final": {"val/loss": 0.5},
        "best": {"epoch": 3, "val/loss": 0.4},
        "test": {"test/loss": 0.45, "test/acc": 0.875, "weights": weights},
    }
    table = results_table(summary)
    cells = [list(c.cells) for c in table.columns]
    row = cells[0].index("test/acc")
    assert cells[column][row] == "0.8750" and cells[3 - column][row] == ""


def test_eval_train_measures_training_examples_as_validation_is_measured(tmp_path: Path):
    """With dropout on, the running training figures are not comparable with validation's; a fixed
    training subset in evaluation mode is (trainer.eval_train, on by default with dropout or BN)."""
    from dnnrun.data.datasets import Split
    from dnnrun.training import metrics as metrics_mod

    summary = loop.run(
        make_config("regularizer=[dropout]", "trainer.epochs=2", "trainer.eval_train_size=300", data="digits"),
        tmp_path / "dropout",
    )
    records = read_jsonl(tmp_path / "dropout" / "metrics.jsonl")
    assert all({"train_eval/loss", "train_eval/acc", "time/eval_train_s"} <= set(r) for r in records)
    assert summary["final"]["train_eval/loss"] == records[-1]["train_eval/loss"]
    # the subset is fixed: the last epoch's weights give the recorded figure again on the same 300 examples
    trainer_model = torch.load(tmp_path / "dropout" / "checkpoints" / "last.pt", weights_only=True)
    from dnnrun.training import runtime

    cfg = make_config("regularizer=[dropout]", data="digits")
    data = runtime.load_data(cfg.data, cfg.model, torch.device("cpu"))
    model = runtime.build_model(cfg, data)[0]
    model.load_state_dict(trainer_model["model"])
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.data.split_seed + 2))[:300]
    loss, acc = metrics_mod.loss_and_accuracy(
        model, Split(data.train.x[pick], data.train.y[pick]), 1024, contextlib.nullcontext
    )
    assert loss == pytest.approx(records[-1]["train_eval/loss"], rel=1e-5) and acc == records[-1]["train_eval/acc"]
    plain = loop.run(make_config("trainer.epochs=1", data="digits"), tmp_path / "plain")  # no dropout, no BN: off
    assert "train_eval/loss" not in plain["final"]
    forced = loop.run(make_config("trainer.epochs=1", "trainer.eval_train=true", data="digits"), tmp_path / "on")
    assert "train_eval/loss" in forced["final"]


def test_the_overfitting_diagnosis_compares_the_training_loss_measured_as_validations():
    from dnnrun.insight import diagnosis

    def record(epoch, val, running, evaluated):
        return {"epoch": epoch, "val/loss": val, "val/acc": 0.9, "train/loss": running, "train_eval/loss": evaluated}

    # validation rises while the running loss falls, but measured in eval mode training got worse too
    history = [
        record(1, 0.30, 0.50, 0.30),
        record(2, 0.25, 0.45, 0.26),
        *[record(e, 0.25 + 0.03 * e, 0.40, 0.28 + 0.03 * e) for e in range(3, 9)],
    ]
    assert diagnosis._overfitting(history) == []
    falling = [{**r, "train_eval/loss": 0.3 - 0.02 * r["epoch"]} for r in history]
    assert diagnosis._overfitting(falling)[0].endswith("(0.260 -> 0.140): overfitting")


def test_resume_auto_without_last_pt_beside_the_runs_files_is_refused_and_loses_nothing(run_dir: Path):
    """Killed before last.pt was first written, or last.pt deleted: best.pt and metrics.jsonl are
    the run's; a fresh start would overwrite them."""
    loop.run(make_config("trainer.epochs=2"), run_dir)
    (run_dir / "checkpoints" / "last.pt").unlink()
    kept = {p.name: p.read_bytes() for p in (run_dir / "checkpoints" / "best.pt", run_dir / "metrics.jsonl")}
    with pytest.raises(UserError, match=r"trainer.resume=auto: .* holds a run \(best.pt, metrics.jsonl\) but no "):
        loop.run(make_config("trainer.epochs=3", "trainer.resume=auto"), run_dir)
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints" / "best.pt", run_dir / "metrics.jsonl")} == kept
