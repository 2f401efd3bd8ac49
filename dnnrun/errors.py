"""How runs end besides completing, and their exit codes (docs/reference/exit-codes.md).

The CLI prints each of these as one clear message, without a traceback: UserError and its kinds
(bad input, exit 2), RunError (the surroundings failed, exit 1), Diverged (exit 3) and Interrupted
(130 or 143). Any other exception is a bug: it gets a traceback and exit code 1. A trial of a
search that the pruner stopped (Pruned) is no failure: exit code 0, status "pruned".
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): 128 + 2
EXIT_TERMINATED = 143  # SIGTERM (docker stop, a scheduler): 128 + 15
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: output cut short by a closed pipe (`dnnrun --help | head`), as for git

# What each exit code means (docs/reference/exit-codes.md is made from this).
EXIT_CODES = {
    EXIT_OK: "completed; in a search, also a trial the pruner stopped (status `pruned`)",
    EXIT_INTERNAL: "an internal error (with a traceback), a failed write (with the path and the reason), "
    "or a sweep in which some job did not complete",
    EXIT_BAD_INPUT: "bad input: config, files, device, checkpoint",
    EXIT_DIVERGED: "diverged: a NaN or infinity in the loss or a gradient",
    EXIT_INTERRUPTED: "interrupted by SIGINT (Ctrl-C)",
    EXIT_TERMINATED: "interrupted by SIGTERM",
    EXIT_BROKEN_PIPE: "`--help` or `--version` output cut short by a closed pipe (`dnnrun --help | head`), as for git",
}


class UserError(Exception):
    """Bad input: a config value, a missing file, a missing device."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(UserError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({n} problem{'s' if n != 1 else ''}):\n{lines}")


class DataError(UserError):
    """A dataset that cannot be found, read or filtered as asked."""


class RunError(Exception):
    """A failure of the surroundings (a full disk, a read-only folder), reported without a traceback."""

    exit_code = EXIT_INTERNAL


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped the run; its state was saved first when training had begun.

    A BaseException, like KeyboardInterrupt: no `except Exception` may swallow it."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class Pruned(Exception):
    """An Optuna search's pruner stopped this trial after an epoch: its monitored metric was behind
    the other trials' at the same epoch. The trial ends early, as planned: not a failure."""

    exit_code = EXIT_OK

    def __init__(self, epoch: int, monitor: str, value: float, pruner: str):
        self.epoch = epoch
        super().__init__(f"pruned after epoch {epoch} by the {pruner} pruner ({monitor} {value:.4g})")


class Diverged(Exception):
    """A NaN or infinity in the loss or a gradient: training cannot go on from here."""

    exit_code = EXIT_DIVERGED

    def __init__(self, step: int, what: str):
        self.step, self.what = step, what
        super().__init__(f"training diverged at step {step}: {what}")


def command(main: Callable[..., int]) -> Callable[..., int]:
    """A small command's main (dnnrun-report, -plot, -export): a UserError or RunError becomes
    `error: ...` on stderr and the error's exit code, without a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except (UserError, RunError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code

    return wrapper
