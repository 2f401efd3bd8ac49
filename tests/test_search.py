"""Optuna searches (dnnrun's own sweeper, hydra/sweeper=optuna): pruning, storages, a study shared
by several processes on a real PostgreSQL."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import uuid
from pathlib import Path

import optuna
import yaml

from conftest import DNNRUN, run_cli
from dnnrun.insight import report
from dnnrun.store.rundir import SweepDir
from services import POSTGRES_PASSWORD, postgres

# A random sampler with a seed: the same trials whatever the pruner does (TPE would learn from the
# pruned trials and sample others).
SEARCH = ["-m", "experiment=search", "data=synthetic", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0"]


def _results(sweep: Path) -> dict:
    return yaml.safe_load((sweep / "optimization_results.yaml").read_text())


def _jobs(sweep: Path) -> dict[int, dict]:
    """Each job's status.json by its number (the trial's)."""
    return {
        int(j.path.name.split("_")[0]): json.loads(j.status.read_text()) | {"dir": j.path}
        for j in SweepDir(sweep).jobs()
    }


def test_pruned_trials_stop_early_and_the_best_trial_is_unchanged(tmp_path: Path):
    ended = {}
    for pruner in ("none", "median"):
        sweep = tmp_path / pruner
        result = run_cli(
            *SEARCH,
            "trainer.epochs=3",
            "hydra.sweeper.n_trials=8",
            f"hydra.sweeper.pruner={pruner}",
            f"hydra.sweep.dir={sweep}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        ended[pruner] = (_results(sweep), _jobs(sweep), result.stdout)
    (full, _, _), (pruned, jobs, out) = ended["none"], ended["median"]
    assert full["trials"] == {"complete": 8}
    n_pruned = pruned["trials"]["pruned"]
    assert n_pruned >= 2 and pruned["trials"] == {"complete": 8 - n_pruned, "pruned": n_pruned}
    assert f"sweep: {8 - n_pruned} of 8 jobs completed, {n_pruned} pruned" in out
    # The best trial is the same one, with the same value; the pruned ones stopped early.
    assert (pruned["best_trial"], pruned["best_params"]) == (full["best_trial"], full["best_params"])
    assert pruned["best_value"] == full["best_value"]
    stopped = [job for job in jobs.values() if job["status"] == "pruned"]
    assert len(stopped) == n_pruned and all(job["exit_code"] == 0 and "error" not in job for job in stopped)
    for job in stopped:
        summary = json.loads((job["dir"] / "summary.json").read_text())
        assert summary["status"] == "pruned" and summary["test"] is None and "error" not in summary
        assert summary["epochs_run"] < 3 and summary["stop_reason"].startswith("pruned after epoch")
    epochs = [len((job["dir"] / "metrics.jsonl").read_text().splitlines()) for job in jobs.values()]
    assert sum(epochs) < 3 * 8
    # Each trial's epochs are in the study, as its job reported them.
    study = optuna.load_study(
        study_name="dnnrun-search",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "median" / "optuna.journal"))
        ),
    )
    for trial in study.trials:
        history = (jobs[trial.number]["dir"] / "metrics.jsonl").read_text().splitlines()
        assert trial.intermediate_values == {r["epoch"]: r["val/loss"] for r in map(json.loads, history)}, trial.number
    with open(tmp_path / "median" / "sweep.csv") as f:
        assert sorted(r["status"] for r in csv.DictReader(f)) == sorted(j["status"] for j in jobs.values())
    # The report ranks them all and lists no pruned trial as a failure.
    assert report.main([str(tmp_path / "median"), "--out", str(tmp_path / "report")]) == 0
    assert "did not complete" not in (tmp_path / "report" / "report.md").read_text()


def test_a_study_in_a_sqlite_file_goes_on_where_it_stopped_and_refuses_another_space(tmp_path: Path):
    root = tmp_path / "outputs"  # made by the search, with the folder of the study's file
    study = root / "studies" / "study.db"
    args = [
        *SEARCH,
        "trainer.epochs=1",
        f"hydra.sweeper.storage=sqlite:///{study}",
        "hydra.sweeper.study_name=lr",
        f"outputs={root}",
    ]
    first = run_cli(*args, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={root / 'one'}", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert study.is_file() and sorted(_jobs(root / "one")) == [0, 1]
    # The same command asking for 3 trials adds one: the study's total is 3.
    second = run_cli(*args, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={root / 'two'}", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert sorted(_jobs(root / "two")) == [2]
    assert _results(root / "two")["trials"] == {"complete": 3}
    # Another search space for the same study: refused before any job, in one line.
    third = run_cli(*args, "model.width=choice(32,64)", f"hydra.sweep.dir={root / 'three'}", cwd=tmp_path)
    assert third.returncode == 2
    (line,) = third.stderr.strip().splitlines()
    assert line.startswith("error: hydra.sweeper.params: the study 'lr' in sqlite:///") and "model.width" in line
    assert not (root / "three").exists()


def test_two_processes_share_one_study_on_postgresql_with_pruning(tmp_path: Path):
    url = postgres()  # no password in it: libpq reads PGPASSWORD
    secret = POSTGRES_PASSWORD
    name = f"shared-{uuid.uuid4().hex[:8]}"
    sweep = tmp_path / "sweep"  # one sweep directory for both, as on a shared file system
    args = [
        *SEARCH[:-2],  # each process its own draws
        "trainer.epochs=3",
        "hydra.sweeper.n_trials=10",
        "hydra.sweeper.pruner=median",
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweep.dir={sweep}",
        f"outputs={tmp_path}",
        "trainer.diagnostics.plots=false",
    ]
    with_password = url.replace("dnnrun@", f"dnnrun:{secret}@", 1)
    ways = [  # one gives the storage in the config and its password to libpq, one the whole URL in the environment
        ([f"hydra.sweeper.storage={url}"], {"PGPASSWORD": secret}),
        ([], {"DNNRUN_OPTUNA_STORAGE": with_password}),
    ]
    processes = [
        subprocess.Popen(
            [str(DNNRUN), *args, *extra],
            cwd=tmp_path,
            env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra, env in ways
    ]
    outputs = [p.communicate(timeout=240) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, out + err
    study = optuna.load_study(study_name=name, storage=with_password)
    numbers = sorted(t.number for t in study.trials)
    # Every trial once: one job directory each, none lost; two processes asking at the same instant
    # may each take the last one.
    assert 10 <= len(numbers) <= 11 and numbers == list(range(len(numbers)))
    jobs = _jobs(sweep)
    assert sorted(jobs) == numbers
    states = {t.number: t.state.name.lower() for t in study.trials}
    assert {n: job["status"].replace("completed", "complete") for n, job in jobs.items()} == states
    assert "pruned" in states.values() and set(states.values()) <= {"complete", "pruned"}
    assert all(out.count("Launching 1 jobs locally") >= 2 for out, _ in outputs)  # both took trials
    assert sum(_results(sweep)["trials"].values()) == len(numbers)  # written by the last to finish
    assert report.main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "report.csv") as f:
        assert sum(int(r["runs"]) for r in csv.DictReader(f)) == len(numbers)
    # The password is in no file of the runs and in nothing they printed.
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".pt"]
    assert not [p for p in written if secret.encode() in p.read_bytes()]
    assert all(secret not in out + err for out, err in outputs)


def test_a_search_stops_asking_for_trials_once_too_many_failed(tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        *SEARCH,
        "trainer.epochs=1",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.max_failure_rate=0.5",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env={"DNNRUN_FAULT": "raise@epoch=1"},  # every trial fails in its first epoch
    )
    assert result.returncode == 1
    assert "1 of this process's 1 trials failed, more than hydra.sweeper.max_failure_rate=0.5" in result.stderr
    assert _results(sweep)["trials"] == {"fail": 1} and [j["status"] for j in _jobs(sweep).values()] == ["failed"]


def test_a_running_trial_whose_parameters_are_still_being_written_is_no_other_space():
    """Two processes start on one study: one reads the other's first trial while its parameters are
    written one at a time. Part of the space fits; a finished trial's space must be the whole one."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from dnnrun.cli.search import other_space

    space = {"lr": FloatDistribution(1e-4, 0.1, log=True), "width": CategoricalDistribution([64, 128])}
    writing = create_trial(state=TrialState.RUNNING, params={"lr": 0.01}, distributions={"lr": space["lr"]})
    assert other_space([writing], space) is None
    done = create_trial(state=TrialState.COMPLETE, value=1.0, params={"lr": 0.01}, distributions={"lr": space["lr"]})
    assert other_space([done], space) == {"lr": space["lr"]}
    elsewhere = {"lr": FloatDistribution(1e-3, 1.0, log=True)}
    running_elsewhere = create_trial(state=TrialState.RUNNING, params={"lr": 0.01}, distributions=elsewhere)
    assert other_space([running_elsewhere], space) == elsewhere
