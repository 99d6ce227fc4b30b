"""Who may write into a store: one plain capture, or the workers of one sharded capture, never both.

A plain writer (and `merge`) holds the store's `.lock` exclusively. Shard workers hold it shared, so they run
side by side, and each also holds `.lock.<i>-of-<n>` exclusively, so the same shard never runs twice; a worker
of another split (m != n, whose sessions would overlap) is refused while one of this split runs. The locks are
the kernel's (flock): a writer killed at any moment holds them no more.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from probes.activations.errors import StoreError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


def _pid_in(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _take(path: Path, mode: int, busy: str) -> int | None:
    """flock `path` with `mode` (non-blocking); StoreError(busy) when held; None on a filesystem without locks."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in(fd)
            os.close(fd)
            raise StoreError(busy.format(holder=holder or "unknown", path=path, folder=path.parent)) from None
        except OSError as err:  # a filesystem without locks: go on, but say that nothing is guarded
            os.close(fd)
            log.warning("%s: cannot lock (%s); a second writer would not be stopped", path, err)
            return None
        try:  # a finishing writer unlinks the file: the one locked must still be the one at the path
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _claim(fd: int, path: Path) -> None:
    old = _pid_in(fd)
    if old is not None and old != os.getpid():
        state = "no longer running" if not _alive(old) else "no longer holding it"
        log.warning("%s: took over the lock left by process %d (%s)", path, old, state)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


class StoreLock:
    """`with StoreLock(folder):` one writer at a time; `with StoreLock(folder, shard=(i, n)):` worker i of a split
    into n. A writer that may not start is refused with a StoreError naming the process that holds the lock."""

    def __init__(self, folder: str | os.PathLike, shard: tuple[int, int] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.shard = shard
        self.fds: list[tuple[int, Path, bool]] = []  # fd, path, unlink on exit

    def __enter__(self) -> "StoreLock":
        if self.shard is None:
            fd = _take(self.path, fcntl.LOCK_EX, "{folder}: another capture (process {holder}) is writing into "
                       "this store (lock file {path}); wait for it to end or use another folder")
            if fd is not None:
                _claim(fd, self.path)
                self.fds.append((fd, self.path, True))
            return self
        i, n = self.shard
        fd = _take(self.path, fcntl.LOCK_SH, "{folder}: a capture that is not sharded (process {holder}) is writing "
                   "into this store; wait for it to end")
        if fd is not None:
            self.fds.append((fd, self.path, False))  # shared: no pid (several hold it), never unlinked
        try:
            self._refuse_other_splits(n)
            mine = self.folder / f"{LOCK_FILE}.{i}-of-{n}"
            fd = _take(mine, fcntl.LOCK_EX, f"{{path}}: shard {i}/{n} is already being captured (process "
                       "{holder})")
        except BaseException:
            self.__exit__()
            raise
        if fd is not None:
            _claim(fd, mine)
            self.fds.append((fd, mine, True))
        return self

    def _refuse_other_splits(self, n: int) -> None:
        for other in self.folder.glob(f"{LOCK_FILE}.*-of-*"):
            m = re.fullmatch(rf"{re.escape(LOCK_FILE)}\.(\d+)-of-(\d+)", other.name)
            if m is None or int(m.group(2)) == n:
                continue
            fd = _take(other, fcntl.LOCK_SH, f"{{path}}: a capture split into {m.group(2)} shards (process "
                       f"{{holder}}) is writing into this store; a split into {n} would capture the same sessions "
                       "twice; use the same number of shards")
            if fd is not None:
                os.close(fd)

    def __exit__(self, *exc: Any) -> None:
        for fd, path, unlink in reversed(self.fds):
            if unlink:
                path.unlink(missing_ok=True)
            os.close(fd)
        self.fds = []


@contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold `path` exclusively for a short read-modify-write (blocking: the holder is another worker of the same
    capture, which releases it within the write)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            log.warning("%s: cannot lock (%s)", path, err)
        yield
    finally:
        os.close(fd)
