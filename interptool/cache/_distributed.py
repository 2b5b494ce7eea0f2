"""Caching over several processes, GPUs or nodes launched by ``torchrun``.

``torchrun --nproc_per_node=N -m interptool cache ... --out OUT.h5`` (or any program calling
:func:`interptool.cache.run_cache` under torchrun) runs this instead of the one-process writer:

1. rank 0 takes the lock on ``OUT.h5`` (held to the end) and decides: a complete matching
   ``OUT.h5`` is a cache hit for every rank; otherwise the run goes on;
2. each rank takes a contiguous shard of the data set, cut at multiples of the batch size (so
   every batch holds the same images as in a one-process run), and writes it with the ordinary
   resumable writer to ``OUT.rankK-of-N.h5`` (attribute ``shard``);
3. the ranks exchange their outcome; if any failed, every rank stops with an error and the
   shard files stay (re-running the same command resumes each);
4. rank 0 copies the shards, in order, into one real HDF5 file written under a temporary name
   and renamed to ``OUT.h5`` (so ``OUT.h5`` exists only complete), records the shards in the
   ``distributed`` attribute and deletes the shard files.

Each dataset of ``OUT.h5`` is then identical to that of a one-process cache of the same data
with the same batch size and per-process thread count. The process group uses gloo on CPU and
nccl on CUDA (each rank on ``cuda:LOCAL_RANK``); only small Python objects travel through it.
Without torchrun's environment (``WORLD_SIZE`` > 1) none of this runs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from interptool._locks import output_lock
from interptool._provenance import fsync_dir, is_no_space
from interptool.cache._errors import (
    CacheDiskFullError,
    CacheForeignError,
    CacheForwardError,
    CacheLockedError,
    CacheMismatchError,
    CacheNonFiniteError,
)
from interptool.cache._format import FEATURES, MAX_SUFFIX, encode_attr
from interptool.errors import CacheError, DataError, InterptoolError

log = logging.getLogger(__name__)

# Collectives wait for the slowest rank's whole shard: allow a long one (gloo's default is 30 min).
_TIMEOUT = _dt.timedelta(hours=24)
# Meeting the other ranks when the process group is made must not take long: a rank that never
# comes (another command, a crashed start) is an error after this many seconds, not a hang.
INIT_TIMEOUT_ENV = "INTERPTOOL_DIST_INIT_TIMEOUT"
_INIT_TIMEOUT_S = 600.0
# The groups this module made, kept for the life of the process (see _shard_group).
_GROUPS: dict[str, Any] = {}
# Rows copied per block while merging (bounded memory: about 64 MiB for the widest layer).
_MERGE_BYTES = 64 << 20

_ERRORS: dict[str, type[InterptoolError]] = {
    cls.__name__: cls
    for cls in (CacheError, CacheMismatchError, CacheLockedError, CacheForwardError,
                CacheDiskFullError, CacheNonFiniteError, CacheForeignError, DataError)
}


def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def rank_info() -> tuple[int, int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)`` from torchrun's environment."""
    world = _env_int("WORLD_SIZE", 1)
    return (_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0),
            _env_int("LOCAL_WORLD_SIZE", world))


def shard_range(n_items: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Items ``[start, stop)`` of rank ``rank``: contiguous, cut at multiples of the batch size.

    Whole batches are dealt out as evenly as possible (ranks differ by at most one batch), so
    each batch holds exactly the images of the same batch in a one-process run.
    """
    n_batches = -(-n_items // batch_size)
    b0, b1 = rank * n_batches // world, (rank + 1) * n_batches // world
    return min(b0 * batch_size, n_items), min(b1 * batch_size, n_items)


def shard_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    """``OUT.h5`` -> ``OUT.rankK-of-N.h5``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}-of-{world}{p.suffix}")


class _Reindexed(Dataset):
    """Items ``start..stop`` of a torch data set, re-numbered from 0 (the writer's row ids)."""

    def __init__(self, base: Any, start: int, stop: int) -> None:
        self.base, self.start, self.stop = base, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int) -> Any:
        item = self.base[self.start + j]
        if item is None:  # a bad image with skip_bad
            return None
        x, y, _ = item
        return x, y, j


class ShardView:
    """The items ``[start, stop)`` of an ImageDataset, with the attributes the writer reads."""

    def __init__(self, dataset: Any, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop
        self.spec = str(dataset.spec)
        self.ids = [str(i) for i in dataset.ids][start:stop]
        self.labels = np.asarray(dataset.labels)[start:stop]
        self.class_names = getattr(dataset, "class_names", None)
        # a shard file belongs to one range of one data set: resuming it with another
        # world size or data set is a mismatch, not a silent mix
        self.fingerprint = hashlib.sha256(
            f"{dataset.fingerprint}#items={start}:{stop}".encode()).hexdigest()

    def __len__(self) -> int:
        return self.stop - self.start

    def torch_dataset(self, transform: Any, skip_bad: bool = False) -> Dataset:
        return _Reindexed(self.dataset.torch_dataset(transform, skip_bad=skip_bad),
                          self.start, self.stop)


def _device(loaded: Any, device: Any, local_rank: int) -> torch.device:
    dev = torch.device(device if device is not None else getattr(loaded, "device", None)
                       or "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            from interptool.errors import ConfigError

            raise ConfigError(f"device {str(dev)!r} was asked for but torch sees no CUDA GPU; "
                              "use --device cpu")
        # one GPU per local rank, whatever index the command named
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def _outcome(exc: BaseException | None, **extra: Any) -> dict[str, Any]:
    if exc is None:
        return {"ok": True, **extra}
    return {"ok": False, "type": type(exc).__name__, "message": str(exc)}


def _raise_first_failure(outcomes: list[dict[str, Any]], rank: int,
                         own: BaseException | None) -> None:
    failed = [(k, o) for k, o in enumerate(outcomes) if not o["ok"]]
    if not failed:
        return
    if own is not None:
        raise own
    k, o = failed[0]
    cls = _ERRORS.get(o["type"], CacheError)
    raise cls(f"rank {k} of {len(outcomes)} failed: {o['message']}")


def run_sharded(
    loaded: Any,
    dataset: Any,
    layers: Any,
    path: str | os.PathLike,
    **kw: Any,
) -> Any:
    """:func:`interptool.cache.run_cache` for one rank of a torchrun launch (see module doc)."""
    import torch.distributed as dist

    from interptool._progress import set_quiet
    from interptool.cache._writer import CacheRun, _choose_probe, _make_job, _run_local

    rank, world, local_rank, local_world = rank_info()
    dev = _device(loaded, kw.pop("device", None), local_rank)
    group = _shard_group("nccl" if dev.type == "cuda" else "gloo", rank)
    if rank != 0:
        set_quiet(True)  # one progress bar (rank 0's shard) is enough
    path = Path(path)
    overwrite = kw.pop("overwrite", False)
    probe = _choose_probe(dataset, kw.pop("probe", None))
    t0 = time.perf_counter()

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj, group=group)
        return out

    with ExitStack() as stack:
        # 1. rank 0 locks OUT and decides: hit, or build from shards
        decision: dict[str, Any] = {}
        err: BaseException | None = None
        final_job = None
        if rank == 0:
            try:
                stack.enter_context(output_lock(path, fix="choose another --out",
                                                error=CacheLockedError))
                final_job = _make_job(loaded, dataset, layers, path, probe=probe,
                                      device=dev, local_ranks=local_world, **kw)
                status, have = final_job._decide(overwrite)
                if status == "resumed":
                    raise CacheError(
                        f"{path}: an incomplete one-process cache is there; finish it "
                        "with the same command without torchrun, or pass --overwrite")
                decision = {"status": status, "have": have}
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it
                err = exc
        outcomes = gather(_outcome(err, **decision))
        _raise_first_failure(outcomes[:1], rank, err)
        if outcomes[0]["status"] == "hit":
            have = outcomes[0]["have"]
            return CacheRun(path, "hit", int(have.get("n_done", 0)), len(dataset),
                            list(have.get("layers") or []), list(have.get("skipped") or []))

        # 2. every rank writes its shard
        start, stop = shard_range(len(dataset), kw["batch_size"], rank, world)
        spath = shard_path(path, rank, world)
        run = None
        err = None
        try:
            if stop > start:
                run = _run_local(
                    loaded, ShardView(dataset, start, stop), layers, spath,
                    probe=probe, device=dev, overwrite=overwrite, local_ranks=local_world,
                    extra_attrs={"shard": {"rank": rank, "world_size": world,
                                           "start": start, "stop": stop,
                                           "of": str(path.name)}},
                    **kw)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it
            err = exc
        info = {"rank": rank, "start": start, "stop": stop,
                "file": spath.name if stop > start else "",
                "n_done": run.n_done if run else 0,
                "computed": run.images_computed if run else 0,
                "skipped": run.skipped if run else [], "status": run.status if run else ""}
        # 3. all shards complete, or everyone stops
        outcomes = gather(_outcome(err, info=info))
        _raise_first_failure(outcomes, rank, err)
        shards = [o["info"] for o in outcomes]

        # 4. rank 0 joins them into OUT
        err = None
        if rank == 0:
            try:
                assert final_job is not None
                _merge(final_job, shards, path)
            except Exception as exc:  # noqa: BLE001
                err = exc
        outcomes = gather(_outcome(err))
        _raise_first_failure(outcomes[:1], rank, err)
        n_done = sum(s["n_done"] for s in shards)
        skipped = [i for s in shards for i in s["skipped"]]
        computed = sum(s["computed"] for s in shards)
        status = "resumed" if any(s["status"] in ("resumed", "hit") for s in shards) \
            else "created"
        return CacheRun(path, status, n_done, len(dataset), list(layers or []), skipped,
                        time.perf_counter() - t0, computed)


def _init_timeout() -> _dt.timedelta:
    raw = os.environ.get(INIT_TIMEOUT_ENV, "")
    try:
        secs = float(raw) if raw else _INIT_TIMEOUT_S
    except ValueError:
        from interptool.errors import ConfigError

        raise ConfigError(f"{INIT_TIMEOUT_ENV}={raw!r}: expected a number of seconds, e.g. "
                          "600") from None
    return _dt.timedelta(seconds=max(1.0, secs))


def _shard_group(backend: str, rank: int) -> Any:
    """The process group the ranks meet in, made once per process and kept until it exits.

    Making the default group, destroying it and making it again in the same torchrun job (one
    sharded cache after another, as ``compare`` does for each model) hangs: torch restarts its
    group numbering at 0, so the second group's gloo rendezvous reads the first one's stale keys
    in torchrun's store and waits for peers that have moved on. So the group is made on the
    first call and reused by every later one. It is made with a short timeout
    (``INTERPTOOL_DIST_INIT_TIMEOUT`` seconds, default 600), so ranks that never meet raise an
    error instead of waiting forever; the collectives that wait for the slowest rank's shard
    use a second group with a long timeout (24 h). If the program made the default group
    itself, the shards meet in it (with its timeout) and it is left to the program.
    """
    import atexit

    import torch.distributed as dist

    if "shards" in _GROUPS:
        return _GROUPS["shards"]
    if dist.is_initialized():
        return None  # the program's own default group
    timeout = _init_timeout()
    try:
        dist.init_process_group(backend, timeout=timeout)
        _GROUPS["shards"] = dist.new_group(backend=backend, timeout=_TIMEOUT)
    except (RuntimeError, dist.DistError) as exc:
        if dist.is_initialized():
            dist.destroy_process_group()
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CacheError(
            f"rank {rank}: the torchrun processes did not form a {backend} process group within "
            f"{timeout.total_seconds():g} s ({first}); check that every rank runs the same "
            f"command and can reach MASTER_ADDR, or raise {INIT_TIMEOUT_ENV}") from None
    atexit.register(_destroy_groups)
    return _GROUPS["shards"]


def _destroy_groups() -> None:
    import torch.distributed as dist

    if _GROUPS.pop("shards", None) is not None and dist.is_initialized():
        dist.destroy_process_group()


def _merge(job: Any, shards: list[dict[str, Any]], path: Path) -> None:
    """Copy the shard files, in rank order, into ``path`` (written under a temporary name)."""
    from interptool.cache._writer import _create_datasets, _create_from_dummy, _shrink

    tmp = path.with_name(f"{path.stem}.merging{os.getpid()}{path.suffix}")
    folder = path.parent
    files = [folder / s["file"] for s in shards if s["file"]]
    try:
        with ExitStack() as stack:
            srcs = [stack.enter_context(h5py.File(p, "r")) for p in files]
            with h5py.File(tmp, "w") as f:
                job._init_attrs(f)
                first = next((s for s in srcs if "logits" in s), None)
                if first is None or all(int(s.attrs["n_done"]) == 0 for s in srcs):
                    _create_from_dummy(f, job.loaded.model, job.loaded.preprocessing,
                                       job.layers, job.dev, job.n_items, job.dtype,
                                       job.compression, job.ids)
                else:
                    feats = {layer: (first[FEATURES][layer].shape[1:],
                                     first[FEATURES][layer + MAX_SUFFIX].shape[1:])
                             for layer in job.layers}
                    _create_datasets(f, job.n_items, first["logits"].shape[1:], feats,
                                     job.dtype, job.compression, job.ids)
                names = ["logits", "labels", "index"] + [
                    f"{FEATURES}/{layer}{sfx}" for layer in job.layers for sfx in ("", MAX_SUFFIX)]
                row = 0
                for src in srcs:
                    n = int(src.attrs["n_done"])
                    for name in names:
                        if n:
                            _copy_rows(src[name], f[name], n, row)
                    row += n
                if row < job.n_items:
                    _shrink(f, row)
                skipped = [i for s in shards for i in s["skipped"]]
                f.attrs["skipped"] = encode_attr("skipped", skipped)
                f.attrs["skip_bad"] = bool(job.skip_bad)
                f.attrs["n_done"] = np.int64(row)
                f.attrs["next_item"] = np.int64(job.n_items)
                f.attrs["distributed"] = encode_attr("distributed", {
                    "world_size": len(shards),
                    "shards": [{k: s[k] for k in ("rank", "start", "stop", "n_done", "file")}
                               for s in shards]})
                f.flush()
                f.attrs["complete"] = True
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_no_space(exc):
            from interptool._provenance import device_of

            raise CacheDiskFullError(
                f"no space left on {device_of(path)} while joining the shards into {path}; "
                f"the {len(files)} shard files are complete and kept; free space and re-run "
                "the same command", path=path) from None
        raise
    for p in files:  # their content is in OUT now
        p.unlink(missing_ok=True)


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, n: int, at: int) -> None:
    row_bytes = max(1, int(np.prod(src.shape[1:], dtype=np.int64)) * src.dtype.itemsize)
    step = max(1, _MERGE_BYTES // row_bytes)
    if dst.chunks:  # whole chunks per block when the offsets allow it
        step = max(dst.chunks[0], step - step % dst.chunks[0])
    for s in range(0, n, step):
        e = min(n, s + step)
        dst[at + s:at + e] = src[s:e]


__all__ = ["ShardView", "launched", "rank_info", "run_sharded", "shard_path", "shard_range"]
