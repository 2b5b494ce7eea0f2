"""Caching over several processes, GPUs or nodes launched by ``torchrun``.

``torchrun --nproc_per_node=N -m interptool cache ... --out OUT.h5`` (or any program calling
:func:`interptool.cache.run_cache` under torchrun) runs this instead of the one-process writer:

1. every rank states what it is about to cache (its data set's length and fingerprint, the
   model's weights checksum, the layers, dtype, batch size, ...); if any rank differs from
   rank 0, every rank stops with one error naming the rank and the field, before any file is
   touched (the shards would otherwise be cut from different data or computed by different
   models and joined silently);
2. rank 0 takes the lock on ``OUT.h5`` (held to the end), removes the temporary file of a join
   that was killed, and decides: a complete matching ``OUT.h5`` is a cache hit for every rank;
   shard files whose range the current ``--batch-size`` and world size would cut differently
   are an error (or are deleted with ``--overwrite``); otherwise the run goes on;
3. each rank takes a contiguous shard of the data set, cut at multiples of the batch size (so
   every batch holds the same images as in a one-process run), and writes it with the ordinary
   resumable writer to ``OUT.rankK-of-N.h5`` (attribute ``shard``);
4. the ranks exchange their outcome; if any failed, every rank stops with an error and the
   shard files stay (re-running the same command resumes each);
5. rank 0 checks each shard file against what its rank reported and what rank 0 expects
   (complete, row count, range, data fingerprint, model, layers, dtype: a stale file is never
   joined) and that the disk holds a second copy of them, copies the shards, in order, into
   one real HDF5 file written under a temporary name (``OUT.merging<pid>.h5``) and renamed to
   ``OUT.h5`` (so ``OUT.h5`` exists only complete), records the shards in the
   ``distributed`` attribute and deletes the shard files.

Each dataset of ``OUT.h5`` is then identical to that of a one-process cache of the same data
with the same batch size and per-process thread count. The process group uses gloo on CPU and
nccl on CUDA (each rank on ``cuda:LOCAL_RANK``); only small Python objects travel through it.
Without torchrun's environment (``WORLD_SIZE`` > 1) none of this runs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from interptool._locks import output_lock
from interptool._provenance import device_of, free_bytes, fsync_dir, fsync_file, is_no_space
from interptool.cache._errors import (
    CacheDiskFullError,
    CacheForeignError,
    CacheForwardError,
    CacheLockedError,
    CacheMismatchError,
    CacheNonFiniteError,
)
from interptool.cache._format import FEATURES, FORMAT, MAX_SUFFIX, decode_attrs, encode_attr
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
# Free space asked for beyond the shards' own size before a join: HDF5 metadata and chunk
# padding of the joined file (it holds the same rows with the same compression).
_JOIN_MARGIN = 16 << 20

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


def shard_fingerprint(data_fingerprint: str, start: int, stop: int) -> str:
    """The ``data_fingerprint`` a shard file of items ``[start, stop)`` records.

    A shard file belongs to one range of one data set: resuming it with another world size or
    data set is a mismatch, not a silent mix; rank 0 derives the same value from its own data
    set to check each shard before the join.
    """
    return hashlib.sha256(f"{data_fingerprint}#items={start}:{stop}".encode()).hexdigest()


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
        self.fingerprint = shard_fingerprint(str(dataset.fingerprint), start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def torch_dataset(self, transform: Any, skip_bad: bool = False) -> Dataset:
        return _Reindexed(self.dataset.torch_dataset(transform, skip_bad=skip_bad),
                          self.start, self.stop)


def _device(loaded: Any, device: Any, local_rank: int, local_world: int) -> torch.device:
    dev = torch.device(device if device is not None else getattr(loaded, "device", None)
                       or "cpu")
    if dev.type == "cuda":
        from interptool.errors import ConfigError

        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(dev)!r} was asked for but torch sees no CUDA GPU; "
                              "use --device cpu")
        count = torch.cuda.device_count()
        if local_world > count:
            # two ranks on one GPU: NCCL refuses them at the first collective ("Duplicate GPU
            # detected"), after every rank has loaded its model
            raise ConfigError(f"{local_world} processes per node but this node has {count} "
                              f"GPU(s): each rank needs its own; use --nproc_per_node={count} "
                              "(or --device cpu)")
        # one GPU per local rank, whatever index the command named
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def use_rank_gpu(device: Any) -> Any:
    """The device this process should load its models on: under torchrun with a CUDA
    ``device``, this rank's GPU (``cuda:LOCAL_RANK``, made current), so that no rank puts its
    weights and CUDA context on GPU 0 (a bare ``"cuda"`` or an index like ``"cuda:0"`` would);
    ``device`` itself outside torchrun or on the CPU."""
    if not launched() or device is None or torch.device(device).type != "cuda":
        return device
    _, _, local_rank, local_world = rank_info()
    return str(_device(None, device, local_rank, local_world))


def _outcome(exc: BaseException | None, **extra: Any) -> dict[str, Any]:
    if exc is None:
        return {"ok": True, **extra}
    return {"ok": False, "type": type(exc).__name__, "message": str(exc)}


def _raise_first_failure(outcomes: list[dict[str, Any]], rank: int,
                         own: BaseException | None, world: int) -> None:
    """Raise this rank's own error, or else the first failed rank's among ``outcomes`` (all
    ranks' or only rank 0's: ``world`` is the number of ranks, for the message)."""
    failed = [(k, o) for k, o in enumerate(outcomes) if not o["ok"]]
    if not failed:
        return
    if own is not None:
        raise own
    k, o = failed[0]
    cls = _ERRORS.get(o["type"], CacheError)
    raise cls(f"rank {k} of {world} failed: {o['message']}")


# What every rank must agree on, in the order a difference is reported (the first that differs
# is named): the data, then the model, then the options that decide the rows' content.
_IDENTITY_KEYS = ("n_items", "data_fingerprint", "arch", "model_kwargs", "checkpoint_sha256",
                  "weights_sha256", "layers", "dtype", "preprocessing", "transform",
                  "batch_size", "compression", "skip_bad", "numerics")
_SAME_DATA = "every rank must see the same data (a stale copy on a node's local disk?)"


def _identity(job: Any) -> dict[str, Any]:
    """What this rank's job would cache: its data set, model and the options of the command."""
    return {"n_items": job.n_items, **job.want, "batch_size": int(job.batch_size),
            "compression": job.compression or "", "skip_bad": bool(job.skip_bad),
            "numerics": job.numerics}


def _short(value: Any) -> str:
    return f"{str(value)[:12]}..." if value else "none"


def _rank_difference(rank: int, key: str, mine: Any, ref: Any) -> str:
    """One sentence on how rank ``rank``'s ``key`` differs from rank 0's, with the fix."""
    if key == "n_items":
        return f"rank {rank}'s data set has {mine} images, rank 0's {ref}: {_SAME_DATA}"
    if key == "data_fingerprint":
        return (f"rank {rank}'s data set differs from rank 0's (data_fingerprint {_short(mine)} "
                f"vs {_short(ref)}: other ids, labels or file sizes): {_SAME_DATA}")
    if key == "weights_sha256":
        return (f"rank {rank}'s model weights differ from rank 0's (weights_sha256 "
                f"{_short(mine)} vs {_short(ref)}): every rank must load the same weights (the "
                "same --checkpoint; a model built in code without one gets new random weights "
                "in each process unless seeded)")
    if key == "checkpoint_sha256":
        return (f"rank {rank} loaded another checkpoint than rank 0 (checkpoint_sha256 "
                f"{_short(mine)} vs {_short(ref)}): every rank must load the same --checkpoint "
                "(a stale copy on a node's local disk?)")
    if key == "numerics":
        return (f"rank {rank} computes with numerics {mine}, rank 0 with {ref}: every rank must "
                "use the same kind of device and TF32 settings, or the joined file would hold "
                "rows rounded two ways")
    return (f"rank {rank}'s {key} is {mine!r}, rank 0's {ref!r}: every rank must run the same "
            "command with the same options")


def _check_same_job(path: Path, identities: list[dict[str, Any]]) -> None:
    """Raise, on every rank alike, if any rank would cache other data or another model than
    rank 0 (each rank holds every rank's identity, so all raise the same error)."""
    from interptool.cache._writer import _jsonish

    ref = identities[0]
    for rank, mine in enumerate(identities[1:], start=1):
        for key in _IDENTITY_KEYS:
            if _jsonish(key, mine.get(key)) != _jsonish(key, ref.get(key)):
                why = _rank_difference(rank, key, mine.get(key), ref.get(key))
                raise CacheError(f"{path}: {why}; nothing was written")


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
    dev = _device(loaded, kw.pop("device", None), local_rank, local_world)
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
        # 1. every rank says what it would cache; all must agree with rank 0 before any file
        # is touched (each rank cuts its shard from its own len(dataset) and checks a resume
        # against its own fingerprint and weights, so nothing later would notice)
        err: BaseException | None = None
        final_job = None
        identity: dict[str, Any] = {}
        try:
            final_job = _make_job(loaded, dataset, layers, path, probe=probe, device=dev,
                                  local_ranks=local_world, **kw)
            identity = _identity(final_job)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it
            err = exc
        outcomes = gather(_outcome(err, identity=identity))
        _raise_first_failure(outcomes, rank, err, world)
        _check_same_job(path, [o["identity"] for o in outcomes])
        assert final_job is not None

        # 2. rank 0 locks OUT and decides: hit, or build from shards
        decision: dict[str, Any] = {}
        err = None
        if rank == 0:
            try:
                stack.enter_context(output_lock(path, fix="choose another --out",
                                                error=CacheLockedError))
                _remove_stale_joins(path)
                status, have = final_job._decide(overwrite)
                if status == "resumed":
                    raise CacheError(
                        f"{path}: an incomplete one-process cache is there; finish it "
                        "with the same command without torchrun, or pass --overwrite")
                if status != "hit":
                    _check_leftover_shards(path, final_job.n_items, final_job.batch_size,
                                           world, overwrite)
                decision = {"status": status, "have": have}
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it
                err = exc
        outcomes = gather(_outcome(err, **decision))
        _raise_first_failure(outcomes[:1], rank, err, world)
        if outcomes[0]["status"] == "hit":
            have = outcomes[0]["have"]
            return CacheRun(path, "hit", int(have.get("n_done", 0)), len(dataset),
                            list(have.get("layers") or []), list(have.get("skipped") or []))

        # 3. every rank writes its shard
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
                    same_model_as=final_job, **kw)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it
            err = exc
        info = {"rank": rank, "start": start, "stop": stop,
                "file": spath.name if stop > start else "",
                "n_done": run.n_done if run else 0,
                "computed": run.images_computed if run else 0,
                "skipped": run.skipped if run else [], "status": run.status if run else ""}
        # 4. all shards complete, or everyone stops
        outcomes = gather(_outcome(err, info=info))
        _raise_first_failure(outcomes, rank, err, world)
        shards = [o["info"] for o in outcomes]

        # 5. rank 0 joins them into OUT
        err = None
        if rank == 0:
            try:
                _merge(final_job, shards, path)
            except Exception as exc:  # noqa: BLE001
                err = exc
        outcomes = gather(_outcome(err))
        _raise_first_failure(outcomes[:1], rank, err, world)
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


def _files_beside(path: Path, infix: str) -> list[tuple[Path, re.Match[str]]]:
    """The files named ``STEM.INFIX.SUFFIX`` in ``path``'s folder (``infix`` a regular
    expression: shard files, join temporaries), sorted, with their matches; none when the
    folder does not exist yet."""
    pattern = re.compile(rf"{re.escape(path.stem)}\.{infix}{re.escape(path.suffix)}")
    try:
        names = sorted(os.listdir(path.parent))
    except OSError:
        return []
    return [(path.parent / name, m) for name in names if (m := pattern.fullmatch(name))]


def _remove_stale_joins(path: Path) -> list[Path]:
    """Delete the temporary files of joins into ``path`` that were killed; return them.

    A join killed by SIGKILL, or by the SIGTERM torchrun sends every rank when one fails,
    leaves ``OUT.merging<pid>.h5``, as large as the whole cache. Called with ``path``'s lock
    held: a join writes its temporary file only while its rank 0 holds that lock (until the
    rename), so every one found now belongs to a dead join, whatever its pid. Asking whether
    the pid is alive would be wrong: on a shared file system the pid may name a process of
    another node, and a live process of that number here proves nothing (pids are reused).
    """
    removed = []
    for stale, _ in _files_beside(path, r"merging\d+"):
        try:
            size = stale.stat().st_size
            stale.unlink()
        except FileNotFoundError:
            continue
        log.warning("removed %s (%.1f MiB), left by a join into %s that was killed", stale,
                    size / 2**20, path.name)
        removed.append(stale)
    return removed


def _recorded_shard(spath: Path) -> dict[str, Any] | None:
    """The ``shard`` range and ``batch_size`` a shard file records, or None if unreadable."""
    try:
        with h5py.File(spath, "r") as f:
            attrs = decode_attrs(f.attrs)
        shard = attrs["shard"]
        return {"start": int(shard["start"]), "stop": int(shard["stop"]),
                "batch_size": int(attrs.get("batch_size", 0))}
    except Exception:  # noqa: BLE001 - not a shard file we can read: its rank's writer says why
        return None


def _check_leftover_shards(path: Path, n_items: int, batch_size: int, world: int,
                           overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, delete) shard files of ``path`` that this run would cut
    at other items: written with another ``--batch-size`` or world size, or from a data set
    of another length.

    Without this, a shard whose range moved fails later with "data_fingerprint differs" and a
    hint to pass --overwrite, which throws away complete shards that the original batch size
    and world size would resume; and shard files of another world size would be left behind
    (as large as their share of the cache) while new ones are written.
    """
    for spath, match in _files_beside(path, r"rank(\d+)-of-(\d+)"):
        rank, was_world = int(match[1]), int(match[2])
        recorded = _recorded_shard(spath)
        now = shard_range(n_items, batch_size, rank, world) if rank < world else None
        if was_world == world and (recorded is None  # its own rank's writer says what it is
                                   or (recorded["start"], recorded["stop"]) == now):
            continue
        if overwrite:
            spath.unlink(missing_ok=True)
            log.info("removed %s, a shard cut at other items (another --batch-size, world "
                     "size or data set; --overwrite)", spath)
            continue
        if recorded is None:
            was = f"was rank {rank} of {was_world}"
        else:
            was = (f"was items {recorded['start']}:{recorded['stop']} with --batch-size "
                   f"{recorded['batch_size']} and {was_world} ranks")
        if now is None:
            now_text = f"now {world} ranks, so no rank {rank}"
        else:
            now_text = (f"now items {now[0]}:{now[1]} with --batch-size {batch_size} and "
                        f"{world} ranks")
        if (recorded is not None and was_world == world
                and int(recorded["batch_size"]) == batch_size):
            # same cut, other items: the data set itself changed length
            raise CacheMismatchError(
                f"{spath}: shard range changed ({was}, {now_text}): the data set now has "
                f"{n_items} images, so this shard was cut from another data set; pass "
                "--overwrite to start again (or point --data at the data it was made from)",
                path=spath, fields=["shard", "n_total"])
        raise CacheMismatchError(
            f"{spath}: shard range changed ({was}, {now_text}): resume with the original "
            "--batch-size and world size, or pass --overwrite to start again",
            path=spath, fields=["shard"])


def _check_shard_file(job: Any, shard: dict[str, Any], have: dict[str, Any], spath: Path,
                      path: Path, world: int) -> None:
    """Refuse to join a shard file that is not the complete shard its rank just reported.

    Each rank wrote and checked its file against its own data set and model; rank 0 checks
    the file again against what it expects itself, so a stale ``OUT.rankK-of-N.h5`` (another
    run's, or one left on a disk that is not shared by every node) is never joined.
    """
    from interptool.cache._writer import _mismatches, canonical_numerics

    rank = int(shard["rank"])
    start, stop = shard_range(job.n_items, job.batch_size, rank, world)
    expected = {"rank": rank, "world_size": world, "start": start, "stop": stop,
                "of": path.name}
    problem = ""
    if have.get("format") != FORMAT:
        problem = f"format is {have.get('format')!r}, expected {FORMAT!r}"
    elif have.get("complete") is not True:
        problem = f"complete is {have.get('complete')!r}, expected True"
    elif have.get("shard") != expected:
        problem = (f"shard is {json.dumps(have.get('shard'), sort_keys=True)}, expected "
                   f"{json.dumps(expected, sort_keys=True)} (items {start}:{stop} of "
                   f"{job.n_items} with --batch-size {job.batch_size})")
    elif int(have.get("n_done", -1)) != int(shard["n_done"]):
        problem = (f"n_done is {have.get('n_done')}, but rank {rank} reported "
                   f"{shard['n_done']} rows")
    else:
        # the model and settings of rank 0's job, the data fingerprint rank 0 derives for
        # this range from its own data set; a complete shard may hold more layers
        want = {**job.want, "data_fingerprint": shard_fingerprint(
            job.want["data_fingerprint"], start, stop)}
        bad = _mismatches(want, have, subset_layers=True)
        # rows rounded another way (another device, TF32 setting or input layout) must not
        # be joined with these: a shard finished by an earlier run is a hit without this check
        started = have.get("numerics")
        if started is not None and canonical_numerics(started) != job.numerics:
            bad.append(f"numerics is {started}, expected {job.numerics}")
        if bad:
            problem = "; ".join(bad)
    if problem:
        raise CacheError(
            f"{spath}: will not join this shard file into {path.name}: {problem}. It is not "
            f"the shard rank {rank} just wrote (a stale file, or --out on a disk that not "
            "every node shares?); delete it and re-run the same command")


def _check_join_space(path: Path, files: list[Path]) -> None:
    """Fail before writing if the disk cannot hold the joined file beside the shards.

    The join writes a copy of every row (the shards are deleted only once ``path`` is
    complete), so it needs about as much free space as the shards take, plus a margin.
    """
    need = sum(p.stat().st_size for p in files)
    need += need // 50 + _JOIN_MARGIN
    try:
        free = free_bytes(path.parent)
    except OSError:  # statvfs unsupported: rely on the write failing
        return
    if free < need:
        raise CacheDiskFullError(
            f"not enough free space on {device_of(path)} to join the {len(files)} shard files "
            f"into {path}: the join writes a copy as large as the shards ({need / 2**30:.2f} "
            f"GiB with margin) before deleting them, and {free / 2**30:.2f} GiB are free; the "
            "shard files are complete and kept; free space and re-run the same command",
            path=path)


def _merge(job: Any, shards: list[dict[str, Any]], path: Path) -> None:
    """Copy the shard files, in rank order, into ``path`` (written under a temporary name)."""
    tmp = path.with_name(f"{path.stem}.merging{os.getpid()}{path.suffix}")
    folder = path.parent
    world = len(shards)
    files = [folder / s["file"] for s in shards if s["file"]]
    with ExitStack() as sources:
        srcs = []
        for shard in shards:
            if not shard["file"]:
                continue
            spath = folder / shard["file"]
            try:
                src = sources.enter_context(h5py.File(spath, "r"))
            except FileNotFoundError:
                raise CacheError(
                    f"{spath}: rank {shard['rank']} wrote this shard file but rank 0 does not "
                    "see it: --out must be on a file system every node shares (NFS, Lustre, "
                    "GPFS); see docs/scaling.md") from None
            except (OSError, RuntimeError) as exc:
                raise CacheError(
                    f"{spath}: cannot be read as HDF5 to join it ({str(exc).splitlines()[0]}); "
                    "delete it and re-run the same command") from None
            _check_shard_file(job, shard, decode_attrs(src.attrs), spath, path, world)
            srcs.append(src)
        _check_join_space(path, files)
        try:
            _write_joined(job, shards, srcs, tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(folder)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, Exception) and is_no_space(exc):
                raise CacheDiskFullError(
                    f"no space left on {device_of(path)} while joining the shards into "
                    f"{path}; the {len(files)} shard files are complete and kept; free space "
                    "and re-run the same command", path=path) from None
            raise
    for p in files:  # their content is in OUT now
        p.unlink(missing_ok=True)


def _write_joined(job: Any, shards: list[dict[str, Any]], srcs: list[h5py.File],
                  tmp: Path) -> None:
    """Write the joined file ``tmp`` from the (checked) open shard files, in rank order."""
    from interptool.cache._writer import _create_datasets, _create_from_dummy, _shrink

    with h5py.File(tmp, "w") as f:
        job._init_attrs(f)
        first = next((s for s in srcs if "logits" in s), None)
        if first is None or all(int(s.attrs["n_done"]) == 0 for s in srcs):
            _create_from_dummy(f, job.loaded.model, job.loaded.preprocessing, job.layers,
                               job.dev, job.n_items, job.dtype, job.compression, job.ids)
        else:
            feats = {layer: (first[FEATURES][layer].shape[1:],
                             first[FEATURES][layer + MAX_SUFFIX].shape[1:])
                     for layer in job.layers}
            _create_datasets(f, job.n_items, first["logits"].shape[1:], feats, job.dtype,
                             job.compression, job.ids)
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


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, n: int, at: int) -> None:
    row_bytes = max(1, int(np.prod(src.shape[1:], dtype=np.int64)) * src.dtype.itemsize)
    step = max(1, _MERGE_BYTES // row_bytes)
    if dst.chunks:  # whole chunks per block when the offsets allow it
        step = max(dst.chunks[0], step - step % dst.chunks[0])
    for s in range(0, n, step):
        e = min(n, s + step)
        dst[at + s:at + e] = src[s:e]


__all__ = ["ShardView", "launched", "rank_info", "run_sharded", "shard_path", "shard_range"]
