"""What a config may ask of Hydra, and where runs may write.

Hydra instantiates hydra.callbacks, .launcher and .sweeper (and any `_target_` nested in them),
hands hydra.job_logging and hydra.hydra_logging to logging.config.dictConfig (which calls `()`
factories and imports the names in `class` and `ext://` values). None of these may name code other
than dnnrun's sweep report, Hydra's launchers and sweepers, Optuna's samplers and the classes of
Python's logging."""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue, OmegaConfBaseException

from dnnrun.cli.messages import explain
from dnnrun.config.schema import did_you_mean

ALLOWED_TARGETS = ("dnnrun.cli.SweepReport",)  # besides Hydra's own launchers and sweepers
SAMPLER = re.compile(r"optuna\.samplers\.[A-Z]\w*")  # Optuna's sampler classes, under hydra.sweeper
LOG_STREAMS = ("ext://sys.stdout", "ext://sys.stderr")  # the only `ext://` names a logging config may use
LOGGING = ("hydra.job_logging", "hydra.hydra_logging")  # handed to logging.config.dictConfig


def code_problems(hydra: DictConfig) -> list[str]:
    """What in a composed config's hydra node would make Hydra import and call code."""
    problems = []
    for path, value in _nodes(hydra, "hydra"):
        name = path.rpartition(".")[2]
        in_logging = path.startswith(tuple(f"{p}." for p in LOGGING))
        if isinstance(value, Exception):
            if name in ("_target_", "class", "()") or (
                in_logging and not isinstance(value, (MissingMandatoryValue, InterpolationToMissingValueError))
            ):
                problems.append(unresolved(path, value))
        elif name == "_target_":
            problems += _target_problems(path, value)
        elif in_logging and name == "()":
            problems.append(
                f"{path}: a '()' factory calls any importable function and is not allowed in a "
                f"logging config; give a handler or formatter with class: NAME (valid: "
                f"{', '.join(sorted(_logging_classes()))})"
            )
        elif in_logging and name == "class" and not (isinstance(value, str) and value in _logging_classes()):
            valid = sorted(_logging_classes())
            problems.append(
                f"{path}: {value!r} is not a class of Python's logging; valid: {', '.join(valid)}"
                f"{did_you_mean(value, valid)}"
            )
        elif in_logging and isinstance(value, str) and value.startswith("ext://") and value not in LOG_STREAMS:
            problems.append(f"{path}: {value!r} would import a module; valid: {', '.join(LOG_STREAMS)}")
    return problems


def unresolved(path: str, exc: Exception) -> str:
    """A setting whose value is known only when Hydra runs, so that no check can see it now."""
    return f"{path}: cannot be checked before the run ({explain(exc)}); give it a plain value"


def _target_problems(path: str, target: object) -> list[str]:
    plugins = _plugins()
    if target in ALLOWED_TARGETS or target in plugins:
        return []
    if path.startswith("hydra.sweeper.") and isinstance(target, str) and SAMPLER.fullmatch(target):
        return []
    return [
        f"{path}: {target!r} may not be instantiated; a config may name only {', '.join(ALLOWED_TARGETS)}, "
        f"an installed Hydra launcher or sweeper ({', '.join(plugins)}) or, under hydra.sweeper, an Optuna "
        f"sampler (optuna.samplers.NAME)"
    ]


@functools.cache
def _plugins() -> tuple[str, ...]:
    """The installed launchers and sweepers, by the name Hydra instantiates them with."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    found = {
        f"{cls.__module__}.{cls.__name__}" for kind in (Launcher, Sweeper) for cls in Plugins.instance().discover(kind)
    }
    return tuple(sorted(name for name in found if Plugins.is_in_toplevel_plugins_module(name)))  # Hydra's own rule


@functools.cache
def _logging_classes() -> frozenset[str]:
    """The handler and formatter classes of logging and logging.handlers, by the name a config gives."""
    import logging
    import logging.handlers

    kinds = (logging.Handler, logging.Formatter, logging.Filter)
    return frozenset(
        f"{module.__name__}.{name}"
        for module in (logging, logging.handlers)
        for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, kinds) and not name.startswith("_")
    )


def _nodes(node: DictConfig | ListConfig, path: str) -> Iterator[tuple[str, object]]:
    """(dotted path, resolved value) of every key under a config node, depth first; an exception
    in place of a value that cannot be resolved now."""
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


def outside_outputs(root: str, places: dict[str, Path]) -> str | None:
    """Runs write only under the outputs root; writing elsewhere takes setting that root (outputs=...).
    places: {what the user would call it: the directory}."""
    base = Path(root).expanduser().resolve()
    for what, path in places.items():
        if not path.resolve().is_relative_to(base):
            return (
                f"{what} resolves to {path.resolve()}, outside the outputs root {base}; choose a directory "
                f"under it, or set the root: outputs=DIR"
            )
    return None


# ---------------------------------------------------------------------------------------------
# The settings of the launchers and sweepers that docs/sweeps-and-clusters.md documents: an
# allow-list. Each setting is a plain value, a path (under the outputs root), a line (one line of
# text: submitit writes it into the sbatch script), or never set (a shell line or command: setup,
# srun_args). A setting not listed here is refused rather than passed through.

VALUE, PATH, LINE, NEVER, SBATCH, STORAGE = "value", "path", "line", "never", "sbatch", "storage"
COUNT, FRACTION, DIRECTION, PRUNER = "count", "fraction", "direction", "pruner"
DIRECTIONS = ("minimize", "maximize")
_SUBMITIT = {
    "submitit_folder": PATH,
    "timeout_min": VALUE,
    "cpus_per_task": VALUE,
    "gpus_per_node": VALUE,
    "tasks_per_node": VALUE,
    "mem_gb": VALUE,
    "nodes": VALUE,
    "name": LINE,
    "stderr_to_stdout": VALUE,
}
PLUGIN_SETTINGS = {
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher": {},
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper": {"max_batch_size": VALUE, "params": VALUE},
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher": {
        "n_jobs": VALUE,
        "backend": VALUE,
        "prefer": VALUE,
        "require": VALUE,
        "verbose": VALUE,
        "timeout": VALUE,
        "pre_dispatch": VALUE,
        "batch_size": VALUE,
        "temp_folder": PATH,
        "max_nbytes": VALUE,
        "mmap_mode": VALUE,
    },
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher": _SUBMITIT,
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher": {
        **_SUBMITIT,
        "partition": LINE,
        "qos": LINE,
        "comment": LINE,
        "constraint": LINE,
        "exclude": LINE,
        "gres": LINE,
        "cpus_per_gpu": VALUE,
        "gpus_per_task": VALUE,
        "mem_per_gpu": LINE,
        "mem_per_cpu": LINE,
        "account": LINE,
        "signal_delay_s": VALUE,
        "max_num_timeout": VALUE,
        "array_parallelism": VALUE,
        "additional_parameters": SBATCH,
        "setup": NEVER,
        "srun_args": NEVER,
    },
    "hydra_plugins.dnnrun_optuna.optuna_sweeper.OptunaSweeper": {
        "sampler": VALUE,
        "direction": DIRECTION,
        "storage": STORAGE,
        "study_name": LINE,
        "n_trials": COUNT,
        "n_jobs": COUNT,
        "pruner": PRUNER,
        "max_failure_rate": FRACTION,
        "params": VALUE,
    },  # the sampler's _target_: code_problems
}
# sbatch options that hydra.launcher.additional_parameters may set (one line each); none runs a program.
SBATCH_OPTIONS = (
    "mail_type",
    "mail_user",
    "time",
    "begin",
    "deadline",
    "reservation",
    "licenses",
    "hint",
    "nice",
    "requeue",
    "wckey",
    "cluster",
    "clusters",
    "priority",
    "mem",
    "ntasks",
    "distribution",
)


def plugin_problems(hydra: DictConfig, root: str | None) -> list[str]:
    """What the launcher's and sweeper's settings would do beyond running dnnrun's jobs: run a shell
    line, write outside the outputs root, or anything dnnrun does not know (refused)."""
    problems = []
    for node in ("launcher", "sweeper"):
        settings = hydra.get(node)
        target = settings.get("_target_") if isinstance(settings, DictConfig) else None
        allowed = PLUGIN_SETTINGS.get(target)
        if allowed is None:
            if target in _plugins():  # installed, but dnnrun does not know what its settings do (else code_problems)
                known = ", ".join(t.rpartition(".")[2] for t in PLUGIN_SETTINGS)
                problems.append(
                    f"hydra.{node}: {target} is not a plugin whose settings dnnrun knows; supported: {known}"
                )
            continue
        for key in settings:
            if key == "_target_":
                continue
            path = f"hydra.{node}.{key}"
            kind = allowed.get(key)
            try:
                value = settings[key]
            except OmegaConfBaseException as exc:
                problems.append(unresolved(path, exc))
                continue
            if kind is None:
                problems.append(
                    f"{path}: not a setting dnnrun passes to {target.rpartition('.')[2]}; valid: "
                    f"{', '.join(allowed) or 'none'}{did_you_mean(key, allowed)}"
                )
            else:
                problems += _setting_problems(path, kind, value, root)
        if node == "launcher" and "signal_delay_s" in allowed:
            problems += _signal_delay_problems(settings)
        if node == "sweeper" and allowed.get("storage") == STORAGE and settings.get("storage") is None:
            from dnnrun.cli.search import STORAGE_ENV, storage_problem

            if os.environ.get(STORAGE_ENV):  # the storage given in the environment instead
                problems += filter(None, [storage_problem(STORAGE_ENV, os.environ[STORAGE_ENV], root)])
    return problems


def _signal_delay_problems(settings: DictConfig) -> list[str]:
    """Slurm sends SIGUSR2 signal_delay_s before the time limit; submitit handles it only once the
    job has started (seconds in): a delay as long as the limit kills the job instead of requeuing it."""
    try:
        delay, limit = settings.get("signal_delay_s"), settings.get("timeout_min")
    except OmegaConfBaseException:
        return []  # said by the settings' own checks
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (delay, limit))
    if numbers and delay > limit * 60 - 10:
        return [
            f"hydra.launcher.signal_delay_s: {delay} s before a time limit of {limit * 60:g} s "
            f"(hydra.launcher.timeout_min={limit}) comes before the job can handle it; give a delay at least "
            f"10 s shorter than the limit"
        ]
    return []


def _setting_problems(path: str, kind: str, value: object, root: str | None) -> list[str]:
    if value is None:
        return []
    if kind == NEVER and not (isinstance(value, (str, ListConfig, DictConfig)) and len(value) == 0):
        return [
            f"{path}: runs as a shell line or a program in the job's script, which a config may not do; "
            f"prepare the environment before calling dnnrun (the job inherits it)"
        ]
    if kind == LINE and isinstance(value, str) and ("\n" in value or "\r" in value):
        return [f"{path}: must be one line (submitit writes it into the job's script), got {value!r}"]
    if kind == PATH and root is not None:
        outside = outside_outputs(root, {path: Path(str(value).split("%", 1)[0])})
        return [outside] if outside else []
    if kind == STORAGE:
        from dnnrun.cli.search import storage_problem

        problem = storage_problem(path, str(value), root)
        return [problem] if problem else []
    if kind == COUNT and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        return [f"{path}: must be a whole number of at least 1, got {value!r}"]
    if kind == FRACTION and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        return [f"{path}: must be a number from 0 to 1, got {value!r}"]
    if kind == DIRECTION and value not in DIRECTIONS:
        return [f"{path}: must be minimize or maximize, got {value!r}{did_you_mean(str(value), DIRECTIONS)}"]
    if kind == PRUNER:
        from dnnrun.cli.search import PRUNERS, pruner_problem

        return [] if value in PRUNERS else [pruner_problem(str(value))]
    if kind == SBATCH and isinstance(value, DictConfig):
        found = []
        for option, setting in value.items():
            if option not in SBATCH_OPTIONS:
                found.append(
                    f"{path}.{option}: not an sbatch option dnnrun passes on; valid: "
                    f"{', '.join(SBATCH_OPTIONS)}{did_you_mean(option, SBATCH_OPTIONS)}"
                )
            elif "\n" in str(setting) or "\r" in str(setting):
                found.append(f"{path}.{option}: must be one line, got {setting!r}")
        return found
    return []


def logging_file_problems(hydra: DictConfig, where: str | None) -> list[str]:
    """A logging handler writes only inside the run (or sweep) directory: a `filename` that resolves
    now must lie there; one that does not must start from the job's directory (hydra.runtime.output_dir)."""
    problems = []
    for node in LOGGING:
        handlers = OmegaConf.select(hydra, f"{node.removeprefix('hydra.')}.handlers", default=None)
        if not isinstance(handlers, DictConfig):
            continue
        for name in handlers:
            path = f"{node}.handlers.{name}.filename"
            raw = (
                OmegaConf.to_container(handlers[name], resolve=False).get("filename")
                if isinstance(handlers[name], DictConfig)
                else None
            )
            if raw is None:
                continue
            rest = re.sub(r"^\$\{hydra[.:]runtime\.output_dir\}/", "", str(raw))
            if (
                rest != str(raw)
                and ".." not in Path(rest).parts
                and not re.sub(r"\$\{hydra[.:]job\.(name|num|id)\}", "", rest).count("${")
            ):
                continue  # inside the job's own directory (named after the job, perhaps)
            try:
                filename = Path(str(OmegaConf.select(hydra, path.removeprefix("hydra."), throw_on_missing=True)))
            except OmegaConfBaseException:
                problems.append(
                    f"{path}: {raw!r} cannot be checked before the run; give a path that starts with "
                    "${hydra:runtime.output_dir}/"
                )
                continue
            inside = where is not None and filename.resolve().is_relative_to(Path(where).resolve())
            if not inside:
                problems.append(
                    f"{path}: {str(filename)!r} lies outside the run's directory; a log file goes inside "
                    "it: ${hydra:runtime.output_dir}/NAME.log"
                )
    return problems


# What a job's directory name (hydra.sweep.subdir) may interpolate: what Hydra knows of the job.
SUBDIR_INTERPOLATIONS = re.compile(
    r"\$\{(hydra[.:]job\.(num|id|name|override_dirname)|dnnrun\.digest:[^{}]*(\$\{hydra[.:]job\.\w+\}[^{}]*)?)\}"
)


def subdir_problems(hydra: DictConfig) -> list[str]:
    """A sweep's jobs stay inside its directory: hydra.sweep.subdir is relative, without `..`, and
    interpolates only what Hydra knows of the job (it is known only when each job starts, so its
    text is checked: `${oc.env:...}` could lead anywhere)."""
    sweep = hydra.get("sweep")
    raw = OmegaConf.to_container(sweep, resolve=False).get("subdir") if isinstance(sweep, DictConfig) else None
    if not isinstance(raw, str):
        return []
    rest = SUBDIR_INTERPOLATIONS.sub("x", raw)
    if Path(raw).is_absolute() or ".." in Path(rest).parts or "${" in rest:
        return [
            f"hydra.sweep.subdir: {raw!r} may lead out of the sweep's directory; give a relative path without '..' "
            "that interpolates only ${hydra.job.num}, ${hydra.job.id}, ${hydra.job.override_dirname} or "
            "${dnnrun.digest:...}"
        ]
    return []


# ---------------------------------------------------------------------------------------------
# Hydra's own namespace: what of it a config may set, each with its check; everything else is
# refused. (The launcher's and sweeper's settings, the callbacks and the logging configs have
# their own lists above; the run and sweep directories are checked where they are resolved.)

CHECKED = "checked apart"  # by code_problems, plugin_problems, logging_file_problems, the directory checks
ANY = "any plain value"
HYDRAS_OWN = "Hydra's record"  # Hydra writes these itself as it composes and runs: a config's value is overwritten
# Environment variables a job may have set (hydra.job.env_set) or copied (env_copy): thread counts,
# the GPUs a job sees, the data root. Never what the dynamic loader, a compiler or Python reads
# (LD_PRELOAD, CXX, PYTHONPATH, ...), nor dnnrun's test hooks (DNNRUN_FAULT).
ENV_VARIABLES = {
    "OMP_NUM_THREADS": r"\d+",
    "MKL_NUM_THREADS": r"\d+",
    "OPENBLAS_NUM_THREADS": r"\d+",
    "NUMEXPR_NUM_THREADS": r"\d+",
    "CUDA_VISIBLE_DEVICES": r"[\w,-]*",  # indices or GPU UUIDs
    "DNNRUN_DATA": r"[^\n\r]+",  # where datasets are cached (data.root's default)
}
HYDRA_SETTINGS: dict = {
    "run": {"dir": CHECKED},
    "sweep": {"dir": CHECKED, "subdir": CHECKED},
    "launcher": CHECKED,
    "sweeper": CHECKED,
    "callbacks": CHECKED,
    "job_logging": CHECKED,
    "hydra_logging": CHECKED,
    "help": ANY,  # --help's templates
    "hydra_help": ANY,
    "verbose": ANY,
    "mode": ANY,
    "searchpath": ANY,  # where configs are read from: what they hold is checked like the rest
    "env": "empty",
    "output_subdir": "output_subdir",
    "overrides": HYDRAS_OWN,
    "runtime": HYDRAS_OWN,
    "job": {
        "name": "name",
        "chdir": "chdir",
        "env_set": "env_set",
        "env_copy": "env_copy",
        "override_dirname": HYDRAS_OWN,
        "id": HYDRAS_OWN,
        "num": HYDRAS_OWN,
        "config_name": HYDRAS_OWN,
        "config": {"override_dirname": {"kv_sep": "line", "item_sep": "line", "exclude_keys": ANY}},
    },
}


def hydra_problems(hydra: DictConfig, spec: dict | None = None, path: str = "hydra") -> list[str]:
    """What a composed config's hydra node sets outside HYDRA_SETTINGS, or against its check."""
    spec = HYDRA_SETTINGS if spec is None else spec
    problems = []
    for key in hydra.keys():
        where = f"{path}.{key}"
        rule = spec.get(key)
        if rule is None:
            valid = [str(k) for k in spec]
            problems.append(
                f"{where}: not a Hydra setting a config may change; valid under {path}: {', '.join(valid)}"
                f"{did_you_mean(key, valid)}"
            )
            continue
        if rule in (CHECKED, ANY, HYDRAS_OWN):
            continue
        try:
            value = hydra[key]
        except OmegaConfBaseException as exc:
            problems.append(unresolved(where, exc))
            continue
        if isinstance(rule, dict):
            if isinstance(value, DictConfig):
                problems += hydra_problems(value, rule, where)
            elif value is not None:
                problems.append(f"{where}: expected a mapping, got {value!r}")
            continue
        problems += _HYDRA_CHECKS[rule](where, value)
    return problems


def _empty(where: str, value: object) -> list[str]:
    return [] if not value else [f"{where}: dnnrun uses no setting here; leave it empty, got {value!r}"]


def _output_subdir(where: str, value: object) -> list[str]:
    """Hydra's config snapshot goes inside the run directory, or nowhere (null: dnnrun writes .hydra/)."""
    if value is None:
        return []
    path = Path(str(value))
    if path.is_absolute() or ".." in path.parts or "${" in str(value) or not str(value).strip():
        return [f"{where}: {value!r} leads out of the run directory; give a relative name such as .hydra, or null"]
    return []


def _job_name(where: str, value: object) -> list[str]:
    if isinstance(value, str) and re.fullmatch(r"[\w.-]+", value) and value not in (".", ".."):
        return []
    return [f"{where}: {value!r} names files of the job (NAME.log): letters, digits, '.', '_' and '-' only"]


def _chdir(where: str, value: object) -> list[str]:
    if value is False or value is None:
        return []
    return [
        f"{where}: dnnrun keeps the working directory (relative paths, the outputs root among them, are read from "
        "where dnnrun starts, and every run writes to its own directory anyway); leave it false"
    ]


def _env_set(where: str, value: object) -> list[str]:
    if not isinstance(value, DictConfig):
        return [] if not value else [f"{where}: expected a mapping of variables, got {value!r}"]
    problems = []
    for name in value:
        pattern = ENV_VARIABLES.get(str(name))
        try:
            setting = value[name]
        except OmegaConfBaseException as exc:
            problems.append(unresolved(f"{where}.{name}", exc))
            continue
        if pattern is None:
            problems.append(_env_refused(f"{where}.{name}"))
        elif not re.fullmatch(pattern, str(setting)):
            problems.append(f"{where}.{name}: {setting!r} is not a value for it (expected {pattern})")
    return problems


def _env_copy(where: str, value: object) -> list[str]:
    return [_env_refused(f"{where}: {name}") for name in (value or []) if str(name) not in ENV_VARIABLES]


def _env_refused(what: str) -> str:
    return (
        f"{what}: a config may set only {', '.join(ENV_VARIABLES)} for a job (thread counts, the GPUs it sees, the "
        "data root); not what the loader, a compiler or Python reads, nor dnnrun's test hooks"
    )


def _line(where: str, value: object) -> list[str]:
    return [f"{where}: must be one line, got {value!r}"] if "\n" in str(value) or "\r" in str(value) else []


_HYDRA_CHECKS = {
    "empty": _empty,
    "output_subdir": _output_subdir,
    "name": _job_name,
    "chdir": _chdir,
    "env_set": _env_set,
    "env_copy": _env_copy,
    "line": _line,
}


def unwritable(path: Path, what: str) -> str | None:
    """Why a directory cannot be made at `path` (a file in the way, a folder it may not write in),
    or None: checked before Hydra makes it, which would end in a traceback. The nearest folder that
    exists is tried for real (a folder made and removed at once: permissions alone do not tell of a
    read-only or special file system)."""
    path = Path(path).expanduser().absolute()
    for parent in [path, *path.parents]:
        if not parent.exists():
            continue
        if not parent.is_dir():
            return f"{what} cannot be made: {parent} is a file, not a folder"
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".dnnrun-probe-", dir=parent))
        except OSError as exc:
            return f"{what} cannot be made: dnnrun cannot write in {parent} ({exc.strerror or exc})"
        return None
    return None
