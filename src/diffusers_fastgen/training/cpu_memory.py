"""CPU training: keep freed tensor memory in the process instead of handing it back to the OS.

glibc serves large allocations (above a dynamic threshold of 128 KB to 32 MB) with mmap and returns them
with munmap when freed, and trims the heap top back to the OS. A training step allocates and frees
the same activation buffers every iteration, so on CPU each one is page-faulted in again (millions of
minor faults per run). CUDA's caching allocator avoids this on GPUs; on CPU, `retain_freed_memory`
does the same through glibc's `mallopt`: allocations up to 256 MB come from the heap and freed
memory is kept for reuse. The cost is that resident memory stays at its peak.
Measured effect in docs/results.md (benchmarks/dmd2_overhead.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3


def retain_freed_memory(mmap_threshold: int = 256 * 2**20, trim_threshold: int = 2**31 - 1) -> bool:
    """Set glibc's mmap and trim thresholds for this process. Returns True if both were accepted,
    False where there is no glibc (macOS, Windows, musl) — then nothing is changed."""
    if not 0 < mmap_threshold < 2**31:
        raise ValueError(f"`mmap_threshold` must be in (0, 2**31) bytes, got {mmap_threshold}.")
    if not 0 < trim_threshold < 2**31:
        raise ValueError(f"`trim_threshold` must be in (0, 2**31) bytes, got {trim_threshold}.")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
