"""The command line: the only part of dnnrun that imports Hydra. It checks the command line
(checks), has Hydra compose the config and run the task (app: one run, or one job of a sweep, which
turns the config into plain typed objects and calls `train.run(cfg, run_dir)`), and reports a
sweep's end (sweep). `dnnrun --help`: help."""

from __future__ import annotations

import atexit
import shutil
import signal
import sys
import tempfile

import hydra

from dnnrun.cli.app import App
from dnnrun.cli.checks import check_command_line, check_overrides, check_torch, preflight
from dnnrun.cli.conf import CONFIG_DIR, CONFIG_NAME
from dnnrun.cli.help import GROUP_HELP, help_text, option_line
from dnnrun.cli.messages import error
from dnnrun.cli.sweep import SweepFailed, SweepReport, sweep_broke
from dnnrun.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, ConfigError, Interrupted

__all__ = ["CONFIG_DIR", "GROUP_HELP", "SweepReport", "check_command_line", "check_overrides", "check_torch",
           "help_text", "main", "option_line"]


def main() -> None:
    # SIGTERM (docker stop, schedulers) stops dnnrun like Ctrl-C, also as a container's PID 1, which
    # gets no default signal handling; during training, train.run takes over to save first.
    signal.signal(signal.SIGTERM, _terminate)
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(help_text())
        return
    check_torch()
    checked = preflight(sys.argv[1:])  # the same on every rank under torchrun: before its scratch dir
    if checked.problems:
        error(checked.problems[0] if len(checked.problems) == 1 else str(ConfigError(checked.problems)))
        sys.exit(EXIT_BAD_INPUT)
    sys.argv[1:] = checked.argv  # with the run or sweep directory that was checked: Hydra uses that one
    _scratch_dir_for_other_ranks()
    app = App()
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
    except (Interrupted, KeyboardInterrupt) as exc:  # before or between runs: nothing to save
        error(str(exc) or "interrupted")
        sys.exit(getattr(exc, "exit_code", EXIT_INTERRUPTED))


def _terminate(signum: int, frame) -> None:
    raise Interrupted(signum)


def _scratch_dir_for_other_ranks() -> None:
    """Under torchrun, ranks other than 0 run in a scratch directory: only rank 0 writes outputs/."""
    from dnnrun.distributed import launched_rank

    if launched_rank() > 0:
        scratch = tempfile.mkdtemp(prefix=f"dnnrun-rank{launched_rank()}-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        argv = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
        sys.argv[1:] = [*argv, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
