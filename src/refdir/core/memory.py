"""The process's memory: its peak resident set size, and giving freed heap memory back to the OS.

PyTorch frees a CPU tensor's memory to the C allocator; glibc keeps freed chunks below its mmap threshold (which
grows up to 32 MiB as large blocks are freed) in the heap instead of returning them. A long run then holds on to the
heap of its earlier stages, and a later stage's large tensors (allocated by mmap, above the threshold) come on top
of it: the peak grows stage after stage although live memory does not. ``trim_heap`` at stage boundaries returns
the free heap pages (``malloc_trim``), so each stage's peak is close to what it needs.

Between those trims, glibc's own trimming works against a run: it gives the heap's free top back to the OS as
soon as it passes twice the mmap threshold, and the next large tensor faults the same pages in again, and page
faults are slow on the VMs measured. :func:`tune_allocator` (called once by the command line) fixes the mmap
threshold at glibc's maximum (32 MiB, the dynamic threshold's ceiling, from the start) and leaves trimming to
``trim_heap``; what it saves is in NOTES.md.
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
def _glibc():
    """The C library where it is glibc on Linux (``malloc_trim`` and ``mallopt`` are glibc's), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - musl has neither
    except (OSError, AttributeError):
        return None
    return libc


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed mmap threshold on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: in effect, no automatic trimming


@cache
def tune_allocator() -> bool:
    """Let glibc keep freed memory for reuse between :func:`trim_heap` calls (see the module docstring); True if
    it took effect (glibc on Linux), False elsewhere (nothing changed)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def trim_heap() -> bool:
    """Collect garbage and return the heap's free pages to the OS where the C library can (glibc); True if it
    could."""
    gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
