"""A run directory has one owner at a time: a second dnnrun in it (a second Enter, a re-run sweep, a
requeued job whose first process still lives) is refused with exit 2, names the holder, and leaves
the first run's files alone; the lock dies with its process."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import DNNRUN, run_cli
from dnnrun.store.rundir import RunDir, SweepDir

RUN = ["data=synthetic", "trainer.epochs=2", "trainer.progress=false", "trainer.diagnostics.plots=false"]


def _start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [str(DNNRUN), *args, f"outputs={cwd}"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _arrived(folder: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not any(folder.glob("*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the first run never reached its first step"
        time.sleep(0.05)


def _epochs(run: RunDir) -> list[int]:
    return [r["epoch"] for r in run.read_metrics()]


def test_a_second_dnnrun_in_a_held_directory_is_refused_and_names_the_holder(tmp_path: Path):
    """The first run stops at its first step (holding the directory) until the test lets it go."""
    run, arrived, go = RunDir(tmp_path / "run"), tmp_path / "arrived", tmp_path / "go"
    go.mkdir()
    first = _start(
        [*RUN, f"hydra.run.dir={run}"],
        tmp_path,
        env={
            "DNNRUN_FAULT": "arrive@step=1,wait@step=1",
            "DNNRUN_FAULT_ARRIVE": str(arrived),
            "DNNRUN_FAULT_WAIT": f"{go}/*:1",
        },
    )
    _arrived(arrived, first)
    before = sorted(p.relative_to(run.path) for p in run.path.rglob("*"))
    for extra in ([], ["trainer.resume=auto"], ["mode=lr_find", "lr_find.steps=20"]):
        second = run_cli(*RUN, f"hydra.run.dir={run}", *extra, cwd=tmp_path)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"{run} is in use by another dnnrun process (pid {first.pid})" in second.stderr
    assert sorted(p.relative_to(run.path) for p in run.path.rglob("*")) == before  # nothing touched
    (go / "now").touch()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, out + err
    assert _epochs(run) == [1, 2] and run.read_status()["status"] == "completed"
    assert not run.owner.exists()


def test_two_dnnruns_started_together_in_one_directory_leave_one_intact_run(tmp_path: Path):
    """Whichever wins, the other exits 2 (in use, or already holding a run if it came late) and the
    directory holds one run: every epoch once, completed."""
    for trial in range(3):
        run = RunDir(tmp_path / f"run{trial}")
        both = [_start([*RUN, f"hydra.run.dir={run}"], tmp_path) for _ in range(2)]
        results = [(p.wait(timeout=180), *p.communicate()) for p in both]
        assert sorted(code for code, _, _ in results) == [0, 2], results
        refused = next(err for code, _, err in results if code == 2)
        assert "is in use by another dnnrun process" in refused or "already holds a run" in refused, refused
        assert _epochs(run) == [1, 2] and run.read_status()["status"] == "completed"


def test_a_sweep_run_again_while_the_first_is_going_leaves_its_jobs_alone(tmp_path: Path):
    sweep, arrived, go = tmp_path / "sweep", tmp_path / "arrived", tmp_path / "go"
    go.mkdir()
    args = ["-m", *RUN, "trainer.seed=0", f"hydra.sweep.dir={sweep}"]
    first = _start(
        args,
        tmp_path,
        env={
            "DNNRUN_FAULT": "arrive@step=1,wait@step=1",
            "DNNRUN_FAULT_ARRIVE": str(arrived),
            "DNNRUN_FAULT_WAIT": f"{go}/*:1",
        },
    )
    _arrived(arrived, first)
    second = run_cli(*args, cwd=tmp_path)
    assert second.returncode == 1, second.stdout + second.stderr  # a sweep with a job that did not run
    assert "is in use by another dnnrun process" in second.stderr
    (go / "now").touch()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, out + err
    (job,) = SweepDir(sweep).jobs()
    assert _epochs(RunDir(job.path)) == [1, 2] and RunDir(job.path).read_status()["status"] == "completed"


def test_the_lock_dies_with_its_process(tmp_path: Path):
    """A run killed with SIGKILL while it holds the directory never blocks its own resume."""
    run = RunDir(tmp_path / "run")
    killed = subprocess.run(
        [str(DNNRUN), *RUN, f"hydra.run.dir={run}", f"outputs={tmp_path}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "DNNRUN_FAULT": "kill@epoch=1"},
    )
    assert killed.returncode == -9 and run.owner.exists()  # its pid is still written there
    resumed = run_cli(*RUN, f"hydra.run.dir={run}", "trainer.resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _epochs(run) == [1, 2] and not run.owner.exists()
