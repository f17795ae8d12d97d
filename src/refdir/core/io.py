"""Atomic writes: a file or a directory appears whole or not at all."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from refdir.errors import RefdirError

# Write failures that mean "the output location cannot take this": reported as one clear error.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_WRITE = {errno.EROFS, errno.EACCES, errno.EPERM}


def write_error(target: Path, e: OSError) -> RefdirError:
    why = "the disk is full or the file is too large" if e.errno in _NO_SPACE else "the location is read-only"
    return RefdirError(f"cannot write {target}: {why} ({e.strerror or e}); nothing was written")


def _make_tmp_dir(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as e:
        raise write_error(target, e) from e


@contextmanager
def atomic_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target``.

    An existing ``target`` is refused unless ``force``. On any error the temporary directory is
    removed, so no partial output is left behind.
    """
    target = Path(target)
    if target.exists() and not force:
        raise RefdirError(f"output directory {target} already exists; pass --force to overwrite it")
    tmp = _make_tmp_dir(target)
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as e:
        if e.errno in _NO_SPACE | _NO_WRITE:
            raise write_error(target, e) from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    For writers that need a file name (safetensors, gguf). On any error the temporary file is
    removed; a full disk or a read-only location becomes one clear error.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in _NO_SPACE | _NO_WRITE:
            raise write_error(path, e) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json_records(path: str | Path, what: str, suffixes: tuple[str, ...] = (".jsonl", ".json"),
                      hint: str = "") -> object:
    """A ``.jsonl`` file as a list of its non-empty lines' JSON values, or a ``.json`` file's value; a missing
    file, a suffix not in ``suffixes`` or unparsable text is one clear error naming ``what`` (e.g. "behaviour"),
    the wrong suffix with ``hint`` (the expected layout) appended."""
    p = Path(path)
    if not p.exists():
        raise RefdirError(f"no such {what} file: {p}")
    suffix = p.suffix.lower()
    if suffix not in suffixes:
        raise RefdirError(f"unknown {what} file format {suffix!r} for {p}; use {' or '.join(suffixes)}"
                          + (f" ({hint})" if hint else ""))
    try:
        text = p.read_text()
        return [json.loads(x) for x in text.splitlines() if x.strip()] if suffix == ".jsonl" else json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefdirError(f"could not parse {p} as {what} data: {e}") from e


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")
