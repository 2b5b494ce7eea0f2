"""Activation cache: logits, labels and named-layer features of a model over a data set, in HDF5.

* :func:`cache_activations` runs a model over a data set and writes a resumable cache;
* :class:`ActivationCache` reads one (lazily, in blocks);
* :func:`capture_layers` is the hook context manager behind it, usable on its own;
* :func:`write_cache` writes a cache from arrays you already have;
* ``Cache*Error`` tell apart the kinds of :class:`~interptool.errors.CacheError` (a file made
  with other settings, a lock held by another process, a failed forward pass, a full disk,
  non-finite activations, a file that is not a cache);
* :func:`launched` / :func:`rank_info` tell whether this process is one of several started by
  torchrun, and which; :func:`use_rank_gpu` makes its GPU current and returns the device to
  load models on.

The file layout is described in docs/cache-format.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> private module that defines it. Imported on first use, so a command that only
# reads caches (dissect, similarity) does not load the writer and the torchrun code.
_EXPORTS = {
    "launched": "_distributed",
    "rank_info": "_distributed",
    "use_rank_gpu": "_distributed",
    "CacheDiskFullError": "_errors",
    "CacheForeignError": "_errors",
    "CacheForwardError": "_errors",
    "CacheLockedError": "_errors",
    "CacheMismatchError": "_errors",
    "CacheNonFiniteError": "_errors",
    "write_cache": "_format",
    "capture_layers": "_hooks",
    "ActivationCache": "_reader",
    "CacheRun": "_writer",
    "cache_activations": "_writer",
    "run_cache": "_writer",
}

if TYPE_CHECKING:  # what static checkers and IDEs see
    from interptool.cache._distributed import launched, rank_info, use_rank_gpu
    from interptool.cache._errors import (
        CacheDiskFullError,
        CacheForeignError,
        CacheForwardError,
        CacheLockedError,
        CacheMismatchError,
        CacheNonFiniteError,
    )
    from interptool.cache._format import write_cache
    from interptool.cache._hooks import capture_layers
    from interptool.cache._reader import ActivationCache
    from interptool.cache._writer import CacheRun, cache_activations, run_cache


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'interptool.cache' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"interptool.cache.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ActivationCache",
    "CacheDiskFullError",
    "CacheForeignError",
    "CacheForwardError",
    "CacheLockedError",
    "CacheMismatchError",
    "CacheNonFiniteError",
    "CacheRun",
    "cache_activations",
    "launched",
    "rank_info",
    "capture_layers",
    "run_cache",
    "use_rank_gpu",
    "write_cache",
]
