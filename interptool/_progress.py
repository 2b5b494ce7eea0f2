"""The one channel for what interptool tells its user while it works.

Progress bars (:func:`progress`) and one-line status messages (:func:`say`) both honour
``--quiet`` (:func:`set_quiet`); :func:`warn` is for the few lines that must be seen even
then. No other module prints to the user or reads the quiet flag.
Results (a report's path, a table) are printed by the CLI commands themselves.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar of this process."""
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    """Whether ``--quiet`` (or :func:`set_quiet`) silenced messages and bars."""
    return _QUIET


def progress_enabled() -> bool:
    """Bars are drawn only when not quiet and stderr is a terminal."""
    return not _QUIET and sys.stderr.isatty()


def say(message: str) -> None:
    """One status line on stderr (``[interptool] message``), silenced by ``--quiet``."""
    if not _QUIET:
        print(f"[interptool] {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A line the user must see even with ``--quiet`` (``interptool: message`` on stderr):
    a guess interptool made for them, a result that needs care."""
    print(f"interptool: {message}", file=sys.stderr, flush=True)


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    leave: bool = False,
) -> Iterator[T] | tqdm:
    """Wrap ``iterable`` in a tqdm bar, disabled when quiet or not on a tty.

    Without an iterable it returns a bar to ``update()`` by hand (use as a context manager).
    """
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        disable=not progress_enabled(),
        dynamic_ncols=True,
    )
