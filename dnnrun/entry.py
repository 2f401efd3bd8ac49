"""The `dnnrun` command's first lines: SIGINT and SIGTERM end it with one line and 130 or 143 from
the moment its code runs, before anything is imported (importing the command line alone takes a
tenth of a second, and torch seconds). dnnrun.cli.main then installs its own handlers, and the
training loop its own. Only the standard library here."""

from __future__ import annotations

import os
import signal
import sys


def _stopped(signum: int, frame) -> None:
    """Nothing has begun that could be saved or recorded: say so and end."""
    os.write(2, f"error: stopped by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


def install() -> None:
    """As dnnrun.cli.main does: a signal that dnnrun's parent ignores stays ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _stopped)


def console() -> None:
    install()
    from dnnrun.cli import console as run

    run()


if __name__ == "__main__":
    sys.exit(console())
