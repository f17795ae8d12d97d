"""Reading a GGUF's metadata and tensor table with the gguf library, without its slow path.

``gguf.GGUFReader`` parses every metadata value into small arrays cut from the file's ``numpy.memmap``; a chat
model's vocabulary and merges are ~300,000 strings, ~3 million slices, and most of the time goes to the memmap
subclass's per-slice bookkeeping (``memmap.__array_finalize__`` / ``__getitem__``), not to reading bytes: seconds
of every GGUF export and of the pre-flight check of a GGUF input (NOTES.md). :class:`GGUFFile` lets the library
parse as usual over a plain ``ndarray`` view of the same mapping: the same fields and tensors, element for element
(tested). The view keeps the mapping alive, and tensors are still read lazily from the file.

transformers reads a GGUF it converts (tokenizer, config and weights, each parsing the whole file) through
``gguf.GGUFReader``, looked up when its loader runs; :func:`library_reads` points that name at :class:`GGUFFile`
for the duration of refdir's GGUF load (the same weights and vocabulary, tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np


class GGUFFile(gguf.GGUFReader):
    """``gguf.GGUFReader`` (read-only) whose parse works on a plain array view of the memory map. If a gguf
    version parses without ``_build_fields``, this is the library's reader unchanged, only slower."""

    def __init__(self, path: str | Path, mode: str = "r"):
        if mode != "r":
            raise ValueError("GGUFFile is read-only")
        super().__init__(str(path), mode="r")

    def _build_fields(self, offs: int, count: int) -> int:
        self.data = self.data.view(np.ndarray)  # same bytes, same mapping; no memmap bookkeeping per slice
        return super()._build_fields(offs, count)


FAST_LIBRARY_READS = True  # False: code that names gguf.GGUFReader gets the library's reader (the reference)


@contextmanager
def library_reads() -> Iterator[None]:
    """While active, ``gguf.GGUFReader`` is :class:`GGUFFile` for code that looks the name up then (transformers'
    GGUF loader); the library's class is put back on exit, whatever happens."""
    if not FAST_LIBRARY_READS:
        yield
        return
    library = gguf.GGUFReader
    gguf.GGUFReader = GGUFFile
    try:
        yield
    finally:
        gguf.GGUFReader = library
