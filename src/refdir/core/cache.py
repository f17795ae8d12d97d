"""Cached files that are re-checked on every load, cheaply.

Beside a cached file (or in a cached directory) refdir records each file's size, mtime and sha256. A later load
compares sizes, and recomputes a sha256 only for a file whose mtime changed; any difference means the cache is
rebuilt, never trusted. Used for the embedded default model's assembled GGUF and its converted safetensors copy.

The converted copies of GGUF files (one directory per file and dtype) are kept within a disk budget: copies of
files that no longer exist are dropped, and the least recently used ones make room for a new one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

from refdir.core.io import written_by_refdir
from refdir.errors import RefdirError


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """A file's size, mtime (ns) and sha256, as stored beside a cached file to re-check it later."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def check_record(path: Path, rec: dict) -> dict | None:
    """Whether ``path`` still holds what ``rec`` (a :func:`file_record`) says.

    Cheap when nothing changed: the size must match, and the sha256 is recomputed only when the mtime differs.
    Returns the record to keep (with the new mtime when the content is unchanged), or None when the file is
    missing or its content differs."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not isinstance(rec, dict) or st.st_size != rec.get("size"):
        return None
    if st.st_mtime_ns == rec.get("mtime_ns"):
        return rec
    if sha256_file(path) != rec.get("sha256"):
        return None
    return {**rec, "mtime_ns": st.st_mtime_ns}


def read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


CONVERTED_RECORD = "refdir_converted.json"


def _recorded(p: Path) -> bool:
    """Files a converted-model record covers: all but the record itself and hidden files (refdir's own marker;
    transformers never loads a hidden file)."""
    return p.name != CONVERTED_RECORD and not p.name.startswith(".") and (p.is_file() or p.is_symlink())


def cached_dir_intact(target: Path) -> bool:
    """Whether a converted model directory still holds exactly the files its record lists, with the recorded
    sizes and sha256s (hashes recomputed only for files whose mtime changed; the record is then refreshed)."""
    rec = read_record(target / CONVERTED_RECORD)
    files = rec.get("files") if rec else None
    if not isinstance(files, dict) or not files:
        return False
    present = {p.name for p in target.iterdir() if _recorded(p)} if target.is_dir() else set()
    if present != set(files):
        return False
    kept = {name: check_record(target / name, r) for name, r in files.items()}
    if any(v is None for v in kept.values()):
        return False
    if kept != files:
        (target / CONVERTED_RECORD).write_text(json.dumps({**rec, "files": kept}, indent=2))
    return True


def write_dir_record(target: Path, **info) -> None:
    """Record every file of ``target`` (size, mtime, sha256) in its converted-model record."""
    files = {p.name: file_record(p) for p in sorted(target.iterdir()) if _recorded(p)}
    (target / CONVERTED_RECORD).write_text(json.dumps({**info, "files": files}, indent=2))


# --------------------------------------------------------------------------------------------
# the converted copies of GGUF files: one directory each under one root, kept within a disk budget
# --------------------------------------------------------------------------------------------

CACHE_LIMIT_GB = 20.0  # what the converted copies may take together; REFDIR_GGUF_CACHE_GB overrides it
FREE_RESERVE = 2 << 30  # bytes a new copy must leave free on its disk


def cache_limit() -> int:
    """The converted copies' budget in bytes: ``REFDIR_GGUF_CACHE_GB`` GiB (a number ≥ 0), else 20 GiB."""
    raw = os.environ.get("REFDIR_GGUF_CACHE_GB")
    if raw is None:
        return int(CACHE_LIMIT_GB * (1 << 30))
    try:
        gb = float(raw)
    except ValueError:
        gb = float("nan")
    if not (math.isfinite(gb) and gb >= 0):
        raise RefdirError(f"REFDIR_GGUF_CACHE_GB must be a number of GiB ≥ 0, got {raw!r}")
    return int(gb * (1 << 30))


def _copies(root: Path) -> list[Path]:
    """The converted copies under ``root`` that refdir wrote (its marker and record); nothing else is ever touched."""
    if not root.is_dir():
        return []
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not d.is_symlink()
            and (d / CONVERTED_RECORD).is_file() and written_by_refdir(d)]


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and not p.is_symlink())


def drop_orphan_copies(root: Path) -> list[Path]:
    """Remove the converted copies under ``root`` whose GGUF file no longer exists (a deleted or temporary file),
    so that the cache does not keep growing with copies nothing can use; returns what was removed."""
    gone = []
    for d in _copies(root):
        src = (read_record(d / CONVERTED_RECORD) or {}).get("source")
        if isinstance(src, str) and not Path(src).exists():
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def touch_copy(d: Path) -> None:
    """Mark a converted copy as just used (its directory's mtime), which :func:`make_room` evicts last."""
    try:
        os.utime(d)
    except OSError:  # a read-only cache still serves its copies
        pass


def make_room(root: Path, need: int, keep: Path) -> bool:
    """Whether a new converted copy of ``need`` bytes fits under ``root``: all copies together within
    :func:`cache_limit`, and :data:`FREE_RESERVE` bytes left free on the disk after it. Where it fits only once
    older copies go, the least recently used ones (never ``keep``, the copy about to be replaced) are removed,
    oldest first, until it fits; where it cannot fit even with all of them gone, nothing is removed."""
    copies = sorted((d for d in _copies(root) if d != keep), key=lambda d: d.stat().st_mtime)
    sizes = {d: _dir_bytes(d) for d in copies}
    total = sum(sizes.values())
    free = shutil.disk_usage(root).free
    if need > cache_limit() or free + total - need < FREE_RESERVE:
        return False
    while copies and (total + need > cache_limit() or free - need < FREE_RESERVE):
        d = copies.pop(0)
        shutil.rmtree(d, ignore_errors=True)
        total -= sizes[d]
        free += sizes[d]
    return True
