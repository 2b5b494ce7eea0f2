"""Progress bars that stay quiet with ``--quiet`` or when stderr is not a terminal."""

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


def progress_enabled() -> bool:
    return not _QUIET and sys.stderr.isatty()


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
