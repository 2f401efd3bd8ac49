"""What a config may ask of Hydra, and where runs may write.

Hydra instantiates hydra.callbacks, .launcher and .sweeper (and any `_target_` nested in them),
hands hydra.job_logging and hydra.hydra_logging to logging.config.dictConfig (which calls `()`
factories and imports the names in `class` and `ext://` values), and Optuna's sweeper calls
hydra.sweeper.custom_search_space. None of these may name code other than dnnrun's sweep report,
Hydra's launchers and sweepers, Optuna's samplers and the classes of Python's logging."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, ListConfig
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue, OmegaConfBaseException

from dnnrun.cli.messages import explain
from dnnrun.schema import did_you_mean

ALLOWED_TARGETS = ("dnnrun.cli.SweepReport",)  # besides Hydra's own launchers and sweepers
SAMPLER = re.compile(r"optuna\.samplers\.[A-Z]\w*")  # Optuna's sampler classes, under hydra.sweeper
LOG_STREAMS = ("ext://sys.stdout", "ext://sys.stderr")  # the only `ext://` names a logging config may use
LOGGING = ("hydra.job_logging", "hydra.hydra_logging")  # handed to logging.config.dictConfig
SEARCH_SPACE = "hydra.sweeper.custom_search_space"  # a function Optuna's sweeper imports and calls


def code_problems(hydra: DictConfig) -> list[str]:
    """What in a composed config's hydra node would make Hydra import and call code."""
    problems = []
    for path, value in _nodes(hydra, "hydra"):
        name = path.rpartition(".")[2]
        in_logging = path.startswith(tuple(f"{p}." for p in LOGGING))
        if isinstance(value, Exception):
            if name in ("_target_", "class", "()") or path == SEARCH_SPACE or (
                    in_logging and not isinstance(value, (MissingMandatoryValue, InterpolationToMissingValueError))):
                problems.append(f"{path}: cannot be checked before the run ({explain(value)}); give it a plain value")
        elif name == "_target_":
            problems += _target_problems(path, value)
        elif path == SEARCH_SPACE and value is not None:
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
    plugins = _plugins()
    if target in ALLOWED_TARGETS or target in plugins:
        return []
    if path.startswith("hydra.sweeper.") and isinstance(target, str) and SAMPLER.fullmatch(target):
        return []
    return [f"{path}: {target!r} may not be instantiated; a config may name only {', '.join(ALLOWED_TARGETS)}, "
            f"an installed Hydra launcher or sweeper ({', '.join(plugins)}) or, under hydra.sweeper, an Optuna "
            f"sampler (optuna.samplers.NAME)"]


@functools.cache
def _plugins() -> tuple[str, ...]:
    """The installed launchers and sweepers, by the name Hydra instantiates them with."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    found = {f"{cls.__module__}.{cls.__name__}" for kind in (Launcher, Sweeper) for cls in Plugins.instance().discover(kind)}
    return tuple(sorted(name for name in found if Plugins.is_in_toplevel_plugins_module(name)))  # Hydra's own rule


@functools.cache
def _logging_classes() -> frozenset[str]:
    """The handler and formatter classes of logging and logging.handlers, by the name a config gives."""
    import logging
    import logging.handlers

    kinds = (logging.Handler, logging.Formatter, logging.Filter)
    return frozenset(f"{module.__name__}.{name}" for module in (logging, logging.handlers)
                     for name, obj in vars(module).items()
                     if isinstance(obj, type) and issubclass(obj, kinds) and not name.startswith("_"))


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
            return (f"{what} resolves to {path.resolve()}, outside the outputs root {base}; choose a directory "
                    f"under it, or set the root: outputs=DIR")
    return None
