"""DataLoader worker processes (the cache's image decoders, the dissection's mask decoders):
their errors, their deaths and their shutdown, shared by both stages."""

from __future__ import annotations

import os
import re
import signal
import threading
import traceback
from typing import Any

from interptool.errors import InterptoolError

__all__ = ["describe", "release_loader", "restore_worker_signal", "set_aside_worker_signal",
           "unwrap_worker_error", "worker_died"]


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
    if (not hasattr(signal, "SIGCHLD")  # Windows: no such signal, no such handler
            or threading.current_thread() is not threading.main_thread()):
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


# torch re-raises an error from a DataLoader worker as the same type, with a message of
# "Caught X in DataLoader worker process N." and the worker's traceback ending in the original
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
