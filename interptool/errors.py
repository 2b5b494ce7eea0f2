"""User-facing errors.

Every problem caused by the user's input (a file, a flag, a config field) is raised as an
:class:`InterptoolError` subclass whose message names the file or field, what was expected
and how to fix it. The CLI prints the message and exits with status 2, without a traceback.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import traceback
from typing import Any


class InterptoolError(Exception):
    """Base class for errors the user can fix; the CLI prints them and exits with code 2."""

    exit_code = 2


class CheckpointError(InterptoolError):
    """A weight file or architecture that cannot be loaded as asked."""


class DataError(InterptoolError):
    """A data set spec, folder, CSV or image that is missing or malformed."""


class CacheError(InterptoolError):
    """An activation cache that is missing, incomplete or does not match the request."""


class ConfigError(InterptoolError):
    """A configuration file or field that is invalid."""


class AnalysisError(InterptoolError):
    """Inputs to an analyzer that do not fit together (layers, label spaces, sizes)."""


class ParamsError(ConfigError, AnalysisError):
    """A bad analyzer parameter (from Python, a CLI flag or a config field).

    Raised by every analyzer's ``Params`` dataclass; the message names the field, the value,
    what was expected and the fix. It is both a :class:`ConfigError` (a setting the user chose)
    and an :class:`AnalysisError` (what analyzers raised for bad arguments before), so existing
    ``except`` clauses keep catching it. ``field`` is the dotted field name.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


# torch re-raises an error from a DataLoader worker as the same type, with a message of
# "Caught X in DataLoader worker process N." and the worker's traceback ending in the original
def release_loader(exc: BaseException) -> None:
    """Clear the local variables of the frames in ``exc``'s traceback.

    An error torch re-raises from a DataLoader worker sits in a reference cycle with those
    frames, which hold the loader's iterator: its worker processes then lived on as long as
    the error was kept (a notebook keeps the last one), and when the garbage collector finally
    freed it, after the loader's queues, the shutdown waited 5 s per worker. Cleared, the
    iterator goes when its owner drops it, and its workers with it."""
    traceback.clear_frames(exc.__traceback__)


# where a batch's shared-memory file descriptor is fetched from the worker that made it
_HAND_OVER = ("multiprocessing/resource_sharer.py", "torch/multiprocessing/reductions.py")


def worker_died(exc: BaseException) -> bool:
    """Whether ``exc`` is how a DataLoader reports a worker process that died (killed by a
    signal, e.g. the out-of-memory killer, or exited): torch's RuntimeError, or, when the dead
    worker still had a batch in shared memory to hand over, the broken connection to it
    (``ConnectionError``, ``EOFError`` raised while fetching that batch's file descriptor;
    the same errors raised by a model or a data set's own code are not a worker's death)."""
    if isinstance(exc, RuntimeError):
        return str(exc).startswith("DataLoader worker (pid")
    if isinstance(exc, (ConnectionError, EOFError)):
        tb = exc.__traceback__
        while tb is not None:
            name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
            if name.endswith(_HAND_OVER):
                return True
            tb = tb.tb_next
    return False


def set_aside_worker_signal() -> Any:
    """Put torch's SIGCHLD handler aside (main thread only) and return what to restore.

    While a loader whose worker died shuts down, the handler raises that death again from
    inside the loader's ``__del__``, where Python can only print it: a traceback ahead of
    the one-line error. ``SIG_DFL`` (not ``SIG_IGN``, which would reap the workers before
    the loader joins them) while the loader goes; :func:`restore_worker_signal` after."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def restore_worker_signal(previous: Any) -> None:
    """Undo :func:`set_aside_worker_signal`."""
    if previous is not None:
        signal.signal(signal.SIGCHLD, previous)


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (for an error that names another one)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


_WORKER_TRACEBACK = re.compile(r"Original Traceback.*?\n(?:\w+\.)*\w+Error: (.*)\Z", re.S)


def unwrap_worker_error(exc: InterptoolError) -> InterptoolError:
    """``exc`` as the DataLoader worker raised it: the traceback torch puts into the message
    when it re-raises the error in the main process is removed (the CLI prints one line).

    The local variables of ``exc``'s frames are cleared too (:func:`release_loader`)."""
    release_loader(exc)
    m = _WORKER_TRACEBACK.search(str(exc))
    if m:
        return type(exc)(m.group(1).strip())
    return exc
