"""Background loading shared by the cache and the dissection: DataLoader worker processes
(the cache's image decoders, the dissection's mask decoders), their errors, their deaths and
their shutdown; and :class:`Prefetch`, a thread that reads ahead (the cache's decoding
without workers, the dissection's mask store)."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import threading
import traceback
from collections.abc import Iterator
from typing import Any

from interptool._resources import torch_threads
from interptool.errors import InterptoolError

__all__ = ["Prefetch", "describe", "loader_failed", "one_torch_thread", "release_loader",
           "restore_worker_signal", "set_aside_worker_signal", "unwrap_worker_error",
           "worker_died"]


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


def loader_failed(exc: BaseException) -> tuple[bool, Any]:
    """What a stage does when iterating its DataLoader raised ``exc``: release the loader
    (:func:`release_loader`) and, when a worker died (:func:`worker_died`), set torch's
    SIGCHLD handler aside until the loader is gone. Returns ``(died, previous)``; pass
    ``previous`` to :func:`restore_worker_signal` once the loader has shut down."""
    release_loader(exc)
    if worker_died(exc):
        return True, set_aside_worker_signal()
    return False, None


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


class Prefetch:
    """Iterate ``source`` in a background thread, ``depth`` items ahead (bounded memory).

    Items come out in order; an exception raised by ``source`` is raised again by
    :meth:`__next__` at its place in the sequence (after the items before it), so errors
    about a bad image keep their meaning. :meth:`close` stops the thread (also when the
    consumer stops early: an error in the forward pass, an interrupt). ``init`` runs first in
    the thread.

    Torch work in the thread (the transform's conversion and normalisation, collation,
    pinning) runs on one intra-op thread (:func:`one_torch_thread`): with the process's
    count it would start an OpenMP team of its own beside the forward pass's and
    oversubscribe the cores the plan gave the forward pass.
    """

    _END = object()

    def __init__(self, source: Any, depth: int = 2, init: Any = None,
                 name: str = "interptool-cache-decode") -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._init = init
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source,), daemon=True,
                                        name=name)
        self._thread.start()
        # Wait until the thread has read torch's process-wide default thread count and set
        # its own to 1, so that it reads the default the process had before the caller sets
        # the forward pass's threads, and restores that one when it ends.
        self._ready.wait()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source: Any) -> None:
        try:
            with one_torch_thread():
                self._ready.set()
                if self._init is not None:  # e.g. the CUDA device, which is per thread
                    self._init()
                for item in source:
                    if not self._put((item, None)):
                        return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((None, exc))
            return
        finally:
            self._ready.set()  # also when one_torch_thread itself failed
        self._put((self._END, None))

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        item, exc = self._queue.get()
        if exc is not None:
            self.close()
            raise exc
        if item is self._END:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a put waiting for room
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        # Long enough for the image being decoded: the thread restores torch's process-wide
        # thread default when it ends, and one ending after the caller has moved on would
        # overwrite a setting made since. A thread stuck longer (a hung file system) is left.
        self._thread.join(timeout=60)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the calling (non-main) thread's torch operations on one intra-op thread.

    With torch's OpenMP backend ``torch.set_num_threads`` sets the calling thread's OpenMP
    thread count (and MKL's, which is per thread too) and a process-wide default that a
    thread takes when it first uses torch; it leaves the count of threads already running
    torch (the one running the model) as it is. So this thread reads the default first
    (its own count starts from it), sets 1, and restores the default at the end, so that
    threads started later get the process's setting and not this thread's 1. (torch's own
    pin-memory thread sets 1 the same way, without the restore.)
    """
    with torch_threads(1):
        yield
