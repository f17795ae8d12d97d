"""The process's memory: its peak resident set size, and giving freed heap memory back to the OS.

PyTorch frees a CPU tensor's memory to the C allocator; glibc keeps freed chunks below its mmap threshold (which
grows up to 32 MiB as large blocks are freed) in the heap instead of returning them. A long run then holds on to the
heap of its earlier stages, and a later stage's large tensors (allocated by mmap, above the threshold) come on top
of it: the peak grows stage after stage although live memory does not. ``trim_heap`` at stage boundaries returns
the free heap pages (``malloc_trim``), so each stage's peak is close to what it needs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from functools import cache


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (2**20 if sys.platform == "darwin" else 1024), 1)


@cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only (musl has no malloc_trim)
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Collect garbage and return the heap's free pages to the OS where the C library can (glibc); True if it
    could."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
