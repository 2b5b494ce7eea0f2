"""The HDF5 activation-cache layout shared by the writer, the reader and the analyzers.

See docs/cache-format.md. Kept in one place so the writer and reader cannot drift apart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT = "interptool-cache/1"
FEATURES = "features"
MAX_SUFFIX = "_max"

# Attributes stored as JSON text (HDF5 attributes hold scalars/strings, not nested dicts).
JSON_ATTRS = (
    "model",
    "preprocessing",
    "layers",
    "layer_shapes",
    "versions",
    "skipped",
    "extra",
    "class_names",
    "threads",
    "token_grid",
    "distributed",
    "shard",
    "numerics",
    "model_kwargs",
)


def chunk_rows(row_shape: Sequence[int], itemsize: int, target: int = 512 * 1024) -> int:
    """Rows per chunk so a chunk is about ``target`` bytes, in the 64 KiB..1 MiB range.

    A row larger than 1 MiB gets a chunk of its own (one image). Callers cap the result at
    the dataset length. Chunks of at most 1 MiB fit HDF5's default chunk cache, so writing a
    batch that ends inside a chunk does not re-read it from disk.
    """
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * itemsize
    return max(1, target // max(row_bytes, 1))


def encode_attr(key: str, value: Any) -> Any:
    if key in JSON_ATTRS:
        return json.dumps(value, sort_keys=True, default=str)
    if value is None:
        return ""
    return value


def decode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if key in JSON_ATTRS and isinstance(value, str):
            try:
                value = json.loads(value) if value else None
            except json.JSONDecodeError:
                pass
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def write_cache(
    path: str | os.PathLike,
    *,
    logits: np.ndarray,
    labels: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    features: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a complete cache from in-memory arrays (bring-your-own activations, tests).

    ``features`` maps layer name -> (N, C, H, W) or (N, T, D) array. Per-image maxima are
    computed here. ``attrs`` may carry ``data_fingerprint``, ``data_spec``, ``model`` etc.
    The file is written under a temporary name and renamed, so it is never seen half-written.
    """
    path = Path(path)
    logits = np.asarray(logits, dtype=np.float32)
    n = logits.shape[0]
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if labels.shape != (n,) or len(ids) != n:
        raise ValueError("logits, labels and ids must have the same length")
    features = dict(features or {})
    # tmp + fsync + rename (interptool._provenance.atomic_path): never seen half-written, and
    # the temporary file is removed on any failure (a full disk included)
    from interptool._provenance import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("logits", data=logits)
        f.create_dataset("labels", data=labels)
        f.create_dataset("index", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        grp = f.create_group(FEATURES)
        shapes = {}
        for layer, arr in features.items():
            arr = np.asarray(arr)
            if arr.shape[0] != n:
                raise ValueError(f"features[{layer!r}] has {arr.shape[0]} rows, expected {n}")
            shapes[layer] = list(arr.shape[1:])
            # maxima of the stored (dtype-rounded) values, as cache_activations writes them
            arr = arr.astype(dtype, copy=False)
            grp.create_dataset(
                layer,
                data=arr,
                chunks=(
                    min(n, chunk_rows(arr.shape[1:], np.dtype(dtype).itemsize)),
                    *arr.shape[1:],
                )
                if n
                else None,
            )
            grp.create_dataset(layer + MAX_SUFFIX, data=feature_maxima(arr))
        base = {
            "format": FORMAT,
            "n_done": n,
            "layers": list(features),
            "layer_shapes": shapes,
            "data_spec": "",
            "data_fingerprint": "",
            "arch": "",
            "checkpoint_sha256": "",
            "seed": 0,
        }
        base.update(attrs or {})
        for key, value in base.items():
            f.attrs[key] = encode_attr(key, value)
        f.attrs["complete"] = True
    return path


def feature_maxima(block: np.ndarray) -> np.ndarray:
    """Per-image, per-channel maxima of a feature block: (N, C, H, W) -> (N, C); tokens (N, T, D) -> (N, D)."""
    block = np.asarray(block)
    if block.ndim == 4:
        return block.reshape(block.shape[0], block.shape[1], -1).max(axis=2).astype(np.float32)
    if block.ndim == 3:
        return block.max(axis=1).astype(np.float32)
    return block.astype(np.float32)
