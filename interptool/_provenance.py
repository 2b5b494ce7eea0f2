"""Provenance recorded in every output (versions, checksums, seeds, time) and atomic writes.

Atomic writes (:func:`atomic_path`, :func:`atomic_write_text`, :func:`atomic_write_bytes`,
:func:`atomic_savefig`) write a temporary file beside the target, ``fsync`` it, rename it over
the target and ``fsync`` the folder: a crash leaves either the old file or the new one, never
a torn one, and any failure (a full disk included) removes the temporary file. A full disk
(``ENOSPC``) or an exceeded quota (``EDQUOT``) becomes :class:`NoSpaceError`, one line naming
the device and the file.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import os
import platform
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from interptool.errors import InterptoolError

_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(InterptoolError):
    """The device holding an output is full (``ENOSPC``) or the user's quota is spent."""


#: digests of files hashed in this process, by the file's identity and version (device,
#: inode, size, modification and status-change times): a file read by several analyses
#: (``compare`` records the cache's checksum for every model and layer it dissects; a
#: Broden-scale cache is ~10 GB, ~7 s to hash) is hashed once. A cache is written in place,
#: and ``--overwrite`` deletes it and makes a new one under the same name, which may get the
#: same inode number back: every write and every new file moves the change time (ctime),
#: which no program can set back (``touch -r`` and ``cp -p`` restore only the mtime).
_DIGESTS: dict[tuple[int, ...], str] = {}
_DIGESTS_KEPT = 64


def _identity(path: str | os.PathLike) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash_file(path: str | os.PathLike, chunk: int = 1 << 20,
               stop: threading.Event | None = None) -> str | None:
    """Hex sha256 of a file read in chunks (bounded memory); None if ``stop`` was set."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            if stop is not None and stop.is_set():
                return None
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _remember(before: tuple[int, ...], path: str | os.PathLike, digest: str) -> None:
    try:
        if _identity(path) != before:  # changed while it was read: the digest is of neither
            return
    except OSError:  # gone since it was read: the digest stands, but is not kept
        return
    _DIGESTS[before] = digest
    while len(_DIGESTS) > _DIGESTS_KEPT:
        del _DIGESTS[next(iter(_DIGESTS))]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bounded memory); a file this process hashed
    before and that has not changed since is not read again."""
    before = _identity(path)
    known = _DIGESTS.get(before)
    if known is not None:
        return known
    digest = _hash_file(path, chunk)
    assert digest is not None
    _remember(before, path, digest)
    return digest


class BackgroundDigest:
    """The sha256 of a file, computed by a thread while the caller works.

    Reading a file and hashing it release the GIL, so on a machine with a core to spare the
    checksum an output records costs no wall time (a 10 GB cache takes ~7 s to hash on one
    core). :meth:`result` waits for it (and raises what the thread met, e.g. a missing file);
    :meth:`cancel` stops the thread between chunks (a run that failed does not wait for it).
    A file hashed before in this process is not read again (:func:`sha256_file`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self._stop = threading.Event()
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        try:
            before = _identity(path)
        except OSError as exc:
            self._error = exc
            return
        self._digest = _DIGESTS.get(before)
        if self._digest is None:
            self._thread = threading.Thread(target=self._work, args=(before,),
                                            name="interptool-sha256", daemon=True)
            self._thread.start()

    def _work(self, before: tuple[int, ...]) -> None:
        try:
            self._digest = _hash_file(self.path, stop=self._stop)
            if self._digest is not None:
                _remember(before, self.path, self._digest)
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self) -> str:
        """The hex digest, once the thread is done."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self._digest is None:
            raise RuntimeError(f"the sha256 of {self.path} was cancelled")
        return self._digest

    def cancel(self) -> None:
        """Stop hashing (between chunks); :meth:`result` then raises."""
        self._stop.set()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions() -> dict[str, str]:
    """Versions of interptool and the libraries whose behaviour shapes the results."""
    import importlib.metadata as md

    out: dict[str, str] = {"python": platform.python_version()}
    for name in ("interptool", "torch", "torchvision", "timm", "captum", "numpy", "scipy", "h5py"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def seed_everything(seed: int) -> int:
    """Seed python, numpy and torch RNGs; returns the seed so callers can record it."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return seed


def provenance(**extra: Any) -> dict[str, Any]:
    """A provenance block: versions, host and time, plus caller-supplied fields."""
    return {"versions": versions(), "created": now_iso(), "host": platform.node(), **extra}




# -- full disks ------------------------------------------------------------------------------


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` means "no space left on device" / "quota exceeded".

    h5py reports HDF5 write failures as ``OSError`` or ``RuntimeError`` without ``errno``,
    the errno being only in the text (``errno = 28, error message = 'No space left ...'``).
    """
    seen = 0
    while exc is not None and seen < 5:
        if getattr(exc, "errno", None) in _NO_SPACE_ERRNOS:
            return True
        if isinstance(exc, (OSError, RuntimeError)):
            text = str(exc)
            if ("No space left on device" in text or "Disk quota exceeded" in text
                    or "errno = 28," in text or "errno = 122," in text):
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def device_of(path: str | os.PathLike) -> str:
    """A human name for the file system holding ``path``: ``SOURCE (mounted at MOUNTPOINT)``.

    Read from ``/proc/self/mountinfo`` (the longest mount point above the path); falls back
    to the folder itself where that file does not exist (not Linux).
    """
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        p = p.resolve()
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return str(p if p.is_dir() else p.parent)
    best, best_src = "", ""
    for line in lines:
        parts = line.split()
        if len(parts) < 10 or "-" not in parts:
            continue
        mount = parts[4].replace("\\040", " ")
        source = parts[parts.index("-") + 2]
        if (str(p) == mount or str(p).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, best_src = mount, source
    if not best:
        return str(p if p.is_dir() else p.parent)
    return f"{best_src} (mounted at {best})"


def no_space_message(path: str | os.PathLike, detail: str = "") -> str:
    """The one-line message for a full disk while writing ``path``."""
    extra = f"; {detail}" if detail else ""
    return (f"no space left on {device_of(path)} while writing {path}{extra}; free space and "
            "re-run the same command")


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes available to this user on the file system holding ``path`` (``statvfs``)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return int(st.f_bavail) * int(st.f_frsize)


# -- atomic writes ---------------------------------------------------------------------------


def _tmp_name(path: Path, keep_suffix: bool = True) -> Path:
    # keep_suffix: the suffix stays last for writers that pick a format from it (numpy's
    # savez appends ".npz" otherwise). Writers that do not (raw bytes, savefig with an
    # explicit format) get "NAME.SUFFIX.tmpPID", so the file a SIGKILL leaves behind does not
    # pass for an output of that type (e.g. "*.png").
    if keep_suffix:
        return path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """``fsync`` a folder so a rename inside it survives a power cut (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and Windows-like mounts) refuse fsync on a folder
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """``fsync`` a written file, so that a rename of it never exposes lost data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to ``path``.

    Any exception inside the block (or while fsyncing / renaming) removes the temporary file
    and re-raises; a full disk is re-raised as :class:`NoSpaceError`. Example::

        with atomic_path(out / "iou.npz") as tmp:
            np.savez(tmp, iou=iou)
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_no_space(exc):
            raise NoSpaceError(no_space_message(path)) from None
        raise
    tmp = _tmp_name(path, keep_suffix)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, Exception) and is_no_space(exc):
            raise NoSpaceError(no_space_message(path)) from None
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, keep_suffix=False) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write a text file so that a crash never leaves a half-written file under ``path``.

    Raises :class:`NoSpaceError` (and leaves no temporary file) when the disk is full.
    """
    atomic_write_bytes(path, text.encode(encoding))


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """``fig.savefig`` through a temporary file, so an interrupted run leaves no torn image."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_path(path, keep_suffix=False) as tmp:
        fig.savefig(tmp, **kwargs)


def output_lock(path: str | os.PathLike, **kwargs: Any) -> Any:
    """interptool's advisory lock on an output (see :func:`interptool._locks.output_lock`)."""
    from interptool._locks import output_lock as _output_lock

    return _output_lock(path, **kwargs)
