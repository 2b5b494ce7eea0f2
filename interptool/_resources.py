"""How many CPU cores this process may use, and how to split them between threads and workers.

A job on a shared machine or in a container usually sees more CPUs (``os.cpu_count()``) than it
may use: its CPU affinity (``taskset``, Slurm's ``--cpus-per-task``) and its cgroup CPU quota
(Docker's ``--cpus``, Kubernetes limits) cap it. Torch's default of one intra-op thread per
visible CPU then makes threads fight each other and run slower than fewer threads would.
:func:`available_cpus` reads both limits; :func:`plan_threads` turns a core budget into
torch intra-op threads + DataLoader workers that never exceed it in total.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from interptool.errors import ConfigError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_dirs(root: Path) -> list[Path]:
    """The cgroup folders of this process, innermost first, ending at ``root``.

    ``/proc/self/cgroup`` names our group relative to the hierarchy; inside a container with
    its own cgroup namespace that is ``/`` and ``root`` itself is our group.
    """
    dirs: list[Path] = []
    text = _read(PROC_CGROUP) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":  # the cgroup v2 entry
            rel = parts[2].strip("/")
            p = root / rel if rel else root
            while True:
                dirs.append(p)
                if p == root or root not in p.parents:
                    break
                p = p.parent
    if root not in dirs:
        dirs.append(root)
    return dirs


def cgroup_cpu_limit(root: str | os.PathLike | None = None) -> float | None:
    """The cgroup CPU quota in cores (e.g. 1.5), or ``None`` when there is none.

    cgroup v2: ``cpu.max`` (``"QUOTA PERIOD"`` or ``"max PERIOD"``), the tightest along our
    group and its parents; cgroup v1: ``cpu/cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.
    """
    base = Path(root) if root is not None else CGROUP_ROOT
    limits: list[float] = []
    for d in _own_cgroup_dirs(base):
        raw = _read(d / "cpu.max")
        if raw:
            parts = raw.split()
            if len(parts) == 2 and parts[0] != "max":
                try:
                    quota, period = float(parts[0]), float(parts[1])
                except ValueError:
                    continue
                if quota > 0 and period > 0:
                    limits.append(quota / period)
    if limits:
        return min(limits)
    quota_s = _read(base / "cpu" / "cpu.cfs_quota_us") or _read(base / "cpu.cfs_quota_us")
    period_s = _read(base / "cpu" / "cpu.cfs_period_us") or _read(base / "cpu.cfs_period_us")
    try:
        quota, period = float(quota_s or -1), float(period_s or -1)
    except ValueError:
        return None
    if quota > 0 and period > 0:
        return quota / period
    return None


def available_cpus(cgroup_root: str | os.PathLike | None = None) -> int:
    """Cores this process may use: the smaller of its CPU affinity and its cgroup quota.

    A fractional quota is rounded down (1.5 cores -> 1), since a second busy thread on a
    1.5-core quota is throttled for part of every period; never less than 1.
    """
    n = _affinity_cpus()
    quota = cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        n = min(n, max(1, math.floor(quota + 1e-9)))
    return max(1, n)


@dataclass(frozen=True)
class ThreadPlan:
    """How a run uses its cores (recorded in cache attributes as ``threads``)."""

    available: int  # cores this process may use (affinity, cgroup quota, shared by local ranks)
    requested: int | None  # --threads, or None for "all available"
    total: int  # the budget actually used: min(requested, available) or available
    torch_threads: int  # torch intra-op threads of the forward pass
    loader_workers: int  # DataLoader worker processes (image decoding)
    source: str  # where `available` came from: "affinity", "cgroup", "affinity/ranks", ...

    def to_dict(self) -> dict:
        return asdict(self)


def _source(cgroup_root: str | os.PathLike | None) -> str:
    quota = cgroup_cpu_limit(cgroup_root)
    if quota is not None and math.floor(quota + 1e-9) < _affinity_cpus():
        return "cgroup"
    return "affinity"


def plan_threads(
    requested: int | None = None,
    *,
    workers: int | None = None,
    cap: int | None = None,
    local_ranks: int = 1,
    cgroup_root: str | os.PathLike | None = None,
) -> ThreadPlan:
    """Split a core budget into torch intra-op threads and DataLoader workers.

    Args:
        requested: ``--threads``: cores to use in total; ``None`` (or 0) uses every available
            core, or ``cap`` if smaller. A request above what is available is capped (the plan
            records both).
        workers: DataLoader workers asked for explicitly (``--workers``); ``None`` chooses.
        cap: an upper bound for the default (the caller's ``torch.get_num_threads()``, so that
            a program that limited torch's threads is not overridden); ignored when
            ``requested`` is given.
        local_ranks: processes sharing this machine's cores (torchrun's
            ``LOCAL_WORLD_SIZE``): each gets an equal share.
        cgroup_root: the cgroup file system (tests point it at a fake one).

    ``torch_threads + loader_workers`` never exceeds the available cores. Chosen workers:
    none below 3 cores, where a decoding process would take a whole core from the forward
    pass (costlier than decoding in between batches); otherwise about one in six cores,
    since decoding a probe image costs a small fraction of its forward pass. Explicit workers
    are kept (up to the available cores less one) and the forward pass gets the rest.

    Raises:
        ConfigError: ``requested`` or ``workers`` is negative, or ``local_ranks`` < 1.
    """
    if requested is not None and (not isinstance(requested, int) or requested < 0):
        raise ConfigError(f"--threads must be a positive integer (or 0 for all cores), got "
                          f"{requested!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"--workers must be an integer >= 0, got {workers!r}")
    if local_ranks < 1:
        raise ConfigError(f"local_ranks must be >= 1, got {local_ranks}")
    cores = available_cpus(cgroup_root)
    source = _source(cgroup_root)
    if local_ranks > 1:
        cores = max(1, cores // local_ranks)
        source += "/ranks"
    if requested:
        budget = min(requested, cores)
    else:
        budget = min(cores, cap) if cap and cap > 0 else cores
    if workers is None:
        workers = 0 if budget < 3 else max(1, round(budget / 6))
        threads = max(1, budget - workers)
    else:
        workers = min(workers, cores - 1)
        threads = max(1, min(budget, cores - workers))
    return ThreadPlan(cores, requested or None, threads + workers, threads, workers, source)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set torch's intra-op threads to ``n`` for the block, then restore the previous value."""
    import torch

    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


__all__ = ["ThreadPlan", "available_cpus", "cgroup_cpu_limit", "plan_threads", "torch_threads"]
