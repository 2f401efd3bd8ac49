"""The command line. The only module that imports Hydra: it composes the config, turns it into
plain typed objects and calls `train.run(cfg, run_dir)`."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.logging import RichHandler
from rich.text import Text

from dnnrun.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, Diverged, UserError
from dnnrun.schema import did_you_mean, unknown

EXIT_INTERRUPTED = 130


def _config_dir() -> Path:
    """conf/ inside the installed package (wheel), else the source checkout's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise SystemExit(f"dnnrun: no config.yaml in {here / 'conf'} or {here.parent / 'conf'}; reinstall dnnrun")


CONFIG_DIR = _config_dir()
_task_started = False  # tells a Hydra composition failure (bad input) from a failure inside a run


def _error(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _task(cfg: DictConfig) -> float | None:
    global _task_started
    _task_started = True
    from dnnrun import evaluate, lr_find, train  # torch is imported here, after Hydra has parsed argv
    from dnnrun.config import parse_run_config
    from dnnrun.console import console

    logger = logging.getLogger("dnnrun")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False, show_time=False, markup=False))
        logger.propagate = False
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_cfg = parse_run_config(OmegaConf.to_container(cfg, resolve=True))
        if run_cfg.mode == "lr_find":
            return lr_find.run(run_cfg, run_dir)["suggestion"]
        if run_cfg.mode == "evaluate":
            return evaluate.run(run_cfg, run_dir)["deterministic"]["accuracy"]
        summary = train.run(run_cfg, run_dir)
    except (UserError, OmegaConfBaseException) as exc:
        _error(str(exc))
        _remove_if_empty(run_dir)
        sys.exit(getattr(exc, "exit_code", EXIT_BAD_INPUT))
    except Diverged as exc:
        _error(f"{exc} (run directory: {run_dir})")
        sys.exit(exc.exit_code)
    return summary["best"]["value"]  # what a sweeper (e.g. Optuna) optimizes


def _remove_if_empty(run_dir: Path) -> None:
    """A run refused before it started leaves no directory holding only Hydra's config snapshot."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(run_dir)


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
    groups += sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in GROUP_HELP)
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
    if unparsed or args.config_path or args.config_name or args.config_dir or args.help or args.hydra_help or args.info:
        return None
    return list(args.overrides)


def main() -> None:
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(help_text())
        return
    overrides = _overrides_from_argv(sys.argv[1:])
    if overrides:
        problems = check_overrides(overrides)
        if problems:
            _error("\n".join(problems))
            sys.exit(EXIT_BAD_INPUT)
    try:
        _task()
    except SystemExit as exc:
        if exc.code == EXIT_INTERNAL and not _task_started:
            sys.exit(EXIT_BAD_INPUT)  # Hydra could not compose the config: it has printed why
        raise
    except KeyboardInterrupt:
        _error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
