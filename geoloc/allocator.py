"""Keep large freed blocks in the process instead of handing them back to the OS at every op.

glibc's malloc serves blocks above its mmap threshold with fresh `mmap` pages and unmaps them when they are freed.
The threshold grows by itself as large blocks are freed, but never beyond 32 MiB, so every larger activation
(a ViT-L/14 MLP activation from a batch of 8 images: 34 MB) has its pages faulted in again at every op.
`keep_freed_memory()` raises glibc's mmap and trim thresholds with `mallopt`, so such blocks are reused: page
faults of CLIP's activation function on that tensor fell 6-30x (`tests/test_allocator.py`), and
`benchmarks/bench_allocator.py` times the ViT-L/14 tower in fresh processes with and without it. Below 32 MiB
glibc's own growing threshold already reuses blocks, so batch-1 answers gain little. jemalloc or tcmalloc
(`LD_PRELOAD`) do the same from outside the process.

glibc on Linux only: elsewhere it does nothing and returns False. `geoloc predict`, `evaluate` and `calibrate`
call it. The cost: freed blocks up to `KEPT_BYTES` stay in the process (per malloc arena, i.e. per thread that
allocates) for reuse, so its resident memory stays near its peak instead of shrinking between batches.
"""

import ctypes
import sys

KEPT_BYTES = 256 << 20  # blocks below this come from the heap; its free top returns to the OS beyond twice that
GLIBC_MAX_MMAP_THRESHOLD = 32 << 20  # the cap of older glibc versions, which refuse larger thresholds
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(kept_bytes: int = KEPT_BYTES) -> bool:
    """Raise glibc's mmap threshold to `kept_bytes` (where this glibc refuses it, to 32 MiB) and its trim
    threshold to twice that; True when both were set (glibc on Linux), False otherwise.

    Raises:
        ValueError: `kept_bytes` is not between 1 and 1 GiB.
    """
    if not 0 < kept_bytes <= 1 << 30:
        raise ValueError(f"kept_bytes must be between 1 and {1 << 30} (1 GiB), got {kept_bytes}.")
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap = bool(mallopt(_M_MMAP_THRESHOLD, kept_bytes)) or bool(
        mallopt(_M_MMAP_THRESHOLD, min(kept_bytes, GLIBC_MAX_MMAP_THRESHOLD)))
    trim = bool(mallopt(_M_TRIM_THRESHOLD, 2 * kept_bytes - 1))
    return mmap and trim


__all__ = ["KEPT_BYTES", "keep_freed_memory"]
