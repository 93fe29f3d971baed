"""Keep freed memory for reuse under glibc, so that caches do not pay fresh page faults each run.

A full `run_with_cache` holds hundreds of MiB of activations until the cache is dropped. With
glibc's defaults, freeing them hands the memory back to the kernel (the heap top is trimmed once
more than a few MiB are free, and blocks over the dynamic mmap threshold are unmapped), so the next
run maps every page afresh: on the CPU benchmark of BENCHMARKS.md that was ~250k minor page faults
and 40% of a forward's time. `keep_freed_memory` asks glibc to keep up to `TRIM_THRESHOLD` bytes of
freed heap for reuse and to serve blocks up to `MMAP_THRESHOLD` from the heap (the largest value
glibc's own dynamic threshold reaches), as `GLIBC_TUNABLES=glibc.malloc.trim_threshold=...` would.
The process's peak memory is unchanged; memory freed after the peak stays mapped (up to
`TRIM_THRESHOLD` at the top of the heap) and is reused by later allocations.

It is applied when a model is built, once per process, and only on glibc. Set the environment
variable ``MOE_HOOKED_KEEP_FREED_MEMORY=0`` to keep glibc's defaults; a `GLIBC_TUNABLES` that sets
malloc tunables is left to rule.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 2**31 - 1
"""Bytes of free memory at the heap top kept for reuse (the largest value `mallopt` takes: 2 GiB)."""
MMAP_THRESHOLD = 32 * 2**20
"""Blocks up to this size come from the heap (glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)."""
OPT_OUT = "MOE_HOOKED_KEEP_FREED_MEMORY"


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the settings above once; True when glibc accepted them."""
    if os.environ.get(OPT_OUT, "1") == "0" or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
