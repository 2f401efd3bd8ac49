"""What the `dnnrun` command changes for its whole process, and library code never does (a
notebook's process is its user's): glibc's allocator thresholds. (`console` also skips the
garbage collector's last passes at exit: gc.freeze.)"""

from __future__ import annotations

import contextlib
import platform

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
