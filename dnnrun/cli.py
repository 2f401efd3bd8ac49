"""The command line. The only module that imports Hydra: it composes the config, turns it into
plain typed objects and calls `train.run(cfg, run_dir)`."""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import io
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.logging import RichHandler
from rich.text import Text

from dnnrun.errors import (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED,
                           ConfigError, Diverged, Interrupted, RunError, UserError)
from dnnrun.schema import did_you_mean, unknown


def _config_dir() -> Path:
    """conf/ inside the installed package (wheel), else the source checkout's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise SystemExit(f"dnnrun: no config.yaml in {here / 'conf'} or {here.parent / 'conf'}; reinstall dnnrun")


CONFIG_DIR = _config_dir()
_launched = False  # set once a run or a job of a sweep begins: tells Hydra's composition errors (bad input) from the rest
_sweep_failed = False  # set by SweepReport: some job of the sweep did not complete
_sweep: DictConfig | None = None  # the hydra node of the sweep under way, set by SweepReport when it starts
_sweep_ended = False  # set by SweepReport: Hydra reached the sweep's end (a launcher that dies does not)
DIED = "its process died before it finished (killed?)"


def _error(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _task(cfg: DictConfig) -> float | None:
    """One run, or one job of a sweep. A run refused before it begins (bad config, occupied or
    forbidden directory, unfitting checkpoint) leaves its directory as it found it; in a sweep its
    failure is kept in SWEEP_DIR/N_rejected. Otherwise the run's status.json records how it ended,
    and a failing job lets the others go on: the sweep's end (SweepReport) lists the failures."""
    from dnnrun import distributed  # torch is imported here, after Hydra has parsed argv
    from dnnrun.console import console
    from dnnrun.rundir import RunDir, SweepDir
    from dnnrun.signals import StopFlag

    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    rank, _ = distributed.init_from_env(OmegaConf.select(cfg, "trainer.device", default="auto"))
    run_dir = Path(distributed.broadcast(hc.runtime.output_dir))  # rank 0's: the one that is written
    sweep_dir = Path(hc.sweep.dir) if sweeping else None
    job = {"num": hc.job.num if sweeping else None, "overrides": list(hc.overrides.task)}
    if rank > 0:
        console.quiet = True  # rank 0 speaks for all
    else:
        _log_to(console)
    # Where a sweep job refused before it begins is recorded, if the sweep directory is allowed.
    in_sweep = sweeping and not _outside_outputs(cfg.outputs, {"hydra.sweep.dir": sweep_dir})
    rejected = sweep_dir / f"{hc.job.num}_rejected" if in_sweep else None
    if rejected is not None and rank == 0:
        shutil.rmtree(rejected, ignore_errors=True)  # an earlier attempt's refusal

    refusal = _refusal(cfg, run_dir, sweep_dir)
    if refusal is None and sweeping:
        previous = RunDir(run_dir).read_status() or {}
        if previous.get("status") == "completed" and previous.get("job", {}).get("overrides") == job["overrides"]:
            logging.getLogger("dnnrun").info("job %s already completed in %s: skipped", hc.job.num, run_dir)
            return RunDir(run_dir).read().get(_monitor(cfg))
    if refusal is not None:
        code, value, failure, started = EXIT_BAD_INPUT, None, UserError(refusal), False
        _error(refusal)
    else:
        try:
            code, value, failure, started = _run(cfg, run_dir, hc, sweeping, rank)
        finally:
            distributed.shutdown()
    if rank == 0:
        held = StopFlag()
        held.deferring = True  # a second Ctrl-C must not cut the record of how the run ended
        with held.installed():
            if started:
                _record(code, failure, run_dir, job)
            else:
                _remove_if_empty(run_dir, sweep_dir if in_sweep else Path(cfg.outputs))  # Hydra made it for this run
                if rejected is not None:
                    _record(code, failure, rejected, job)
            if in_sweep:
                SweepDir(sweep_dir).update_table()
        if held.signum and sweeping and code not in (EXIT_INTERRUPTED, EXIT_TERMINATED):  # the sweep stops here
            sys.exit(Interrupted(held.signum).exit_code)
    if code == EXIT_INTERNAL and not sweeping and not isinstance(failure, RunError):
        raise failure  # a bug: Hydra prints the traceback; exit code 1
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED) or (code and not sweeping):
        sys.exit(code)  # a signal stops a whole sweep too
    # What a sweeper (e.g. Optuna) optimizes: the best value of trainer.monitor. A failed job gives
    # NaN, which Optuna records as a failed trial before going on with the next.
    return float("nan") if code else value


STATUS_OF_EXIT = {EXIT_OK: "completed", EXIT_DIVERGED: "diverged", EXIT_INTERRUPTED: "interrupted",
                  EXIT_TERMINATED: "interrupted"}  # any other code: "failed"


def _record(code: int, failure: BaseException | None, run_dir: Path, job: dict) -> None:
    from dnnrun import faults
    from dnnrun.rundir import RunDir

    injected = faults.from_env()
    if injected is not None:  # tests: a signal while the end is recorded
        injected.at("status", 1)
    RunDir(run_dir).write_status(STATUS_OF_EXIT.get(code, "failed"), code, job, _describe(failure))


def _refusal(cfg: DictConfig, run_dir: Path, sweep_dir: Path | None) -> str | None:
    """Why this run may not use its directory, if it may not: outside the outputs root, or (a
    single run) already holding another run that it does not resume."""
    places = {"hydra.sweep.dir": sweep_dir, "the job directory (hydra.sweep.subdir)": run_dir} if sweep_dir \
        else {"hydra.run.dir": run_dir}
    outside = _outside_outputs(cfg.outputs, places)
    if outside or sweep_dir is not None:
        return outside
    resuming = cfg.mode == "train" and cfg.trainer.resume is not None
    occupied = [name for name in ("summary.json", "status.json", "checkpoints") if (run_dir / name).exists()]
    if occupied and not resuming:
        return (f"{run_dir} already holds a run ({', '.join(occupied)}); continue it with trainer.resume=auto, "
                f"or choose another directory (hydra.run.dir=...)")
    return None


def _run(cfg: DictConfig, run_dir: Path, hc, sweeping: bool, rank: int):
    """(exit code, the value for a sweeper, what went wrong, whether the run began) of one run;
    prints what went wrong. A run begins once it owns its directory: then Hydra's config snapshot
    is written into it."""
    from dnnrun import evaluate, faults, lr_find, train
    from dnnrun.config import parse_run_config

    started = []

    def start() -> None:
        if rank == 0:
            try:
                _save_snapshot(cfg, hc, run_dir)
            except OSError as exc:
                raise RunError(f"cannot write {exc.filename or run_dir}: {exc.strerror or exc}") from exc
        started.append(True)

    try:
        run_cfg = _for_this_process(parse_run_config(OmegaConf.to_container(cfg, resolve=True)), hc, run_dir,
                                    sweeping, rank)
        if run_cfg.mode == "lr_find":
            start()
            return EXIT_OK, lr_find.run(run_cfg, run_dir)["suggestion"], None, True
        if run_cfg.mode == "evaluate":
            start()
            return EXIT_OK, evaluate.run(run_cfg, run_dir)["deterministic"]["accuracy"], None, True
        summary = train.run(run_cfg, run_dir if rank == 0 else Path(hc.runtime.output_dir), on_start=start,
                            hook=faults.from_env())
        return EXIT_OK, summary["best"]["value"], None, True
    except (UserError, OmegaConfBaseException) as exc:
        _error(str(exc))
        return getattr(exc, "exit_code", EXIT_BAD_INPUT), None, exc, bool(started)
    except (Diverged, RunError) as exc:
        _error(f"{exc} (run directory: {run_dir})")
        return exc.exit_code, None, exc, bool(started)
    except (Interrupted, KeyboardInterrupt) as exc:
        _error(f"{exc or 'interrupted'} (run directory: {run_dir})")
        return getattr(exc, "exit_code", EXIT_INTERRUPTED), None, exc, bool(started)
    except Exception as exc:
        if sweeping:
            logging.getLogger("dnnrun").exception("job %s failed", hc.job.num)
        return EXIT_INTERNAL, None, exc, bool(started)


def _save_snapshot(cfg: DictConfig, hc, run_dir: Path) -> None:
    """What Hydra itself writes to .hydra/ (hydra.output_subdir=null hands it to dnnrun, so that a
    refused run does not overwrite the snapshot of the run it found in its directory)."""
    snapshot = run_dir / ".hydra"
    snapshot.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, snapshot / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), snapshot / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), snapshot / "overrides.yaml")


def _for_this_process(run_cfg, hc, run_dir: Path, sweeping: bool, rank: int):
    """What only the launcher knows: threads and GPU of a parallel job, resuming a requeued job,
    and, under torchrun, where rank 0 keeps the checkpoints."""
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
    if sweeping and trainer.resume is None and (run_dir / "checkpoints" / "last.pt").exists():
        trainer = dataclasses.replace(trainer, resume="auto")  # a requeued or re-run job continues
    if rank > 0 and trainer.resume == "auto":  # this rank's own directory is a scratch one
        last = run_dir / "checkpoints" / "last.pt"
        trainer = dataclasses.replace(trainer, resume=str(last) if last.exists() else None)
    return dataclasses.replace(run_cfg, trainer=trainer)


def _describe(failure: BaseException | None) -> str | None:
    if failure is None:
        return None
    if isinstance(failure, KeyboardInterrupt):
        return "interrupted"
    if isinstance(failure, (UserError, Diverged, RunError, Interrupted)):
        return str(failure)
    return f"{type(failure).__name__}: {failure}"


def _outside_outputs(root: str, places: dict[str, Path]) -> str | None:
    """Runs write only under the outputs root; writing elsewhere takes setting that root (outputs=...)."""
    base = Path(root).expanduser().resolve()
    for what, path in places.items():
        if not path.resolve().is_relative_to(base):
            return (f"{what} resolves to {path.resolve()}, outside the outputs root {base}; choose a directory "
                    f"under it, or set the root: outputs=DIR")
    return None


def _monitor(cfg: DictConfig) -> str:
    return OmegaConf.select(cfg, "trainer.monitor", default="val/loss")


def _log_to(console) -> None:
    logger = logging.getLogger("dnnrun")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False, show_time=False, markup=False))
        logger.propagate = False


def _remove_if_empty(run_dir: Path, up_to: Path) -> None:
    """A run refused before it began leaves no empty directory behind: Hydra makes it first, and
    the folders above it (outputs/<date>/), which go too while empty, up to but not including
    `up_to` (the outputs root; a sweep's directory for its jobs)."""
    if not run_dir.is_dir() or any(run_dir.iterdir()):
        return
    run_dir.rmdir()
    top, path = up_to.expanduser().resolve(), run_dir.resolve().parent
    while path != top and path.is_relative_to(top):
        try:
            path.rmdir()  # only while empty: another run may have begun in it meanwhile
        except OSError:
            return
        path = path.parent


class SweepReport(Callback):
    """At the end of a sweep: rewrite sweep.csv, list every job that did not complete, and make
    the sweep exit non-zero if there was one (configured in conf/config.yaml: hydra.callbacks).
    It also notes when a run or a job begins (a failure after that is not a config error) and
    which sweep is under way (for main, should its launcher die before the end)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        global _launched
        _launched = True

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        global _launched
        _launched = True

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        global _sweep
        _sweep = config.hydra

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        global _sweep_failed, _sweep_ended
        _sweep_ended = True
        if report_sweep(Path(config.hydra.sweep.dir)):
            _sweep_failed = True
            raise SystemExit(EXIT_INTERNAL)


def report_sweep(sweep_dir: Path) -> bool:
    """Rewrite sweep.csv and print how many jobs completed and every one that did not; whether one did not."""
    from dnnrun.rundir import SweepDir

    rows = SweepDir(sweep_dir).update_table()
    failed = [r for r in rows if r["status"] != "completed"]
    print(f"sweep: {len(rows) - len(failed)} of {len(rows)} jobs completed; table: {sweep_dir}/sweep.csv")
    for row in failed:
        _error(f"job {row['job']} ({row['overrides'] or 'no overrides'}): {row['status']}"
               + (f": {row['error']}" if row.get("error") else ""))
    return bool(failed)


def _sweep_broke() -> bool:
    """After the launcher of a sweep raised (e.g. joblib when a worker process is killed), before the
    sweep's end: Hydra calls no on_multirun_end then. The jobs whose process died left no status.json:
    they are recorded as failed, and the sweep is reported as SweepReport would. False when no job
    had begun: Hydra could not compose a job's config (bad input; it has printed why)."""
    from dnnrun.rundir import SweepDir

    sweep_dir = Path(_sweep.sweep.dir)
    jobs = [job.path for job in SweepDir(sweep_dir).jobs()]
    if not jobs and not _launched:
        return False
    # A Slurm job (submitit) outlives a failure of the launcher that waits for it: it records its own end.
    remote = "submitit" in str(OmegaConf.select(_sweep, "launcher._target_", default=""))
    for job in jobs if not remote else []:
        if not (job / "status.json").exists():
            snapshot = job / ".hydra" / "overrides.yaml"
            overrides = OmegaConf.to_container(OmegaConf.load(snapshot)) if snapshot.is_file() else []
            number = job.name.split("_", 1)[0]
            _record(EXIT_INTERNAL, RunError(DIED), job,
                    {"num": int(number) if number.isdigit() else None, "overrides": overrides})
    report_sweep(sweep_dir)
    _error(f"the sweep stopped before its end (the error above); jobs that had not begun have no directory in {sweep_dir}")
    return True


# ---------------------------------------------------------------------------------------------
# --help: every group and every option, each with the first comment line of its YAML.

GROUP_HELP = {
    "data": "the dataset, its splits and input scaling",
    "model": "the network",
    "init": "how every Linear weight is initialized (biases start at zero)",
    "act": "the hidden layers' activation function",
    "norm": "a normalization layer in each hidden block",
    "optimizer": "the update rule",
    "schedule": "how the learning rate changes during training",
    "regularizer": "penalties, dropout and constraints; a list selects several: regularizer=[l2,dropout]",
    "trainer": "epochs, batch size, device, seed, early stopping, clipping, resuming, diagnostics",
    "logger": "where metrics go besides the run directory's JSON lines",
    "pretrain": "training the hidden layers without labels before supervised training",
    "experiment": "presets that set several groups at once",
}


def describe(path: Path) -> str:
    """The first comment line of a YAML option, its one-line description."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("#").strip()
    return ""


def help_text() -> str:
    defaults: dict[str, object] = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            defaults.update(entry)
    groups = [g for g in GROUP_HELP if (CONFIG_DIR / g).is_dir()]
    groups += sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in GROUP_HELP and p.name != "hydra")
    lines = [
        "usage: dnnrun [-m] [group=option ...] [group.key=value ...]",
        "",
        "Trains a PyTorch model built from config groups and writes metrics, checkpoints and a summary",
        "to a run directory under outputs/. -m (--multirun) sweeps comma-separated values: act=relu,elu.",
    ]
    for group in groups:
        default = defaults.get(group)
        default = ",".join(default) if isinstance(default, list) else default
        lines += ["", f"{group}: {GROUP_HELP.get(group, '')}" + (f" (default: {default})" if default else "")]
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            lines.append(f"  {path.stem:<20} {describe(path)}")
    lines += [
        "",
        "examples:",
        "  dnnrun optimizer=adam act=elu",
        "  dnnrun -m act=sigmoid,relu,elu,selu init=glorot_uniform,he_normal",
        "  dnnrun experiment=self_normalizing trainer.epochs=50",
        "  dnnrun mode=lr_find optimizer=adam            the learning-rate range test",
        "  dnnrun mode=evaluate evaluate.checkpoint=PATH evaluate.mc_samples=30",
        "  dnnrun --cfg job optimizer=nadam      print the composed config (every key you can override)",
        "",
        "sweeps (pip install -e \".[sweeps]\"): -m hydra/launcher=joblib (parallel jobs), hydra/launcher=slurm,",
        "  -m experiment=search (Optuna); torchrun --nproc_per_node=N -m dnnrun ... (one run on N GPUs);",
        "  dnnrun-report SWEEP_DIR; dnnrun-plot RUN_DIR",
        "  dnnrun --hydra-help                   Hydra's own flags",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command line is checked before Hydra runs, all of it at once and before anything is trained
# or created: option names, keys and values (every value of a sweep), where the run or sweep
# directory lies, and that no config (the command line, a hydra.searchpath directory, -cd/-cp/-cn)
# makes Hydra import and call code. Each problem names its key and what is valid; exit code 2.

ALLOWED_TARGETS = ("dnnrun.cli.SweepReport",)  # besides Hydra's own launchers and sweepers
PLUGIN_PREFIXES = ("hydra_plugins.", "hydra._internal.core_plugins.")
SAMPLER = re.compile(r"optuna\.samplers\.[A-Z]\w*")  # Optuna's sampler classes, under hydra.sweeper
LOG_STREAMS = ("ext://sys.stdout", "ext://sys.stderr")  # the only `ext://` names a logging config may use
LOGGING = ("hydra.job_logging", "hydra.hydra_logging")  # handed to logging.config.dictConfig
RERUN_REFUSED = ("--experimental-rerun is not supported: it unpickles a file (which can run code) and skips "
                 "dnnrun's checks; run again with the overrides in RUN_DIR/.hydra/overrides.yaml")


def check_command_line(argv: list[str]) -> list[str]:
    """Every problem of a command line, [] if none (or if Hydra will refuse it itself: usage errors)."""
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args, unparsed = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return []  # a usage error, or --version: Hydra parses argv again and answers
    if unparsed or args.shell_completion:
        return []
    if args.experimental_rerun is not None:
        return [RERUN_REFUSED]
    if not args.overrides and not (args.config_path or args.config_name or args.config_dir):
        return []  # dnnrun's own config as shipped
    return check_overrides(list(args.overrides), multirun=args.multirun,
                           launching=not (args.cfg or args.info or args.hydra_help),
                           config_path=args.config_path, config_name=args.config_name, config_dir=args.config_dir)


def check_overrides(overrides: list[str], multirun: bool = False, launching: bool = True,
                    config_path: str | None = None, config_name: str | None = None,
                    config_dir: str | None = None) -> list[str]:
    """The problems of these overrides. The config is composed as Hydra composes it, hydra node
    and hydra.searchpath included; `launching`: also the run or sweep directory and the values, for
    the first value of every sweep and for each other value of each swept key or group in turn."""
    from hydra.core.object_type import ObjectType
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed, problems = [], []
    for text in overrides:
        try:
            parsed.append(parser.parse_override(text))
        except HydraException as exc:
            problems.append(f"{text}: {_message(exc)}")
    if problems:
        return problems
    choices = (ValueType.ELEMENT, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP)
    config_name = config_name or "config"
    with _config_loader(config_path, config_dir, problems) as loader:
        if loader is None:
            return problems
        try:  # the repository that composition uses: hydra.searchpath=[...] adds to it
            searchpath = [o.input_line for o in parsed if o.key_or_group == "hydra.searchpath"]
            repo = loader._parse_overrides_and_create_caching_repo(config_name, searchpath)[1]
        except HydraException as exc:
            return [_message(exc)]

        fixed: list[str] = [*searchpath]  # the group selections that are no sweep, to compose with
        group_sweeps: list[list[str]] = []  # each swept group's valid options, as overrides
        values = []  # the other overrides: applied to the composed config one by one, as Hydra does
        for o in parsed:
            key = o.key_or_group
            if key == "hydra.searchpath":
                continue
            if not repo.group_exists(key):
                values.append(o)
                continue
            if o.is_delete():
                fixed.append(o.input_line)
            if o.is_delete() or o.value_type not in choices:
                continue  # glob and range sweeps: Hydra expands and checks them
            options = repo.get_group_options(key, results_filter=ObjectType.CONFIG)
            pairs = zip(o.sweep_iterator(), o.sweep_string_iterator()) if o.is_sweep_override() \
                else [(o.value(), None)]
            valid = []
            for value, text in pairs:
                bad = [n for n in (value if isinstance(value, list) else [value]) if n is not None and str(n) not in options]
                problems += [f"{key}={n}: " + unknown(f"{key} option", n, options) for n in bad]
                if not bad:
                    valid.append(o.input_line if text is None else f"{o.get_key_element()}={text}")
            if valid and o.is_sweep_override():
                group_sweeps.append(valid)
            elif valid:
                fixed.append(valid[0])

        def compose(chosen: list[str]) -> DictConfig:
            return loader.load_configuration(config_name, chosen, RunMode.MULTIRUN if multirun else RunMode.RUN,
                                             validate_sweep_overrides=False)

        # The master config, as Hydra composes it before a run or a sweep: without the sweeps. Its
        # hydra node is the one whose callbacks, launcher and sweeper Hydra instantiates.
        try:
            master = compose(fixed)
        except (HydraException, OmegaConfBaseException) as exc:
            return problems + [_message(exc)]
        multirun = multirun or master.hydra.mode == RunMode.MULTIRUN
        if not multirun:
            try:
                loader.validate_sweep_overrides_legal(parsed, run_mode=RunMode.RUN, from_shell=True)
            except HydraException as exc:
                problems.append(_message(exc))
        applied, value_sweeps = [], []  # the overrides every job gets; each value of each swept key
        for o in values:
            if o.value_type not in choices:  # range, interval and glob sweeps: left to Hydra and its sweepers
                if _plain(o) and (missing := _missing_key(master, o.key_or_group)):
                    problems.append(missing)
                continue
            if o.is_sweep_override():
                value_sweeps.append([parser.parse_override(f"{o.get_key_element()}={s}")
                                     for s in o.sweep_string_iterator()])
            elif problem := _apply(o, master):
                problems.append(problem)
            else:
                applied.append(o)

        def job(groups: list[str], sweep_values: list) -> DictConfig | None:
            """A job's config: the master's overrides, these group options and these values."""
            try:
                cfg = compose([*fixed, *groups]) if groups else copy.deepcopy(master)
            except (HydraException, OmegaConfBaseException) as exc:
                problems.append(f"with {' '.join(groups)}: {_message(exc)}")
                return None
            label = " ".join(groups + [o.input_line for o in sweep_values])
            found = [_apply(o, cfg) for o in (applied if groups else []) + sweep_values]
            problems.extend(f"with {label}: {p}" if label else p for p in found if p and p not in problems)
            return None if any(found) else cfg

        # The jobs to check: the first of the sweep, then each other value of each swept key or
        # group in turn (the others at their first), so that every value is seen once.
        jobs = [("", master)]
        if multirun and (group_sweeps or value_sweeps):
            firsts = [s[0] for s in group_sweeps], [s[0] for s in value_sweeps]
            jobs = [("", job(*firsts))]
            for i, sweep in enumerate(group_sweeps):
                jobs += [(o, job([*firsts[0][:i], o, *firsts[0][i + 1:]], firsts[1])) for o in sweep[1:]]
            for i, sweep in enumerate(value_sweeps):
                jobs += [(o.input_line, job(firsts[0], [*firsts[1][:i], o, *firsts[1][i + 1:]])) for o in sweep[1:]]
            jobs = [(label, cfg) for label, cfg in jobs if cfg is not None]
        problems += _code_problems(master)
        for label, cfg in jobs:
            found = _code_problems(cfg)
            if launching:
                found += _directory_problems(master, cfg, multirun) + _value_problems(cfg)
            problems += [f"with {label}: {p}" if label else p for p in found if p not in problems]
    return list(dict.fromkeys(problems))


@contextlib.contextmanager
def _config_loader(config_path: str | None, config_dir: str | None, problems: list[str]):
    """Hydra's config loader with the search path that @hydra.main builds for these flags (the
    same calls as hydra._internal.utils._run_hydra); None after adding to `problems`."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import (create_automatic_config_search_path,
                                       detect_calling_file_or_module_from_task_function)
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    calling_file, calling_module = detect_calling_file_or_module_from_task_function(_task)
    search_path = create_automatic_config_search_path(calling_file, calling_module, config_path or str(CONFIG_DIR))
    if config_dir is not None:
        where = os.path.abspath(config_dir)
        if not os.path.isdir(where):
            problems.append(f"--config-dir: no directory {where}")
            yield None
            return
        search_path.prepend(provider="command-line", path=f"file://{where}", anchor=SearchPathQuery(provider="schema"))
    try:
        yield Hydra.create_main_hydra2(task_name="dnnrun", config_search_path=search_path).config_loader
    finally:
        GlobalHydra.instance().clear()


def _plain(override) -> bool:
    """An override that changes a value of dnnrun's config (key=value, no +, ++ or ~)."""
    return not (override.is_add() or override.is_force_add() or override.is_delete() or override.is_hydra_override())


def _apply(override, cfg: DictConfig) -> str | None:
    """Apply one override as Hydra does (its own code, for the same errors); the problem, if any."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import HydraException

    missing = _missing_key(cfg, override.key_or_group) if _plain(override) else None
    if missing:
        return missing  # names the valid keys, unlike Hydra's message
    try:
        ConfigLoaderImpl._apply_overrides_to_config([override], cfg)
    except HydraException as exc:
        return _message(exc)
    return None


def _directory_problems(master: DictConfig, cfg: DictConfig, multirun: bool) -> list[str]:
    """The run directory (a sweep's directory: the master config's) must lie under a job's outputs
    root: checked as _task checks it, before Hydra creates it."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        where, root = OmegaConf.select(master, key, throw_on_missing=True), cfg.outputs
    except OmegaConfBaseException:
        return []  # known only once Hydra launches: _task checks it then
    if not isinstance(root, str) or where is None:
        return []  # the value check reports a bad root
    outside = _outside_outputs(root, {key: Path(str(where))})
    return [outside] if outside else []


def _code_problems(cfg: DictConfig) -> list[str]:
    """Hydra instantiates hydra.callbacks, .launcher and .sweeper, any `_target_` nested in them
    too, and hands hydra.job_logging and hydra.hydra_logging to logging.config.dictConfig, which
    calls `()` factories and imports the names in `class` and `ext://` values. None of these may
    name code other than dnnrun's sweep report, Hydra's launchers and sweepers, Optuna's samplers
    and the classes of Python's logging."""
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    problems = []
    for path, value in _nodes(cfg.hydra, "hydra"):
        name = path.rpartition(".")[2]
        in_logging = path.startswith(tuple(f"{p}." for p in LOGGING))
        if isinstance(value, Exception):
            if name in ("_target_", "class", "()") or path == "hydra.sweeper.custom_search_space" or (
                    in_logging and not isinstance(value, (MissingMandatoryValue, InterpolationToMissingValueError))):
                problems.append(f"{path}: cannot be checked before the run ({_message(value)}); give it a plain value")
        elif name == "_target_":
            problems += _target_problems(path, value)
        elif path == "hydra.sweeper.custom_search_space" and value is not None:
            problems.append(f"{path}: {value!r} names a function for Optuna to call, which a config may not do; "
                            f"give the search space in hydra.sweeper.params instead")
        elif in_logging and name == "()":
            problems.append(f"{path}: a '()' factory calls any importable function and is not allowed in a "
                            f"logging config; give a handler or formatter with class: NAME (valid: "
                            f"{', '.join(sorted(_logging_classes()))})")
        elif in_logging and name == "class" and not (isinstance(value, str) and value in _logging_classes()):
            valid = sorted(_logging_classes())
            problems.append(f"{path}: {value!r} is not a class of Python's logging; valid: {', '.join(valid)}"
                            f"{did_you_mean(value, valid)}")
        elif in_logging and isinstance(value, str) and value.startswith("ext://") and value not in LOG_STREAMS:
            problems.append(f"{path}: {value!r} would import a module; valid: {', '.join(LOG_STREAMS)}")
    return problems


def _target_problems(path: str, target: object) -> list[str]:
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    plugins = sorted(name for name, cls in Plugins.instance().class_name_to_class.items()
                     if name.startswith(PLUGIN_PREFIXES) and issubclass(cls, (Launcher, Sweeper)))
    if target in ALLOWED_TARGETS or target in plugins:
        return []
    if path.startswith("hydra.sweeper.") and isinstance(target, str) and SAMPLER.fullmatch(target):
        return []
    return [f"{path}: {target!r} may not be instantiated; a config may name only {', '.join(ALLOWED_TARGETS)}, "
            f"an installed Hydra launcher or sweeper ({', '.join(plugins)}) or, under hydra.sweeper, an Optuna "
            f"sampler (optuna.samplers.NAME)"]


@functools.cache
def _logging_classes() -> frozenset[str]:
    """The handler and formatter classes of logging and logging.handlers, by the name a config gives."""
    import logging.handlers

    kinds = (logging.Handler, logging.Formatter, logging.Filter)
    return frozenset(f"{module.__name__}.{name}" for module in (logging, logging.handlers)
                     for name, obj in vars(module).items()
                     if isinstance(obj, type) and issubclass(obj, kinds) and not name.startswith("_"))


def _nodes(node, path: str):
    """(dotted path, resolved value) of every key under a config node, depth first; an exception
    in place of a value that cannot be resolved now."""
    from omegaconf import ListConfig

    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        where = f"{path}.{key}"
        try:
            value = node[key]
        except OmegaConfBaseException as exc:
            yield where, exc
            continue
        yield where, value
        if isinstance(value, (DictConfig, ListConfig)):
            yield from _nodes(value, where)


def _value_problems(cfg: DictConfig) -> list[str]:
    """What dnnrun's typed check (the one every run does first) finds in a composed config."""
    from omegaconf import open_dict, read_write
    from omegaconf.errors import InterpolationToMissingValueError

    from dnnrun.config import parse_run_config  # imports torch

    task, hydra_config = copy.deepcopy(cfg), HydraConfig.instance()
    previous = hydra_config.cfg
    try:
        hydra_config.set_config(copy.deepcopy(cfg))  # for ${hydra:...} in values, as in a run
        with read_write(task), open_dict(task):
            del task["hydra"]
        raw = OmegaConf.to_container(task, resolve=True)
    except InterpolationToMissingValueError:
        return []  # a value that only Hydra knows at launch (the run's directory ...): _task checks it
    except OmegaConfBaseException as exc:
        return [_message(exc)]
    finally:
        hydra_config.cfg = previous
    try:
        parse_run_config(raw)
    except ConfigError as exc:
        return exc.problems
    return []


def _message(exc: BaseException) -> str:
    """Hydra often wraps the real error (an OmegaConf one) in an exception with a vague message."""
    text = str(exc).strip()
    cause = str(exc.__cause__).strip() if exc.__cause__ is not None else ""
    if cause and cause not in text:
        text = f"{text}: {cause}" if text else cause
    return text or type(exc).__name__


def _missing_key(cfg: DictConfig, dotted: str) -> str | None:
    node, path = cfg, []
    for part in dotted.split("."):
        if not isinstance(node, DictConfig):
            return None
        if part not in node:
            where = ".".join(path) or "the top level"
            valid = [str(k) for k in node.keys()]
            return (
                f"{dotted}: unknown key '{part}' in {where}; valid: {', '.join(valid)}{did_you_mean(part, valid)}"
            )
        node, path = node[part], path + [part]
    return None


def _check_torch() -> None:
    """Checkpoint loading relies on torch.load(weights_only=True) with the fixes of PyTorch 2.10.

    Read from the package metadata: importing torch takes seconds, and a mistyped option should not wait.
    """
    from importlib.metadata import version

    installed = version("torch")
    major, minor = (int(re.match(r"\d+", part).group()) for part in installed.split(".")[:2])
    if (major, minor) < (2, 10):
        _error(f"dnnrun needs PyTorch 2.10 or later (its safe checkpoint loader); this is {installed}")
        sys.exit(EXIT_BAD_INPUT)


def _scratch_dir_for_other_ranks() -> None:
    """Under torchrun, ranks other than 0 run in a scratch directory: only rank 0 writes outputs/."""
    from dnnrun.distributed import launched_rank

    if launched_rank() > 0:
        scratch = tempfile.mkdtemp(prefix=f"dnnrun-rank{launched_rank()}-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        argv = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
        sys.argv[1:] = [*argv, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def _terminate(signum: int, frame) -> None:
    raise Interrupted(signum)


def main() -> None:
    # SIGTERM (docker stop, schedulers) stops dnnrun like Ctrl-C, also as a container's PID 1, which
    # gets no default signal handling; during training, train.run takes over to save first.
    signal.signal(signal.SIGTERM, _terminate)
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(help_text())
        return
    _check_torch()
    problems = check_command_line(sys.argv[1:])  # the same on every rank under torchrun: before its scratch dir
    if problems:
        _error(problems[0] if len(problems) == 1 else str(ConfigError(problems)))
        sys.exit(EXIT_BAD_INPUT)
    _scratch_dir_for_other_ranks()
    try:
        _task()
    except SystemExit as exc:
        if exc.code == EXIT_INTERNAL and not _sweep_failed and _sweep is not None and not _sweep_ended:
            sys.exit(EXIT_INTERNAL if _sweep_broke() else EXIT_BAD_INPUT)
        if exc.code == EXIT_INTERNAL and not _launched and not _sweep_failed:
            sys.exit(EXIT_BAD_INPUT)  # Hydra could not compose the config: it has printed why
        raise
    except Exception:  # HYDRA_FULL_ERROR=1: Hydra re-raises instead of printing; Python prints it
        if _sweep is not None and not _sweep_ended:
            _sweep_broke()
        raise
    except (Interrupted, KeyboardInterrupt) as exc:  # before or between runs: nothing to save
        _error(str(exc) or "interrupted")
        sys.exit(getattr(exc, "exit_code", EXIT_INTERRUPTED))
