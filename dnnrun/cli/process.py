"""What the `dnnrun` command changes for its whole process, and library code never does (a
notebook's process is its user's): glibc's allocator thresholds, and a stdout that outlives its
reader. (`console` also skips the garbage collector's last passes at exit: gc.freeze.)"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from typing import Any

# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """Tensors of up to 32 MB that a training step frees and allocates again (a stack of members'
    gradients: 15 MB each) reuse the process's memory instead of fresh pages from the kernel,
    whose first touch costs as much as the matmul that fills them (2 ms for 15 MB on 2 cores).
    glibc returns such blocks to the kernel by default; this raises its thresholds, as
    torch.backends.xeon.run_cpu does by preloading another allocator. Linux with glibc only."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest
        libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20)  # freed memory kept for reuse, up to this much at the top


class _QuietWhenUnread:
    """sys.stdout that goes quiet when its reader goes away (`dnnrun | head`): once a write finds
    the pipe closed, the descriptor is pointed at os.devnull and the run goes on and ends as it
    would have, with its log in run.log and its ending in status.json. Everything else is the
    stream's own (isatty, encoding, fileno: Rich asks them)."""

    def __init__(self, stream: Any):
        self._stream = stream

    def _quiet(self) -> None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._quiet()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._quiet()
            self._stream.flush()  # what was buffered goes to os.devnull, so Python's own flush at exit finds nothing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def outlive_the_reader() -> None:
    """Runs and sweeps: a reader of stdout that stops early does not stop training (see _QuietWhenUnread)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stdout.fileno()  # a real descriptor to point elsewhere (not pytest's capture, not a StringIO)
        if not isinstance(sys.stdout, _QuietWhenUnread):
            sys.stdout = _QuietWhenUnread(sys.stdout)
