"""Process-wide settings made once at start-up, before the first large allocation."""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep large freed buffers for reuse instead of returning them to the kernel.

    By default glibc serves every allocation above a (dynamic, at most 32 MiB) threshold with its own
    mmap and unmaps it when freed, and trims the heap top above 128 KiB. A CPU training step frees
    and re-allocates the same activation buffers every step, so each step pays the page faults of
    mapping them again (measured in docs/benchmarks.md). Raising both thresholds to 1 GiB keeps the
    buffers mapped; the cost is that the process keeps its peak memory. PyTorch's CUDA caching
    allocator does the same on GPUs. jemalloc would work too but is not a Python package.
    Returns whether the allocator took the settings (False off glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # glibc before 2.26 caps the mmap threshold at 32 MiB on 64-bit systems
    mapped = mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mapped) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
