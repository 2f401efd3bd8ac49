"""SIGINT and SIGTERM during a run: before training starts they stop it at once (there is nothing
to save); once the loop runs (`deferring`) they only set `signum`, and the loop finishes its
step, writes a checkpoint and stops. Nothing is raised then from inside the handler, so a second
signal during that write is harmless."""

from __future__ import annotations

import contextlib
import signal
import threading

from dnnrun.errors import Interrupted


class StopFlag:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, deferring: bool = False) -> None:
        self.signum = 0
        self.deferring = deferring

    def __call__(self, signum: int, frame) -> None:
        if not self.deferring:
            raise Interrupted(signum)
        self.signum = self.signum or signum

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            yield self
            return
        previous = {sig: signal.signal(sig, self) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
