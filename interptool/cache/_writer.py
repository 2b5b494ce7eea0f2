"""Run a model over a data set and write logits, labels and layer features to an HDF5 cache.

The cache file is written in place, batch by batch, so that an interrupted run can resume:

* on the first batch every dataset is created with its full length ``N`` (``maxshape`` lets
  the file shrink at the end when bad images were skipped);
* after each batch the rows are written with one h5py write per dataset, then the two scalar
  attributes ``n_done`` (rows written) and ``next_item`` (data-set items consumed, bad ones
  included) are overwritten and the file is flushed;
* ``complete`` stays ``False`` until the very end, and :class:`ActivationCache` refuses such a
  file, so a half-written cache can never be mistaken for a whole one.

A re-run with the same arguments reopens the file, checks that model, data, layers, dtype and
preprocessing still match, and continues at ``next_item``. Batches start at multiples of the
batch size in both runs, so the resumed file holds exactly what an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, default_collate

from interptool._progress import progress
from interptool._provenance import now_iso, seed_everything, versions
from interptool.cache._format import (
    FEATURES,
    FORMAT,
    MAX_SUFFIX,
    chunk_rows,
    decode_attrs,
    encode_attr,
)
from interptool.cache._hooks import capture_layers, resolve_layers
from interptool.errors import CacheError, ConfigError, DataError, InterptoolError

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "float32": torch.float32}
COMPRESSIONS = ("gzip", "lzf")

# Attributes that must agree between a request and an existing file for it to be reused.
MATCH_KEYS = (
    "arch",
    "checkpoint_sha256",
    "weights_sha256",
    "data_fingerprint",
    "layers",
    "dtype",
    "preprocessing",
    "transform",
)


@dataclass
class CacheRun:
    """What one :func:`cache_activations` call did (the CLI prints :meth:`summary`)."""

    path: Path
    status: str  # "created", "resumed" or "hit"
    n_done: int
    n_items: int
    layers: list[str]
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_computed: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images_computed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        layers = ", ".join(self.layers) if self.layers else "logits only"
        if self.status == "hit":
            return (
                f"cache hit: {self.n_done} images ({layers}) already cached with matching "
                "model, data and settings; nothing to do"
            )
        how = "resumed and finished" if self.status == "resumed" else "cached"
        skipped = f", {len(self.skipped)} bad image(s) skipped" if self.skipped else ""
        return (
            f"{how} {self.n_done} images ({layers}){skipped} in {self.seconds:.1f} s "
            f"({self.images_per_s:.1f} images/s)"
        )


# -- helpers ---------------------------------------------------------------------------------


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the names and bytes of every parameter and buffer (in state_dict order).

    Identifies the weights actually in memory, so two random initialisations (no checkpoint)
    or two key mappings of one checkpoint are not mistaken for each other.
    """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # Reinterpret as bytes (bfloat16 and others have no numpy equivalent).
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _maxima(t: torch.Tensor) -> torch.Tensor:
    """Per-image maxima over positions: (N, C, H, W) -> (N, C); tokens (N, T, D) -> (N, D)."""
    if t.ndim >= 4:
        return t.flatten(2).amax(dim=2)
    if t.ndim == 3:
        return t.amax(dim=1)
    return t


def _collate_skip_none(items: list[Any]) -> Any:
    """Collate ``(tensor, label, index)`` items, dropping ``None`` (bad images with skip_bad)."""
    kept = [it for it in items if it is not None]
    if not kept:
        return None
    return default_collate(kept)


class _ForwardError(CacheError):
    """The model's forward pass raised (wrong input size or channels, out of memory)."""


def _forward_failed(model_name: str, shape: tuple[int, ...], exc: Exception) -> _ForwardError:
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else ""
    if "out of memory" in text.lower():
        fix = "lower --batch-size (or cache fewer / smaller layers)"
    else:
        fix = ("check --image-size (some architectures, e.g. ViTs, accept only their native "
               "size) and the number of --mean/--std values (input channels)")
    return _ForwardError(
        f"model {model_name} failed on a batch of shape {shape} ({type(exc).__name__}: "
        f"{first}); {fix}"
    )


_WRAPPED = re.compile(r"Original Traceback.*?\n(?:\w+\.)*\w+Error: (.*)\Z", re.S)


def _unwrap_worker_error(exc: InterptoolError) -> InterptoolError:
    """A DataLoader worker re-raises our error with a traceback in the message; strip it."""
    m = _WRAPPED.search(str(exc))
    if m:
        return type(exc)(m.group(1).strip())
    return exc


def _check_args(batch_size: int, workers: int, dtype: str, compression: str | None) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be an integer >= 0, got {workers!r}")
    if dtype not in DTYPES:
        raise ConfigError(
            f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)} "
            "(float16 halves the file size; maxima and logits are always float32)"
        )
    if compression not in (None, *COMPRESSIONS):
        raise ConfigError(
            f"compression {compression!r} is not supported; use gzip, lzf or none"
        )


def _resolve_device(loaded: Any, device: str | torch.device | None) -> torch.device:
    dev = torch.device(device if device is not None else getattr(loaded, "device", None) or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(dev)!r} was asked for but torch sees no CUDA GPU; use --device cpu"
        )
    return dev


def _model_device(model: torch.nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _choose_probe(dataset: Any, probe: bool | None) -> bool:
    # Broden-style data (segmentation masks) must be fed uncropped so masks stay aligned.
    if probe is None:
        return hasattr(dataset, "load_segmentation")
    return bool(probe)


def _jsonish(key: str, value: Any) -> str:
    """Canonical text of an attribute value for comparing a request with a file."""
    if key == "layers":
        value = sorted(value or [])
    return json.dumps(value, sort_keys=True, default=str)


def _mismatches(want: dict[str, Any], have: dict[str, Any], subset_layers: bool) -> list[str]:
    out = []
    for key in MATCH_KEYS:
        a, b = want.get(key), have.get(key)
        if key == "layers" and subset_layers:
            if set(a or []) <= set(b or []):
                continue
        elif _jsonish(key, a) == _jsonish(key, b):
            continue
        if key == "weights_sha256":
            hint = (
                " (a model built in your own code without a checkpoint gets new random "
                "weights each run unless seeded)"
                if not want.get("checkpoint_sha256")
                else ""
            )
            out.append(f"weights_sha256 differs: the model's weights are not those that made "
                       f"the file{hint}")
        elif key == "preprocessing":
            fields = sorted(k for k in set(a or {}) | set(b or {})
                            if (a or {}).get(k) != (b or {}).get(k))
            diffs = ", ".join(f"{k}: file has {(b or {}).get(k)!r}, asked for {(a or {}).get(k)!r}"
                              for k in fields)
            out.append(f"preprocessing differs ({diffs})")
        elif key == "checkpoint_sha256":
            def short(v: Any) -> str:
                return f"{str(v)[:12]}..." if v else "no checkpoint"

            out.append(f"checkpoint_sha256 differs (file: {short(b)}, now: {short(a)})")
        elif key == "data_fingerprint":
            out.append("data_fingerprint differs (the data set's ids, labels or file sizes "
                       "are not those the file was made from)")
        else:
            out.append(f"{key}: file has {b!r}, asked for {a!r}")
    return out


# -- the writer ------------------------------------------------------------------------------


def cache_activations(
    loaded: Any,
    dataset: Any,
    layers: Sequence[str] | None,
    path: str | os.PathLike,
    *,
    batch_size: int = 64,
    workers: int = 0,
    dtype: str = "float16",
    compression: str | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    probe: bool | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Path:
    """Cache logits, labels and the outputs of ``layers`` of a model over ``dataset`` in HDF5.

    Args:
        loaded: a :class:`interptool.loading.LoadedModel` (``model``, ``arch``,
            ``checkpoint_sha256``, ``preprocessing``, ``to_dict()``).
        dataset: an :class:`interptool.data.ImageDataset` (``ids``, ``labels``, ``spec``,
            ``fingerprint``, ``torch_dataset(transform, skip_bad)``).
        layers: dotted module names (``"layer4"``, ``"blocks.11"``) whose outputs are cached,
            or ``None``/``[]`` for logits and labels only.
        path: the ``.h5`` file. An incomplete file from an interrupted run with the same
            arguments is resumed; a complete matching one is reused as is (cache hit).
        batch_size, workers: DataLoader batch size and worker processes.
        dtype: ``"float16"`` or ``"float32"`` for the features (logits, maxima: float32).
        compression: ``None``, ``"gzip"`` or ``"lzf"``.
        overwrite: replace an existing file that does not match the request.
        skip_bad: skip images that fail to decode (listed in the ``skipped`` attribute; the
            cache then has fewer rows) instead of stopping with a :class:`DataError`.
        probe: ``True`` for the probe transform (resize, no crop), ``False`` for the eval
            transform; ``None`` picks probe for Broden-style data (segmentation masks).
        seed: seeds python/numpy/torch and is recorded.
        device: torch device; default ``loaded.device``. The model is moved there if needed.

    Returns:
        The path of the complete cache.

    Raises:
        CacheError: unknown layer, TorchScript model with layers, an existing file that does
            not match (without ``overwrite``) or cannot be read.
        DataError: an image fails to decode and ``skip_bad`` is false.
    """
    return run_cache(
        loaded,
        dataset,
        layers,
        path,
        batch_size=batch_size,
        workers=workers,
        dtype=dtype,
        compression=compression,
        overwrite=overwrite,
        skip_bad=skip_bad,
        probe=probe,
        seed=seed,
        device=device,
    ).path


def run_cache(
    loaded: Any,
    dataset: Any,
    layers: Sequence[str] | None,
    path: str | os.PathLike,
    *,
    batch_size: int = 64,
    workers: int = 0,
    dtype: str = "float16",
    compression: str | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    probe: bool | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> CacheRun:
    """:func:`cache_activations`, returning a :class:`CacheRun` (status, counts, speed)."""
    _check_args(batch_size, workers, dtype, compression)
    path = Path(path)
    layers = list(layers or [])
    model = loaded.model
    resolve_layers(model, layers)  # fail on a bad name before touching any file
    dev = _resolve_device(loaded, device)
    if _model_device(model) not in (None, dev):
        model.to(dev)
    model.eval()
    seed_everything(seed)

    n_items = len(dataset)
    if n_items == 0:
        raise DataError(f"data set {dataset.spec!r} holds no images; nothing to cache")
    ids = [str(i) for i in dataset.ids]
    use_probe = _choose_probe(dataset, probe)
    pre = loaded.preprocessing
    transform = pre.probe_transform() if use_probe else pre.eval_transform()

    want: dict[str, Any] = {
        "arch": str(loaded.arch),
        "checkpoint_sha256": loaded.checkpoint_sha256 or "",
        "weights_sha256": weights_sha256(model),
        "data_fingerprint": str(dataset.fingerprint),
        "layers": layers,
        "dtype": dtype,
        "preprocessing": pre.to_dict(),
        "transform": "probe" if use_probe else "eval",
    }

    # -- decide: fresh, resume or hit ------------------------------------------------------
    status = "created"
    if path.exists() and overwrite:
        path.unlink()
    elif path.exists():
        have = _read_attrs(path)
        complete = bool(have.get("complete", False))
        bad = _mismatches(want, have, subset_layers=complete)
        if bad:
            state = "complete" if complete else "incomplete (interrupted)"
            raise CacheError(
                f"{path}: an existing {state} cache was made with other settings "
                f"({'; '.join(bad)}). Pass --overwrite (overwrite=True) to replace it, or "
                "choose another output path."
            )
        if complete:
            skipped = list(have.get("skipped") or [])
            if skipped and not skip_bad:
                raise CacheError(
                    f"{path}: this cache skipped {len(skipped)} bad image(s) "
                    f"({', '.join(skipped[:3])}{'...' if len(skipped) > 3 else ''}); "
                    "re-run with --skip-bad to reuse it or fix the images and --overwrite"
                )
            log.info("cache hit: %s already holds this model's activations", path)
            return CacheRun(
                path, "hit", int(have.get("n_done", 0)), n_items, list(have.get("layers") or []),
                skipped,
            )
        if int(have.get("n_total", -1)) != n_items:
            raise CacheError(
                f"{path}: incomplete cache was started for {have.get('n_total')} images but the "
                f"data set has {n_items}; pass --overwrite to start again"
            )
        status = "resumed"

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        f = h5py.File(path, "a")
    except OSError as exc:
        raise CacheError(
            f"{path}: cannot open for writing ({exc}); another process may be writing it, or "
            "the directory is read-only"
        ) from None
    # A forward pass that fails on the very first batch of a new file (wrong --image-size,
    # channels, ...) leaves nothing worth resuming: the file is removed so that the corrected
    # command starts afresh instead of reporting "made with other settings".
    discard = False
    try:
        with f:
            if status == "created":
                _init_attrs(f, want, loaded, dataset, n_items, seed, compression, batch_size)
            start = int(f.attrs["next_item"])
            n_done = int(f.attrs["n_done"])
            # Bad images before the resume point are the items missing from the rows written.
            done_ids = set(_decode_ids(f["index"][:n_done])) if "index" in f else set()
            skipped = [ids[i] for i in range(start) if ids[i] not in done_ids]
            del done_ids

            t0 = time.perf_counter()
            computed = 0
            if start < n_items:
                try:
                    computed = _run_batches(
                        f, model, dataset, ids, layers, transform, dev,
                        start=start, n_items=n_items, batch_size=batch_size, workers=workers,
                        dtype=dtype, compression=compression, skip_bad=skip_bad,
                        skipped=skipped, desc=f"cache {getattr(loaded, 'name', '') or loaded.arch}",
                    )
                except _ForwardError:
                    discard = status == "created" and int(f.attrs["n_done"]) == 0
                    raise
            n_done = int(f.attrs["n_done"])
            if "logits" not in f:  # every image was bad: still write a well-formed empty cache
                _create_from_dummy(f, model, pre, layers, dev, n_items, dtype, compression, ids)
            if n_done < n_items:  # bad images were skipped: drop the unused tail rows
                _shrink(f, n_done)
            f.attrs["skipped"] = encode_attr("skipped", skipped)
            # whether bad images were allowed to be left out (the run that finished the file)
            f.attrs["skip_bad"] = bool(skip_bad)
            f.attrs["complete"] = True
            f.flush()
            seconds = time.perf_counter() - t0
    except _ForwardError:
        if discard:
            path.unlink(missing_ok=True)
        raise
    return CacheRun(path, status, n_done, n_items, layers, skipped, seconds, computed)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _read_attrs(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise CacheError(f"{path}: exists but cannot be read ({exc}); check its permissions or "
                         "choose another --out") from None
    if head != _HDF5_SIGNATURE:
        # Most likely the user's own file named by mistake: never suggest deleting it first.
        raise CacheError(
            f"{path}: exists and is not an HDF5 file, so not an activation cache; choose "
            "another --out (--overwrite would delete this file)"
        )
    try:
        with h5py.File(path, "r") as f:
            have = decode_attrs(f.attrs)
    except OSError as exc:
        raise CacheError(
            f"{path}: exists but cannot be read as HDF5 ({exc}). If a cache run was killed "
            "while writing, the file may be damaged: pass --overwrite to start again."
        ) from None
    if have.get("format") != FORMAT:
        raise CacheError(
            f"{path}: exists and is not an interptool activation cache (format "
            f"{have.get('format')!r}); choose another output path or pass --overwrite"
        )
    return have


def _init_attrs(
    f: h5py.File,
    want: dict[str, Any],
    loaded: Any,
    dataset: Any,
    n_items: int,
    seed: int,
    compression: str | None,
    batch_size: int,
) -> None:
    attrs: dict[str, Any] = {
        "format": FORMAT,
        "complete": False,
        "n_done": 0,
        "next_item": 0,
        "n_total": n_items,
        **want,
        "model": loaded.to_dict(),
        "data_spec": str(dataset.spec),
        "layer_shapes": {},
        "versions": versions(),
        "seed": int(seed),
        "created": now_iso(),
        "skipped": [],
        "compression": compression or "",
        "batch_size": int(batch_size),
        # class names travel with the logits so analyzers can label matrices and tables
        "class_names": list(getattr(dataset, "class_names", None) or []),
    }
    for key, value in attrs.items():
        f.attrs[key] = encode_attr(key, value)
    # n_done / next_item are overwritten after every batch: fixed-size int64 scalars are
    # rewritten in place in the object header (no reallocation while a crash may strike).
    f.attrs["n_done"] = np.int64(0)
    f.attrs["next_item"] = np.int64(0)
    f.flush()


def _decode_ids(raw: np.ndarray) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in raw]


def _create_datasets(
    f: h5py.File,
    n: int,
    logits_shape: tuple[int, ...],
    feats: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    dtype: str,
    compression: str | None,
    ids: list[str],
) -> None:
    """Create every dataset with its full length ``n``, chunked along N."""

    def make(parent: h5py.Group, name: str, row: tuple[int, ...], dt: Any) -> None:
        itemsize = np.dtype(dt).itemsize if not isinstance(dt, h5py.Datatype) else 1
        rows = min(n, chunk_rows(row, itemsize))
        parent.create_dataset(
            name,
            shape=(n, *row),
            maxshape=(None, *row),
            dtype=dt,
            chunks=(rows, *row),
            compression=compression,
        )

    make(f, "logits", logits_shape, np.float32)
    make(f, "labels", (), np.int64)
    # Fixed-length UTF-8 ids: no global heap writes per batch (fewer metadata updates).
    width = max(1, max(len(i.encode()) for i in ids))
    f.create_dataset(
        "index",
        shape=(n,),
        maxshape=(None,),
        dtype=h5py.string_dtype("utf-8", width),
        chunks=(min(n, chunk_rows((), width)),),
        compression=compression,
    )
    grp = f.require_group(FEATURES)
    shapes = {}
    for layer, (row, max_row) in feats.items():
        make(grp, layer, row, np.dtype(dtype))
        make(grp, layer + MAX_SUFFIX, max_row, np.float32)
        shapes[layer] = list(row)
    f.attrs["layer_shapes"] = encode_attr("layer_shapes", shapes)
    f.flush()


def _shrink(f: h5py.File, n: int) -> None:
    for name in ("logits", "labels", "index"):
        f[name].resize(n, axis=0)
    for ds in f[FEATURES].values():
        ds.resize(n, axis=0)


def _create_from_dummy(
    f: h5py.File,
    model: torch.nn.Module,
    pre: Any,
    layers: list[str],
    dev: torch.device,
    n: int,
    dtype: str,
    compression: str | None,
    ids: list[str],
) -> None:
    """Learn output shapes from one zero input when no image could be read at all."""
    x = torch.zeros((1, *pre.input_size), device=dev, dtype=_input_dtype(model))
    with torch.inference_mode(), capture_layers(model, layers) as acts:
        logits = model(x)
    feats = {k: (tuple(v.shape[1:]), tuple(_maxima(v).shape[1:])) for k, v in acts.items()}
    _create_datasets(f, n, tuple(logits.shape[1:]), feats, dtype, compression, ids)


def _run_batches(
    f: h5py.File,
    model: torch.nn.Module,
    dataset: Any,
    ids: list[str],
    layers: list[str],
    transform: Any,
    dev: torch.device,
    *,
    start: int,
    n_items: int,
    batch_size: int,
    workers: int,
    dtype: str,
    compression: str | None,
    skip_bad: bool,
    skipped: list[str],
    desc: str,
) -> int:
    """Forward every batch from ``start``, writing rows and progress after each one."""
    tds = dataset.torch_dataset(transform, skip_bad=skip_bad)
    if start:
        tds = Subset(tds, range(start, n_items))
    cuda = dev.type == "cuda"
    loader = DataLoader(
        tds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate_skip_none,
        pin_memory=cuda,
    )
    feat_dtype = DTYPES[dtype]
    in_dtype = _input_dtype(model)

    def grab(name: str, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Runs inside the forward hook, before any later in-place op can touch ``out``:
        # a converted copy for the file, and maxima (computed on the device, rounded like
        # the stored values so max(features) == features_max exactly).
        out = out.detach()
        if out.ndim < 2:
            raise CacheError(
                f"layer {name!r} output has shape {tuple(out.shape)}; expected (N, C, H, W), "
                "(N, T, D) or (N, C)"
            )
        feat = out.to(feat_dtype, copy=True)
        # (N, C) outputs are their own maxima: take them from the copy, never alias ``out``.
        mx = feat.float() if out.ndim == 2 else _maxima(out).to(feat_dtype).float()
        if cuda:
            return feat.to("cpu", non_blocking=True), mx.to("cpu", non_blocking=True)
        return feat, mx

    n_done = int(f.attrs["n_done"])
    item = start
    computed = 0
    bar = progress(total=n_items, desc=desc, unit="img")
    bar.initial = bar.n = start  # the rate counts only this run's images
    it = iter(loader)
    try:
        with torch.inference_mode(), capture_layers(model, layers, grab) as acts:
            while item < n_items:
                try:
                    batch = next(it)
                except StopIteration:  # pragma: no cover - loader shorter than expected
                    break
                except InterptoolError as exc:
                    raise _unwrap_worker_error(exc) from None
                stop = min(item + batch_size, n_items)
                if batch is None:  # every image of this batch was bad
                    skipped.extend(ids[item:stop])
                else:
                    x, y, idx = batch
                    idx_np = idx.numpy().astype(np.int64)
                    if len(idx_np) < stop - item:
                        kept = set(idx_np.tolist())
                        skipped.extend(ids[i] for i in range(item, stop) if i not in kept)
                    acts.clear()
                    x = x.to(dev, dtype=in_dtype, non_blocking=True)
                    try:
                        out = model(x)
                    except InterptoolError:
                        raise
                    except (RuntimeError, ValueError, AssertionError, TypeError,
                            IndexError) as exc:
                        raise _forward_failed(desc.removeprefix("cache "), tuple(x.shape),
                                              exc) from exc
                    logits = out if isinstance(out, torch.Tensor) else _first(out)
                    if logits.ndim != 2:
                        raise CacheError(
                            f"model output has shape {tuple(logits.shape)}; expected logits "
                            "(N, K). Is the model a classifier?"
                        )
                    logits = logits.float().to("cpu", non_blocking=True)
                    if cuda:
                        torch.cuda.synchronize(dev)
                    if "logits" not in f:
                        feats = {
                            k: (tuple(v[0].shape[1:]), tuple(v[1].shape[1:]))
                            for k, v in acts.items()
                        }
                        _create_datasets(
                            f, n_items, tuple(logits.shape[1:]), feats, dtype, compression, ids
                        )
                    b = len(idx_np)
                    rows = slice(n_done, n_done + b)
                    f["logits"][rows] = logits.numpy()
                    f["labels"][rows] = y.numpy().astype(np.int64)
                    f["index"][rows] = np.array([ids[i].encode() for i in idx_np], dtype=f["index"].dtype)
                    grp = f[FEATURES] if layers else None
                    for layer in layers:
                        feat, mx = acts[layer]
                        grp[layer][rows] = feat.numpy()
                        grp[layer + MAX_SUFFIX][rows] = mx.numpy()
                    n_done += b
                    computed += b
                # Progress markers last, then flush: a crash before this point only loses
                # the current batch, which the next run recomputes.
                f.attrs["n_done"] = np.int64(n_done)
                f.attrs["next_item"] = np.int64(stop)
                f.flush()
                bar.update(stop - item)
                item = stop
    finally:
        bar.close()
        del it
    return computed


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise CacheError(
        f"model returned {type(out).__name__}; expected a logits tensor (N, K)"
    )


__all__ = ["CacheRun", "cache_activations", "run_cache", "weights_sha256"]
