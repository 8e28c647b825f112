"""Keep freed memory in the process on CPU: no page faults for every large tensor of a step.

glibc's malloc serves blocks above its mmap threshold (at most 32 MB) with a fresh mmap and
returns them to the system on free, so every [B, T, V] logits tensor, log-softmax and
gradient of a step is faulted in page by page again (on SmolLM2-135M about a quarter of an
update's time, most of it system time). Raising the mmap and trim thresholds keeps freed
blocks in the heap for the next step. Memory freed after the peak is not given back to the
system until the process ends, and the heap can fragment: a step of many micro-batches and
LM-head chunks of varied sizes reached 18 GB of peak RSS where malloc's defaults needed 1.5
(a 16k-token OPD update, benchmarks/memory.py). Set COPD_KEEP_FREED_MEMORY=0 to leave
malloc as it is. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap
TRIM_THRESHOLD = 1 << 62  # never give the heap's top back


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process; whether it was done."""
    if os.environ.get("COPD_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
