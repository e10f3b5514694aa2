"""Keeping freed memory in the process for the next batch (glibc's malloc).

A forward pass allocates the same few large activations (megabytes each) every batch. By default glibc hands
blocks over its mmap threshold straight back to the kernel when they are freed, and trims the heap's free top,
so the next batch touches fresh pages and takes a page fault for every 4 KiB of them: on a 2-core CPU about a
tenth of the forward pass's CPU time goes to the kernel. Raising both thresholds keeps those blocks in the
heap for reuse; the resident set stays at its high-water mark instead, which is bounded by the largest batch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems; larger blocks are still mapped.
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tune glibc's malloc so freed activations stay mapped; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl has no mallopt tunables worth setting
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if ok:
        log.info("malloc keeps freed blocks up to %d MiB for reuse", MAX_MMAP_THRESHOLD >> 20)
    return ok
