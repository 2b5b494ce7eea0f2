"""Activation cache: logits, labels and named-layer features of a model over a data set, in HDF5.

* :func:`cache_activations` runs a model over a data set and writes a resumable cache;
* :class:`ActivationCache` reads one (lazily, in blocks);
* :func:`capture_layers` is the hook context manager behind it, usable on its own;
* :func:`write_cache` writes a cache from arrays you already have;
* ``Cache*Error`` tell apart the kinds of :class:`~interptool.errors.CacheError` (a file made
  with other settings, a lock held by another process, a failed forward pass, a full disk,
  non-finite activations, a file that is not a cache);
* :func:`launched` / :func:`rank_info` tell whether this process is one of several started by
  torchrun, and which.

The file layout is described in docs/cache-format.md.
"""

from interptool.cache._distributed import launched, rank_info
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
    "write_cache",
]
