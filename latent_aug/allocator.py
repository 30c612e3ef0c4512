"""Host memory allocator settings for CPU training loops of small nets.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above its
mmap threshold (128 KiB at start, adapting up to 32 MiB) with fresh ``mmap`` pages and returns
the heap top to the system once more than its trim threshold is free. A training or
evaluation loop that allocates the same few MB-sized activations every batch then
page-faults on (and zero-fills) every one of them again: on the paper's MNIST net one
validation pass over 10,000 images took about 121,000 minor page faults on this project's
2-core machine, and none once freed blocks were kept (``benchmarks/results/timings.md``).

:func:`keep_freed_memory` raises both thresholds so freed blocks stay in the heap and are
reused. It changes the whole process, so the library never calls it on import: the grid
runner calls it in the processes that train (``run_grid(keep_memory=True)``, the default), and a
user's own CPU loop may call it once at start. Without glibc (macOS, Windows, musl) it does
nothing and says so by returning False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(limit_mib: int = 256) -> bool:
    """Let glibc keep freed blocks of up to ``limit_mib`` MiB (and free heap of up to twice
    that) for reuse instead of handing them back to the system.

    The process keeps its peak heap (up to ``2 * limit_mib`` MiB of freed memory) instead of
    shrinking. ``limit_mib`` above 1023 counts as 1023 (``mallopt`` takes a C int). Returns
    True when glibc accepted both settings, False where there is no glibc ``mallopt`` (then
    nothing changed)."""
    if limit_mib < 1:
        raise ValueError(f"limit_mib must be >= 1, got {limit_mib}.")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    limit = min(limit_mib, 1023) << 20  # an int for mallopt
    # older glibc caps the mmap threshold at 32 MiB: fall back to the cap
    ok = mallopt(_M_MMAP_THRESHOLD, limit) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(ok) and bool(mallopt(_M_TRIM_THRESHOLD, min(2 * limit, (1 << 31) - 1)))
