"""Atomic writes: a file or a directory appears whole or not at all, fsynced before it is renamed into place.

Every output directory refdir writes carries a marker file (``.refdir``); ``--force`` replaces only a directory
with that marker, or an empty one, so it can never delete a directory refdir did not write (``--out ~``). The
marker also lists the files refdir wrote in that directory (and in its unmarked subdirectories), so ``--force``
refuses a refdir directory into which a user has since put a file of their own, instead of deleting that file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from refdir.core.dirlock import LOCK_NAME, is_temp_name
from refdir.errors import RefdirError

# Write failures that mean "the output location cannot take this": reported as one clear error.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_WRITE = {errno.EROFS, errno.EACCES, errno.EPERM}


def write_error(target: Path, e: OSError) -> RefdirError:
    why = "the disk is full or the file is too large" if e.errno in _NO_SPACE else "the location is read-only"
    return RefdirError(f"cannot write {target}: {why} ({e.strerror or e}); nothing was written")


def _os_error_of(e: Exception) -> OSError | None:
    """The OS error inside a writer's own exception: safetensors reports a failed write as its ``SafetensorError``
    with the errno only in its text ("... No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


@contextmanager
def write_errors(target: Path) -> Iterator[None]:
    """Turn a full disk or a read-only location met while writing ``target`` into one clear error (also where
    safetensors reports it); other errors pass through unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- re-raised unless it is one of the OS errors above
        os_err = _os_error_of(e)
        if os_err is not None and os_err.errno in _NO_SPACE | _NO_WRITE:
            raise write_error(target, os_err) from e
        raise


# ------------------------------------------------------------------ durability


def _fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk (a file written by another handle: opened again read-only for this)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (so a rename in it survives a crash); a no-op where the OS cannot do it."""
    try:
        _fsync_file(path)
    except OSError:  # e.g. Windows, or a filesystem without directory fsync: nothing more can be done
        pass


def umask() -> int:
    """The process's file mode creation mask (read by setting it and setting it back: Python has no getter)."""
    m = os.umask(0o022)
    os.umask(m)
    return m


def default_mode(path: str | Path, is_dir: bool) -> None:
    """Give a file or directory refdir is about to commit the mode a plain ``open``/``mkdir`` would give it under
    the umask (0644 / 0755 under the usual 022), so that the output can be read by whoever may read the user's
    other files (a checkpoint served by another account, a report on a shared machine). :mod:`tempfile` creates
    0600 / 0700, and so does safetensors 0.8's writer (it writes a temp file and renames it; safetensors issue
    #782), for any path it is given."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask())


def _fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root`` and every directory in it (before the tree is renamed), each given
    the mode the umask gives a new one (:func:`default_mode`)."""
    for d, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                default_mode(p, is_dir=False)
                _fsync_file(p)
        default_mode(d, is_dir=True)
        fsync_dir(d)


# ------------------------------------------------------------------ which directories refdir wrote

MARKER = ".refdir"
_MARKER_BODY = {"written_by": "refdir", "note": "written by refdir; refdir --force may replace this directory"}
# directories written before the marker existed are recognised by a refdir file with these keys
_LEGACY_OWNED = {"stage.json": ("key", "stage"), "refdir_edit.json": ("kind",), "refdir_converted.json": ("sha256",),
                 "config.json": ("run", "kl_marks", "variants")}  # the last: a search's study directory


def _json_dict(path: Path) -> dict | None:
    """The JSON object in regular file ``path`` (not a link), or None."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_marker(directory: str | Path, listed: bool = True) -> None:
    """Mark ``directory`` as written by refdir: what lets ``--force`` replace it later. A new marker starts an
    empty list of the files refdir wrote there (:func:`note_written` adds to it); an existing one is kept.
    ``listed=False``: no list, the whole directory counts as refdir's (a bench's scratch directory, which
    other libraries' writers fill)."""
    m = Path(directory) / MARKER
    if _json_dict(m) is None:
        if m.is_symlink():  # never write through a link
            m.unlink()
        m.write_text(json.dumps({**_MARKER_BODY, **({"files": []} if listed else {})}) + "\n")


def _manifest_of(path: Path) -> tuple[Path, dict] | None:
    """The nearest directory above ``path`` that holds refdir's marker, with the marker, when that marker keeps
    a file list (markers from before the list trust their whole directory, and are left as they are)."""
    for d in Path(os.path.abspath(path)).parents:
        m = _json_dict(d / MARKER)
        if m is not None:
            return (d, m) if m.get("written_by") == "refdir" and isinstance(m.get("files"), list) else None
    return None


def note_written(*paths: str | Path) -> None:
    """Add ``paths`` (files refdir is about to write, or wrote by another library's own writer: the optuna
    journal) to the file list of the nearest refdir-marked directory above them. Called by :func:`atomic_file`
    before its rename, so a crash leaves at worst a listed name without a file, never a refdir file unlisted.
    The marker itself is written by :func:`atomic_write_text`, and is not listed."""
    for p in paths:
        found = None if Path(p).name == MARKER else _manifest_of(Path(p))
        if found is None:
            continue
        d, m = found
        rel = Path(os.path.abspath(p)).relative_to(d).as_posix()
        if rel not in m["files"]:
            atomic_write_text(d / MARKER, json.dumps({**m, "files": [*m["files"], rel]}) + "\n")


def foreign_files(directory: str | Path) -> list[str]:
    """The entries under ``directory`` (a directory refdir wrote) that refdir did not write: not its marker or
    lock, not a listed file, not a temp name of its writers, and not inside a subdirectory that carries its own
    marker and holds nothing foreign either. Links count as foreign (refdir writes none). Empty where the marker
    predates the file list (such a directory is trusted whole, as before)."""
    d = Path(directory)
    marker = _json_dict(d / MARKER)
    listed = marker.get("files") if marker is not None else None
    if not isinstance(listed, list):
        return []
    listed = set(listed)
    out: list[str] = []

    def walk(sub: Path, rel: str) -> None:
        for e in sorted(sub.iterdir()):
            name = f"{rel}{e.name}"
            if e.is_symlink():
                out.append(name)
            elif e.is_dir():
                if (e / MARKER).exists():
                    out.extend(f"{name}/{x}" for x in foreign_files(e))
                elif not is_temp_name(e.name):
                    walk(e, f"{name}/")
            elif name not in listed and not (rel == "" and e.name in (MARKER, LOCK_NAME)) and not is_temp_name(e.name):
                out.append(name)

    walk(d, "")
    return out


def written_by_refdir(directory: str | Path) -> bool:
    """Whether ``directory`` holds refdir's marker (or, from before the marker, a refdir stage/edit file)."""
    d = Path(directory)
    marker = _json_dict(d / MARKER)
    if marker is not None:
        return marker.get("written_by") == "refdir"
    for name, keys in _LEGACY_OWNED.items():
        obj = _json_dict(d / name)
        if obj is not None and all(k in obj for k in keys):
            return True
    return False


def _protected(real: Path) -> bool:
    """A filesystem root, the home directory, or a directory holding the current directory."""
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError, OSError):
        home = None
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    return real == Path(real.anchor) or real == home or (cwd is not None and cwd.is_relative_to(real))


def check_replaceable(target: str | Path) -> None:
    """Raise one clear error unless ``target`` may be replaced under ``--force``: it is missing, empty, or a
    directory refdir wrote (:func:`written_by_refdir`). Never a link, a file, a filesystem root, the home
    directory or a directory holding the current one."""
    t = Path(target)
    if not os.path.lexists(t):
        return
    if t.is_symlink():
        raise RefdirError(f"{t} is a symbolic link; refusing to replace it")
    if not t.is_dir():
        raise RefdirError(f"{t} is a file, not a directory written by refdir; refusing to replace it")
    if _protected(t.resolve()):
        raise RefdirError(f"refusing to replace {t}: it is a filesystem root, the home directory or holds the "
                          "current directory")
    try:
        empty = not any(t.iterdir())
    except OSError as e:
        raise RefdirError(f"cannot read {t}: {e.strerror or e}") from e
    if not empty and not written_by_refdir(t):
        raise RefdirError(f"{t} was not written by refdir; refusing to replace it")
    if not empty and (foreign := foreign_files(t)):
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise RefdirError(f"{t} holds files refdir did not write ({', '.join(foreign[:3])}{more}); refusing to "
                          "replace it: move them out of it first")


def remove_dir(target: str | Path) -> None:
    """Delete ``target`` after :func:`check_replaceable` allowed it (the ``--force`` path of writers that
    do not go through :func:`atomic_dir`)."""
    check_replaceable(target)
    if os.path.lexists(target):
        shutil.rmtree(target)


def make_output_dir(path: str | Path, listed: bool = True) -> Path:
    """Create ``path`` (with parents) if needed and mark it as refdir's: for directories that grow in place
    (a run directory, a search directory) rather than appearing whole through :func:`atomic_dir`. ``listed``:
    see :func:`write_marker`."""
    p = Path(path)
    with write_errors(p):
        p.mkdir(parents=True, exist_ok=True)
        write_marker(p, listed)
    return p


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path``, every symbolic link resolved, lies inside ``root`` (resolved too)."""
    try:
        return Path(path).resolve(strict=True).is_relative_to(Path(root).resolve(strict=True))
    except (OSError, RuntimeError):
        return False


# ------------------------------------------------------------------ atomic writers


def _list_tree(root: Path) -> None:
    """Set the marker's file list of ``root`` (an :func:`atomic_dir` about to be committed, all refdir's) to every
    file under it outside subdirectories with their own marker."""
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if not (Path(d) / x / MARKER).exists()]
        rel = Path(d).relative_to(root)
        files += [(rel / n).as_posix() for n in names if not (d == str(root) and n == MARKER)]
    (root / MARKER).write_text(json.dumps({**_MARKER_BODY, "files": sorted(files)}) + "\n")


def _make_tmp_dir(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as e:
        raise write_error(target, e) from e


@contextmanager
def atomic_dir(target: str | Path, force: bool = False, listed: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target``.

    An existing ``target`` is refused unless ``force``, and even then unless refdir wrote it or it is empty
    (:func:`check_replaceable`). The new directory gets refdir's marker; its files are fsynced before the
    rename and the parent directory after it. On any error the temporary directory is removed, so no partial
    output is left behind. ``listed=False``: a marker without a file list (see :func:`write_marker`), for refdir's
    own cache, whose copies are rebuilt whatever was added to them.
    """
    target = Path(target)
    if os.path.lexists(target):
        if not force:
            raise RefdirError(f"output directory {target} already exists; pass --force to overwrite it")
        check_replaceable(target)
    tmp = _make_tmp_dir(target)
    try:
        with write_errors(target):
            write_marker(tmp, listed)  # first, so that files written inside are listed here, not further up
            yield tmp
            if listed:
                _list_tree(tmp)  # the final marker, listing every file of the tree
            else:
                write_marker(tmp, listed)  # again, should the writer have cleared the directory
            _fsync_tree(tmp)
            if os.path.lexists(target):
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed to ``path``.

    For writers that need a file name (safetensors, gguf). An existing ``path`` is refused unless
    ``overwrite`` (writers of a user's output file pass their ``--force``); a directory is never replaced.
    On any error the temporary file is removed; a full disk or a read-only location becomes one clear error.
    """
    path = Path(path)
    check_file_target(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with write_errors(path):
            yield Path(tmp)
            default_mode(tmp, is_dir=False)  # after the writer, which may have replaced the file (safetensors)
            _fsync_file(tmp)
            note_written(path)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_file_target(path: str | Path, force: bool) -> None:
    """Refuse to write the file ``path`` over an existing one unless ``force``, and over a directory always."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        raise RefdirError(f"{p} is a directory; refusing to replace it with a file")
    if os.path.lexists(p) and not force:
        raise RefdirError(f"{p} already exists; pass --force to overwrite it")


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


def read_json_object(path: str | Path, what: str) -> dict:
    """The JSON object in ``path``; unreadable text, broken JSON or another JSON value is one clear error that names
    ``what`` (e.g. "metadata file") and the path."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RefdirError(f"corrupt {what} {p}: {e}") from e
    if not isinstance(obj, dict):
        raise RefdirError(f"corrupt {what} {p}: not a JSON object")
    return obj


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
