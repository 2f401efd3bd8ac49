"""The command line. The only module that imports Hydra: it composes the config, turns it into
plain typed objects and calls `train.run(cfg, run_dir)`."""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
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
                           Diverged, Interrupted, RunError, UserError)
from dnnrun.schema import did_you_mean, unknown


def _config_dir() -> Path:
    """conf/ inside the installed package (wheel), else the source checkout's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise SystemExit(f"dnnrun: no config.yaml in {here / 'conf'} or {here.parent / 'conf'}; reinstall dnnrun")


CONFIG_DIR = _config_dir()
_launched = False  # set once Hydra has composed the config: tells its composition errors (bad input) from the rest
_sweep_failed = False  # set by SweepReport: some job of the sweep did not complete


def _error(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _task(cfg: DictConfig) -> float | None:
    """One run, or one job of a sweep. A run refused before it begins (bad config, occupied or
    forbidden directory, unfitting checkpoint) leaves its directory as it found it; in a sweep its
    failure is kept in SWEEP_DIR/N_rejected. Otherwise the run's status.json records how it ended,
    and a failing job lets the others go on: the sweep's end (SweepReport) lists the failures."""
    from dnnrun import distributed, sweeps  # torch is imported here, after Hydra has parsed argv
    from dnnrun.console import console

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
        previous = sweeps.status(run_dir) or {}
        if previous.get("status") == "completed" and previous.get("job", {}).get("overrides") == job["overrides"]:
            logging.getLogger("dnnrun").info("job %s already completed in %s: skipped", hc.job.num, run_dir)
            return sweeps.read_run(run_dir).get(_monitor(cfg))
    if refusal is not None:
        code, value, failure, started = EXIT_BAD_INPUT, None, UserError(refusal), False
        _error(refusal)
    else:
        try:
            code, value, failure, started = _run(cfg, run_dir, hc, sweeping, rank)
        finally:
            distributed.shutdown()
    if rank == 0:
        if started:
            _record(code, failure, run_dir, job)
        else:
            _remove_if_empty(run_dir)  # Hydra made it for this run
            if rejected is not None:
                _record(code, failure, rejected, job)
        if in_sweep:
            sweeps.update_table(sweep_dir)
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
    from dnnrun import sweeps

    sweeps.write_status(run_dir, STATUS_OF_EXIT.get(code, "failed"), code, job, _describe(failure))


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
    from dnnrun import evaluate, lr_find, train
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
        summary = train.run(run_cfg, run_dir if rank == 0 else Path(hc.runtime.output_dir), on_start=start)
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
    import os

    import torch

    trainer = run_cfg.trainer
    launcher = OmegaConf.select(hc, "launcher._target_", default="") or ""
    if "joblib" in launcher:  # several jobs share this machine's cores and GPUs
        cores = os.cpu_count() or 1
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


def _remove_if_empty(run_dir: Path) -> None:
    """A run refused before it began leaves no empty directory behind (Hydra makes it first)."""
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


class SweepReport(Callback):
    """At the end of a sweep: rewrite sweep.csv, list every job that did not complete, and make
    the sweep exit non-zero if there was one (configured in conf/config.yaml: hydra.callbacks).
    It also notes when Hydra has composed the config and launches: a failure after that is not a
    config error."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        global _launched
        _launched = True

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        global _launched
        _launched = True

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        global _sweep_failed
        from dnnrun import sweeps

        rows = sweeps.update_table(Path(config.hydra.sweep.dir))
        failed = [r for r in rows if r["status"] != "completed"]
        print(f"sweep: {len(rows) - len(failed)} of {len(rows)} jobs completed; table: {config.hydra.sweep.dir}/sweep.csv")
        for row in failed:
            _error(f"job {row['job']} ({row['overrides'] or 'no overrides'}): {row['status']}"
                   + (f": {row['error']}" if row.get("error") else ""))
        if failed:
            _sweep_failed = True
            raise SystemExit(EXIT_INTERNAL)


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
# Command-line overrides are checked before Hydra runs, so that a typo in an option or a key gets
# the list of valid names, a suggestion and exit code 2.


def check_overrides(overrides: list[str]) -> list[str]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
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
    first_choices: list[str] = []  # the group selections, first value of each sweep, to compose with
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="dnnrun"):
        loader = GlobalHydra.instance().config_loader()

        def is_group(key: str) -> bool:
            parent, _, name = key.rpartition("/")
            return name in loader.list_groups(parent)

        for o in parsed:
            key = o.key_or_group
            if o.is_delete() or key.startswith("hydra") or not is_group(key):
                continue
            if o.value_type not in (ValueType.ELEMENT, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP):
                continue  # glob and range sweeps: Hydra expands and checks them
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            options = loader.get_group_options(key, results_filter=ObjectType.CONFIG)
            for value in values:
                for name in value if isinstance(value, list) else [value]:
                    if name is not None and str(name) not in options:
                        problems.append(f"{key}={name}: " + unknown(f"{key} option", name, options))
            first = values[0]
            first_choices.append(
                f"{o.get_key_element()}=" + (f"[{','.join(map(str, first))}]" if isinstance(first, list) else str(first))
            )
        if problems:
            return problems
        try:
            cfg = compose("config", overrides=first_choices)
        except HydraException as exc:
            return [_message(exc)]
        for o in parsed:
            key = o.key_or_group
            if o.is_add() or o.is_force_add() or o.is_delete() or key.startswith("hydra") or is_group(key):
                continue
            problem = _missing_key(cfg, key)
            if problem:
                problems.append(problem)
    return problems


def _message(exc: BaseException) -> str:
    """Hydra sometimes wraps the real error (an OmegaConf one) in an exception with no message."""
    text = str(exc).strip()
    if not text and exc.__cause__ is not None:
        text = str(exc.__cause__).strip()
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


def _overrides_from_argv(argv: list[str]) -> list[str] | None:
    """The overrides on the command line, or None when Hydra's own flags change where configs come from."""
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, unparsed = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return None  # Hydra parses argv again and reports its own usage error
    if unparsed or args.config_path or args.config_name or args.config_dir or args.hydra_help or args.info:
        return None
    return list(args.overrides)


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
    _scratch_dir_for_other_ranks()
    overrides = _overrides_from_argv(sys.argv[1:])
    if overrides:
        problems = check_overrides(overrides)
        if problems:
            _error("\n".join(problems))
            sys.exit(EXIT_BAD_INPUT)
    try:
        _task()
    except SystemExit as exc:
        if exc.code == EXIT_INTERNAL and not _launched and not _sweep_failed:
            sys.exit(EXIT_BAD_INPUT)  # Hydra could not compose the config: it has printed why
        raise
    except (Interrupted, KeyboardInterrupt) as exc:  # before or between runs: nothing to save
        _error(str(exc) or "interrupted")
        sys.exit(getattr(exc, "exit_code", EXIT_INTERRUPTED))
