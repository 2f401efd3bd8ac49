"""One DDP run over several machines: two torchrun agents meeting by c10d rendezvous, as two nodes
would run them, and the two tasks of one Slurm job. Each must train as one process does with the
same global batch, rank 0 alone writing the run directory (for real machines, on a shared file
system); the other rank writes nothing outside its temporary directory, which it removes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import last_weights, make_config, run_cli
from dnnrun.store.rundir import SweepDir
from dnnrun.training import distributed, loop
from services import slurm

# Small and quick: the processes' start-up (torch, Hydra) takes most of each test. With pretraining
# (every rank must start from the same pretrained weights) and 833 training examples (the last
# global batch of 1 leaves rank 1 nothing).
OVERRIDES = [
    "data=synthetic",
    "trainer.epochs=2",
    "pretrain=autoencoder",
    "pretrain.epochs=1",
    "data.max_train=833",
    "trainer.diagnostics.plots=false",
]


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> Path:
    """The same run in one process, with the same global batch."""
    single = tmp_path_factory.mktemp("single")
    loop.run(make_config(*OVERRIDES[1:]), single)
    return single


def _figures(run: Path) -> dict[str, float]:
    """The figures a run's summary reports, its timings left out."""
    summary = json.loads((run / "summary.json").read_text())
    final, test = summary["final"], summary["test"]
    return {
        **{k: final[k] for k in ("train/loss", "train/acc", "val/loss", "val/acc", "step")},
        **{k: test[k] for k in ("test/loss", "test/acc")},
        "best": summary["best"]["value"],
        "best epoch": summary["best"]["epoch"],
        "processes": summary["processes"],
    }


def _one_run_of_two_processes(run: Path, alone: Path) -> None:
    """The run's weights and figures are those of one process; only rank 0 wrote its files."""
    ours, theirs = last_weights(run), last_weights(alone)
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in theirs), "weights differ from one process's"
    assert _figures(run) == pytest.approx({**_figures(alone), "processes": 2}, rel=1e-5)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # one line an epoch, from rank 0
    log = (run / "run.log").read_text().splitlines()
    assert sum("epoch 2/2" in line for line in log) == 1, "\n".join(log)


def _scratch_removed(tmp: Path) -> None:
    """What the other rank kept in its temporary directory (TMPDIR) is gone."""
    left = list(tmp.glob("dnnrun-*"))
    assert not left, left


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_with_c10d_rendezvous_train_as_one_process(tmp_path: Path, alone: Path):
    """Two agents (`--nnodes=2`, one process each) given the same command, hydra.run.dir included,
    as on two machines sharing a file system; each has a temporary directory of its own."""
    port, run = _free_port(), tmp_path / "run"
    agents = []
    for node in range(2):
        (tmp_path / f"tmp{node}").mkdir()
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            f"--rdzv_id=multinode-{port}",
            "-m",
            "dnnrun",
            *OVERRIDES,
            f"hydra.run.dir={run}",
            f"outputs={tmp_path}",
        ]
        env = {**os.environ, "TMPDIR": str(tmp_path / f"tmp{node}")}
        agents.append(
            subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=120)[0].decode())
    finally:
        for agent in agents:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(outputs)
    assert sum("dnnrun: completed" in out for out in outputs) == 1, "\n".join(outputs)  # rank 0 speaks for all

    _one_run_of_two_processes(run, alone)
    assert {p.name for p in tmp_path.iterdir()} == {"run", "tmp0", "tmp1"}
    _scratch_removed(tmp_path / "tmp0")
    _scratch_removed(tmp_path / "tmp1")


SLURM_STEP = {  # rank 3 of `srun --nodes=2 --ntasks=4`, on the second node
    "SLURM_JOB_ID": "4711",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_JOB_NODELIST": "gpu[007-009,012],cpu1",
    "SLURM_STEP_NODELIST": "gpu[008-009]",
}
BATCH_SCRIPT = {"SLURM_JOB_ID": "4711", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu007"}
TORCHRUN = {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "8"}


@pytest.mark.parametrize(
    "env, ranks, master",
    [
        (SLURM_STEP, (3, 1), "gpu008"),  # rank 0 runs on the step's first node
        ({**SLURM_STEP, "MASTER_ADDR": "head", "MASTER_PORT": "29500"}, (3, 1), "head"),
        (BATCH_SCRIPT, (0, 0), None),  # the batch script of a job of 4 tasks is one process: no group to join
        ({**SLURM_STEP, **TORCHRUN}, (1, 0), None),  # srun torchrun: torchrun's ranks
        ({}, (0, 0), None),
    ],
    ids=["srun task", "MASTER_ADDR set", "batch script", "srun torchrun", "one process"],
)
def test_the_rank_slurm_or_torchrun_gives_is_known_before_the_process_group(monkeypatch, env, ranks, master):
    for name in [*os.environ]:
        if name.startswith("SLURM_") or name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert (distributed.launched_rank(), distributed.local_rank()) == ranks
    step = distributed._slurm_step()
    assert step.get("MASTER_ADDR") == master
    if master is not None:
        assert step["WORLD_SIZE"] == 4 and 1024 < step["MASTER_PORT"] < 65536


def test_two_slurm_tasks_train_as_one_process(tmp_path: Path, alone: Path):
    """`dnnrun -m hydra/launcher=slurm hydra.launcher.tasks_per_node=2`: Hydra's submitit launcher
    runs the job in both tasks of one Slurm job, each given the job's directory; rank 0 writes it.
    (`srun --ntasks=2 dnnrun ...` in a batch script takes the same ranks from Slurm: the test above.)"""
    partition = slurm()
    (tmp_path / "tmp").mkdir()
    env = {"TMPDIR": str(tmp_path / "tmp")}  # Slurm hands the environment on to the tasks
    result = run_cli(
        "-m",
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={partition}",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=5",
        *OVERRIDES,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        env=env,
        process=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = [j.path for j in SweepDir(tmp_path / "sweep").jobs()]

    _one_run_of_two_processes(run, alone)
    assert {p.name for p in tmp_path.iterdir()} == {run.relative_to(tmp_path).parts[0], "tmp"}
    _scratch_removed(tmp_path / "tmp")
