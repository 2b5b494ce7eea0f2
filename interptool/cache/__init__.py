"""Activation cache: logits, labels and named-layer features of a model over a data set, in HDF5."""

from interptool.cache._format import write_cache
from interptool.cache._reader import ActivationCache

__all__ = ["ActivationCache", "write_cache"]

try:  # the model-driven writer (hooks, resumable batches)
    from interptool.cache._writer import cache_activations, capture_layers  # noqa: F401

    __all__ += ["cache_activations", "capture_layers"]
except ImportError:  # pragma: no cover - during development only
    pass
