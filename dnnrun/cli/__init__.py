"""The command line: the only part of dnnrun that imports Hydra. It checks the command line
(checks), has Hydra compose the config and run the task (app: one run, or one job of a sweep, which
turns the config into plain typed objects and calls `training.loop.run(cfg, run_dir)`), and reports a
sweep's end (sweep). `dnnrun --help`: help.

Importing this package is cheap (omegaconf, for the resolver that conf/config.yaml calls): Hydra and
the rest are imported by main() once its signal handlers are in place, and the names below on
first use."""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from dnnrun.cli.conf import CONFIG_DIR, CONFIG_NAME
from dnnrun.errors import EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, Interrupted

__all__ = [
    "CONFIG_DIR",
    "GROUP_HELP",
    "SweepReport",
    "check_command_line",
    "check_overrides",
    "check_torch",
    "console",
    "help_text",
    "main",
    "option_line",
]

_LAZY = {
    "GROUP_HELP": "help",
    "help_text": "help",
    "option_line": "help",
    "SweepReport": "sweep",
    "check_command_line": "checks",
    "check_overrides": "checks",
    "check_torch": "checks",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"dnnrun.cli.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    # Ctrl-C and SIGTERM (docker stop, schedulers; also as a container's PID 1, which gets no default
    # signal handling) stop dnnrun at once with one line while it starts: imports, the check, Hydra
    # composing the config, the run's set-up. Installed before any of that; once training runs,
    # training.loop.run takes over to save first. A signal that dnnrun's parent ignores (`dnnrun &` in a
    # script ignores SIGINT) stays ignored, as Python itself leaves it.
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _terminate)
    try:
        _main(sys.argv[1:])
    except (Interrupted, KeyboardInterrupt) as exc:  # before or between runs: nothing to save
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # a second signal must not turn this line into a traceback
        from dnnrun.cli.messages import error

        error(str(exc) or "interrupted")
        sys.exit(getattr(exc, "exit_code", EXIT_INTERRUPTED))


def console() -> None:
    """The `dnnrun` command (and `python -m dnnrun`): main(), in a process that ends with it."""
    from dnnrun.cli.process import keep_freed_memory

    keep_freed_memory()
    try:
        main()
    finally:
        # Nothing is left to collect that matters: skip the collector's last passes over torch's
        # objects while the interpreter shuts down (about half a second on 2 cores). atexit
        # handlers still run.
        gc.freeze()


def _main(argv: list[str]) -> None:
    if {"--help", "-h"} & set(argv):
        from dnnrun.cli.help import help_text

        _say(help_text())
        return
    if "--version" in argv:
        _say(_versions())
        return
    from dnnrun.cli.checks import check_torch, preflight
    from dnnrun.cli.messages import error
    from dnnrun.cli.process import outlive_the_reader
    from dnnrun.cli.rerun import expand
    from dnnrun.errors import ConfigError, UserError

    outlive_the_reader()  # `dnnrun | head`: the run goes on, quietly, once head has its lines
    try:
        argv = expand(argv)  # rerun=RUN: that run's overrides
    except UserError as exc:
        error(str(exc))
        sys.exit(EXIT_BAD_INPUT)
    checked = preflight(argv)  # the same on every rank under torchrun: before its scratch dir
    if checked.problems:
        error(checked.problems[0] if len(checked.problems) == 1 else str(ConfigError(checked.problems)))
        sys.exit(EXIT_BAD_INPUT)
    check_torch()
    import hydra

    from dnnrun.cli.app import App
    from dnnrun.cli.sweep import SweepFailed, sweep_broke

    sys.argv[1:] = checked.argv  # with the run or sweep directory that was checked: Hydra uses that one
    _scratch_dir_for_other_ranks()
    app = App(new_root=checked.outputs is not None and not Path(checked.outputs).expanduser().exists())
    try:
        hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base="1.3")(app.task)()
    except SweepFailed:
        raise  # SweepReport has listed the jobs that did not complete
    except SystemExit as exc:
        if exc.code == EXIT_INTERNAL and checked.sweep_dir is not None:  # the launcher broke before the sweep's end
            sys.exit(EXIT_INTERNAL if sweep_broke(checked.sweep_dir, checked.launcher, app.began) else EXIT_BAD_INPUT)
        if exc.code == EXIT_INTERNAL and not app.began:
            sys.exit(EXIT_BAD_INPUT)  # Hydra could not compose the config: it has printed why
        raise
    except Exception:  # HYDRA_FULL_ERROR=1: Hydra re-raises instead of printing; Python prints it
        if checked.sweep_dir is not None:
            sweep_broke(checked.sweep_dir, checked.launcher, app.began)
        raise


def _versions() -> str:
    """dnnrun's, PyTorch's, Hydra's and Python's versions, from the package metadata: importing
    torch to ask it takes seconds."""
    from importlib.metadata import PackageNotFoundError, version

    def of(distribution: str) -> str:
        try:
            return version(distribution)
        except PackageNotFoundError:
            return "not installed"

    python = ".".join(str(n) for n in sys.version_info[:3])
    return f"dnnrun {of('dnnrun')} (torch {of('torch')}, Hydra {of('hydra-core')}, Python {python})"


def _say(text: str) -> None:
    """Print to stdout; a reader that stopped early (`dnnrun --help | head -1`) ends dnnrun quietly
    with 141, as the shell reports git or cat cut short by SIGPIPE: `set -o pipefail` scripts know it."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit finds no pipe
        sys.exit(EXIT_BROKEN_PIPE)


def _terminate(signum: int, frame) -> None:
    raise Interrupted(signum)


def _scratch_dir_for_other_ranks() -> None:
    """Under torchrun, ranks other than 0 run in a scratch directory: only rank 0 writes outputs/."""
    from dnnrun.training.distributed import launched_rank

    if launched_rank() > 0:
        scratch = tempfile.mkdtemp(prefix=f"dnnrun-rank{launched_rank()}-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        argv = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
        sys.argv[1:] = [*argv, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
