"""Read-only access to an activation cache, streaming features in blocks."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from interptool.cache._format import FEATURES, FORMAT, MAX_SUFFIX, decode_attrs
from interptool.errors import CacheError


class ActivationCache:
    """An interptool HDF5 activation cache opened for reading.

    Logits, labels and ids are small and loaded eagerly; features stay on disk and are read
    in blocks (``iter_features``) so memory does not grow with the number of images.

    Raises :class:`CacheError` for a missing file, a file that is not an interptool cache,
    or one whose writing never finished (re-run ``interptool cache`` with the same arguments
    to resume it).
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"{self.path}: no such cache file; create it with `interptool cache`")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise CacheError(
                f"{self.path}: not a readable HDF5 file ({exc}); re-create it with "
                "`interptool cache ... --overwrite`"
            ) from None
        self.attrs: dict[str, Any] = decode_attrs(self._file.attrs)
        if self.attrs.get("format") != FORMAT:
            self.close()
            raise CacheError(
                f"{self.path}: not an interptool activation cache (format attribute is "
                f"{self.attrs.get('format')!r}, expected {FORMAT!r})"
            )
        if not self.attrs.get("complete", False) and not allow_incomplete:
            done = self.attrs.get("n_done", 0)
            self.close()
            raise CacheError(
                f"{self.path}: incomplete cache ({done} images written; the run that made it "
                "was interrupted). Re-run the same `interptool cache` command to resume it."
            )
        if "logits" not in self._file:
            if self.attrs.get("complete", False) or int(self.attrs.get("n_done", 0)):
                self.close()
                raise CacheError(f"{self.path}: the cache has no 'logits' dataset (damaged); "
                                 "re-create it with `interptool cache ... --overwrite`")
            # interrupted before its first batch was written: datasets are made with it
            self.n = 0
            self.logits = np.zeros((0, 0), np.float32)
            self.labels = np.zeros(0, np.int64)
            self.ids = []
            return
        self.n: int = int(self.attrs.get("n_done", self._file["logits"].shape[0]))
        self.logits: np.ndarray = self._file["logits"][: self.n].astype(np.float32)
        self.labels: np.ndarray = self._file["labels"][: self.n].astype(np.int64)
        self.ids: list[str] = [
            s.decode() if isinstance(s, bytes) else str(s) for s in self._file["index"][: self.n]
        ]

    # -- metadata ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        grp = self._file.get(FEATURES)
        if grp is None:
            return []
        listed = self.attrs.get("layers") or []
        present = [k for k in grp.keys() if not k.endswith(MAX_SUFFIX) or k in listed]
        return [layer for layer in listed if layer in grp] or sorted(present)

    @property
    def data_fingerprint(self) -> str:
        return str(self.attrs.get("data_fingerprint", ""))

    @property
    def data_spec(self) -> str:
        """The data spec the cache was made from, as reopening it must read it: an
        unversioned concept-world spec predates version 2 becoming the default and means
        version 1 (``interptool.data.recorded_spec``); ``attrs["data_spec"]`` keeps the raw text."""
        from interptool.data import recorded_spec

        return recorded_spec(str(self.attrs.get("data_spec", "")))

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        return self.attrs.get("preprocessing")

    @property
    def model_info(self) -> dict[str, Any] | None:
        return self.attrs.get("model")

    @property
    def name(self) -> str:
        """Display name: the model's name if recorded, else the file stem."""
        info = self.model_info or {}
        return str(info.get("name") or self.path.stem)

    # -- features ---------------------------------------------------------------------------
    def _check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            close = difflib.get_close_matches(layer, self.layers, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise CacheError(
                f"{self.path}: layer {layer!r} is not in this cache (cached layers: "
                f"{', '.join(self.layers) or 'none'}).{hint} Re-run `interptool cache` with "
                f"--layers {layer} to add it."
            )

    def features(self, layer: str) -> h5py.Dataset:
        """The on-disk (N, C, H, W) or (N, T, D) dataset of ``layer`` (lazy, sliceable)."""
        self._check_layer(layer)
        return self._file[FEATURES][layer]

    def feature_shape(self, layer: str) -> tuple[int, ...]:
        return (self.n, *self.features(layer).shape[1:])

    def feature_max(self, layer: str) -> np.ndarray:
        """Per-image, per-unit maxima (N, C), float32."""
        self._check_layer(layer)
        return self._file[FEATURES][layer + MAX_SUFFIX][: self.n].astype(np.float32)

    def iter_features(
        self, layer: str, batch_size: int = 256, dtype: Any = np.float32
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block)`` with blocks of at most ``batch_size`` images, in order."""
        ds = self.features(layer)
        for start in range(0, self.n, batch_size):
            stop = min(start + batch_size, self.n)
            yield start, ds[start:stop].astype(dtype, copy=False)

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None and f.id.valid:
            f.close()

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ActivationCache({str(self.path)!r}, n={self.n}, layers={self.layers})"
