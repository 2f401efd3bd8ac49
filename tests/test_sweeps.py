"""Sweeps: job statuses, failures, re-runs, reports, and the launchers and sweepers they run on."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from conftest import make_config, run_cli
from dnnrun.insight import report
from dnnrun.store.rundir import RunDir, SweepDir
from dnnrun.training import loop


def _status(job: Path) -> str:
    return json.loads((job / "status.json").read_text())["status"]


def test_a_failing_job_leaves_the_others_and_a_rerun_finishes_only_it(tmp_path: Path):
    sweep = tmp_path / "sweep"
    args = ["-m", "data=synthetic", "trainer.epochs=1,2,3", f"hydra.sweep.dir={sweep}"]
    first = run_cli(*args, cwd=tmp_path, env={"DNNRUN_FAULT": "raise@epoch=3"})  # only the 3-epoch job gets there
    assert first.returncode == 1, first.stdout + first.stderr
    jobs = [j.path for j in SweepDir(sweep).jobs()]
    assert [_status(j) for j in jobs] == ["completed", "completed", "failed"]
    assert "sweep: 2 of 3 jobs completed" in first.stdout
    (line,) = [line for line in first.stderr.splitlines() if line.startswith("error: job 2 (")]
    assert "trainer.epochs=3" in line and line.endswith(
        "failed: InjectedFault: DNNRUN_FAULT: injected failure at epoch 3"
    )
    with open(sweep / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["epochs"]) for r in rows] == [
        ("0", "completed", "1"),
        ("1", "completed", "2"),
        ("2", "failed", "3"),
    ]
    finished = {j.name: (j / "checkpoints" / "last.pt").stat().st_mtime_ns for j in jobs[:2]}

    second = run_cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert [_status(j) for j in jobs] == ["completed"] * 3
    assert {j.name: (j / "checkpoints" / "last.pt").stat().st_mtime_ns for j in jobs[:2]} == finished  # skipped
    assert "resumed from" in (jobs[2] / "run.log").read_text()  # the failed job continued from its checkpoint
    assert [r["epoch"] for r in _history(jobs[2])] == [1, 2, 3]


def _history(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]


def test_dnnrun_report_ranks_groups_seeds_and_writes_its_files(tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "data=synthetic",
        "trainer.epochs=2",
        "act=relu,elu",
        "trainer.seed=0,1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert report.main([str(sweep)]) == 0
    for name in ("report.md", "report.csv", "learning_curves.png", "param_act.png"):
        assert (sweep / name).stat().st_size > 0, name

    summaries = {}
    for job in [j.path for j in SweepDir(sweep).jobs()]:
        o = RunDir(job).overrides()
        summaries[(o["act"], o["trainer.seed"])] = json.loads((job / "summary.json").read_text())
    with open(sweep / "report.csv") as f:
        rows = {r["act"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"relu", "elu"}
    for act, row in rows.items():
        assert row["runs"] == "2"
        for metric, read in (
            ("val/loss", lambda s: s["best"]["val/loss"]),
            ("test/acc", lambda s: s["test"]["test/acc"]),
        ):
            values = [read(summaries[(act, seed)]) for seed in ("0", "1")]
            assert float(row[metric]) == pytest.approx(statistics.fmean(values))
            assert float(row[f"{metric} std"]) == pytest.approx(statistics.stdev(values))
    ranked = [line for line in (sweep / "report.md").read_text().splitlines() if line.startswith("| 1 ")]
    best = min(rows, key=lambda a: float(rows[a]["val/loss"]))
    assert ranked and f"| {best} |" in ranked[0]


def test_a_report_over_single_runs_shows_each_with_its_summary(tmp_path: Path):
    a = loop.run(make_config("trainer.epochs=1", "act=tanh"), tmp_path / "a")
    b = loop.run(make_config("trainer.epochs=1", "act=relu"), tmp_path / "b")
    runs = report.collect([tmp_path / "a", tmp_path / "b"])
    assert [r["test/acc"] for r in runs] == [a["test"]["test/acc"], b["test"]["test/acc"]]
    assert [r["status"] for r in runs] == ["completed", "completed"]


def _log_span(path: Path) -> tuple[datetime, datetime]:
    """When a run wrote its first and its last log line."""
    lines = path.read_text().splitlines()
    return tuple(
        datetime.strptime(" ".join(line.split()[:2]), "%Y-%m-%d %H:%M:%S,%f") for line in (lines[0], lines[-1])
    )


def test_joblib_runs_jobs_in_parallel_dividing_the_cores(tmp_path: Path):
    sweep = tmp_path / "sweep"
    # After its first step each job waits until both have got there (a barrier): run one after the
    # other, the first would wait in vain and fail.
    barrier = tmp_path / "barrier"
    result = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "data=synthetic",
        "trainer.epochs=2",
        "act=relu,elu",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env={
            "DNNRUN_FAULT": "arrive@step=1,wait@step=1",
            "DNNRUN_FAULT_ARRIVE": str(barrier),
            "DNNRUN_FAULT_WAIT": f"{barrier}/*:2",
        },
        process=True,
    )
    assert result.returncode == 0, result.stderr
    jobs = [j.path for j in SweepDir(sweep).jobs()]
    assert [_status(j) for j in jobs] == ["completed", "completed"]
    threads = [json.loads((j / "summary.json").read_text())["threads"] for j in jobs]
    assert threads == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2
    # At the same time: each job's first log line comes before the other's last one.
    (first_a, last_a), (first_b, last_b) = (_log_span(j / "run.log") for j in jobs)
    assert first_a < last_b and first_b < last_a
    assert (sweep / "sweep.csv").exists()


def _torchrun(tmp_path: Path, name: str, *overrides: str) -> dict:
    data = [] if any(o.startswith("data=") for o in overrides) else ["data=synthetic"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "dnnrun",
        *data,
        *overrides,
        "trainer.diagnostics.plots=false",
        f"hydra.run.dir={tmp_path / name}",
        f"outputs={tmp_path}",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((tmp_path / name / "summary.json").read_text())


def _close(a: Path, b: Path) -> bool:
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)["model"]
    return all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


# A conv net with max-norm filters and frozen and then unfrozen transferred conv blocks (DDP must
# learn that their gradients exist again). No batch norm: on the CPU each rank normalizes its half
# batch (SyncBatchNorm is for CUDA). Pretraining and a ragged last batch: tests/test_multinode.py.
CONV = ["data=digits", "model=cnn", "model.channels=[4,8]", "regularizer=[max_norm]", "data.max_train=600"]
TORCHRUN_CASES = {
    "a conv net's frozen then unfrozen transferred blocks": [
        *CONV,
        "trainer.epochs=2",
        "transfer.freeze=true",
        "transfer.unfreeze_after=1",
        "transfer.layers=1",
    ],
}


@pytest.mark.parametrize("overrides", TORCHRUN_CASES.values(), ids=TORCHRUN_CASES.keys())
def test_torchrun_with_two_processes_matches_one_process_with_the_same_global_batch(overrides, tmp_path: Path):
    if any(o.startswith("transfer.") for o in overrides):
        source = [o for o in overrides if not o.startswith(("transfer.", "trainer.epochs="))]
        loop.run(make_config(*source, "trainer.epochs=1", data=None), tmp_path / "source")
        overrides = [*overrides, f"transfer.source={tmp_path / 'source' / 'checkpoints' / 'last.pt'}"]
    summary = _torchrun(tmp_path, "ddp", *overrides)
    assert summary["processes"] == 2
    single = loop.run(
        make_config(*overrides, data=None if "data=digits" in overrides else "synthetic"), tmp_path / "single"
    )
    assert _close(tmp_path / "ddp", tmp_path / "single")
    assert summary["final"]["train/loss"] == pytest.approx(single["final"]["train/loss"], rel=1e-5)
    assert summary["final"]["val/acc"] == pytest.approx(single["final"]["val/acc"])
    assert not {p.name for p in tmp_path.iterdir()} - {"ddp", "single", "source"}  # rank 1 wrote nothing here


@pytest.mark.parametrize(
    "given, sweeping, drawn",
    [("auto", False, True), ("auto", True, False), ("true", True, True), ("false", False, False)],
)
def test_plots_auto_draws_them_for_a_run_not_for_each_job_of_a_sweep(tmp_path: Path, given, sweeping, drawn):
    """Drawing takes longer than a short job; the sweep's report compares the jobs."""
    from omegaconf import OmegaConf

    from dnnrun.cli.app import _for_this_process

    cfg = make_config(f"trainer.diagnostics.plots={given}")
    hc = OmegaConf.create({"launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}})
    resolved = _for_this_process(cfg, hc, RunDir(tmp_path), sweeping=sweeping, rank=0)
    assert resolved.trainer.diagnostics.plots is drawn
