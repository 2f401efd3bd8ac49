"""The Hydra task: one run, or one job of a sweep, from its composed config to how it ended.

A run refused before it begins (bad config, occupied or forbidden directory, unfitting checkpoint)
leaves its directory as it found it; in a sweep its failure is kept in SWEEP_DIR/N_rejected.
Otherwise the run's status.json records how it ended, and a failing job lets the others go on:
the sweep's end (sweep.SweepReport) lists the failures."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dnnrun.cli.messages import error
from dnnrun.cli.rules import outside_outputs
from dnnrun.cli.status import record_end
from dnnrun.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    Diverged,
    Interrupted,
    Pruned,
    RunError,
    UserError,
)
from dnnrun.store.rundir import ENDED_WELL, RunDir, SweepDir

log = logging.getLogger("dnnrun")


class App:
    """One invocation of dnnrun. Hydra calls `task` for the run, or for each job of a sweep that
    its launcher runs in this process (joblib and submitit run them in other processes, each with
    its own copy of this object)."""

    def __init__(self, new_root: bool = False) -> None:
        self.began = False  # a run or a job began in this process: a failure after that is no config error
        self.new_root = new_root  # the outputs root did not exist before: a refused run removes it too

    def task(self, cfg: DictConfig) -> float | None:
        from dnnrun.insight.console import console
        from dnnrun.training import distributed  # torch is imported here, after Hydra has parsed argv
        from dnnrun.training.signals import StopFlag

        self.began = True
        hc = HydraConfig.get()
        sweeping = hc.mode == RunMode.MULTIRUN
        rank, _ = distributed.init_from_env(OmegaConf.select(cfg, "trainer.device", default="auto"))
        run = RunDir(distributed.broadcast(hc.runtime.output_dir))  # rank 0's: the one that is written
        sweep = SweepDir(hc.sweep.dir) if sweeping else None
        job = {"num": hc.job.num if sweeping else None, "overrides": list(hc.overrides.task)}
        if rank > 0:
            console.quiet = True  # rank 0 speaks for all
        else:
            _log_to(console)
        # Where a sweep job refused before it begins is recorded, if the sweep directory is allowed.
        in_sweep = sweep is not None and not outside_outputs(cfg.outputs, {"hydra.sweep.dir": sweep.path})
        rejected = sweep.rejected(hc.job.num) if in_sweep else None
        if rejected is not None and rank == 0:
            shutil.rmtree(rejected.path, ignore_errors=True)  # an earlier attempt's refusal

        with contextlib.ExitStack() as hold:  # rank 0 holds the directory until the job's end is recorded
            busy = None
            if rank == 0 and not outside_outputs(cfg.outputs, {"run": run.path}):
                try:
                    hold.enter_context(run.owned())
                except UserError as exc:  # another dnnrun holds it: refused, and its files left alone
                    busy = str(exc)
                except RunError as exc:  # a full or read-only disk: nothing can be recorded there either
                    error(f"{exc} (run directory: {run})")
                    sys.exit(exc.exit_code)
            refusal = busy or _refusal(cfg, run, sweep)
            if refusal is None and sweeping:
                previous = run.read_status() or {}
                done = previous.get("status") in ENDED_WELL
                if done and previous.get("job", {}).get("overrides") == job["overrides"]:
                    log.info("job %s already completed in %s: skipped", hc.job.num, run)
                    return run.read().get(_monitor(cfg))
            if refusal is not None:
                code, value, failure, started = EXIT_BAD_INPUT, None, UserError(refusal), False
                error(refusal)
            else:
                try:
                    code, value, failure, started = _run(cfg, run, hc, sweeping, rank)
                finally:
                    distributed.shutdown()
            if rank == 0 and busy is None:  # a directory another process holds: its records are its own
                held = StopFlag()
                held.deferring = True  # a second Ctrl-C must not cut the record of how the run ended
                with held.installed():
                    if started:
                        record_end(run, code, failure, job)
                    else:
                        root = Path(cfg.outputs).expanduser().resolve()  # Hydra made the directory for this run
                        run.remove_if_empty(sweep.path if in_sweep else root.parent if self.new_root else root)
                        if rejected is not None:
                            record_end(rejected, code, failure, job)
                    if in_sweep:
                        try:
                            sweep.update_table()
                        except RunError as exc:  # a full or read-only disk: the job's own ending stands
                            error(str(exc))
                if held.signum and sweeping and code not in (EXIT_INTERRUPTED, EXIT_TERMINATED):  # the sweep stops here
                    sys.exit(Interrupted(held.signum).exit_code)
            if code == EXIT_INTERNAL and not sweeping and not isinstance(failure, RunError):
                raise failure  # a bug: Hydra prints the traceback; exit code 1
            if code in (EXIT_INTERRUPTED, EXIT_TERMINATED) or (code and not sweeping):
                sys.exit(code)  # a signal stops a whole sweep too
            # What a sweeper (e.g. Optuna) optimizes: the best value of trainer.monitor. A failed job gives
            # NaN, which Optuna records as a failed trial before going on with the next.
            return float("nan") if code else value


def _refusal(cfg: DictConfig, run: RunDir, sweep: SweepDir | None) -> str | None:
    """Why this run may not use its directory, if it may not: outside the outputs root, or (a
    single run) already holding another run that it does not resume."""
    places = (
        {"hydra.sweep.dir": sweep.path, "the job directory (hydra.sweep.subdir)": run.path}
        if sweep
        else {"hydra.run.dir": run.path}
    )
    outside = outside_outputs(cfg.outputs, places)
    if outside or sweep is not None:
        return outside
    resuming = cfg.mode == "train" and cfg.trainer.resume is not None
    occupied = run.holds_run()
    if occupied and not resuming:
        return (
            f"{run} already holds a run ({', '.join(occupied)}); continue it with trainer.resume=auto, "
            f"or choose another directory (hydra.run.dir=...)"
        )
    return None


def _run(cfg: DictConfig, run: RunDir, hc: DictConfig, sweeping: bool, rank: int):
    """(exit code, the value for a sweeper, what went wrong, whether the run began) of one run;
    prints what went wrong. A run begins once it owns its directory: then Hydra's config snapshot
    is written into it."""
    from dnnrun.config.run_config import parse_run_config
    from dnnrun.inference import evaluate, predict
    from dnnrun.training import faults, loop, lr_find

    started = []

    def start() -> None:
        if rank == 0:
            try:
                _save_snapshot(cfg, hc, run)
            except OSError as exc:
                raise RunError(f"cannot write {exc.filename or run}: {exc.strerror or exc}") from exc
        started.append(True)

    try:
        run_cfg = _for_this_process(
            parse_run_config(OmegaConf.to_container(cfg, resolve=True)), hc, run, sweeping, rank
        )
        if run_cfg.mode == "lr_find":
            return EXIT_OK, lr_find.run(run_cfg, run.path, on_start=start)["suggestion"], None, True
        if run_cfg.mode == "evaluate":
            return EXIT_OK, evaluate.run(run_cfg, run.path, on_start=start)["deterministic"]["accuracy"], None, True
        if run_cfg.mode == "predict":
            return EXIT_OK, predict.run(run_cfg, run.path, on_start=start)["examples"], None, True
        trial = _trial(run_cfg, hc) if sweeping else None
        with contextlib.ExitStack() as scratch:
            # Rank 0 writes the run directory; another rank trains in a scratch one of its own (the
            # Slurm tasks of one launcher job are all given the job's directory).
            own = run.path
            if rank > 0:
                own = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix=f"dnnrun-rank{rank}-")))
            summary = loop.run(run_cfg, own, on_start=start, hook=faults.from_env(), trial=trial)
        return EXIT_OK, summary["best"]["value"], None, True
    except Pruned as exc:  # the search's pruner stopped the trial (the loop has said so): not a failure
        return EXIT_OK, None, exc, True
    except (UserError, OmegaConfBaseException) as exc:
        error(str(exc))
        return getattr(exc, "exit_code", EXIT_BAD_INPUT), None, exc, bool(started)
    except (Diverged, RunError) as exc:
        error(f"{exc} (run directory: {run})")
        return exc.exit_code, None, exc, bool(started)
    except (Interrupted, KeyboardInterrupt) as exc:
        error(f"{exc or 'interrupted'} (run directory: {run})")
        return getattr(exc, "exit_code", EXIT_INTERRUPTED), None, exc, bool(started)
    except Exception as exc:
        if sweeping:
            log.exception("job %s failed", hc.job.num)
        return EXIT_INTERNAL, None, exc, bool(started)


def _trial(run_cfg, hc: DictConfig):
    """The search's trial that this job is (dnnrun's Optuna sweeper), or None."""
    from dnnrun.cli.search import SEEDS_REFUSED, job_trial

    trial = job_trial(hc)
    if trial is not None and run_cfg.trainer.seeds is not None:
        raise UserError(SEEDS_REFUSED)  # the command line's check refuses it first (cli/checks.py)
    return trial


def _save_snapshot(cfg: DictConfig, hc: DictConfig, run: RunDir) -> None:
    """What Hydra itself writes to .hydra/ (hydra.output_subdir=null hands it to dnnrun, so that a
    refused run does not overwrite the snapshot of the run it found in its directory)."""
    run.snapshot_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run.snapshot("config"))
    OmegaConf.save(OmegaConf.create({"hydra": hc}), run.snapshot("hydra"))
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), run.snapshot("overrides"))


def _for_this_process(run_cfg, hc: DictConfig, run: RunDir, sweeping: bool, rank: int):
    """What only the launcher knows: threads and GPU of a parallel job, resuming a requeued job,
    whether plots are drawn (trainer.diagnostics.plots=auto), and, under torchrun, where rank 0
    keeps the checkpoints."""
    import dataclasses

    import torch

    trainer = run_cfg.trainer
    launcher = OmegaConf.select(hc, "launcher._target_", default="") or ""
    if "joblib" in launcher:  # several jobs share this machine's cores and GPUs
        # the CPUs this process may run on (taskset, cgroups, a Slurm allocation), not the machine's
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n_jobs = OmegaConf.select(hc, "launcher.n_jobs", default=-1)
        jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
        if trainer.threads is None:
            trainer = dataclasses.replace(trainer, threads=max(1, cores // jobs))
        if trainer.device == "auto" and torch.cuda.device_count() > 1:
            trainer = dataclasses.replace(trainer, device=f"cuda:{hc.job.num % torch.cuda.device_count()}")
    if trainer.diagnostics.plots == "auto":  # plots for a run, not for each job of a sweep nor each member
        plots = not sweeping and trainer.seeds is None
        trainer = dataclasses.replace(trainer, diagnostics=dataclasses.replace(trainer.diagnostics, plots=plots))
    if sweeping and trainer.resume is None and run.last.exists():
        trainer = dataclasses.replace(trainer, resume="auto")  # a requeued or re-run job continues
    if rank > 0 and trainer.resume == "auto":  # this rank's own directory is a scratch one
        trainer = dataclasses.replace(trainer, resume=str(run.last) if run.last.exists() else None)
    return dataclasses.replace(run_cfg, trainer=trainer)


def _monitor(cfg: DictConfig) -> str:
    return OmegaConf.select(cfg, "trainer.monitor", default="val/loss")


def _log_to(console) -> None:
    from rich.logging import RichHandler

    if not any(isinstance(h, RichHandler) for h in log.handlers):
        log.addHandler(RichHandler(console=console, show_path=False, show_time=False, markup=False))
        log.propagate = False
    log.setLevel(logging.INFO)  # every mode says where it writes, and what it found
