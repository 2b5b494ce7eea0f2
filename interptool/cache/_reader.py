"""Read-only access to an activation cache, streaming features in blocks."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from interptool.cache._format import (
    FEATURES,
    FORMAT,
    MAX_SUFFIX,
    check_attrs,
    check_datasets,
    check_layer,
    damaged,
    decode_attrs,
    decode_ids,
    error_text,
)
from interptool.errors import CacheError


def _read_attrs(f: h5py.File, path: Path) -> dict[str, Any]:
    """The root attributes, decoded; one that cannot be read is a CacheError naming it."""
    out: dict[str, Any] = {}
    try:
        keys = list(f.attrs.keys())
    except (OSError, RuntimeError) as exc:
        raise damaged(path, "root attributes", f"cannot be read ({error_text(exc)})",
                      "readable attributes") from None
    for key in keys:
        try:
            out.update(decode_attrs({key: f.attrs[key]}))
        except (OSError, RuntimeError, TypeError, ValueError) as exc:  # UnicodeDecodeError too
            raise damaged(path, f"attribute {key!r}",
                          f"cannot be read ({error_text(exc, 120)})",
                          "a number or UTF-8 text") from None
    return out


class ActivationCache:
    """An interptool HDF5 activation cache opened for reading.

    Logits, labels and ids are small and loaded eagerly; features stay on disk and are read
    in blocks (``iter_features``) so memory does not grow with the number of images.

    Raises :class:`CacheError` for a missing file, a file that is not an interptool cache,
    one whose writing never finished (re-run ``interptool cache`` with the same arguments
    to resume it), or one that disagrees with the layout (docs/cache-format.md, "Checks on
    opening"): the types of ``complete``, ``n_done``, ``layers``, ``layer_shapes`` and
    ``dtype``, the kinds, ranks and lengths of ``/logits``, ``/labels`` and ``/index``, and
    the dtype and shape of every cached layer and its maxima are checked on opening (metadata
    only, no feature rows are read); ids that are not UTF-8 are refused, naming the row.
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self._layers: list[str] = []
        self._checked: set[str] = set()
        if self.path.is_dir():
            raise CacheError(f"{self.path}: is a folder, not a cache file; give the path of an "
                             "HDF5 file made by `interptool cache`")
        if not self.path.exists():
            raise CacheError(f"{self.path}: no such cache file; create it with `interptool cache`")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            from interptool._locks import locked_message, read_lock_holder

            holder = read_lock_holder(self.path)
            if holder is not None:  # HDF5 refuses a file open for writing elsewhere
                raise CacheError(locked_message(
                    self.path, holder, fix="read the cache once that run has finished")) \
                    from None
            reason = error_text(exc, 300)
            raise CacheError(
                f"{self.path}: not a readable HDF5 file ({reason}); re-create it with "
                "`interptool cache ... --overwrite`"
            ) from None
        try:
            self._open(allow_incomplete)
        except BaseException:
            self.close()
            raise

    def _open(self, allow_incomplete: bool) -> None:
        """Check the layout (attribute types, dataset kinds and shapes: metadata only, never
        the feature rows), then load logits, labels and ids. Raises :class:`CacheError`."""
        f = self._file
        self.attrs: dict[str, Any] = _read_attrs(f, self.path)
        if self.attrs.get("format") != FORMAT:
            raise CacheError(
                f"{self.path}: not an interptool activation cache (format attribute is "
                f"{self.attrs.get('format')!r}, expected {FORMAT!r})"
            )
        meta = check_attrs(self.path, self.attrs)
        self._meta = meta
        if not meta["complete"] and not allow_incomplete:
            done = meta["n_done"] or 0
            raise CacheError(
                f"{self.path}: incomplete cache ({done} images written; the run that made it "
                "was interrupted). Re-run the same `interptool cache` command to resume it."
            )
        if "logits" not in f and not meta["complete"] and not meta["n_done"]:
            # interrupted before its first batch was written: datasets are made with it
            self.n = 0
            self.logits = np.zeros((0, 0), np.float32)
            self.labels = np.zeros(0, np.int64)
            self.ids = []
            return
        self.n: int = check_datasets(f, self.path, meta["n_done"], meta["complete"])
        rows = int(f["logits"].shape[0])
        # every cached layer, named by the `layers` attribute (a file without it: the
        # datasets of /features), checked against layer_shapes and dtype
        listed = meta["layers"]
        if not listed:
            grp = f.get(FEATURES)
            listed = sorted(k for k in grp.keys() if not k.endswith(MAX_SUFFIX)) \
                if isinstance(grp, h5py.Group) else []
        for layer in listed:
            check_layer(f, self.path, layer, rows, meta["layer_shapes"], meta["dtype"])
            self._checked.add(layer)
        self._layers = list(listed)
        self.logits: np.ndarray = self._read("logits").astype(np.float32)
        self.labels: np.ndarray = self._read("labels").astype(np.int64)
        self.ids: list[str] = decode_ids(self.path, self._read("index"))

    def _read(self, name: str) -> np.ndarray:
        try:
            return self._file[name][: self.n]
        except (OSError, RuntimeError, ValueError, TypeError) as exc:
            raise damaged(self.path, f"dataset '/{name}'",
                          f"cannot be read ({error_text(exc)})",
                          "readable rows") from None

    # -- metadata ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """The cached layers, in request order (checked when the file was opened)."""
        return list(self._layers)

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

    def _layer_dataset(self, layer: str) -> h5py.Dataset:
        self._check_layer(layer)
        if layer not in self._checked:  # every listed layer is checked on opening
            meta = self._meta
            check_layer(self._file, self.path, layer, int(self._file["logits"].shape[0]),
                        meta["layer_shapes"], meta["dtype"])
            self._checked.add(layer)
        return self._file[FEATURES][layer]

    def features(self, layer: str) -> h5py.Dataset:
        """The on-disk (N, C, H, W) or (N, T, D) dataset of ``layer`` (lazy, sliceable).

        Its dtype and shape (rows, *layer_shapes[layer]) and those of ``<layer>_max`` are
        checked: a mismatch is a :class:`CacheError`."""
        return self._layer_dataset(layer)

    def feature_shape(self, layer: str) -> tuple[int, ...]:
        return (self.n, *self.features(layer).shape[1:])

    def feature_max(self, layer: str) -> np.ndarray:
        """Per-image, per-unit maxima (N, C), float32."""
        self._layer_dataset(layer)
        try:
            block = self._file[FEATURES][layer + MAX_SUFFIX][: self.n]
        except (OSError, RuntimeError) as exc:
            raise damaged(self.path, f"dataset '/{FEATURES}/{layer}{MAX_SUFFIX}'",
                          f"cannot be read ({error_text(exc)})",
                          "readable rows") from None
        return block.astype(np.float32)

    def iter_features(
        self, layer: str, batch_size: int = 256, dtype: Any = np.float32
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block)`` with blocks of at most ``batch_size`` images, in order."""
        ds = self.features(layer)
        for start in range(0, self.n, batch_size):
            stop = min(start + batch_size, self.n)
            try:
                block = ds[start:stop]
            except (OSError, RuntimeError) as exc:  # a damaged chunk
                raise damaged(self.path, f"dataset '/{FEATURES}/{layer}'",
                              f"rows {start}:{stop} cannot be read "
                              f"({error_text(exc)})", "readable rows") from None
            yield start, block.astype(dtype, copy=False)

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
