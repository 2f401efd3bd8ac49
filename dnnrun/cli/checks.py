"""The pre-flight check of a command line, before Hydra runs: all of it at once and before anything
is trained or created. Option names, keys and values (every value of a sweep), where the run or
sweep directory lies, and that no config (the command line, a hydra.searchpath directory,
-cd/-cp/-cn) makes Hydra import and call code. Each problem names its key and what is valid; the
command line then exits 2.

The config is composed as @hydra.main composes it (compose.py). The run or sweep directory checked
is handed back as an override (`Preflight.pins`), so that Hydra uses exactly that one."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
from pathlib import Path

from hydra.core.override_parser.types import ValueType
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue, OmegaConfBaseException

from dnnrun.cli.compose import COMPOSE_ERRORS, Composer, Refused, composer_for, parse, quoted
from dnnrun.cli.conf import CONFIG_NAME
from dnnrun.cli.messages import error, explain
from dnnrun.cli.rules import (
    code_problems,
    hydra_problems,
    logging_file_problems,
    outside_outputs,
    plugin_problems,
    subdir_problems,
    unwritable,
)
from dnnrun.config.schema import did_you_mean, unknown
from dnnrun.errors import EXIT_BAD_INPUT, ConfigError

# what the check expands: values, choices and ranges (finite: data.fold='range(5)');
# glob and interval sweeps are Hydra's
CHOICES = (ValueType.ELEMENT, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP)
RERUN_REFUSED = (
    "--experimental-rerun is not supported: it unpickles a file (which can run code) and skips "
    "dnnrun's checks; run a finished run again with dnnrun rerun=RUN_DIR"
)


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What the check found, and what the command line hands on to Hydra."""

    problems: list[str]
    pins: tuple[str, ...] = ()  # overrides to add: the run or sweep directory as checked (hydra.run.dir=...)
    sweep_dir: Path | None = None  # the directory of the sweep about to start, when pinned
    launcher: str = ""  # the `_target_` of the sweep's launcher
    outputs: str | None = None  # the outputs root, as checked
    argv: tuple[str, ...] = ()  # the command line for Hydra: the one checked, with the pins among its overrides


def check_command_line(argv: list[str]) -> list[str]:
    """Every problem of a command line, [] if none (or if Hydra will refuse it itself: usage errors)."""
    return preflight(argv).problems


def check_overrides(
    overrides: list[str],
    multirun: bool = False,
    launching: bool = True,
    config_path: str | None = None,
    config_name: str | None = None,
    config_dir: str | None = None,
) -> list[str]:
    """The problems of these overrides. The config is composed as Hydra composes it, hydra node
    and hydra.searchpath included; `launching`: also the run or sweep directory and the values, for
    the first value of every sweep and for each other value of each swept key or group in turn."""
    return _check(overrides, multirun, launching, config_path, config_name, config_dir).problems


def check_torch() -> None:
    """Checkpoint loading relies on torch.load(weights_only=True) with the fixes of PyTorch 2.10.

    Read from the package metadata: importing torch takes seconds, and a mistyped option should not wait.
    """
    from importlib.metadata import version

    installed = version("torch")
    major, minor = (int(re.match(r"\d+", part).group()) for part in installed.split(".")[:2])
    if (major, minor) < (2, 10):
        error(f"dnnrun needs PyTorch 2.10 or later (its safe checkpoint loader); this is {installed}")
        sys.exit(EXIT_BAD_INPUT)


# ---------------------------------------------------------------------------------------------
# argv, read as Hydra reads it (hydra.main's flags)


class _Unparsed(Exception):
    """argv that Hydra's own parser would refuse: Hydra answers it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _Unparsed(message)


def _args_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dnnrun", add_help=False)
    parser.add_argument("--help", "-h", action="store_true")
    parser.add_argument("--hydra-help", action="store_true")
    parser.add_argument("--version", action="store_true")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--cfg", "-c", choices=["job", "hydra", "all"])
    parser.add_argument("--resolve", action="store_true")
    parser.add_argument("--package", "-p")
    parser.add_argument("--run", "-r", action="store_true")
    parser.add_argument("--multirun", "-m", action="store_true")
    parser.add_argument("--shell-completion", "-sc", action="store_true")
    parser.add_argument("--config-path", "-cp")
    parser.add_argument("--config-name", "-cn")
    parser.add_argument("--config-dir", "-cd")
    parser.add_argument("--experimental-rerun")
    parser.add_argument(
        "--info",
        "-i",
        nargs="?",
        const="all",
        choices=["all", "config", "defaults", "defaults-tree", "plugins", "searchpath"],
    )
    return parser


def preflight(argv: list[str]) -> Preflight:
    """The check of a command line, and the command line for Hydra, its run or sweep directory pinned."""
    unchecked = Preflight([], argv=tuple(argv))
    try:
        args, unparsed = _args_parser().parse_known_args(argv)
    except _Unparsed:
        return unchecked  # a usage error: Hydra parses argv again and says what is wrong
    if unparsed or args.version or args.shell_completion:
        return unchecked
    if args.experimental_rerun is not None:
        return dataclasses.replace(unchecked, problems=[RERUN_REFUSED])
    shown = [flag for flag, given in (("--cfg", args.cfg), ("--info", args.info)) if given]
    if shown and (args.multirun or args.run):
        mode = "-m (--multirun)" if args.multirun else "--run"
        return dataclasses.replace(
            unchecked,
            problems=[
                f"{shown[0]} prints one composed config and runs nothing; drop {mode} (a sweep's "
                f"comma-separated values: give one of them)"
            ],
        )
    if not args.overrides and not (args.config_path or args.config_name or args.config_dir):
        return unchecked  # dnnrun's own config as shipped
    checked = _check(
        list(args.overrides),
        multirun=args.multirun,
        launching=not (args.cfg or args.info or args.hydra_help),
        config_path=args.config_path,
        config_name=args.config_name,
        config_dir=args.config_dir,
    )
    return dataclasses.replace(checked, argv=_with_overrides(argv, args.overrides, checked.pins))


def _with_overrides(argv: list[str], overrides: list[str], added: tuple[str, ...]) -> tuple[str, ...]:
    """argv with `added` right after its overrides: argparse takes one unbroken run of them."""
    n = len(overrides)
    at = next((i + n for i in range(len(argv) - n + 1) if argv[i : i + n] == overrides), len(argv))
    return (*argv[:at], *added, *argv[at:])


# ---------------------------------------------------------------------------------------------
# The check


def _check(
    overrides: list[str],
    multirun: bool,
    launching: bool,
    config_path: str | None,
    config_name: str | None,
    config_dir: str | None,
) -> Preflight:
    parsed, problems = [], []
    for text in overrides:
        try:
            parsed.append(parse(text))
        except HydraException as exc:
            problems.append(f"{text}: {explain(exc)}")
    if problems:
        return Preflight(problems)
    try:
        with composer_for(config_path, config_dir, config_name or CONFIG_NAME, parsed) as composer:
            return _check_composed(composer, parsed, multirun, launching)
    except Refused as refused:
        return Preflight([str(refused)])


def _check_composed(
    composer: Composer, parsed: list, multirun: bool, launching: bool, with_params: bool = True
) -> Preflight:
    problems: list[str] = []
    fixed, group_sweeps, values = _group_choices(composer, parsed, problems)
    if problems and not values:
        # Only options were chosen, and some do not exist: nothing is left to check but how the
        # valid ones combine, which waits until the names are right. A typo answers at once.
        return Preflight(problems)
    # The master config, as Hydra composes it before a run or a sweep: without the sweeps. Its
    # hydra node is the one whose callbacks, launcher and sweeper Hydra instantiates.
    mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    try:
        master = composer.compose(fixed, mode)
    except COMPOSE_ERRORS as exc:
        return Preflight(problems + [explain(exc)])
    multirun = multirun or master.hydra.mode == RunMode.MULTIRUN
    if multirun and with_params and (params := _sweeper_params(master, problems)):
        # What the sweeper sets per job is checked as the command line's: before the first job starts.
        found = _check_composed(composer, [*params, *parsed], multirun, launching, with_params=False)
        return dataclasses.replace(found, problems=list(dict.fromkeys(problems + found.problems)))
    if not multirun:
        problems += composer.sweep_problems(parsed)
    applied, value_sweeps = _value_overrides(values, master, problems)
    master, applied, found = _compose_each(composer, fixed, applied, mode, master)
    problems += found
    if launching and not multirun and master.hydra.mode != RunMode.MULTIRUN:
        problems += _sweep_without_multirun(master, parsed)  # Hydra would ignore the sweeper and run once
    jobs = [("", master)]
    if multirun and (group_sweeps or value_sweeps):
        jobs = _sweep_jobs(composer, fixed, applied, group_sweeps, value_sweeps, problems)

    # The run's directory (a sweep's: the master config's), resolved now as Hydra will resolve it.
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    resolvable = _resolvable(master)
    where, root = _select(resolvable, key), _select(resolvable, "outputs")
    problems += _unresolvable(resolvable, key)
    problems += (
        hydra_problems(resolvable.hydra) + code_problems(resolvable.hydra) + plugin_problems(resolvable.hydra, root)
    )
    problems += logging_file_problems(resolvable.hydra, where) + (subdir_problems(resolvable.hydra) if multirun else [])
    for label, cfg in jobs:
        if cfg is not master:
            resolvable = _resolvable(cfg)
        found = hydra_problems(resolvable.hydra) + code_problems(resolvable.hydra) if cfg is not master else []
        if launching:
            found += _directory_problems(resolvable, key, where) + _value_problems(resolvable)
            found += _search_problems(resolvable) if multirun else []
        problems += [f"with {label}: {p}" if label else p for p in found if p not in problems]
    problems = list(dict.fromkeys(problems))
    pins = _pins(parsed, key, where) if launching and where is not None else None
    return Preflight(
        problems,
        pins=pins or (),
        sweep_dir=Path(where) if multirun and pins is not None else None,
        launcher=str(OmegaConf.select(master, "hydra.launcher._target_", default="") or ""),
        outputs=root,
    )


def _group_choices(composer: Composer, parsed: list, problems: list[str]) -> tuple[list, list[list], list]:
    """(the group selections that are no sweep, and group deletions, to compose with; each swept
    group's valid options, as overrides; the other overrides). Unknown options go to `problems`."""
    fixed, group_sweeps, values = [], [], []
    for o in parsed:
        key = o.key_or_group
        if key == "hydra.searchpath":
            continue  # in the composer's own overrides
        options = composer.options(key)  # a group's options; [] for a key, or a group of groups only
        if not options and not composer.is_group(key):
            values.append(o)
            continue
        if o.is_delete():
            fixed.append(o)
        if o.is_delete() or o.value_type not in CHOICES:
            continue  # glob sweeps: Hydra expands and checks them
        pairs = list(
            zip(o.sweep_iterator(), o.sweep_string_iterator()) if o.is_sweep_override() else [(o.value(), None)]
        )
        named = [str(n) for value, _ in pairs for n in (value if isinstance(value, list) else [value]) if n is not None]
        if any("/" in n and n not in options for n in named):
            options = composer.options(key, nested=True)  # experiment=chapter/prelu: an option in a folder
        valid = []
        for value, text in pairs:
            bad = [
                n for n in (value if isinstance(value, list) else [value]) if n is not None and str(n) not in options
            ]
            problems += [f"{key}={n}: " + unknown(f"{key} option", n, options) for n in bad]
            chosen = [str(n) for n in value] if isinstance(value, list) else []
            twice = sorted({n for n in chosen if chosen.count(n) > 1})
            problems += [f"{key}: {n} is chosen twice; give each option once" for n in twice]
            if not bad and not twice:
                valid.append(o if text is None else parse(f"{o.get_key_element()}={text}"))
        if valid and o.is_sweep_override():
            group_sweeps.append(valid)
        elif valid:
            fixed.append(valid[0])
    return fixed, group_sweeps, values


def _sweeper_params(master: DictConfig, problems: list[str]) -> list:
    """The overrides a sweeper's `params` (hydra.sweeper.params) makes per job, as overrides of the
    command line; a key of Hydra's own namespace is refused outright (it would reach each job
    unchecked)."""
    node = OmegaConf.select(master, "hydra.sweeper.params", default=None)
    if not isinstance(node, DictConfig) or not node:
        return []
    found = []
    for key, value in OmegaConf.to_container(node, resolve=False).items():
        where = f"hydra.sweeper.params.{key}"
        if str(key).lstrip("+~").split(".")[0].split("/")[0] == "hydra":
            problems.append(f"{where}: a sweep may not set Hydra's own settings per job; set them for the whole sweep")
            continue
        try:
            found.append(parse(f"{key}={value}"))
        except HydraException as exc:
            problems.append(f"{where}: {explain(exc)}")
    return found


def _sweep_without_multirun(master: DictConfig, parsed: list) -> list[str]:
    """A config composed for one run that asks for a sweep: a sweeper other than Hydra's basic
    one (hydra/sweeper=optuna, as experiment=search selects) or a search space (hydra.sweeper.params)."""
    sweeper = OmegaConf.select(master, "hydra.runtime.choices", default={}).get("hydra/sweeper", "basic")
    params = OmegaConf.select(master, "hydra.sweeper.params", default=None)
    asked = [f"hydra/sweeper={sweeper}"] if sweeper != "basic" else []
    if params:
        asked.append(f"over {', '.join(str(k) for k in params)}")
    if not asked:
        return []
    command = " ".join(["dnnrun -m", *(shlex.quote(o.input_line) for o in parsed)])
    return [f"the config sets up a sweep ({' '.join(asked)}), which runs only with -m (--multirun): {command}"]


def _value_overrides(values: list, master: DictConfig, problems: list[str]) -> tuple[list, list[list]]:
    """(the value overrides every job gets, each swept key's values as overrides). Interval and
    glob sweeps are left to Hydra and its sweepers: only their key is checked."""
    applied, value_sweeps = [], []
    for o in values:
        if o.value_type not in CHOICES:
            if _plain(o) and (missing := _missing_key(master, o.key_or_group)):
                problems.append(missing)
        elif o.is_sweep_override():
            value_sweeps.append([parse(f"{o.get_key_element()}={s}") for s in o.sweep_string_iterator()])
        else:
            applied.append(o)
    return applied, value_sweeps


def _sweep_jobs(
    composer: Composer,
    fixed: list,
    applied: list,
    group_sweeps: list[list],
    value_sweeps: list[list],
    problems: list[str],
) -> list[tuple[str, DictConfig]]:
    """(label, config) of the jobs to check: the first of the sweep, then each other value of each
    swept group or key in turn (the others at their first), so that every value is seen once. Each
    is composed as a sweeper composes it (RunMode.RUN); a job that cannot be is left out, its
    problems added."""

    def job(groups: list, sweep_values: list) -> DictConfig | None:
        label = " ".join(o.input_line for o in [*groups, *sweep_values])
        try:
            cfg, _, found = _compose_each(composer, [*fixed, *groups], [*applied, *sweep_values], RunMode.RUN)
        except COMPOSE_ERRORS as exc:
            problems.append(f"with {label}: {explain(exc)}")
            return None
        problems.extend(f"with {label}: {p}" if label else p for p in found if p not in problems)
        return None if found else cfg

    def with_value(first: DictConfig | None, i: int, o) -> DictConfig | None:
        """The first job with one plain value set otherwise: Hydra sets it as OmegaConf.update
        does, on a key the first job's composing found (much cheaper than composing it again)."""
        if first is None or not _plain(o):
            return job(groups, [*values[:i], o, *values[i + 1 :]])
        cfg = first.copy()
        try:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        except OmegaConfBaseException as exc:
            problems.append(f"with {o.input_line}: {explain(exc)}")
            return None
        return cfg

    groups, values = [s[0] for s in group_sweeps], [s[0] for s in value_sweeps]
    first = job(groups, values)
    jobs = [("", first)]
    for i, sweep in enumerate(group_sweeps):
        jobs += [(o.input_line, job([*groups[:i], o, *groups[i + 1 :]], values)) for o in sweep[1:]]
    for i, sweep in enumerate(value_sweeps):
        jobs += [(o.input_line, with_value(first, i, o)) for o in sweep[1:]]
    return [(label, cfg) for label, cfg in jobs if cfg is not None]


def _compose_each(composer: Composer, start: list, overrides: list, mode, composed: DictConfig | None = None):
    """(config, the overrides that apply, the problems of the others): `start`, then each
    override in turn as Hydra applies it, for every problem at once. All at once first, which
    is all it takes when there is none."""
    if composed is not None and not overrides:
        return composed, overrides, []
    try:
        return composer.compose([*start, *overrides], mode), overrides, []
    except COMPOSE_ERRORS:
        pass
    cfg = composed if composed is not None else composer.compose(start, mode)
    applied, problems = [], []
    for o in overrides:
        if _plain(o) and (missing := _missing_key(cfg, o.key_or_group)):
            problems.append(missing)  # names the valid keys, unlike Hydra's message
            continue
        try:
            cfg = composer.compose([*start, *applied, o], mode)
        except COMPOSE_ERRORS as exc:
            problems.append(explain(exc))
            continue
        applied.append(o)
    return cfg, applied, problems


def _pins(parsed: list, key: str, where: str) -> tuple[str, ...] | None:
    """The override that makes Hydra use this directory: none when the command line gives it as
    it is already, None when the grammar cannot say it."""
    given = [o for o in parsed if o.key_or_group == key]
    if given and given[-1].get_key_element() == key and given[-1].value() == where and "${" not in where:
        return ()
    pin = _override(key, where)
    return (pin,) if pin else None


def _plain(override) -> bool:
    """An override that changes a value of dnnrun's config (key=value, no +, ++ or ~)."""
    return not (override.is_add() or override.is_force_add() or override.is_delete() or override.is_hydra_override())


def _missing_key(cfg: DictConfig, dotted: str) -> str | None:
    node, path = cfg, []
    for part in dotted.split("."):
        if not isinstance(node, DictConfig):
            return None
        if part not in node:
            where = ".".join(path) or "the top level"
            valid = [str(k) for k in node.keys()]
            return f"{dotted}: unknown key '{part}' in {where}; valid: {', '.join(valid)}{did_you_mean(part, valid)}"
        node, path = node[part], path + [part]
    return None


def _resolvable(cfg: DictConfig) -> DictConfig:
    """A plain copy of a composed config in which `${hydra:X}` reads the config's own hydra node
    (`${hydra.X}`), as it reads HydraConfig once Hydra runs the job. Values Hydra knows only then
    (hydra.runtime.output_dir, hydra.job.num, ...) stay missing."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    return OmegaConf.create(_hydra_interpolations_as_keys(plain))


def _hydra_interpolations_as_keys(value: object) -> object:
    if isinstance(value, dict):
        return {k: _hydra_interpolations_as_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hydra_interpolations_as_keys(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"(?<!\\)\$\{hydra:", "${hydra.", value)
    return value


def _select(cfg: DictConfig, key: str) -> str | None:
    """A value resolved now; None if Hydra knows it only when it launches."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException:
        return None
    return None if value is None else str(value)


def _unresolvable(cfg: DictConfig, key: str) -> list[str]:
    """A directory that will never resolve (a resolver that does not exist, an environment variable
    that is not set): Hydra would fail on it as it launches, with a traceback. One known only at
    launch (the job's number, the time) is not a problem."""
    try:
        OmegaConf.select(cfg, key, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError):
        return []
    except OmegaConfBaseException as exc:
        return [f"{key}: {explain(exc)}"]
    return []


def _directory_problems(cfg: DictConfig, key: str, where: str | None) -> list[str]:
    """The run directory (a sweep's directory: the master config's) must lie under a job's outputs
    root: checked as the task checks it, before Hydra creates it."""
    try:
        root = cfg.outputs
    except OmegaConfBaseException:
        return []  # the value check reports it
    if not isinstance(root, str) or where is None:
        return []  # the value check reports a bad root; a directory known only at launch: the task checks it
    outside = outside_outputs(root, {key: Path(where)}) or unwritable(Path(where), key)
    return [outside] if outside else []


def _search_problems(cfg: DictConfig) -> list[str]:
    """What a search's jobs cannot be: each is one trial, one model's value (cli/search.py)."""
    from dnnrun.cli.search import SEEDS_REFUSED, SWEEPER

    searching = OmegaConf.select(cfg, "hydra.sweeper._target_", default=None) == SWEEPER
    return [SEEDS_REFUSED] if searching and OmegaConf.select(cfg, "trainer.seeds", default=None) is not None else []


def _value_problems(cfg: DictConfig) -> list[str]:
    """What dnnrun's typed check (the one every run does first) finds in a composed config."""
    from dnnrun.config.run_config import parse_run_config  # imports torch

    raw = {}
    try:
        for key in cfg.keys():
            if key == "hydra":
                continue
            if OmegaConf.is_missing(cfg, key):
                raw[key] = "???"
                continue
            value = cfg[key]
            raw[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except InterpolationToMissingValueError:
        return []  # a value that only Hydra knows at launch (the run's directory ...): the task checks it
    except OmegaConfBaseException as exc:
        return [explain(exc)]
    try:
        parse_run_config(raw)
    except ConfigError as exc:
        return exc.problems
    return []


def _override(key: str, value: str) -> str | None:
    """`key=value` in Hydra's override grammar, value quoted; None if it does not read back as the
    same string (or would be an interpolation)."""
    text = f"{key}={quoted(value)}"
    try:
        same = parse(text).value() == value
    except HydraException:
        return None
    return text if same and "${" not in value else None
