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

from interptool.errors import CacheError

FORMAT = "interptool-cache/1"
FEATURES = "features"
MAX_SUFFIX = "_max"
# Datasets every cache holds once its first batch is written: name -> what the reader expects.
REQUIRED = {
    "logits": "a 2-D float dataset (N, K) with K >= 1",
    "labels": "a 1-D integer dataset (N,)",
    "index": "a 1-D string dataset (N,) of UTF-8 image ids",
}
# Values of the ``dtype`` attribute (the stored features). ``write_cache`` records none and
# may store any float type (float64 included).
FEATURE_DTYPES = ("float16", "float32")
RECREATE = "re-create it with `interptool cache ... --overwrite`"

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
    if block.ndim >= 4:  # as the writer's maxima: over every position after the channels
        return block.reshape(block.shape[0], block.shape[1], -1).max(axis=2).astype(np.float32)
    if block.ndim == 3:
        return block.max(axis=1).astype(np.float32)
    return block.astype(np.float32)


# -- validation of an opened cache (the reader; metadata only, never the rows) ---------------


def max_row_shape(row: Sequence[int]) -> tuple[int, ...]:
    """Per-image shape of ``<layer>_max`` for a layer whose per-image shape is ``row``:
    (C, H, W, ...) -> (C,); tokens (T, D) -> (D,); (C,) and () are their own maxima."""
    row = tuple(row)
    if len(row) >= 3:
        return row[:1]
    if len(row) == 2:
        return row[1:]
    return row


def _show(value: Any, limit: int = 80) -> str:
    text = " ".join(repr(value).split())  # one line, whatever the value holds
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_text(exc: BaseException, limit: int = 200) -> str:
    """An exception's text on one line, at most ``limit`` characters (h5py's messages span
    several lines)."""
    return " ".join(str(exc).split())[:limit]


def damaged(path: Any, field: str, problem: str, expected: str) -> CacheError:
    """The one-line error for a cache that disagrees with the layout: file, field, what was
    found, what was expected, and the fix."""
    return CacheError(
        f"{path}: {field} {problem}, expected {expected}; the file is damaged or was not "
        f"written by interptool: {RECREATE}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_attrs(path: Any, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Check the types of the root attributes the reader relies on; return them normalised.

    Returns ``complete`` (bool), ``n_done`` (int or None when absent), ``layers`` (list of
    names, or None when absent), ``layer_shapes`` (dict layer -> tuple, or None when absent)
    and ``dtype`` (str, or None when absent: ``write_cache`` records none).
    """
    out: dict[str, Any] = {}
    complete = attrs.get("complete", False)
    if not (isinstance(complete, (bool, np.bool_)) or (_is_int(complete) and complete in (0, 1))):
        raise damaged(path, "attribute 'complete'", f"is {_show(complete)}", "True or False")
    out["complete"] = bool(complete)

    n_done = attrs.get("n_done")
    if n_done is not None and (not _is_int(n_done) or n_done < 0):
        raise damaged(path, "attribute 'n_done'", f"is {_show(n_done)}",
                      "a whole number >= 0 (rows written)")
    out["n_done"] = None if n_done is None else int(n_done)

    layers = attrs.get("layers")
    if layers is not None:
        if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
            raise damaged(path, "attribute 'layers'", f"is {_show(layers)}",
                          'a JSON list of layer names such as ["layer3", "layer4"]')
        if len(set(layers)) != len(layers):
            raise damaged(path, "attribute 'layers'", f"names a layer twice ({_show(layers)})",
                          "each cached layer once")
    out["layers"] = layers

    shapes = attrs.get("layer_shapes")
    if shapes is not None:
        ok = isinstance(shapes, dict) and all(
            isinstance(k, str) and isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v)
            for k, v in shapes.items())
        if not ok:
            raise damaged(path, "attribute 'layer_shapes'", f"is {_show(shapes)}",
                          'a JSON object layer -> per-image shape such as {"layer4": [512, 7, 7]}')
        shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    out["layer_shapes"] = shapes

    dtype = attrs.get("dtype")
    if dtype is not None and dtype != "" and dtype not in FEATURE_DTYPES:
        raise damaged(path, "attribute 'dtype'", f"is {_show(dtype)}",
                      f"one of {', '.join(FEATURE_DTYPES)}")
    out["dtype"] = dtype or None
    return out


def _dataset(f: h5py.Group, name: str, path: Any, field: str, expected: str) -> h5py.Dataset:
    try:
        obj = f.get(name)
    except (KeyError, OSError, RuntimeError, ValueError) as exc:  # a dangling link, a bad header
        raise damaged(path, field, f"cannot be opened ({error_text(exc)})", expected) from None
    if obj is None:
        raise damaged(path, field, "is missing", expected)
    if not isinstance(obj, h5py.Dataset):
        kind = "a group" if isinstance(obj, h5py.Group) else type(obj).__name__
        raise damaged(path, field, f"is {kind}, not a dataset", expected)
    return obj


def _describe(ds: h5py.Dataset) -> str:
    kind = "string" if h5py.check_string_dtype(ds.dtype) is not None else str(ds.dtype)
    return f"has shape {tuple(ds.shape)} and dtype {kind}"


def check_datasets(f: h5py.File, path: Any, n_done: int | None, complete: bool) -> int:
    """Check ``/logits``, ``/labels`` and ``/index`` (kinds, ranks, equal lengths) against
    ``n_done``; return the number of rows to read (``n_done``, or all rows when absent)."""
    found = {}
    for name, expected in REQUIRED.items():
        ds = _dataset(f, name, path, f"dataset '/{name}'", expected)
        if name == "logits":
            ok = ds.ndim == 2 and ds.dtype.kind == "f" and ds.shape[1] >= 1
        elif name == "labels":
            ok = ds.ndim == 1 and ds.dtype.kind in "iu"
        else:
            ok = ds.ndim == 1 and h5py.check_string_dtype(ds.dtype) is not None
        if not ok:
            raise damaged(path, f"dataset '/{name}'", _describe(ds), expected)
        found[name] = ds.shape[0]
    if len(set(found.values())) != 1:
        have = ", ".join(f"/{k} {v}" for k, v in found.items())
        raise damaged(path, "datasets '/logits', '/labels', '/index'", f"have {have} rows",
                      "one row per image in each")
    rows = found["logits"]
    if n_done is None:
        return rows
    if n_done > rows or (complete and n_done != rows):
        raise damaged(path, "attribute 'n_done'", f"is {n_done} but the datasets hold {rows} rows",
                      f"n_done {'==' if complete else '<='} {rows}"
                      + (" in a complete cache" if complete else ""))
    return n_done


def check_layer(f: h5py.File, path: Any, layer: str, rows: int,
                shapes: Mapping[str, tuple[int, ...]] | None, dtype: str | None) -> h5py.Dataset:
    """Check ``/features/<layer>`` and its ``_max`` against ``layer_shapes`` and ``dtype``
    (shapes and dtypes only); return the features dataset."""
    grp = _dataset_group(f, path)
    field = f"dataset '/{FEATURES}/{layer}'"
    if shapes is None or layer not in shapes:
        _dataset(grp, layer, path, field, "one dataset per layer named in attribute 'layers'")
        raise damaged(path, "attribute 'layer_shapes'",
                      f"has no entry for cached layer {layer!r}" if shapes is not None
                      else "is missing", "the per-image shape of every cached layer")
    row = shapes[layer]
    want = (f"{dtype or 'a float dtype'} of shape {(rows, *row)} ({rows} rows, then "
            f"layer_shapes[{layer!r}] = {list(row)})")
    ds = _dataset(grp, layer, path, field, want)
    ok_dtype = ds.dtype == np.dtype(dtype) if dtype else ds.dtype.kind == "f"
    if not ok_dtype or tuple(ds.shape) != (rows, *row):
        raise damaged(path, field, _describe(ds), want)
    mfield = f"dataset '/{FEATURES}/{layer}{MAX_SUFFIX}'"
    mwant = f"float32 of shape {(rows, *max_row_shape(row))} (per-image maxima of {layer!r})"
    mx = _dataset(grp, layer + MAX_SUFFIX, path, mfield, mwant)
    if mx.dtype.kind != "f" or tuple(mx.shape) != (rows, *max_row_shape(row)):
        raise damaged(path, mfield, _describe(mx), mwant)
    return ds


def _dataset_group(f: h5py.File, path: Any) -> h5py.Group:
    grp = f.get(FEATURES)
    if grp is None or not isinstance(grp, h5py.Group):
        raise damaged(path, f"group '/{FEATURES}'",
                      "is missing" if grp is None else "is not a group",
                      "a group holding one dataset per cached layer")
    return grp


def decode_ids(path: Any, raw: Any) -> list[str]:
    """The image ids of ``/index`` as text; bytes that are not UTF-8 are a CacheError naming
    the row."""
    out = []
    for i, s in enumerate(raw):
        if isinstance(s, bytes):
            try:
                s = s.decode("utf-8")
            except UnicodeDecodeError:
                raise damaged(path, "dataset '/index'",
                              f"row {i} holds bytes that are not UTF-8 ({_show(bytes(s), 60)})",
                              "UTF-8 image ids") from None
        out.append(str(s))
    return out
