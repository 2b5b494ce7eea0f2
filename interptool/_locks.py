"""Advisory locks of interptool's own, one beside every file or folder a run writes.

HDF5's own file locking is switched off on many shared file systems
(``HDF5_USE_FILE_LOCKING=FALSE`` on NFS / Lustre), and it only guards the HDF5 file while it is
open: not the checks that come before (resume or overwrite?) nor files that are not HDF5. So a
writer first takes :func:`output_lock` on ``FILE.lock``:

* the lock is ``fcntl.flock`` on a separate small file, held for the whole run; the kernel
  drops it when the process ends in any way (``kill -9`` included), so a crash never leaves a
  stale lock, only a stale ``.lock`` file that the next run takes over;
* the lock file holds JSON ``{"pid", "host", "started", "argv"}`` of the holder, so a second
  writer can say who is writing;
* a second writer (another process, or the same process opening the same output twice) gets
  :class:`OutputLockedError` at once instead of waiting.

``flock`` is advisory: it binds interptool processes, not other programs. On NFS, Linux maps
``flock`` onto POSIX byte-range locks (NLM), which work across hosts; Lustre needs the
``flock`` mount option.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from interptool._provenance import NoSpaceError, is_no_space, no_space_message, now_iso
from interptool.errors import InterptoolError

LOCK_SUFFIX = ".lock"


class OutputLockedError(InterptoolError):
    """Another interptool process (or this one) is writing the output already."""

    def __init__(self, message: str, *, path: Path | None = None,
                 holder: dict | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder or {}


class LockUnavailableError(InterptoolError):
    """The lock file cannot be created (read-only folder or file system, no permission)."""


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock: written as JSON into the lock file."""

    pid: int
    host: str
    started: str
    argv: str = ""

    def to_dict(self) -> dict:
        return {"pid": self.pid, "host": self.host, "started": self.started, "argv": self.argv}


class HeldLock:
    """A lock held by this process (what :func:`output_lock` yields).

    Besides the lock, it can keep a *space reserve*: the lock file is grown with
    ``posix_fallocate`` so that, when the disk fills up, :meth:`release_reserve` frees enough
    room for the writer to flush and close its file cleanly (HDF5 needs to write metadata on
    close; without room it leaves a file that cannot be opened).
    """

    def __init__(self, path: Path, lock_file: Path, fd: int, info: LockInfo, size: int) -> None:
        self.path = path
        self.lock_file = lock_file
        self.info = info
        self._fd = fd
        self._json_size = size
        self.reserved = 0

    def reserve(self, nbytes: int) -> None:
        """Make the reserve at least ``nbytes`` (raises ``OSError`` ENOSPC if it cannot)."""
        if nbytes <= self.reserved:
            return
        try:
            os.posix_fallocate(self._fd, self._json_size, nbytes)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # no fallocate on this file system: write the zeros ourselves
            os.pwrite(self._fd, b"\0" * nbytes, self._json_size)
            os.fsync(self._fd)
        self.reserved = nbytes

    def release_reserve(self) -> int:
        """Give the reserve back to the file system; returns the bytes freed."""
        freed, self.reserved = self.reserved, 0
        if freed:
            try:
                os.ftruncate(self._fd, self._json_size)
            except OSError:
                return 0
        return freed


# Paths this process holds (resolved), so a nested take of the same output fails clearly
# instead of silently succeeding (flock on a second descriptor of one file conflicts, but the
# message would then name our own pid as "another process").
_HELD: dict[str, LockInfo] = {}
_HELD_GUARD = threading.Lock()


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file that guards ``path``: ``path`` + ``.lock`` in the same directory."""
    p = Path(path)
    return p.with_name(p.name + LOCK_SUFFIX)


def read_lock_holder(path: str | os.PathLike) -> dict | None:
    """The JSON of the lock file beside ``path`` if some process holds it now, else ``None``."""
    lp = lock_path(path)
    try:
        fd = os.open(lp, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            # A shared, non-blocking probe: it succeeds only if nobody holds the lock.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_json(fd)
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_json(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        # the holder may have padded its lock file with a space reserve (zeros)
        data = json.loads(raw.rstrip(b"\0").decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        # The holder may be between truncate and write: say "unknown", never fail on it.
        return {}


def locked_message(path: str | os.PathLike, holder: dict | None, *,
                   what: str = "writing", fix: str = "choose another --out") -> str:
    """The one-line message for a lock held by someone else."""
    h = holder or {}
    who = (f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started at "
           f"{h.get('started', '?')}")
    return (f"another interptool process ({who}) is {what} {path}; wait for it or {fix}")


@contextmanager
def output_lock(
    path: str | os.PathLike,
    *,
    what: str = "writing",
    fix: str = "choose another --out",
    error: type[OutputLockedError] = OutputLockedError,
) -> Iterator[HeldLock]:
    """Hold interptool's advisory lock on ``path`` (a file or folder) for the ``with`` block.

    Args:
        path: the output being written; the lock file is ``path`` + ``.lock`` beside it
            (its folder is created if needed).
        what: the verb used in the message a second writer gets (``"writing"``).
        fix: the advice given to the second writer after "wait for it or".
        error: the exception class raised when the lock is held (a subclass of
            :class:`OutputLockedError`, e.g. the cache's ``CacheLockedError``).

    Yields:
        A :class:`HeldLock` (``info``: what was written into the lock file; ``reserve()`` /
        ``release_reserve()`` for a space reserve).

    Raises:
        OutputLockedError: another process (or this one) holds the lock; the message names
            its pid, host and start time.
        InterptoolError: the lock file cannot be created (read-only folder, full disk).
    """
    target = Path(path)
    lp = lock_path(target)
    key = str(lp.resolve() if lp.parent.exists() else lp.absolute())
    with _HELD_GUARD:
        mine = _HELD.get(key)
    if mine is not None:
        raise error(
            f"this interptool process (pid {mine.pid} on {mine.host}, started at "
            f"{mine.started}) is already {what} {target}; one run cannot write the same "
            f"output twice at once: {fix}",
            path=target, holder=mine.to_dict())
    try:
        lp.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InterptoolError(f"{lp.parent}: cannot create the output folder ({exc.strerror}); "
                              "choose another --out") from None
    fd = _acquire(lp, target, what, fix, error)
    info = LockInfo(os.getpid(), platform.node(), now_iso(), " ".join(sys.argv)[:500])
    try:
        size = _write_holder(fd, lp, info)
    except BaseException:
        _release(fd, lp)
        raise
    with _HELD_GUARD:
        _HELD[key] = info
    try:
        yield HeldLock(target, lp, fd, info, size)
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        _release(fd, lp)


def _acquire(lp: Path, target: Path, what: str, fix: str,
             error: type[OutputLockedError]) -> int:
    # Loop: the file we locked may have been unlinked by its previous holder between our
    # open and our flock; then we hold a lock on a dead inode and must retry on the new one.
    for _ in range(100):
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _io_error(lp, exc, "create the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_json(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise error(locked_message(target, holder, what=what, fix=fix),
                            path=target, holder=holder) from None
            raise _io_error(lp, exc, "lock") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise InterptoolError(f"{lp}: could not take the lock (the lock file keeps being "
                          "replaced); retry")


def _write_holder(fd: int, lp: Path, info: LockInfo) -> int:
    data = json.dumps(info.to_dict()).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OSError as exc:
        raise _io_error(lp, exc, "write the lock file") from None
    return len(data)


def _release(fd: int, lp: Path) -> None:
    # Unlink while still holding the lock, so nobody can lock this inode after we let go
    # and believe they own the output (the inode check in _acquire catches the rest).
    try:
        lp.unlink()
    except OSError:
        pass
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _io_error(path: Path, exc: OSError, doing: str) -> InterptoolError:
    if is_no_space(exc):
        return NoSpaceError(no_space_message(path))
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LockUnavailableError(
            f"{path}: cannot {doing} ({exc.strerror or exc}); the folder is not writable: "
            "choose another --out")
    return InterptoolError(f"{path}: cannot {doing} ({exc.strerror or exc}); check that the "
                           "folder is writable or choose another --out")


def is_locked(path: str | os.PathLike) -> bool:
    """Whether some process holds the lock on ``path`` right now."""
    return read_lock_holder(path) is not None


__all__ = ["LOCK_SUFFIX", "HeldLock", "LockInfo", "LockUnavailableError", "OutputLockedError", "is_locked", "lock_path",
           "locked_message", "output_lock", "read_lock_holder"]
