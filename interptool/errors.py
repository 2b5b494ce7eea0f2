"""User-facing errors.

Every problem caused by the user's input (a file, a flag, a config field) is raised as an
:class:`InterptoolError` subclass whose message names the file or field, what was expected
and how to fix it. The CLI prints the message and exits with status 2, without a traceback.
"""

from __future__ import annotations

import re
import traceback


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


def worker_died(exc: BaseException) -> bool:
    """Whether ``exc`` is how a DataLoader reports a worker process that died (killed by a
    signal, e.g. the out-of-memory killer, or exited): torch's RuntimeError, or, when the dead
    worker still had a batch in shared memory to hand over, the broken connection to the
    process that held its file descriptor (``ConnectionError``, ``EOFError``)."""
    if isinstance(exc, (ConnectionError, EOFError)):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker (pid")


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
