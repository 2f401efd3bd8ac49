"""Hyperparameter searches with Optuna: `dnnrun -m experiment=search` (hydra/sweeper=optuna).

dnnrun's own sweeper (the plugin in hydra_plugins/dnnrun_optuna registers it with Hydra) asks
Optuna's study for trials, launches each as a job of the sweep through Hydra's launcher (in this
process, joblib, Slurm), and tells the study how each ended. Ask-and-tell through the storage, so
that the same command started on several machines (or as several Slurm jobs) works on one study:

- a trial's job is numbered as the trial (the study numbers them once, for every process), so its
  directory SWEEP/N is its own even when the processes share the sweep directory;
- each job reports its monitored metric to the study after every epoch (training/pruning.py) and
  the pruner may stop it there: status "pruned", not a failure;
- hydra.sweeper.n_trials is the study's total: a process asks for trials while the study holds
  fewer (two processes asking at the same instant may each take the last one).

Storages (hydra.sweeper.storage): sqlite:///PATH or journal:///PATH (Optuna's journal file, for a
shared file system) under the outputs root, or a PostgreSQL or MySQL URL without a password
(libpq's PGPASSWORD or ~/.pgpass give it; or the whole URL in DNNRUN_OPTUNA_STORAGE, which is never
written anywhere). Left out: a journal file in the sweep directory, SWEEP/optuna.journal."""

from __future__ import annotations

import logging
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

from dnnrun.cli.messages import error
from dnnrun.config.schema import did_you_mean
from dnnrun.errors import EXIT_BAD_INPUT, UserError
from dnnrun.store.rundir import RunDir, SweepDir, atomic_write

log = logging.getLogger("dnnrun")

SWEEPER = "hydra_plugins.dnnrun_optuna.optuna_sweeper.OptunaSweeper"  # hydra.sweeper._target_ of a search
SEEDS_REFUSED = (
    "trainer.seeds: a search's trial is one run (its value one model's); search without trainer.seeds "
    "and compare the best settings over seeds afterwards"
)
STORAGE_ENV = "DNNRUN_OPTUNA_STORAGE"  # a storage URL that may hold a password: read, never written
JOURNAL = "optuna.journal"  # the study of a search given no storage, in its sweep directory
FILE_SCHEMES = ("sqlite", "journal")  # a file under the outputs root
SERVER_SCHEMES = ("postgresql", "mysql")  # with or without +DRIVER (postgresql+psycopg2, mysql+pymysql)
DEFAULT_STUDY = "dnnrun-search"
# Processes started at the same time on a new database both create Optuna's tables, and one of them
# fails (PostgreSQL: a duplicate pg_type entry); it tries again once the other's tables are there.
OPEN_ATTEMPTS = 3


def _pruners() -> dict[str, Callable[[], Any]]:
    import optuna

    return {
        # stops a trial whose value is worse than the median of the other trials' at the same
        # epoch, once 5 trials have finished (Optuna's defaults)
        "median": optuna.pruners.MedianPruner,
        # successive halving in brackets over the epochs (Li et al., 2018): 1 epoch at least
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }


PRUNERS = ("median", "hyperband", "none")  # the names of _pruners(), known without importing Optuna


# ---------------------------------------------------------------------------------------------
# Storages


def storage_problem(where: str, url: str, root: str | None) -> str | None:
    """Why hydra.sweeper.storage (or DNNRUN_OPTUNA_STORAGE) may not hold the study, if it may not."""
    from dnnrun.cli.rules import outside_outputs

    scheme = url.partition(":")[0].partition("+")[0]
    if scheme in FILE_SCHEMES:
        if not url.startswith(f"{scheme}:///") or "+" in url.partition(":")[0]:
            return f"{where}: {url!r} is not a file URL; give {scheme}:///PATH (PATH under the outputs root)"
        path = Path(url.removeprefix(f"{scheme}:///")).expanduser()
        if root is None:
            return None
        return outside_outputs(root, {where: path})
    if scheme in SERVER_SCHEMES:
        parts = urlsplit(url)
        if parts.password is not None and where != STORAGE_ENV:
            return (
                f"{where}: the URL holds a password, which would be written into the run's .hydra/ files and "
                f"logs; leave it out and give it in PGPASSWORD or ~/.pgpass (PostgreSQL), or give the whole URL "
                f"in the environment variable {STORAGE_ENV} instead"
            )
        if not parts.hostname or not parts.path.strip("/"):
            return f"{where}: {_shown(url)!r} names no host and database; give {scheme}://USER@HOST:PORT/DATABASE"
        return None
    valid = [*(f"{s}:///PATH" for s in FILE_SCHEMES), *(f"{s}://USER@HOST/DB" for s in SERVER_SCHEMES)]
    return f"{where}: {_shown(url)!r} is not a storage dnnrun can use; valid: {', '.join(valid)}"


def storage_url(sweeper: DictConfig, sweep_dir: str | os.PathLike) -> tuple[str, str]:
    """(the URL the study is in, what messages may show of it: no password)."""
    setting = sweeper.get("storage")
    if setting is not None:
        return str(setting), str(setting)
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV], f"${STORAGE_ENV} ({_shown(os.environ[STORAGE_ENV])})"
    url = f"journal:///{Path(sweep_dir).resolve() / JOURNAL}"
    return url, url


def open_storage(url: str):
    """Optuna's storage for a URL that storage_problem accepted; a folder for a file is made."""
    import optuna

    scheme = url.partition(":")[0]
    if scheme in FILE_SCHEMES:
        path = Path(url.removeprefix(f"{scheme}:///")).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        if scheme == "journal":
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        url = f"sqlite:///{path}"
    # pool_pre_ping: a connection the server dropped while a trial trained is replaced, not an error
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if scheme != "sqlite" else None)


def _shown(url: str) -> str:
    """A URL as messages show it: without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


# ---------------------------------------------------------------------------------------------
# The search space: Hydra's sweep syntax, in hydra.sweeper.params and on the command line


def search_space(params: DictConfig | None, arguments: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """({key: Optuna distribution}, the overrides every trial shares). The command line's sweeps
    replace the params' of the same key; its plain overrides apply to every trial."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = _distribution(key, override)
        else:
            fixed[key] = override.input_line
    return space, list(fixed.values())


def _distribution(key: str, override) -> Any:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        low, high, log_scale = sweep.start, sweep.end, "log" in sweep.tags
        if "int" in sweep.tags or (isinstance(low, int) and isinstance(high, int)):
            return IntDistribution(int(low), int(high), log=log_scale)
        return FloatDistribution(float(low), float(high), log=log_scale)
    if isinstance(sweep, RangeSweep) and all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
        values = list(range(sweep.start, sweep.stop, sweep.step))
        if not values:
            raise UserError(f"hydra.sweeper.params.{key}: {override.input_line!r} holds no value")
        return IntDistribution(values[0], values[-1], step=sweep.step)
    if isinstance(sweep, (ChoiceSweep, RangeSweep)):
        values = list(override.sweep_iterator())
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            raise UserError(
                f"hydra.sweeper.params.{key}: {override.input_line!r}: a search chooses among plain values "
                f"(numbers, strings, true/false, null), not lists or mappings"
            )
        return CategoricalDistribution(values)
    raise UserError(f"hydra.sweeper.params.{key}: {override.input_line!r} is not a sweep a search can sample")


def override_line(key: str, value: Any) -> str:
    """key=value as Hydra parses it back to the same value."""
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"{key}={value!r}"
    text = str(value)
    if re.fullmatch(r"[\w./-]+", text) and text.lower() not in ("true", "false", "null", "nan", "inf"):
        return f"{key}={text}"
    return f"{key}='" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---------------------------------------------------------------------------------------------
# The sweeper's loop


class Search:
    """One process's part of a search. settings: hydra.sweeper (direction, n_trials, n_jobs,
    pruner, sampler, storage, study_name, max_failure_rate, params); launch(overrides, first job
    number) runs a batch of jobs; validate(overrides) composes them first (Hydra's
    Sweeper.validate_batch_is_legal)."""

    def __init__(self, settings: DictConfig, sweep_dir: str, launch: Callable, validate: Callable, sampler):
        self.settings, self.sweep = settings, SweepDir(sweep_dir)
        self.launch, self.validate, self.sampler = launch, validate, sampler

    def run(self, arguments: list[str]) -> None:
        try:
            space, fixed = search_space(self.settings.get("params"), arguments)
            study = self._study(space)
        except UserError as exc:  # before any job: one line, exit 2
            error(str(exc))
            sys.exit(EXIT_BAD_INPUT)
        n_trials, n_jobs = int(self.settings.n_trials), int(self.settings.n_jobs)
        rate = float(self.settings.get("max_failure_rate", 1.0))
        mine: list[str] = []  # how this process's trials ended
        while (left := n_trials - len(study.get_trials(deepcopy=False))) > 0:
            trials = [study.ask(space) for _ in range(min(n_jobs, left))]
            jobs = [[*fixed, *(override_line(k, v) for k, v in t.params.items())] for t in trials]
            self.validate(jobs)
            for first, batch in _consecutive([t.number for t in trials], jobs):
                returns = self.launch(batch, first)
                for number, ret in zip(range(first, first + len(batch)), returns):
                    trial = next(t for t in trials if t.number == number)
                    mine.append(self._tell(study, trial, ret))
            failed = mine.count("fail")
            if failed and failed / len(mine) > rate:
                error(
                    f"{failed} of this process's {len(mine)} trials failed, more than hydra.sweeper.max_failure_rate="
                    f"{rate}: no more trials are asked for"
                )
                break
        self._write_results(study)

    def _study(self, space: dict[str, Any]):
        import optuna

        url, shown = storage_url(self.settings, self.sweep.path)
        name = self.settings.get("study_name") or DEFAULT_STUDY
        direction = str(self.settings.direction)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # dnnrun says what the search does
        for attempt in range(OPEN_ATTEMPTS):
            try:
                study = optuna.create_study(
                    storage=open_storage(url),
                    study_name=name,
                    direction=direction,
                    sampler=self.sampler,
                    pruner=make_pruner(str(self.settings.pruner)),
                    load_if_exists=True,
                )
                break
            except Exception as exc:  # the server or file cannot be reached or read: nothing has run
                if attempt + 1 < OPEN_ATTEMPTS:  # processes started together race to make the tables
                    time.sleep(random.uniform(0.5, 2.0))
                    continue
                problem = f"hydra.sweeper.storage: cannot open the study {name!r} in {shown}: {_reason(exc)}"
                raise UserError(problem) from exc
        if study.direction.name.lower() != direction:
            raise UserError(
                f"hydra.sweeper.direction: the study {name!r} in {shown} is to {study.direction.name.lower()}, "
                f"not {direction}; give another study_name (hydra.sweeper.study_name=...)"
            )
        other = other_space(study.get_trials(deepcopy=False), space)
        if other is not None:
            raise UserError(
                f"hydra.sweeper.params: the study {name!r} in {shown} searches "
                f"{_describe(other)}, not {_describe(space)}; give another study_name "
                f"(hydra.sweeper.study_name=...) or the same search space"
            )
        had = len(study.get_trials(deepcopy=False))
        log.info(
            "study %r in %s: %d of %d trials there; pruner: %s",
            name,
            shown,
            had,
            self.settings.n_trials,
            self.settings.pruner,
        )
        return study

    def _tell(self, study, trial, ret) -> str:
        """Tell the study how a trial's job ended: complete (its value), pruned or failed."""
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        ran = ret.hydra_cfg is not None  # else the launcher could not even start the job
        status = ((RunDir(ret.hydra_cfg.hydra.runtime.output_dir).read_status() or {}) if ran else {}).get("status")
        value = ret.return_value if ret.status == JobStatus.COMPLETED else None
        if status == "completed" and isinstance(value, (int, float)) and math.isfinite(value):
            study.tell(trial, float(value), skip_if_finished=True)
            return "complete"
        if status == "pruned":
            study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            return "pruned"
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        return "fail"

    def _write_results(self, study) -> None:
        """SWEEP/optimization_results.yaml: the study's best trial and how its trials ended, all of them
        (every process's)."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        results = {
            "name": "optuna",
            "study_name": study.study_name,
            "direction": study.direction.name.lower(),
            "best_params": dict(study.best_trial.params) if done else None,
            "best_value": study.best_value if done else None,
            "best_trial": study.best_trial.number if done else None,
            "trials": {k: v for k, v in counts.items() if v},
        }
        text = OmegaConf.to_yaml(OmegaConf.create(results))
        self.sweep.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.sweep.path / "optimization_results.yaml", lambda f: f.write(text.encode()))
        ended = f"{len(done)} complete, {counts.get('pruned', 0)} pruned" + "".join(
            f", {counts[state]} {state}" for state in ("fail", "running") if counts.get(state)
        )  # running: other processes' trials
        print(
            f"search: {len(trials)} trials in study {study.study_name!r} ({ended}); "
            f"best {results['best_value']} (trial {results['best_trial']}): {results['best_params']}"
        )


def make_pruner(name: str):
    if name not in PRUNERS:
        raise UserError(pruner_problem(name))
    return _pruners()[name]()


def _consecutive(numbers: list[int], jobs: list[list[str]]):
    """(first number, jobs) for each run of consecutive trial numbers: a launcher numbers a batch
    from its first job on."""
    runs: list[tuple[int, list[list[str]]]] = []
    for number, job in sorted(zip(numbers, jobs)):
        if runs and runs[-1][0] + len(runs[-1][1]) == number:
            runs[-1][1].append(job)
        else:
            runs.append((number, [job]))
    return runs


def other_space(trials: list, space: dict[str, Any]) -> dict[str, Any] | None:
    """The search space of a study's trial that is not `space`, or None. Another process may be
    writing a running trial's parameters one at a time: a part of `space` fits it."""
    from optuna.trial import TrialState

    for trial in trials:
        partial = trial.state == TrialState.RUNNING
        fits = trial.distributions.items() <= space.items() if partial else trial.distributions == space
        if trial.distributions and not fits:
            return trial.distributions
    return None


def _describe(space: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {_distribution_text(d)}" for k, d in sorted(space.items())) + "}"


def _distribution_text(d) -> str:
    from optuna.distributions import CategoricalDistribution

    if isinstance(d, CategoricalDistribution):
        return f"choice({', '.join(map(str, d.choices))})"
    return f"{'log ' if d.log else ''}interval({d.low}, {d.high})"


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return _shown(text[0]) if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# In a trial's job


class JobTrial:
    """The study's trial that this job is (training/pruning.py's Trial): reports each epoch's
    monitored value and asks the pruner."""

    def __init__(self, trial, pruner: str):
        self.trial, self.pruner = trial, pruner
        self.broken = False

    def report(self, epoch: int, value: float) -> bool:
        """Rank 0 reports and asks; every rank learns its answer (DDP: all stop together)."""
        from dnnrun.training import distributed

        stop = False
        if distributed.rank_world()[0] == 0 and not self.broken:
            try:
                self.trial.report(value, epoch)
                stop = self.trial.should_prune()
            except Exception as exc:  # the storage went away: the trial trains on, unpruned
                self.broken = True
                log.warning(
                    "cannot report epoch %d to the study (%s): the trial trains on unpruned", epoch, _reason(exc)
                )
        return distributed.broadcast(stop)


def job_trial(hc: DictConfig) -> JobTrial | None:
    """In a job of a search: its trial (the job's number is the trial's); None otherwise."""
    sweeper = hc.get("sweeper")
    if not isinstance(sweeper, DictConfig) or sweeper.get("_target_") != SWEEPER:
        return None
    import optuna

    url, shown = storage_url(sweeper, hc.sweep.dir)
    name = sweeper.get("study_name") or DEFAULT_STUDY
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = open_storage(url)
        study = optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(str(sweeper.pruner)))
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(name), int(hc.job.num)
        )
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"this job is trial {hc.job.num} of the study {name!r} in {shown}, which cannot be read: {_reason(exc)}"
        ) from exc
    return JobTrial(optuna.trial.Trial(study, trial_id), str(sweeper.pruner))


def pruner_problem(name: str) -> str:
    return f"hydra.sweeper.pruner: {name!r} is not a pruner; valid: {', '.join(PRUNERS)}{did_you_mean(name, PRUNERS)}"
