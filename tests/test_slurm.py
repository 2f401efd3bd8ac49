"""Sweeps on a real Slurm cluster (services/slurm.sh: one node, started before the suite by .ci/run):
`dnnrun -m hydra/launcher=slurm` submits each job with sbatch through submitit; a job preempted,
requeued or near its time limit continues from its own checkpoints/last.pt and ends as an
uninterrupted run of the same config would.

Both sweeps run at once in one module fixture, since the time limit takes long to come (slurmctld
checks time limits every 30 s); the tests then check what happened. A requeued job may start again
only after a while (AuthInfo=cred_expire in slurm.conf): the fixture lets it start at once
(scontrol update StartTime=now), as an administrator would."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import DNNRUN, last_weights, make_config
from dnnrun.insight import report
from dnnrun.store.rundir import SweepDir
from dnnrun.training import loop
from services import slurm

# For both sweeps: each job trains for about a second, after ~5 s of imports; beside the other
# pytest worker, and with submitit's polls further apart as a job runs longer, they take longer.
TIMEOUT_S = 300


class Sweep:
    """`dnnrun -m` on Slurm in a process of its own, in `root`; what Slurm knows of its jobs."""

    def __init__(self, root: Path, partition: str, *overrides: str):
        root.mkdir(parents=True)
        self.root, self.dir = root, root / "sweep"
        self.args = [
            "-m",
            "hydra/launcher=slurm",
            f"hydra.launcher.partition={partition}",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1",
            "hydra.launcher.gpus_per_node=0",
            "data=synthetic",
            *overrides,
            f"hydra.sweep.dir={self.dir}",
            f"outputs={root}",
            "trainer.progress=false",
            "trainer.diagnostics.plots=false",
        ]
        self.arrays: list[str] = []  # the job array of each submission, oldest first
        self.process: subprocess.Popen | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        """The command (again), with these variables in its environment and so in its jobs' (sbatch
        passes them on)."""
        self.arrays.append("")
        self.output = self.root / f"dnnrun.{len(self.arrays)}.log"
        with open(self.output, "w") as out:
            self.process = subprocess.Popen(
                [str(DNNRUN), *self.args],
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def array(self) -> str:
        """The job array of the latest submission (submitit's folder .submitit/ID holds its script)."""
        if self.arrays and not self.arrays[-1]:
            folder = self.dir / ".submitit"
            found = {p.name for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()
            new = sorted(found - set(self.arrays), key=int)
            self.arrays[-1] = new[-1] if new else ""
        return self.arrays[-1] if self.arrays else ""

    def task(self, job: int) -> str:
        """The Slurm job of sweep job `job`: array task k for job k (submitit keeps each task's files
        in .submitit/ARRAY_k), or the array's own ID where submitit submitted a single job without one."""
        array = self.array()
        return f"{array}_{job}" if (self.dir / ".submitit" / f"{array}_{job}").is_dir() else array

    def release(self) -> None:
        """Let the requeued jobs (pending until their begin time) start now."""
        if not self.array():
            return
        for line in _run("squeue", "-h", "-r", "-t", "PD", "-j", self.array(), "-o", "%i %r", check=False).splitlines():
            job, _, reason = line.partition(" ")
            if reason == "BeginTime":
                _run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)

    def ended(self) -> dict:
        """What the latest submission left, read as soon as it has ended (Slurm forgets a finished
        job after MinJobAge)."""
        jobs = self.jobs()
        return {
            "returncode": self.process.returncode,
            "output": self.output.read_text(),
            "status": [json.loads((j / "status.json").read_text())["status"] for j in jobs],
            "restarts": [_restarts(self.task(k)) for k in range(len(jobs))],
            "time_limit": [_job_field(self.task(k), "TimeLimit") for k in range(len(jobs))],
            "submitit_log": [self.submitit_log(k) for k in range(len(jobs))],
            "run_log": [(j / "run.log").read_text() for j in jobs],
            "last_written": [(j / "checkpoints" / "last.pt").stat().st_mtime_ns for j in jobs],
        }

    def stop(self) -> None:
        if self.running:
            self.process.kill()
            self.process.wait()
        for array in filter(None, self.arrays):
            _run("scancel", array, check=False)

    def jobs(self) -> list[Path]:
        return [j.path for j in SweepDir(self.dir).jobs()]

    def submitit_log(self, job: int) -> str:
        return "".join(p.read_text() for p in sorted((self.dir / ".submitit" / self.task(job)).glob("*_log.*")))


def _run(*command: str, check: bool = True) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(command)}: exit {done.returncode}: {done.stderr}")
    return done.stdout


def _job_field(task: str, name: str) -> str:
    return re.search(rf"\b{name}=(\S+)", _run("scontrol", "show", "job", task))[1]


def _restarts(task: str) -> int:
    """How many times Slurm has requeued this job."""
    return int(_job_field(task, "Restarts"))


def _array_task(pid: str) -> int:
    """Which task of its job array a process of this (single) node belongs to, from its environment."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (task,) = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"SLURM_ARRAY_TASK_ID=")]
    return int(task)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> SimpleNamespace:
    return _drive(tmp_path_factory.mktemp("slurm"), slurm())


def _drive(root: Path, partition: str) -> SimpleNamespace:
    """`interrupted`: jobs 0 (3 epochs) and 1 (4 epochs) stop after their epoch 2 (its checkpoint
    written) until this acts: job 0 gets SIGUSR2 as from a preempting scheduler (submitit requeues
    it), job 1 is requeued by Slurm (scontrol requeue: killed, then started again) and then fails at
    its epoch 4. Then the same command once more (`rerun`).
    `timed`: one job of 3 epochs with a 1-minute limit (the least Slurm takes) and Slurm's SIGUSR2
    50 s before it: from 10 s into the job (well after submitit handles the signal), at slurmctld's
    next time-limit check. The job waits after its epoch 2 until then (or fails after faults.WAIT_S)."""
    arrived = root / "arrived"
    interrupted = Sweep(
        root / "interrupted",
        partition,
        "trainer.epochs=3,4",
        "hydra.launcher.timeout_min=30",  # far away: submitit calls a SIGUSR2 a preemption
    )
    limits = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=50"]
    timed = Sweep(root / "timed", partition, "trainer.epochs=3", *limits)
    found = SimpleNamespace(interrupted=interrupted, timed=timed)
    handled: set[str] = set()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        timed.start({"DNNRUN_FAULT": "hold@epoch=2"})
        interrupted.start(
            {"DNNRUN_FAULT": "arrive@epoch=2,hold@epoch=2,raise@epoch=4", "DNNRUN_FAULT_ARRIVE": str(arrived)}
        )
        while True:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the sweeps took over {TIMEOUT_S} s; squeue:\n{_run('squeue', '-r', check=False)}\n"
                    + "\n".join(s.output.read_text() for s in (interrupted, timed))
                )
            for pid in sorted({p.name for p in arrived.iterdir()} - handled) if arrived.is_dir() else []:
                if _array_task(pid) == 0:
                    _run("scancel", "--signal=USR2", interrupted.task(0))
                else:
                    _run("scontrol", "requeue", interrupted.task(1))
                handled.add(pid)
            interrupted.release()
            timed.release()
            if not interrupted.running and not hasattr(found, "first"):
                found.first = interrupted.ended()
                interrupted.start()  # without faults: the completed job is skipped, the failed one continues
            if not timed.running and not hasattr(found, "timed_out"):
                found.timed_out = timed.ended()
            if hasattr(found, "first") and hasattr(found, "timed_out") and not interrupted.running:
                break
            time.sleep(0.2)
        found.rerun = interrupted.ended()
    finally:
        interrupted.stop()
        timed.stop()
    assert len(handled) == 2, found.first["output"]
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, Path]:
    """Runs of 3 and 4 epochs trained in this process without interruption: what the interrupted
    Slurm jobs of the same config must end as."""
    root = tmp_path_factory.mktemp("uninterrupted")
    for epochs in (3, 4):
        loop.run(make_config(f"trainer.epochs={epochs}"), root / str(epochs))
    return {epochs: root / str(epochs) for epochs in (3, 4)}


def _history(job: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock times."""
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def _assert_same_run(job: Path, straight: Path) -> None:
    assert _history(job) == _history(straight)
    weights = last_weights(job)
    expected = last_weights(straight)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_a_preempted_and_a_requeued_slurm_job_resume_from_their_checkpoints(sweeps, uninterrupted):
    first = sweeps.first
    assert first["restarts"] == [1, 1], first["output"]
    assert "Caught signal SIGUSR2 on" in first["submitit_log"][0]
    assert "this job is preempted" in first["submitit_log"][0]
    assert "DUE TO JOB REQUEUE" in first["submitit_log"][1]
    for log in first["run_log"]:
        assert re.search(r"resumed from .*last\.pt after epoch 2\b", log), log
    _assert_same_run(sweeps.interrupted.jobs()[0], uninterrupted[3])


def test_a_failing_slurm_job_is_listed_and_a_rerun_finishes_only_it(sweeps, uninterrupted):
    first, rerun = sweeps.first, sweeps.rerun
    assert first["returncode"] == 1, first["output"]
    assert first["status"] == ["completed", "failed"]
    assert "sweep: 1 of 2 jobs completed" in first["output"]
    assert re.search(r"error: job 1 \(.*trainer\.epochs=4.*\): failed: InjectedFault: .* at epoch 4", first["output"])

    assert rerun["returncode"] == 0, rerun["output"]
    assert rerun["status"] == ["completed", "completed"]
    assert "sweep: 2 of 2 jobs completed" in rerun["output"]
    assert "job 0 already completed in" in rerun["submitit_log"][0]  # skipped
    assert rerun["last_written"][0] == first["last_written"][0]
    assert rerun["restarts"] == [0, 0]
    assert re.search(r"resumed from .*last\.pt after epoch 4\b", rerun["run_log"][1]), rerun["run_log"][1]
    _assert_same_run(sweeps.interrupted.jobs()[1], uninterrupted[4])


def test_dnnrun_report_reads_a_slurm_sweep(sweeps):
    sweep = sweeps.interrupted.dir
    assert report.main([str(sweep)]) == 0
    with open(sweep / "report.csv") as f:
        rows = {r["trainer.epochs"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["3", "4"]
    for job in sweeps.interrupted.jobs():
        row = rows[str(len(_history(job)))]
        summary = json.loads((job / "summary.json").read_text())
        assert (row["runs"], row["status"]) == ("1", "completed")
        assert float(row["test/acc"]) == pytest.approx(summary["test"]["test/acc"])


def test_a_slurm_job_near_its_time_limit_is_requeued_and_ends_as_if_uninterrupted(sweeps, uninterrupted):
    timed = sweeps.timed_out
    assert timed["returncode"] == 0, timed["output"]
    assert timed["status"] == ["completed"]
    assert timed["time_limit"] == ["00:01:00"]
    assert timed["restarts"][0] >= 1
    assert "Caught signal SIGUSR2 on" in timed["submitit_log"][0]
    assert "this job is timed-out" in timed["submitit_log"][0]
    assert "resumed from" in timed["run_log"][0]
    _assert_same_run(sweeps.timed.jobs()[0], uninterrupted[3])
