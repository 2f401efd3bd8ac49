"""Errors a user can fix. The CLI prints their message, without a traceback, and exits 2."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


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


class Diverged(Exception):
    """A NaN or infinity in the loss or a gradient: training cannot go on from here."""

    exit_code = EXIT_DIVERGED

    def __init__(self, step: int, what: str):
        self.step, self.what = step, what
        super().__init__(f"training diverged at step {step}: {what}")
