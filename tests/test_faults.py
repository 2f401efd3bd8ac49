"""Nothing lost, nothing unsafe: kills, failed writes, signals, hostile checkpoints and configs.

Faults are injected with DNNRUN_FAULT (dnnrun/training/faults.py) into a real `dnnrun` process; the resumed
run then goes on in this process and is compared with one that was never interrupted.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import last_weights, make_config, run_cli
from dnnrun.errors import ConfigError, Interrupted, RunError, UserError
from dnnrun.inference import evaluate
from dnnrun.store import checkpoint
from dnnrun.store.rundir import RunDir, SweepDir, read_jsonl
from dnnrun.training import faults, loop

# Batch norm, dropout, momentum with 1cycle and per-step diagnostics: every kind of state a resume
# must restore. 864 training examples / 32 = 27 steps per epoch.
SETUP = (
    "data=synthetic",
    "trainer.epochs=3",
    "norm=batchnorm",
    "regularizer=[dropout]",
    "optimizer=momentum",
    "schedule=onecycle",
    "model.hidden=[64,32]",
    "trainer.diagnostics.every=10",
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run everything is compared with."""
    run = tmp_path_factory.mktemp("straight")
    loop.run(make_config(*SETUP[1:]), run)
    return run


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = last_weights(a), last_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _faulty_run(tmp_path: Path, fault: str, *extra: str, process: bool = True) -> subprocess.CompletedProcess:
    """dnnrun with a fault injected; in a process of its own, which the fault may kill or signal."""
    return run_cli(
        *SETUP, *extra, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"DNNRUN_FAULT": fault}, process=process
    )


def _resume(tmp_path: Path):
    return loop.run(make_config(*SETUP[1:], "trainer.resume=auto"), tmp_path / "run")


def _metrics_intact(run: Path, epochs: int) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, epochs + 1))  # no torn or duplicated line


KILL_POINTS = {
    "before the first checkpoint": "kill@step=5",
    "at an epoch boundary": "kill@epoch=2",
    "mid-epoch": "kill@step=40",
    "between the temporary file and its rename": "kill@save=3",  # epoch 2's best.pt
    "between best.pt and last.pt": "kill@save=4",  # epoch 2's last.pt, after its best.pt
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", KILL_POINTS.values(), ids=KILL_POINTS.keys())
def test_a_run_killed_anywhere_resumes_to_the_same_weights(fault, tmp_path: Path, straight: Path):
    killed = _faulty_run(tmp_path, fault)
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    if fault != "kill@step=5":
        checkpoint.load(run / "checkpoints" / "last.pt")  # the last checkpoint is whole
    summary = _resume(tmp_path)
    assert summary["status"] == "completed"
    assert _same_weights(run, straight)
    _metrics_intact(run, 3)
    assert read_jsonl(run / "metrics.jsonl") == [  # the times aside
        {**r, **{k: v for k, v in a.items() if k.startswith("time/")}}
        for r, a in zip(read_jsonl(straight / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl"))
    ]
    assert not list(run.rglob(".*.tmp-*"))  # stale temporary files were cleaned up


def test_without_the_rng_state_the_same_resume_differs(tmp_path: Path, straight: Path, monkeypatch):
    """The control: the test above can fail."""
    assert _faulty_run(tmp_path, "kill@step=40").returncode == -signal.SIGKILL
    monkeypatch.setattr(checkpoint, "restore_rng", lambda state, shuffle: None)
    _resume(tmp_path)
    assert not _same_weights(tmp_path / "run", straight)


# ---------------------------------------------------------------------------------------------
# Failed writes


def test_a_full_disk_during_a_save_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path: Path):
    result = _faulty_run(tmp_path, "enospc@save=3", process=False)  # epoch 2's first write
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output
    assert "cannot write" in result.stderr and "checkpoints/best.pt" in result.stderr
    assert "No space left on device" in result.stderr
    run = tmp_path / "run"
    kept = checkpoint.load(run / "checkpoints" / "last.pt")
    assert kept["trainer"]["epoch"] == 1
    assert not list(run.rglob(".*.tmp-*"))  # nothing partial is left, under any name
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("blocked", ["metrics.jsonl", "diagnostics.jsonl"])
def test_any_file_that_cannot_be_written_is_reported_with_its_path(blocked, tmp_path: Path):
    run = tmp_path / "run"
    (run / blocked).mkdir(parents=True)  # a folder where the file should go: writing it fails for real
    result = run_cli(*SETUP, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert f"cannot write {run / blocked}" in result.stderr
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


def _stopped_after_epoch(tmp_path: Path, epoch: int) -> None:
    """tmp_path/run as a run stopped after `epoch` leaves it (in this process: SIGINT from the hook)."""
    with pytest.raises(Interrupted):
        loop.run(make_config(*SETUP[1:]), tmp_path / "run", hook=faults.parse(f"int@epoch={epoch}"))


def test_a_corrupted_last_checkpoint_is_reported_and_never_replaced_by_a_fresh_start(tmp_path: Path):
    _stopped_after_epoch(tmp_path, 2)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # torn, as by a broken disk
    damaged = last.read_bytes()
    result = run_cli(*SETUP, "trainer.resume=auto", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot read checkpoint {last}: the file is damaged" in result.stderr
    assert last.read_bytes() == damaged
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Signals


@pytest.mark.parametrize(
    "fault, code",
    [("term@step=40", 143), ("int@step=40,int@save=3,int@status=1", 130)],
    ids=["SIGTERM", "SIGINT, and more during the save and the status record"],
)
def test_a_signal_finishes_the_step_saves_and_exits_with_its_code(fault, code, tmp_path: Path, straight: Path):
    """The signal arrives right after step 40 (the 13th of epoch 2): the run stops there, says so,
    and the resume says it goes on from there, and does."""
    result = _faulty_run(tmp_path, fault)
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    saved = checkpoint.load(run / "checkpoints" / "last.pt")  # written whole, also with a second SIGINT during it
    assert saved["trainer"]["epoch"] == 1 and saved["trainer"]["progress"]["batches"] == 13  # in epoch 2
    name = "SIGTERM" if code == 143 else "SIGINT"
    assert (
        f"stopped by {name} during epoch 2, after step 40: checkpoints/last.pt continues from there"
        in (run / "run.log").read_text()
    )
    _resume(tmp_path)
    assert (
        f"resumed from {run / 'checkpoints' / 'last.pt'} during epoch 2, after step 40" in (run / "run.log").read_text()
    )
    assert _same_weights(run, straight)
    _metrics_intact(run, 3)
    assert read_jsonl(run / "diagnostics.jsonl") == read_jsonl(straight / "diagnostics.jsonl")  # every step once


def test_sigterm_between_epochs_stops_at_the_epoch_boundary(tmp_path: Path):
    result = _faulty_run(tmp_path, "term@epoch=1")
    assert result.returncode == 143
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["trainer"]["epoch"] == 1 and "progress" not in saved["trainer"]


def test_sigterm_before_training_exits_143_at_once(tmp_path: Path):
    # A long pretraining phase comes before the first training step: the signal lands in it.
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dnnrun"),
            *SETUP,
            "pretrain=autoencoder",
            "pretrain.epochs=10000",
            f"outputs={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not (tmp_path / "run" / "run.log").exists() and time.time() < deadline:  # the run has begun
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM" in err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()  # nothing trained, nothing saved
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "interrupted"


# ---------------------------------------------------------------------------------------------
# Hostile checkpoints


class Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "dnnrun-checkpoint", "version": 1, "model": {}, "trainer": Payload(marker)}, path)
    assert not marker.exists()
    return path


@pytest.mark.parametrize("env", [{}, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}], ids=["plain", "forced unsafe load"])
def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_never_runs(env, tmp_path: Path):
    marker = tmp_path / "payload-ran"
    _hostile(tmp_path / "run" / "checkpoints" / "last.pt", marker)
    result = run_cli(*SETUP, "trainer.resume=auto", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert "refused to load" in result.stderr and "weights_only=True" in result.stderr
    assert not marker.exists()


def test_every_checkpoint_reader_refuses_a_payload(tmp_path: Path):
    marker = tmp_path / "payload-ran"
    evil = _hostile(tmp_path / "evil.pt", marker)
    for overrides in ([f"transfer.source={evil}"], ["mode=evaluate", f"evaluate.checkpoint={evil}"]):
        cfg = make_config(*overrides)
        with pytest.raises(UserError, match="refused to load"):
            (loop.run if cfg.mode == "train" else evaluate.run)(cfg, tmp_path / "out")
    assert not marker.exists()


def test_weights_export_to_safetensors_and_load_back(tmp_path: Path, straight: Path):
    from dnnrun.inference.export import main as export

    out = tmp_path / "weights.safetensors"
    assert export([str(straight / "checkpoints" / "best.pt"), "--out", str(out)]) == 0
    loaded = checkpoint.load(out)
    original = checkpoint.load(straight / "checkpoints" / "best.pt")
    assert all(torch.equal(loaded["model"][k], original["model"][k]) for k in original["model"])
    assert loaded["config"] == original["config"]
    from dnnrun.inference import evaluate

    report = evaluate.run(make_config("mode=evaluate", f"evaluate.checkpoint={out}"), tmp_path / "eval")
    summary = json.loads((straight / "summary.json").read_text())
    assert report["deterministic"]["accuracy"] == pytest.approx(summary["test"]["test/acc"])
    with pytest.raises(UserError, match="holds weights only"):
        loop.run(make_config(*SETUP[1:], f"trainer.resume={out}"), tmp_path / "resumed")


def test_export_takes_a_run_directory_for_its_best_checkpoint(tmp_path: Path, straight: Path):
    import shutil

    from dnnrun.inference.export import main as export

    run = shutil.copytree(straight, tmp_path / "run")
    assert export([str(run)]) == 0
    exported = checkpoint.load(run / "checkpoints" / "best.safetensors")
    best = checkpoint.load(run / "checkpoints" / "best.pt")
    assert all(torch.equal(exported["model"][k], best["model"][k]) for k in best["model"])


# ---------------------------------------------------------------------------------------------
# Hostile or mistaken configs


def test_no_config_value_names_code_to_import():
    with pytest.raises(ConfigError, match="unknown optimizer 'torch.optim.SGD'"):
        make_config("optimizer.name=torch.optim.SGD")
    with pytest.raises(ConfigError, match="optimizer._target_: not a parameter of optimizer 'sgd'"):
        make_config("+optimizer._target_=os.system")
    with pytest.raises(ConfigError, match="unknown activation 'builtins.eval'"):
        make_config("act.name=builtins.eval")


@pytest.mark.parametrize("where", ["/tmp/elsewhere", "outputs/../../escaped"])
def test_run_directories_stay_under_the_outputs_root(where, tmp_path: Path):
    result = run_cli("data=synthetic", f"hydra.run.dir={where}", cwd=tmp_path, root_at_cwd=False)
    assert result.returncode == 2 and "outside the outputs root" in result.stderr
    assert "set the root: outputs=DIR" in result.stderr
    assert not Path(where).exists() and not (tmp_path.parent / "escaped").exists()  # nothing left there


def test_setting_the_outputs_root_allows_another_place(tmp_path: Path):
    allowed = run_cli(
        "data=synthetic",
        "trainer.epochs=1",
        f"outputs={tmp_path / 'elsewhere'}",
        f"hydra.run.dir={tmp_path / 'elsewhere' / 'run'}",
        cwd=tmp_path,
        root_at_cwd=False,
    )
    assert allowed.returncode == 0, allowed.stderr


def test_a_sweep_job_cannot_escape_the_outputs_root(tmp_path: Path):
    result = run_cli(
        "-m",
        "data=synthetic",
        "trainer.epochs=1",
        "hydra.sweep.subdir=../../../escaped",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert (
        result.returncode == 2 and "hydra.sweep.subdir: '../../../escaped' may lead out" in result.stderr
    )  # the pre-check
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "sweep").exists()


def test_resuming_with_a_config_that_changes_the_result_lists_the_changes(tmp_path: Path):
    _stopped_after_epoch(tmp_path, 1)
    changed = run_cli(
        *SETUP,
        "trainer.resume=auto",
        "optimizer.lr=0.1",
        "trainer.seed=7",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "optimizer.lr: 0.01 in the checkpoint, 0.1 now" in changed.stderr
    assert "trainer.seed: 0 in the checkpoint, 7 now" in changed.stderr
    assert "trainer.force_resume=true" in changed.stderr
    run = tmp_path / "run"
    loop.run(make_config(*SETUP[1:], "trainer.resume=auto", "trainer.epochs=4", "predict.mc_samples=5"), run)  # fine
    # ... and the 1cycle schedule keeps the length it started with: annihilated at the end of epoch 3,
    # it stays at lr0 / final_div in epoch 4 instead of jumping to the curve of a 4-epoch run
    assert read_jsonl(run / "metrics.jsonl")[3]["lr"] == pytest.approx(0.01 / 1000)
    loop.run(
        make_config(
            *SETUP[1:], "trainer.resume=auto", "trainer.epochs=5", "optimizer.lr=0.02", "trainer.force_resume=true"
        ),
        run,
    )
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert "resuming despite a changed setting (trainer.force_resume): optimizer.lr" in (run / "run.log").read_text()


# ---------------------------------------------------------------------------------------------
# Sweeps under faults


@pytest.mark.slow
def test_a_job_killed_under_joblib_loses_no_finished_job_and_a_rerun_finishes(tmp_path: Path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "data=synthetic",
        "trainer.epochs=1,2,3",
        f"hydra.sweep.dir={sweep}",
    ]
    # Only the 3-epoch job gets to step 60; it dies there once the other two jobs have finished (a
    # barrier: which job is faster does not matter), so that no running job is taken down with it.
    first = run_cli(
        *args,
        cwd=tmp_path,
        env={"DNNRUN_FAULT": "wait@step=60,kill@step=60", "DNNRUN_FAULT_WAIT": f"{sweep}/*/status.json:2"},
        process=True,
    )
    assert first.returncode == 1, first.stdout + first.stderr  # Hydra prints joblib's error first: accepted
    # The dead job is recorded and listed as failed, next to the finished ones.
    jobs = [j.path for j in SweepDir(sweep).jobs()]
    killed = RunDir(jobs[2]).read_status()
    assert (killed["status"], killed["exit_code"]) == ("failed", 1)
    assert killed["error"] == "its process died before it finished (killed?)" and killed["job"]["num"] == 2
    with open(sweep / "sweep.csv") as f:
        assert [(r["job"], r["status"]) for r in csv.DictReader(f)] == [
            ("0", "completed"),
            ("1", "completed"),
            ("2", "failed"),
        ]
    assert "sweep: 2 of 3 jobs completed" in first.stdout
    (line,) = [line for line in first.stderr.splitlines() if line.startswith("error: job 2 (")]
    assert "trainer.epochs=3" in line and line.endswith("failed: its process died before it finished (killed?)")
    done = {
        job.name: (job / "checkpoints" / "last.pt").stat().st_mtime_ns
        for job in jobs
        if RunDir(job).read_status()["status"] == "completed"
    }
    assert len(done) == 2 and not any(name.startswith("2_") for name in done)
    second = run_cli(*args, cwd=tmp_path, process=True)
    assert second.returncode == 0, second.stderr
    jobs = [j.path for j in SweepDir(sweep).jobs()]
    assert [RunDir(j).read_status()["status"] for j in jobs] == ["completed"] * 3
    assert {j.name: (j / "checkpoints" / "last.pt").stat().st_mtime_ns for j in jobs if j.name in done} == done
    assert [r["epoch"] for r in read_jsonl(jobs[2] / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.slow
def test_a_job_that_a_dying_joblib_worker_takes_down_is_resumed_not_restarted_by_the_rerun(tmp_path: Path):
    """joblib ends every worker when one dies: a job running beside it dies too. By construction
    here: job 0 (batch 32, 27 steps an epoch) stops at step 40, in its second epoch, and stays
    there; job 1 (batch 256, 4 steps an epoch, never at step 40) dies after its third epoch once
    job 0 is held. The re-run continues job 0 from its first epoch's checkpoint."""
    sweep, held = tmp_path / "sweep", tmp_path / "held"
    args = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "data=synthetic",
        "trainer.epochs=3",
        "trainer.batch_size=32,256",
        f"hydra.sweep.dir={sweep}",
    ]
    first = run_cli(
        *args,
        cwd=tmp_path,
        process=True,
        env={
            "DNNRUN_FAULT": "arrive@step=40,hold@step=40,wait@epoch=3,kill@epoch=3",
            "DNNRUN_FAULT_ARRIVE": str(held),
            "DNNRUN_FAULT_WAIT": f"{held}/*:1",
        },
    )
    assert first.returncode == 1, first.stdout + first.stderr
    taken_down, killed = (RunDir(j.path) for j in SweepDir(sweep).jobs())
    for job in (taken_down, killed):
        assert job.read_status()["status"] == "failed"
        assert job.read_status()["error"] == "its process died before it finished (killed?)"
    assert checkpoint.load(taken_down.last)["trainer"]["epoch"] == 1
    first_epoch = taken_down.read_metrics()[0]

    second = run_cli(*args, cwd=tmp_path, process=True)
    assert second.returncode == 0, second.stdout + second.stderr
    assert [job.read_status()["status"] for job in (taken_down, killed)] == ["completed"] * 2
    assert "resumed from" in taken_down.log.read_text()
    assert [r["epoch"] for r in taken_down.read_metrics()] == [1, 2, 3]
    assert taken_down.read_metrics()[0] == first_epoch  # epoch 1 as the first attempt trained it: not again


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_as_the_command_starts_ends_it_with_one_line(signum, code):
    """From the command's first line (dnnrun.entry), before the command line is even imported: the
    signal's exit code and one line, never a KeyboardInterrupt's traceback."""
    program = (
        "import os, signal, time; from dnnrun.entry import install; install(); "
        f"os.kill(os.getpid(), {int(signum)}); time.sleep(10)"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == code and result.stderr == f"error: stopped by {signal.Signals(signum).name}\n"


def test_a_status_that_cannot_be_recorded_is_one_line_and_the_runs_ending_stands(tmp_path: Path):
    result = _faulty_run(tmp_path, "enospc@status=1", process=False)
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr
    assert f"cannot record how the run ended in {tmp_path / 'run' / 'status.json'}: No space left" in result.stderr


def test_a_full_disk_under_run_log_ends_the_run_with_its_path(tmp_path: Path, monkeypatch, capsys):
    """A log line that cannot be written (a full disk) is reported as any file the run cannot
    write, once, never as logging's own "--- Logging error ---" traceback."""
    import errno

    written = []

    def full(self):
        written.append(1)
        if len(written) > 3:  # run.log has its first lines
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(loop.RunLog, "flush", full)
    with pytest.raises(RunError, match=r"cannot write .*run\.log: No space left on device"):
        loop.run(make_config(*SETUP[1:]), tmp_path / "run")
    assert "Logging error" not in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_a_run_directory_that_cannot_be_held_is_one_line(tmp_path: Path, monkeypatch):
    import errno

    real = Path.write_text

    def full(self, *a, **kw):
        if self.name == ".owner":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full)
    result = run_cli(*SETUP, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert "cannot write" in result.stderr and ".owner: No space left on device" in result.stderr
