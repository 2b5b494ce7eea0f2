"""Kinds of :class:`~interptool.errors.CacheError`, so callers can react to each differently.

A pipeline (``compare``) that reuses caches must tell apart a file made with other settings
(:class:`CacheMismatchError`: rebuilding it, into a new file or with the user's explicit
``--overwrite``, is the remedy) from faults where rebuilding would destroy resumable work:
another process writing it (:class:`CacheLockedError`), the model failing
(:class:`CacheForwardError`), a full disk (:class:`CacheDiskFullError`), non-finite
activations (:class:`CacheNonFiniteError`) or a file that is not ours
(:class:`CacheForeignError`). Every one is a ``CacheError`` (exit 2 in the CLI).
"""

from __future__ import annotations

from pathlib import Path

from interptool._locks import OutputLockedError
from interptool._provenance import NoSpaceError
from interptool.errors import CacheError


class CacheMismatchError(CacheError):
    """An existing cache was made with other settings (model, data, layers, dtype, ...).

    ``fields`` lists the differing attribute names; ``path`` is the file.
    """

    def __init__(self, message: str, *, path: Path | None = None,
                 fields: list[str] | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.fields = list(fields or [])


class CacheLockedError(CacheError, OutputLockedError):
    """Another interptool process (or this one) is writing the cache file now."""


class CacheForwardError(CacheError):
    """The model's forward pass raised (wrong input size or channels, out of memory)."""


class CacheDiskFullError(CacheError, NoSpaceError):
    """The disk filled up; ``n_safe`` images are durably in the (resumable) file."""

    def __init__(self, message: str, *, path: Path | None = None, n_safe: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.n_safe = n_safe


class CacheNonFiniteError(CacheError):
    """A layer or the logits hold NaN or Inf; ``layer`` is ``"logits"`` for the outputs."""

    def __init__(self, message: str, *, layer: str = "", image: str = "") -> None:
        super().__init__(message)
        self.layer = layer
        self.image = image


class CacheForeignError(CacheError):
    """The output path holds a file that is not an interptool cache (or cannot be read)."""


__all__ = [
    "CacheDiskFullError",
    "CacheForeignError",
    "CacheForwardError",
    "CacheLockedError",
    "CacheMismatchError",
    "CacheNonFiniteError",
]
