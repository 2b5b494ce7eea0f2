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

Faults (docs/cache-format.md, "Faults"):

* the whole run holds interptool's own lock on ``FILE.lock`` (:func:`interptool._locks.output_lock`),
  taken before the file is looked at, so a second writer stops at once (``CacheLockedError``)
  and ``--overwrite`` can never delete a file another live run is writing;
* the lock file also holds a space reserve; before each batch the free space is checked, and
  if the disk fills up anyway the reserve is given back so that HDF5 can flush and close the
  file with the last durable ``n_done``: the file stays openable and resumable
  (``CacheDiskFullError``);
* every batch's maxima and logits are checked for NaN / Inf (``CacheNonFiniteError``);
* a run that fails before any row is durable (a bad image in the first batch, a failed
  forward pass, a model with 0 classes, ...) removes the file it created, so it cannot block
  the next run; a file that existed before the run (a resumed one) is never removed.

Throughput: images are decoded by DataLoader workers (sized by :mod:`interptool._resources`
for the device: most cores on CUDA, about one in six on the CPU), or without workers by a
thread of this process on one torch thread, while the model runs, and rows are written to
HDF5 by a writer thread fed through a bounded queue, so the forward pass rarely waits for
either.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, default_collate

from interptool._locks import HeldLock, LockUnavailableError, output_lock
from interptool._progress import progress
from interptool._provenance import (
    device_of,
    free_bytes,
    is_no_space,
    now_iso,
    seed_everything,
    versions,
)
from interptool._resources import ThreadPlan, plan_threads, shm_free_bytes, torch_threads
from interptool._workers import (
    Prefetch,
    describe,
    loader_failed,
    restore_worker_signal,
    unwrap_worker_error,
    worker_died,
)
from interptool.cache._errors import (
    CacheDiskFullError,
    CacheForeignError,
    CacheForwardError,
    CacheLockedError,
    CacheMismatchError,
    CacheNonFiniteError,
)
from interptool.cache._format import (
    FEATURES,
    FORMAT,
    MAX_SUFFIX,
    chunk_rows,
    decode_attrs,
    encode_attr,
)
from interptool.cache._hooks import capture_layers, resolve_layers
from interptool.common.numerics import fp32_precision
from interptool.data import collate_skip_bad
from interptool.errors import (
    CacheError,
    ConfigError,
    DataError,
    InterptoolError,
)
from interptool.loading import ImagePixels, split_normalization

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "float32": torch.float32}
COMPRESSIONS = ("gzip", "lzf")

# Attributes that must agree between a request and an existing file for it to be reused.
MATCH_KEYS = (
    "arch",
    "model_kwargs",
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


def _collate(items: list[Any], step: Any = None) -> Any:
    """Collate ``(image, label, index)`` items as ``collate_skip_bad`` does (``None`` items,
    bad images with skip_bad, are dropped; ``None`` when all are). With ``step`` (a
    channels-last run, ``split_normalization``) the items carry their pixels
    (``ImagePixels``), normalised here straight into a channels-last batch, which the forward
    pass takes as it is; a data set that does not apply the transform (its items are tensors
    already) is collated as before. ``functools.partial`` of it pickles (DataLoader workers).
    """
    if step is not None:
        kept = [it for it in items if it is not None]
        if any(isinstance(it[0], ImagePixels) for it in kept):
            images, labels, index = zip(*kept)
            return [step.stack(images), default_collate(labels), default_collate(index)]
    return collate_skip_bad(items)


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` accepts the keyword argument ``name`` (a preprocessing object written
    against the older interface has ``eval_transform()`` without ``channels_last``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: call it the plain way
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# kept for code that imported the private name
_ForwardError = CacheForwardError


def _forward_failed(model_name: str, shape: tuple[int, ...], exc: Exception) -> CacheForwardError:
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else ""
    if "out of memory" in text.lower():
        fix = "lower --batch-size (or cache fewer / smaller layers)"
    else:
        fix = ("check --image-size (some architectures, e.g. ViTs, accept only their native "
               "size) and the number of --mean/--std values (input channels)")
    return CacheForwardError(
        f"model {model_name} failed on a batch of shape {shape} ({type(exc).__name__}: "
        f"{first}); {fix}"
    )


def _fit_shared_memory(plan: ThreadPlan, asked: int | None, batch_size: int,
                       input_size: Sequence[int] | None) -> ThreadPlan:
    """Workers hand their batches over in ``/dev/shm``, two in flight each. Where it cannot
    hold them (a container's default 64 MiB against 38 MB per batch of 64 images at 224 px),
    torch's queue drops a batch it cannot share and the run waits forever: chosen workers are
    lowered to what fits (none: a thread of this process decodes), asked-for workers refused
    with the fix."""
    free = shm_free_bytes()
    if not plan.loader_workers or free is None or not input_size:
        return plan
    per_batch = batch_size * 4 * math.prod(int(v) for v in input_size)  # float32 at most
    fits = int(free // (2 * per_batch * 1.25))  # a quarter spare for the rest of the queue
    if plan.loader_workers <= fits:
        return plan
    if asked is not None:
        def size(n: float) -> str:
            return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"

        fewer = (f"--workers {fits} (or 0 to decode in this process)" if fits
                 else "--workers 0 (decoded in this process)")
        raise CacheError(
            f"/dev/shm has {size(free)} free, but {plan.loader_workers} DataLoader "
            f"worker(s) keep two batches of up to {size(per_batch)} each there; run the "
            f"container with --shm-size=2g (or --ipc=host), lower --batch-size, or give "
            f"{fewer}")
    return replace(plan, loader_workers=fits, total=plan.torch_threads + fits)


def _check_args(batch_size: int, workers: int | None, dtype: str,
                compression: str | None) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"workers must be an integer >= 0 (or None to choose), got {workers!r}")
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
    elif key == "model_kwargs":
        value = value or {}  # files from before model_kwargs: the architecture's defaults
    return json.dumps(value, sort_keys=True, default=str)


def _mismatches(want: dict[str, Any], have: dict[str, Any], subset_layers: bool,
                fields: list[str] | None = None) -> list[str]:
    out = []
    for key in MATCH_KEYS:
        a, b = want.get(key), have.get(key)
        if key == "layers" and subset_layers:
            if set(a or []) <= set(b or []):
                continue
        elif _jsonish(key, a) == _jsonish(key, b):
            continue
        if fields is not None:
            fields.append(key)
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

# The space reserve kept in the lock file: room for HDF5 to write its metadata and the dirty
# chunks of its chunk cache when the disk fills up mid-run (grown once chunk sizes are known).
_RESERVE_BASE = 1 << 20
# Margin over a batch's raw bytes required free before writing it (metadata, B-tree nodes).
_SPACE_MARGIN = 1 << 20


def cache_activations(
    loaded: Any,
    dataset: Any,
    layers: Sequence[str] | None,
    path: str | os.PathLike,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    threads: int | None = None,
    dtype: str = "float16",
    compression: str | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    probe: bool | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    distributed: bool | None = None,
    channels_last: bool | None = None,
) -> Path:
    """Cache logits, labels and the outputs of ``layers`` of a model over ``dataset`` in HDF5.

    Args:
        loaded: a :class:`interptool.loading.LoadedModel` (``model``, ``arch``,
            ``checkpoint_sha256``, ``preprocessing``, ``to_dict()``; ``num_prefix_tokens`` and
            ``token_grid`` are recorded when present).
        dataset: an :class:`interptool.data.ImageDataset` (``ids``, ``labels``, ``spec``,
            ``fingerprint``, ``torch_dataset(transform, skip_bad)``).
        layers: dotted module names (``"layer4"``, ``"blocks.11"``) whose outputs are cached,
            or ``None``/``[]`` for logits and labels only.
        path: the ``.h5`` file. An incomplete file from an interrupted run with the same
            arguments is resumed; a complete matching one is reused as is (cache hit).
        batch_size: images per forward pass (recorded; a resumed run must use the same one
            for a bitwise-identical file).
        workers: DataLoader worker processes decoding images; ``None`` chooses from the
            cores available (see ``threads``).
        threads: cores to use in total (torch intra-op threads + workers); ``None`` uses every
            core this process may use (CPU affinity and cgroup quota). Recorded as ``threads``.
        dtype: ``"float16"`` or ``"float32"`` for the features (logits, maxima: float32).
        compression: ``None``, ``"gzip"`` or ``"lzf"``.
        overwrite: replace an existing file that does not match the request (never one that
            another process is writing: that is a :class:`CacheLockedError`).
        skip_bad: skip images that fail to decode (listed in the ``skipped`` attribute; the
            cache then has fewer rows) instead of stopping with a :class:`DataError`.
        probe: ``True`` for the probe transform (resize, no crop), ``False`` for the eval
            transform; ``None`` picks probe for Broden-style data (segmentation masks).
        seed: seeds python/numpy/torch and is recorded.
        device: torch device; default ``loaded.device``. The model is moved there if needed.
        distributed: ``None`` shards the data set over the processes of a ``torchrun``
            launch when its environment (``WORLD_SIZE`` > 1) is present; ``False`` never.
        channels_last: feed the images to the model in channels-last memory order (oneDNN's
            faster convolutions: resnet18 on 2 CPU cores runs ~25 % faster). ``None`` (default)
            does so on the CPU for convolutional models whose forward pass accepts it (tried
            on one blank image first); ``False`` never. Values differ from the default
            layout by float rounding only (~1e-7 relative); recorded in ``numerics``.

    Returns:
        The path of the complete cache.

    Raises:
        CacheMismatchError: an existing file was made with other settings (without
            ``overwrite``).
        CacheLockedError: another interptool process is writing ``path``.
        CacheForwardError: the model's forward pass failed.
        CacheNonFiniteError: a layer or the logits hold NaN / Inf.
        CacheDiskFullError: the disk filled up (the file stays resumable).
        CacheForeignError: ``path`` holds a file that is not an interptool cache.
        CacheError: unknown layer, TorchScript model with layers, other faults.
        DataError: an image fails to decode and ``skip_bad`` is false.
    """
    return run_cache(
        loaded,
        dataset,
        layers,
        path,
        batch_size=batch_size,
        workers=workers,
        threads=threads,
        dtype=dtype,
        compression=compression,
        overwrite=overwrite,
        skip_bad=skip_bad,
        probe=probe,
        seed=seed,
        device=device,
        distributed=distributed,
        channels_last=channels_last,
    ).path


def run_cache(
    loaded: Any,
    dataset: Any,
    layers: Sequence[str] | None,
    path: str | os.PathLike,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    threads: int | None = None,
    dtype: str = "float16",
    compression: str | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    probe: bool | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    distributed: bool | None = None,
    channels_last: bool | None = None,
) -> CacheRun:
    """:func:`cache_activations`, returning a :class:`CacheRun` (status, counts, speed)."""
    _check_args(batch_size, workers, dtype, compression)
    if threads is not None and (not isinstance(threads, int) or threads < 0):
        raise ConfigError(f"threads must be a positive integer (or None for all cores), "
                          f"got {threads!r}")
    kw = dict(batch_size=batch_size, workers=workers, threads=threads, dtype=dtype,
              compression=compression, overwrite=overwrite, skip_bad=skip_bad, probe=probe,
              seed=seed, device=device, channels_last=channels_last)
    if distributed is not False:
        from interptool.cache import _distributed

        if _distributed.launched():
            return _distributed.run_sharded(loaded, dataset, layers, path, **kw)
    return _run_local(loaded, dataset, layers, path, **kw)


def _run_local(
    loaded: Any,
    dataset: Any,
    layers: Sequence[str] | None,
    path: str | os.PathLike,
    *,
    batch_size: int,
    workers: int | None,
    threads: int | None,
    dtype: str,
    compression: str | None,
    overwrite: bool,
    skip_bad: bool,
    probe: bool | None,
    seed: int,
    device: str | torch.device | None,
    channels_last: bool | None = None,
    local_ranks: int = 1,
    extra_attrs: dict[str, Any] | None = None,
    same_model_as: _Job | None = None,
) -> CacheRun:
    """One process writing one file (the whole data set, or one torchrun shard of it).

    ``same_model_as``: a job already made for the same loaded model on this device (a
    torchrun rank's whole-data-set job), whose weights checksum and channels-last decision
    are taken instead of being computed a second time.
    """
    job = _make_job(loaded, dataset, layers, path, batch_size=batch_size, workers=workers,
                    threads=threads, dtype=dtype, compression=compression, skip_bad=skip_bad,
                    probe=probe, seed=seed, device=device, channels_last=channels_last,
                    local_ranks=local_ranks, extra_attrs=extra_attrs,
                    same_model_as=same_model_as)
    try:
        with output_lock(job.path, fix="choose another --out", error=CacheLockedError) as lock:
            return job.run(lock, overwrite=overwrite)
    except LockUnavailableError:
        # A read-only folder (a shared, finished cache) cannot hold a lock file, and needs
        # none to be read: a complete matching file is still a cache hit.
        if not overwrite and job.path.exists():
            status, have = job._decide(False)
            if status == "hit" and have is not None:
                return job.hit(have)
        raise


def _make_job(
    loaded: Any,
    dataset: Any,
    layers: Sequence[str] | None,
    path: str | os.PathLike,
    *,
    batch_size: int,
    workers: int | None,
    threads: int | None,
    dtype: str,
    compression: str | None,
    skip_bad: bool,
    probe: bool | None,
    seed: int,
    device: str | torch.device | None,
    channels_last: bool | None = None,
    local_ranks: int = 1,
    extra_attrs: dict[str, Any] | None = None,
    same_model_as: _Job | None = None,
) -> _Job:
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
    # built per run (_loader): a channels-last run takes its images in that layout already
    make_transform = pre.probe_transform if use_probe else pre.eval_transform
    # Without --threads, a caller that limited torch's threads keeps its limit (and its
    # numbers: float reductions may round differently with another thread count).
    cap: int | None = torch.get_num_threads()
    if local_ranks > 1 and os.environ.get("OMP_NUM_THREADS") == "1":
        # torchrun sets OMP_NUM_THREADS=1 in every process when it starts several per node
        # (unless it was set already): taken as a limit, it would leave each rank one core of
        # its share and no decoding workers. The ranks already divide the cores between them
        # (local_ranks); --threads is how to ask for fewer.
        cap = None
    # On CUDA the chosen split gives nearly every core to decoding workers (the GPU needs
    # little CPU); on the CPU the forward pass keeps most of them.
    plan = plan_threads(threads, workers=workers, cap=cap, local_ranks=local_ranks,
                        device_type=dev.type)
    plan = _fit_shared_memory(plan, workers, batch_size, getattr(pre, "input_size", None))
    # Without workers the images are decoded by a thread of this process (Prefetch, one torch
    # thread), beside the forward pass on the same cores: recorded so the plan says so.
    plan = replace(plan, decode_threads=0 if plan.loader_workers else 1)

    want: dict[str, Any] = {
        "arch": str(loaded.arch),
        "model_kwargs": dict(getattr(loaded, "model_kwargs", None) or {}),
        "checkpoint_sha256": loaded.checkpoint_sha256 or "",
        # hashing every weight takes seconds for a large model: once per process
        "weights_sha256": (same_model_as.want["weights_sha256"] if same_model_as is not None
                           else weights_sha256(model)),
        "data_fingerprint": str(dataset.fingerprint),
        "layers": layers,
        "dtype": dtype,
        "preprocessing": pre.to_dict(),
        "transform": "probe" if use_probe else "eval",
    }
    return _Job(path, loaded, dataset, layers, ids, make_transform, dev, plan, want,
                batch_size=batch_size, dtype=dtype, compression=compression,
                skip_bad=skip_bad, seed=seed, extra_attrs=dict(extra_attrs or {}),
                channels_last_wanted=channels_last,
                channels_last_known=(None if same_model_as is None
                                     else same_model_as.channels_last))


def canonical_numerics(numerics: dict[str, Any]) -> dict[str, Any]:
    """``numerics`` as this version records them: files written before the per-operation
    settings recorded TF32 as ``cudnn_allow_tf32`` / ``matmul_allow_tf32`` booleans."""
    out = dict(numerics)
    for old, new in (("cudnn_allow_tf32", "conv_fp32_precision"),
                     ("matmul_allow_tf32", "matmul_fp32_precision")):
        if old in out:
            out[new] = "tf32" if out.pop(old) else "ieee"
    return out


@dataclass
class _Job:
    """Everything one file's run needs; :meth:`run` is called with the output lock held."""

    path: Path
    loaded: Any
    dataset: Any
    layers: list[str]
    ids: list[str]
    make_transform: Callable[..., Any]  # (channels_last=...) -> PIL image -> tensor
    dev: torch.device
    plan: ThreadPlan
    want: dict[str, Any]
    batch_size: int
    dtype: str
    compression: str | None
    skip_bad: bool
    seed: int
    extra_attrs: dict[str, Any]
    channels_last_wanted: bool | None = None
    channels_last_known: bool | None = None  # decided by another job for the same model

    @property
    def n_items(self) -> int:
        return len(self.ids)

    @property
    def name(self) -> str:
        return getattr(self.loaded, "name", "") or str(self.loaded.arch)

    @property
    def numerics(self) -> dict[str, Any]:
        """How this run's forward pass rounds: the device type and, on CUDA, torch's TF32
        switches (on by default for cuDNN convolutions). Recorded in the file; a resume
        must match it, so a file never mixes rows computed two ways."""
        out: dict[str, Any] = {"device_type": self.dev.type}
        if self.dev.type == "cuda":
            out.update(fp32_precision())
        if self.channels_last:  # absent for the default layout: older files still resume
            out["memory_format"] = "channels_last"
        return out

    @functools.cached_property
    def channels_last(self) -> bool:
        """Whether the images go to the model in channels-last order (decided once per run).

        oneDNN's channels-last convolutions are ~25 % faster on the CPU (resnet18, 2 cores:
        benchmarks/bench_cache.py --probe) and the layout flows through the layers by itself;
        only the input is converted. A model whose forward pass cannot take it (a ``view``
        that assumes the default strides) is noticed on one blank image and left as it is.
        """
        if self.channels_last_known is not None:
            return self.channels_last_known
        wanted = self.channels_last_wanted
        model = self.loaded.model
        pre = self.loaded.preprocessing
        if wanted is False or len(tuple(pre.input_size)) != 3:
            return False
        if wanted is None and (self.dev.type != "cpu" or not any(
                isinstance(m, torch.nn.Conv2d) for m in model.modules())):
            return False
        x = _blank_input(model, pre, self.dev)
        try:
            with torch_threads(self.plan.torch_threads), torch.inference_mode():
                model(x.contiguous(memory_format=torch.channels_last))
        except Exception as exc:  # any failure: the default layout, as the user runs it
            if wanted:
                raise CacheError(f"model {self.name} cannot run on channels-last input "
                                 f"({_first_line(exc)}); pass channels_last=None or False") \
                    from None
            log.info("model %s: channels-last input failed (%s); default layout",
                     self.name, _first_line(exc))
            return False
        return True

    # -- decide: fresh, resume or hit -------------------------------------------------------
    def _decide(self, overwrite: bool) -> tuple[str, dict[str, Any] | None]:
        path = self.path
        if path.exists() and overwrite:
            path.unlink()
            return "created", None
        if not path.exists():
            return "created", None
        have = _read_attrs(path)
        complete = bool(have.get("complete", False))
        fields: list[str] = []
        bad = _mismatches(self.want, have, subset_layers=complete, fields=fields)
        if bad:
            state = "complete" if complete else "incomplete (interrupted)"
            raise CacheMismatchError(
                f"{path}: an existing {state} cache was made with other settings "
                f"({'; '.join(bad)}). Pass --overwrite (overwrite=True) to replace it, or "
                "choose another output path.", path=path, fields=fields)
        if complete:
            skipped = list(have.get("skipped") or [])
            if skipped and not self.skip_bad:
                raise CacheMismatchError(
                    f"{path}: this cache skipped {len(skipped)} bad image(s) "
                    f"({', '.join(skipped[:3])}{'...' if len(skipped) > 3 else ''}); "
                    "re-run with --skip-bad to reuse it or fix the images and --overwrite",
                    path=path, fields=["skip_bad"])
            return "hit", have
        if int(have.get("n_total", -1)) != self.n_items:
            raise CacheMismatchError(
                f"{path}: incomplete cache was started for {have.get('n_total')} images but the "
                f"data set has {self.n_items}; pass --overwrite to start again",
                path=path, fields=["n_total"])
        started = have.get("numerics")  # absent in caches from before it was recorded
        if started is not None and canonical_numerics(started) != self.numerics:
            raise CacheMismatchError(
                f"{path}: this incomplete cache was started with numerics {started} and this "
                f"run computes with {self.numerics}; resuming would mix rows rounded two ways "
                "(a GPU's TF32 convolutions differ from the CPU by up to ~1e-3 relative). "
                "Resume it on the same device with the same TF32 settings, or pass "
                "--overwrite to start again", path=path, fields=["numerics"])
        return "resumed", have

    def hit(self, have: dict[str, Any]) -> CacheRun:
        log.info("cache hit: %s already holds this model's activations", self.path)
        return CacheRun(self.path, "hit", int(have.get("n_done", 0)), self.n_items,
                        list(have.get("layers") or []), list(have.get("skipped") or []))

    def run(self, lock: HeldLock, *, overwrite: bool) -> CacheRun:
        status, have = self._decide(overwrite)
        path = self.path
        if status == "hit":
            assert have is not None
            return self.hit(have)
        created = status == "created"
        n_safe = int(have.get("n_done", 0)) if have else 0
        try:
            lock.reserve(_RESERVE_BASE)
        except OSError as exc:
            if is_no_space(exc):
                raise self._disk_full(n_safe) from None
            raise
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = h5py.File(path, "a")
        except (OSError, RuntimeError) as exc:
            if created:
                _remove_unusable(path)
            if is_no_space(exc):
                raise self._disk_full(0 if created else n_safe) from None
            raise CacheError(
                f"{path}: cannot open for writing ({_first_line(exc)}); the folder may be "
                "read-only, or a program other than interptool holds the file open (HDF5 file "
                "lock: close it there)"
            ) from None
        writer: _RowWriter | None = None
        try:
            if created:
                self._init_attrs(f)
            else:
                # the settings of the run that is writing now (a resume may use other threads)
                f.attrs["threads"] = encode_attr("threads", self.plan.to_dict())
                f.flush()
            start = int(f.attrs["next_item"])
            n_done = int(f.attrs["n_done"])
            # Bad images before the resume point are the items missing from the rows written.
            done_ids = set(_decode_ids(f["index"][:n_done])) if "index" in f else set()
            skipped = [self.ids[i] for i in range(start) if self.ids[i] not in done_ids]
            del done_ids

            t0 = time.perf_counter()
            computed = 0
            if start < self.n_items:
                writer = _RowWriter(f, self, lock, n_done, start)
                computed = self._run_batches(writer, start, skipped)
                writer.finish()
            n_done = int(f.attrs["n_done"])
            if "logits" not in f:  # every image was bad: still write a well-formed empty cache
                _create_from_dummy(f, self.loaded.model, self.loaded.preprocessing, self.layers,
                                   self.dev, self.n_items, self.dtype, self.compression,
                                   self.ids)
            if n_done < self.n_items:  # bad images were skipped: drop the unused tail rows
                _shrink(f, n_done)
            f.attrs["skipped"] = encode_attr("skipped", skipped)
            # whether bad images were allowed to be left out (the run that finished the file)
            f.attrs["skip_bad"] = bool(self.skip_bad)
            f.flush()
            # complete=True last, in a flush of its own: a file that says complete has every
            # row and attribute on disk before it.
            f.attrs["complete"] = True
            f.flush()
            seconds = time.perf_counter() - t0
        except BaseException as exc:
            if writer is not None:
                writer.abort()
            safe = writer.safe if writer is not None else (n_safe, None)
            self._fail(f, lock, exc, created, safe, writer)
            if is_no_space(exc) and not isinstance(exc, CacheDiskFullError):
                raise self._no_space(created, safe[0]) from None
            raise
        _close(f)
        lock.release_reserve()
        return CacheRun(path, status, n_done, self.n_items, self.layers, skipped, seconds,
                        computed)

    # -- failure handling -------------------------------------------------------------------
    def _fail(self, f: h5py.File, lock: HeldLock, exc: BaseException, created: bool,
              safe: tuple[int, int | None], writer: _RowWriter | None) -> None:
        """Leave the file as it was after its last durable batch, then close it."""
        no_space = is_no_space(exc)
        if no_space:
            # room for HDF5 to write its metadata and cached chunks while closing
            lock.release_reserve()
        if writer is not None:
            writer.release()
            try:
                if f.id.valid and "n_done" in f.attrs:
                    f.attrs["n_done"] = np.int64(safe[0])
                    if safe[1] is not None:
                        f.attrs["next_item"] = np.int64(safe[1])
                    f.attrs["complete"] = False
            except Exception:  # noqa: BLE001 - the close below is what matters now
                pass
        _close(f)
        # A file this run created that holds no durable row is worth nothing, whatever the
        # failure (a bad image in the first batch, a failed forward pass, non-finite values,
        # a full disk, Ctrl-C), and would block the corrected command, or one with another
        # model ("made with other settings"): remove it. A resumed file is always kept.
        if created and safe[0] == 0:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:  # pragma: no cover - the first error is what the user needs
                log.debug("removing %s failed", self.path, exc_info=True)
        elif created:
            _remove_unusable(self.path)

    def _no_space(self, created: bool, n_safe: int) -> CacheDiskFullError:
        if created and n_safe == 0:
            return self._disk_full(0)
        if not _openable(self.path):
            return CacheDiskFullError(
                f"no space left on {device_of(self.path)} while writing {self.path}, and the "
                "file could not be closed cleanly (it cannot be opened); free space, then "
                "delete it or re-run with --overwrite", path=self.path, n_safe=0)
        return self._disk_full(n_safe)

    def _disk_full(self, n_safe: int) -> CacheDiskFullError:
        where = device_of(self.path)
        if n_safe:
            msg = (f"no space left on {where} while writing {self.path}; {n_safe} images are "
                   "safe in it; free space and re-run the same command to resume")
        else:
            msg = (f"no space left on {where} while writing {self.path}; nothing was cached "
                   "yet; free space and re-run the same command")
        return CacheDiskFullError(msg, path=self.path, n_safe=n_safe)

    # -- attributes ---------------------------------------------------------------------------
    def _init_attrs(self, f: h5py.File) -> None:
        attrs: dict[str, Any] = {
            "format": FORMAT,
            "complete": False,
            "n_done": 0,
            "next_item": 0,
            "n_total": self.n_items,
            **self.want,
            "model": self.loaded.to_dict(),
            "data_spec": str(self.dataset.spec),
            "layer_shapes": {},
            "versions": versions(),
            "seed": int(self.seed),
            "created": now_iso(),
            "skipped": [],
            "compression": self.compression or "",
            "batch_size": int(self.batch_size),
            # class names travel with the logits so analyzers can label matrices and tables
            "class_names": list(getattr(self.dataset, "class_names", None) or []),
            "threads": self.plan.to_dict(),
            "numerics": self.numerics,
        }
        # leading (class / distillation / register) tokens of transformer models, when the
        # loader knows them: dissection must drop exactly these before the patch grid
        n_prefix = getattr(self.loaded, "num_prefix_tokens", None)
        if n_prefix is not None:
            attrs["num_prefix_tokens"] = int(n_prefix)
        grid = getattr(self.loaded, "token_grid", None)
        if grid is not None:
            attrs["token_grid"] = [int(g) for g in grid]
        attrs.update(self.extra_attrs)
        for key, value in attrs.items():
            f.attrs[key] = encode_attr(key, value)
        # n_done / next_item are overwritten after every batch: fixed-size int64 scalars are
        # rewritten in place in the object header (no reallocation while a crash may strike).
        f.attrs["n_done"] = np.int64(0)
        f.attrs["next_item"] = np.int64(0)
        f.flush()

    # -- the batches ----------------------------------------------------------------------------
    def _loader(self, start: int) -> DataLoader:
        split = None
        if self.channels_last and _takes_keyword(self.make_transform, "channels_last"):
            # decoded straight into channels-last batches (no re-layout per batch, and less
            # decoding work: see ToNormalizedChannelsLast); the same values
            split = split_normalization(self.make_transform(channels_last=True))
        if split is None:
            transform, collate = self.make_transform(), _collate
        else:
            transform, collate = split[0], functools.partial(_collate, step=split[1])
        tds = self.dataset.torch_dataset(transform, skip_bad=self.skip_bad)
        if start:
            tds = Subset(tds, range(start, self.n_items))
        # no more workers than batches left: each would start a process (and, on CUDA, the
        # plan's many) only to decode nothing (a small data set or the end of a resume)
        w = min(self.plan.loader_workers, -(-(self.n_items - start) // self.batch_size))
        return DataLoader(
            tds,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=w,
            collate_fn=collate,
            pin_memory=self.dev.type == "cuda",
            # decoding runs ahead of the forward pass by two batches per worker (bounded memory)
            prefetch_factor=2 if w else None,
            persistent_workers=bool(w),
        )

    def _run_batches(self, writer: _RowWriter, start: int, skipped: list[str]) -> int:
        """Forward every batch from ``start``, handing rows to the writer thread."""
        model = self.loaded.model
        layers, ids, dev = self.layers, self.ids, self.dev
        n_items, batch_size = self.n_items, self.batch_size
        cuda = dev.type == "cuda"
        feat_dtype = DTYPES[self.dtype]
        in_dtype = _input_dtype(model)
        layout = torch.channels_last if self.channels_last else torch.preserve_format

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
            # contiguous rows for the file whatever layout the model computes in
            feat = out.to(feat_dtype, copy=True, memory_format=torch.contiguous_format)
            # (N, C) outputs are their own maxima: take them from the copy, never alias ``out``.
            mx = feat.float() if out.ndim == 2 else _maxima(out).to(feat_dtype).float()
            if cuda:
                # reading a GPU value here would make the host wait in the middle of every
                # forward pass (twice per cached layer): queue the test, read it after the
                # batch's synchronize
                _HookFault.defer(name, out, feat)
                return feat.to("cpu", non_blocking=True), mx.to("cpu", non_blocking=True)
            if not _finite(feat, mx):
                _HookFault.record(name, out, feat)
            return feat, mx

        item = start
        computed = 0
        bar = progress(total=n_items, desc=f"cache {self.name}", unit="img")
        bar.initial = bar.n = start  # the rate counts only this run's images
        loader = self._loader(start)
        if self.plan.loader_workers:
            # the DataLoader's pin-memory thread takes the current CUDA device when the
            # iterator starts: make it this run's (cuda:1, a torchrun rank's), not GPU 0
            with torch.cuda.device(dev) if cuda else contextlib.nullcontext():
                it = iter(loader)
        else:
            # a thread decodes the next batches while the model runs (PIL and torch release
            # the GIL): decoding between batches took the cache to 1.04-1.35x a bare forward
            # loop on 2 quiet cores, 0.89-1.00x with this thread (alternating runs,
            # benchmarks/bench_cache.py --probe 480). Pinning happens in that thread, so it
            # gets this process's GPU (torchrun), not GPU 0.
            gpu = None
            if cuda:
                gpu = dev.index if dev.index is not None else torch.cuda.current_device()
            it = Prefetch(loader, init=None if gpu is None else
                           (lambda: torch.cuda.set_device(gpu)))
        aside = None
        try:
            with torch_threads(self.plan.torch_threads), torch.inference_mode(), \
                    capture_layers(model, layers, grab) as acts:
                while item < n_items:
                    try:
                        batch = next(it)
                    except StopIteration:  # pragma: no cover - loader shorter than expected
                        break
                    except InterptoolError as exc:
                        raise unwrap_worker_error(exc) from None
                    stop = min(item + batch_size, n_items)
                    if batch is None:  # every image of this batch was bad
                        skipped.extend(ids[item:stop])
                        writer.submit(_Rows(stop, None, None, None, {}))
                    else:
                        x, y, idx = batch
                        idx_np = idx.numpy().astype(np.int64)
                        if len(idx_np) < stop - item:
                            kept = set(idx_np.tolist())
                            skipped.extend(ids[i] for i in range(item, stop) if i not in kept)
                        acts.clear()
                        _HookFault.clear()
                        x = x.to(dev, dtype=in_dtype, non_blocking=True, memory_format=layout)
                        try:
                            out = model(x)
                        except InterptoolError:
                            raise
                        except (RuntimeError, ValueError, AssertionError, TypeError,
                                IndexError) as exc:
                            if worker_died(exc):  # raised by torch's SIGCHLD handler here
                                raise
                            raise _forward_failed(self.name, tuple(x.shape), exc) from exc
                        logits = out if isinstance(out, torch.Tensor) else _first(out)
                        if logits.ndim != 2:
                            raise CacheError(
                                f"model output has shape {tuple(logits.shape)}; expected logits "
                                "(N, K). Is the model a classifier?"
                            )
                        if logits.shape[1] == 0:
                            raise _no_classes(self.name, tuple(logits.shape))
                        logits = logits.float().to("cpu", non_blocking=True)
                        if cuda:
                            torch.cuda.synchronize(dev)
                        self._check_finite(acts, logits, idx_np, writer.n_submitted)
                        writer.submit(_Rows(
                            stop, logits.numpy(), y.numpy().astype(np.int64),
                            np.array([ids[i].encode() for i in idx_np]),
                            {k: (acts[k][0].numpy(), acts[k][1].numpy()) for k in layers},
                        ))
                        computed += len(idx_np)
                    bar.update(stop - item)
                    item = stop
        except BaseException as exc:  # a worker killed, Ctrl-C: see release_loader
            # a death seen by the loader or by torch's SIGCHLD handler anywhere; the handler
            # stays aside while the loader goes (finally below)
            died, aside = loader_failed(exc)
            if died:
                raise CacheError(
                    f"a worker process decoding images died ({describe(exc)}); the usual "
                    "cause is the out-of-memory killer: give the run fewer --workers (0 "
                    "decodes in this process) or a smaller --batch-size") from None
            raise
        finally:
            bar.close()
            if isinstance(it, Prefetch):
                it.close()
            del it, loader
            restore_worker_signal(aside)
        return computed

    # -- non-finite values ----------------------------------------------------------------------
    def _check_finite(self, acts: dict[str, Any], logits: torch.Tensor, idx: np.ndarray,
                      n_before: int) -> None:
        _HookFault.resolve()
        fault = _HookFault.first()
        if fault is None and bool(torch.isfinite(logits).all()):
            return
        if fault is not None:
            layer, row, kind, overflow = fault
        else:
            bad = ~torch.isfinite(logits).all(dim=1)
            row = int(torch.nonzero(bad)[0, 0])
            layer, kind = "logits", "NaN" if bool(torch.isnan(logits[row]).any()) else "Inf"
            overflow = False
        image = self.ids[int(idx[row])]
        bad_param = _nonfinite_parameter(self.loaded.model)
        if bad_param:
            cause = (f"the model's weights hold NaN/Inf ({bad_param}): check the checkpoint "
                     "(a diverged training run saves NaN weights)")
        elif overflow and self.dtype == "float16":
            cause = ("float16 overflow: this layer's outputs exceed 65504, the largest "
                     "float16 value; re-run with --dtype float32")
        elif layer == "logits":
            cause = ("the forward pass overflowed or produced NaN inside the model (NaN "
                     "weights or inputs, or values too large for the model's dtype)")
        else:
            cause = ("the model produced them (NaN weights or inputs, or an overflow inside "
                     "the model)")
        where = "the logits" if layer == "logits" else f"layer {layer!r}"
        kept = (f"; the {n_before} images written before are kept in {self.path}"
                if n_before else "")
        raise CacheNonFiniteError(
            f"{where} of model {self.name} holds {kind} values, first for image {image}; "
            f"likely cause: {cause}{kept}", layer=layer, image=image)


def _finite(feat: torch.Tensor, mx: torch.Tensor) -> bool:
    """Whether a batch's features are all finite, checked cheaply.

    The maxima catch NaN (amax propagates it) and +Inf; a float32 sum of the (rounded) copy
    also catches -Inf away from the maxima. Only when the sum is not finite is the exact test
    run, so a float32 sum that overflows on huge finite values cannot raise a false alarm.
    """
    if not bool(torch.isfinite(mx).all()):
        return False
    if bool(torch.isfinite(feat.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(feat).all())


class _HookFault:
    """The first layer of the current forward pass whose output held NaN / Inf.

    Recorded from inside the hook (which knows the layer's unrounded output, hence whether the
    float16 copy overflowed) and read after the pass. Hooks run on the calling thread, and one
    process runs one cache at a time, so a module-level slot suffices.
    """

    _slot: tuple[str, int, str, bool] | None = None
    # deferred tests (CUDA), one per hook call: (layer, finite rows of the copy, rows of the
    # copy holding NaN, finite rows of the unrounded output or None when the copy is not
    # narrower); small per-row flags only, so no device copy outlives its hook
    _pending: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    @classmethod
    def clear(cls) -> None:
        cls._slot = None
        cls._pending = []

    @classmethod
    def defer(cls, name: str, out: torch.Tensor, feat: torch.Tensor) -> None:
        """Queue the exact per-row test on the device without reading it (one elementwise
        pass, cheap on a GPU); :meth:`resolve` reads it once the batch is done. The unrounded
        rows are tested now, before a later in-place op can change ``out``."""
        flat = feat.reshape(feat.shape[0], -1)
        rows_ok = torch.isfinite(flat).all(dim=1)
        rows_nan = torch.isnan(flat).any(dim=1)
        out_ok = (torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
                  if feat.dtype != out.dtype else None)
        cls._pending.append((name, rows_ok, rows_nan, out_ok))

    @classmethod
    def resolve(cls) -> None:
        """Read the deferred tests in hook order (after the device finished the batch)."""
        pending, cls._pending = cls._pending, []
        for name, rows_ok, rows_nan, out_ok in pending:
            if cls._slot is not None:
                return
            if bool(rows_ok.all()):
                continue
            row = int(torch.nonzero(~rows_ok)[0, 0])
            kind = "NaN" if bool(rows_nan[row]) else "Inf"
            # the unrounded values were finite: the (float16) copy overflowed
            overflow = bool(out_ok[row]) if out_ok is not None else False
            cls._slot = (name, row, kind, overflow)

    @classmethod
    def record(cls, name: str, out: torch.Tensor, feat: torch.Tensor) -> None:
        """The immediate test (the CPU's, once the cheap check failed): the deferred one,
        read at once."""
        if cls._slot is None:
            cls.defer(name, out, feat)
            cls.resolve()

    @classmethod
    def first(cls) -> tuple[str, int, str, bool] | None:
        return cls._slot


def _nonfinite_parameter(model: torch.nn.Module) -> str:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return ""


# -- the writer thread -----------------------------------------------------------------------


@dataclass
class _Rows:
    """One batch for the file: ``stop`` is the data-set item after the batch."""

    stop: int
    logits: np.ndarray | None
    labels: np.ndarray | None
    index: np.ndarray | None
    feats: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        if self.logits is None:
            return 0
        total = self.logits.nbytes + self.labels.nbytes + self.index.nbytes
        return total + sum(a.nbytes + b.nbytes for a, b in self.feats.values())


class _RowWriter:
    """Writes batches to the HDF5 file on a thread of its own, through a bounded queue.

    The forward pass of batch k+1 runs while batch k is written (h5py keeps its own lock; the
    forward pass runs in torch's C++ code without the GIL for the most part). After each batch:
    rows, then ``n_done`` / ``next_item``, then a flush; ``safe`` is the (n_done, next_item)
    of the last flush that succeeded: what is durably in the file.
    """

    def __init__(self, f: h5py.File, job: _Job, lock: HeldLock, n_done: int, start: int) -> None:
        self.f, self.job, self.lock = f, job, lock
        self.n_done = n_done
        self.n_submitted = n_done
        self.safe: tuple[int, int | None] = (n_done, start)
        self.error: BaseException | None = None
        # two batches in flight at most: memory stays bounded whatever the write speed
        self._q: queue.Queue[_Rows | None] = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._loop, name="interptool-cache-writer",
                                        daemon=True)
        self._thread.start()

    def submit(self, rows: _Rows) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._q.put(rows, timeout=0.2)
                break
            except queue.Full:
                continue
        if rows.logits is not None:
            self.n_submitted += len(rows.logits)

    def finish(self) -> None:
        """Wait until every batch is written; re-raise the writer's error if there was one."""
        self._q.put(None)
        self._thread.join()
        self._raise_if_failed()
        self.release()

    def abort(self) -> None:
        """The main thread failed: write the batches already queued (they are good), then
        stop; never raises (a write error stays in ``error``, ``safe`` says what is on disk)."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def _loop(self) -> None:
        while True:
            rows = self._q.get()
            if rows is None:
                return
            try:
                self._write(rows)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc
                # drain so the main thread's put never blocks; it sees the error next
                while True:
                    rows = self._q.get()
                    if rows is None:
                        return

    def _datasets(self) -> dict[str, h5py.Dataset]:
        # Handles stay open for the whole run: h5py closes a temporary Dataset object when it
        # is garbage-collected, HDF5 then writes that dataset's cached chunks, and a failure
        # there (a full disk) is printed and ignored by h5py, never raised; with open handles
        # the chunks are written by f.flush(), whose errors do reach us.
        if self._handles is None:
            f, job = self.f, self.job
            self._handles = {name: f[name] for name in ("logits", "labels", "index")}
            for layer in job.layers:
                for name in (layer, layer + MAX_SUFFIX):
                    self._handles[f"{FEATURES}/{name}"] = f[FEATURES][name]
        return self._handles

    _handles: dict[str, h5py.Dataset] | None = None

    def release(self) -> None:
        """Drop the dataset handles (before the file is closed)."""
        self._handles = None

    def _write(self, rows: _Rows) -> None:
        f, job = self.f, self.job
        if rows.logits is not None:
            if "logits" not in f:
                feats = {k: (a.shape[1:], b.shape[1:]) for k, (a, b) in rows.feats.items()}
                _create_datasets(f, job.n_items, tuple(rows.logits.shape[1:]), feats,
                                 job.dtype, job.compression, job.ids)
                # room to close cleanly on a full disk: every chunk the cache may hold dirty
                self.lock.reserve(_RESERVE_BASE + _chunk_bytes(f))
            ds = self._datasets()
            need = rows.nbytes + _SPACE_MARGIN
            if not _enough_space(job.path, need):
                raise OSError(errno.ENOSPC, f"less than {need} bytes free for the next batch")
            b = len(rows.logits)
            sl = slice(self.n_done, self.n_done + b)
            ds["logits"][sl] = rows.logits
            ds["labels"][sl] = rows.labels
            ds["index"][sl] = rows.index.astype(ds["index"].dtype)
            for layer in job.layers:
                feat, mx = rows.feats[layer]
                ds[f"{FEATURES}/{layer}"][sl] = feat
                ds[f"{FEATURES}/{layer}{MAX_SUFFIX}"][sl] = mx
            self.n_done += b
        # The rows (chunks, chunk index, the file's end address) are flushed first, the
        # progress markers after, in a second flush: one flush writes them in an order HDF5
        # does not promise, and a SIGKILL inside it can keep a new n_done naming a chunk the
        # file's end address does not cover yet (seen once under load: "addr overflow" on
        # resume). A crash before the second flush only loses the current batch, which the
        # next run recomputes.
        f.flush()
        f.attrs["n_done"] = np.int64(self.n_done)
        f.attrs["next_item"] = np.int64(rows.stop)
        f.flush()
        self.safe = (self.n_done, rows.stop)


def _enough_space(path: Path, need: int) -> bool:
    try:
        return free_bytes(path) >= need
    except OSError:  # statvfs unsupported: rely on the write failing
        return True


def _chunk_bytes(f: h5py.File) -> int:
    total = 0

    def add(_: str, obj: Any) -> None:
        nonlocal total
        if isinstance(obj, h5py.Dataset) and obj.chunks:
            total += int(np.prod(obj.chunks, dtype=np.int64)) * obj.dtype.itemsize

    f.visititems(add)
    return total


# -- small file helpers ----------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _close(f: h5py.File) -> None:
    try:
        if f.id.valid:
            f.close()
    except Exception:  # noqa: BLE001 - closing a failed file must not hide the first error
        log.debug("closing %s failed", f, exc_info=True)


def _openable(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            int(f.attrs["n_done"])
        return True
    except Exception:  # noqa: BLE001
        return False


def _remove_unusable(path: Path) -> None:
    """Remove a file this run created that is empty or cannot be opened (a failed start)."""
    try:
        if path.exists() and (path.stat().st_size == 0 or not _openable(path)):
            path.unlink()
    except OSError:
        pass


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _read_attrs(path: Path) -> dict[str, Any]:
    """The attributes of an existing output file, or a ``CacheForeignError`` saying what it is.

    Messages here never suggest ``--overwrite``: the file may be the user's own, and deleting
    it is theirs to decide (``--overwrite`` does replace it when they ask).
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise CacheForeignError(f"{path}: exists but cannot be read ({exc.strerror or exc}); "
                                "check its permissions or choose another --out") from None
    if head == b"":
        # A 0-byte file: most likely a run that died while creating it (e.g. on a full disk).
        raise CacheForeignError(
            f"{path}: exists and is empty (0 bytes), so not an activation cache; delete it if "
            "it is a leftover of a failed run, or choose another --out"
        )
    if head != _HDF5_SIGNATURE:
        # Most likely the user's own file named by mistake: never suggest deleting it first.
        raise CacheForeignError(
            f"{path}: exists and is not an HDF5 file, so not an activation cache; choose "
            "another --out (--overwrite would delete this file)"
        )
    try:
        with h5py.File(path, "r") as f:
            have = decode_attrs(f.attrs)
    except (OSError, RuntimeError) as exc:
        raise CacheForeignError(
            f"{path}: exists but cannot be read as HDF5 ({_first_line(exc)}); if it is a cache "
            "whose run was killed inside a write, delete it and re-run; otherwise choose "
            "another --out"
        ) from None
    if have.get("format") != FORMAT:
        raise CacheForeignError(
            f"{path}: exists and is an HDF5 file but not an interptool activation cache "
            f"(format {have.get('format')!r}); choose another --out (--overwrite would "
            "delete this file)"
        )
    return have


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
    if not all(logits_shape):
        raise _no_classes("", (n, *logits_shape))
    for layer, (row, _) in feats.items():
        if not all(row):
            raise CacheError(f"layer {layer!r} output has shape (N, {', '.join(map(str, row))}) "
                             "with a dimension of 0: nothing to cache; choose another layer")

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


def _blank_input(model: torch.nn.Module, pre: Any, dev: torch.device) -> torch.Tensor:
    """One zero image of the model's input size, dtype and device (shape and layout probes)."""
    return torch.zeros((1, *pre.input_size), device=dev, dtype=_input_dtype(model))


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
    x = _blank_input(model, pre, dev)
    with torch.inference_mode(), capture_layers(model, layers) as acts:
        logits = model(x)
    feats = {k: (tuple(v.shape[1:]), tuple(_maxima(v).shape[1:])) for k, v in acts.items()}
    _create_datasets(f, n, tuple(logits.shape[1:]), feats, dtype, compression, ids)


def _no_classes(model: str, shape: tuple[int, ...]) -> CacheError:
    who = f"model {model}" if model else "the model"
    return CacheError(
        f"{who} returned logits of shape {shape}: 0 classes; expected logits (N, K) with "
        "K >= 1. The classifier has no outputs: check --num-classes or the checkpoint's "
        "classifier weights"
    )


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise CacheError(
        f"model returned {type(out).__name__}; expected a logits tensor (N, K)"
    )


__all__ = ["CacheRun", "cache_activations", "run_cache", "weights_sha256"]
