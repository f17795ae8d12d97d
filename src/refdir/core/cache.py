"""Cached files that are re-checked on every load, cheaply.

Beside a cached file (or in a cached directory) refdir records each file's size, mtime and sha256. A later load
compares sizes, and recomputes a sha256 only for a file whose mtime changed; any difference means the cache is
rebuilt, never trusted. Used for the embedded default model's assembled GGUF and its converted safetensors copy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


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
