"""Keep glibc from handing the training step's heap back to the OS after every step (CPU training).

With glibc's default (dynamic) thresholds, the memory a step frees at the top of the heap is
returned to the OS (`brk` shrinks) as soon as it exceeds the trim threshold, and the next step
faults it back in page by page: measured on the bench transformer_lm, ~2,000 minor page faults and
~3-4 ms of a 85 ms CPU step. Whether it happens depends on heap layout luck (a tensor that happens
to stay alive at the top of the heap prevents it). jemalloc/tcmalloc set-ups for CPU training avoid
it by never decaying freed memory; this is the glibc equivalent, applied once before the first
step so start-up allocations (datasets, checkpoints) keep the defaults:

* M_MMAP_THRESHOLD 32 MiB: glibc's own upper bound for its dynamic threshold (fixing a value turns
  the dynamic adjustment off, so it is set to where the adjustment ends up for large tensors);
* M_TRIM_THRESHOLD 1 GiB: freed heap below that is kept for the next step. Peak RSS is unchanged;
  memory above the steady-state need is not returned until the process ends.

Skipped off Linux/glibc, and when the user chose an allocator or malloc tuning of their own
(LD_PRELOAD, MALLOC_*_ environment variables).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("dist_train")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30
_done = False


def retain_freed_heap() -> bool:
    """Apply the thresholds above (once per process). Returns whether they are in effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD"):
        return False
    if any(os.environ.get(f"MALLOC_{name}_") for name in ("TRIM_THRESHOLD", "MMAP_THRESHOLD", "TOP_PAD")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    _done = ok
    if ok:
        log.debug("glibc malloc: mmap threshold %d, trim threshold %d", MMAP_THRESHOLD, TRIM_THRESHOLD)
    return ok
