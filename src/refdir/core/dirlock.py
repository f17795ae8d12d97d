"""One writer per directory, and the cleanup of what a killed writer left behind.

A run (or search) directory is written by one refdir process at a time. The lock is ``fcntl.flock`` on the
directory's ``.refdir.lock`` file: the kernel drops it when the holding process ends, however it ends (SIGKILL
included), so a lock left by a dead process is simply taken over, and no stale lock can outlive its process.
The file holds the holder's pid while it writes (for the error message a second writer gets) and is emptied
when the lock is released. Where ``flock`` is unavailable (no ``fcntl``, or a filesystem without it) the pid in
the file decides: a live process other than this one holds the directory, a dead one does not.

A process that already holds a directory's lock may take it again (a search preparing a run's stages): the
inner taker does not own the lock and releasing it is a no-op; the first taker releases it.

:func:`clean_stale` removes the temp names of :mod:`refdir.core.io`'s atomic writers (``.NAME.tmp-*`` and
``.NAME.old-PID`` directories, ``.NAME.XXXXXXXX.tmp`` files) that a killed writer leaves; it is called under the
lock, so no live writer of the directory owns them.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from refdir.errors import RefdirError

LOCK_NAME = ".refdir.lock"

# the temp names of refdir.core.io: atomic_dir's mkdtemp(prefix=".NAME.tmp-") and its ".NAME.old-PID", and
# atomic_file's mkstemp(prefix=".NAME.", suffix=".tmp") (8 random characters from [a-z0-9_])
_STALE = re.compile(r"^\..+\.(tmp-[a-z0-9_]+|old-\d+|[a-z0-9_]{8}\.tmp)$")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of the temp names above (a file or directory a refdir writer owns)."""
    return _STALE.match(name) is not None


# resolved directory -> the DirLock of this process that owns its lock
_OWNERS: dict[str, weakref.ref] = {}


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a pid we may not signal exists too; on Windows, where signal 0
    would interrupt the process, every pid counts as alive)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirLock:
    """The writer's lock on one directory (see the module docstring). :meth:`acquire` takes it or raises a
    RefdirError naming the holder; :meth:`stamp` writes this process's pid once the writer commits to the
    directory; :meth:`release` (or the end of the process) gives it back."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self._file = None  # the open lock file, while this object owns the lock
        self._held = False  # whether acquire() succeeded (as owner, or inside this process's owner)
        self._stamped = False

    @property
    def held(self) -> bool:
        return self._held

    def _key(self) -> str:
        return str(self.dir.resolve())

    def acquire(self) -> DirLock:
        """Take the lock (creating the directory and the lock file if needed); a no-op when held already."""
        if self._held:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        owner = _OWNERS.get(self._key())
        if owner is not None and owner() is not None and owner()._file is not None:
            self._held = True  # this process holds it already: share, do not own
            return self
        f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")  # open while the lock is held
        try:
            if not self._flock(f):
                raise RefdirError(f"{self.dir} is in use by another refdir process (pid {self._holder(f)}); "
                                  "wait for it to end or choose another --out")
        except BaseException:
            f.close()
            raise
        self._file, self._held = f, True
        _OWNERS[self._key()] = weakref.ref(self)
        return self

    def _flock(self, f) -> bool:
        """Lock ``f`` without waiting: True when taken, False when another process holds it."""
        try:
            import fcntl
        except ImportError:
            return self._pid_free(f)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            return self._pid_free(f)  # e.g. ENOLCK: a filesystem without flock
        return True

    def _pid_free(self, f) -> bool:
        """The fallback without flock: free unless the pid in the file is another live process."""
        pid = self._holder(f)
        return not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)))

    @staticmethod
    def _holder(f) -> str:
        f.seek(0)
        pid = f.read().strip()
        return pid if pid else "unknown"

    def stamp(self) -> None:
        """Write this process's pid into the lock file (only the owner does; nothing before the writer commits,
        so a refused command leaves the file as it was)."""
        if self._file is not None and not self._stamped:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(f"{os.getpid()}\n")
            self._file.flush()
            self._stamped = True

    def release(self) -> None:
        """Give the lock back (the owner empties the file first); a no-op when not held."""
        if self._file is not None:
            if self._stamped:
                self._file.seek(0)
                self._file.truncate()
                self._file.flush()
            self._file.close()  # closing the descriptor drops the flock
            self._file = None
            if _OWNERS.get(self._key()) is not None and _OWNERS[self._key()]() is self:
                del _OWNERS[self._key()]
        self._held = self._stamped = False


@contextmanager
def adding_to(path: str | Path | None) -> Iterator[None]:
    """Hold the writer lock of the existing directory ``path`` while a command adds to it (eval, bench and analyze
    write their outputs, report sections and the re-rendered report into a run directory), so that it never writes
    beside a run or search still writing there: that is refused with one error. A ``path`` that is None or not a
    directory refdir writes (it has no lock file) is left to the command's own checks (nothing is created here)."""
    if path is None or not (Path(path) / LOCK_NAME).is_file():
        yield
        return
    lock = DirLock(path).acquire()
    try:
        yield
    finally:
        lock.release()


def clean_stale(root: str | Path) -> list[Path]:
    """Remove the temp files and directories refdir's atomic writers leave when killed, anywhere under ``root``
    (links are removed, never followed). Returns what was removed."""
    removed = []
    for d, dirs, files in os.walk(root):
        for name in [n for n in dirs if is_temp_name(n)]:
            p = Path(d) / name
            if p.is_symlink():
                p.unlink()
            else:
                shutil.rmtree(p, ignore_errors=True)
            dirs.remove(name)
            removed.append(p)
        for name in files:
            if is_temp_name(name):
                (Path(d) / name).unlink(missing_ok=True)
                removed.append(Path(d) / name)
    return sorted(removed)
