"""How many CPU cores this process may use, and how to split them between threads and workers.

A job on a shared machine or in a container usually sees more CPUs (``os.cpu_count()``) than it
may use: its CPU affinity (``taskset``, Slurm's ``--cpus-per-task``) and its cgroup CPU quota
(Docker's ``--cpus``, Kubernetes limits) cap it. Torch's default of one intra-op thread per
visible CPU then makes threads fight each other and run slower than fewer threads would.
:func:`available_cpus` reads both limits; :func:`plan_threads` turns a core budget into
torch intra-op threads + DataLoader workers that never exceed it in total.
:func:`free_core_threads` goes one step further for analyses made of many small tensor
operations (dissection's tally, attribution's forward/backward passes): it keeps only as many
threads as there are cores idle right now, and :func:`thread_scope` holds that choice for a
whole stage.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from interptool.errors import ConfigError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
#: per-CPU time counters (Linux); tests point it at a fake file
PROC_STAT = Path("/proc/stat")
#: how long the idle-core sample lasts (s): long enough for the kernel's jiffy counters
#: (100 per second) to say something, short against any analysis worth threading
IDLE_SAMPLE_SECONDS = 0.05


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


def _group_and_parents(base: Path, entry: Callable[[str, str], bool]) -> list[Path]:
    """This process's groups under ``base``, each with its parents, innermost first: one per
    ``/proc/self/cgroup`` line ``HIERARCHY:CONTROLLERS:PATH`` for which
    ``entry(HIERARCHY, CONTROLLERS)`` holds.

    The line names the group relative to the hierarchy; inside a container with its own cgroup
    namespace that is ``/`` and ``base`` itself is the group. A host path that does not exist
    under the mount is harmless: its files read as absent.
    """
    dirs: list[Path] = []
    for line in (_read(PROC_CGROUP) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and entry(parts[0], parts[1]):
            rel = parts[2].strip("/")
            p = base / rel if rel else base
            dirs.append(p)
            while p != base and base in p.parents:
                p = p.parent
                dirs.append(p)
    return dirs


def _own_cgroup_dirs(root: Path) -> list[Path]:
    """cgroup v2: the folders of this process's group, innermost first, ending at ``root``."""
    dirs = _group_and_parents(root, lambda hierarchy, controllers: hierarchy == "0"
                              and controllers == "")  # the v2 entry: "0::/path"
    return dirs if root in dirs else [*dirs, root]


def _own_v1_cpu_dirs(root: Path) -> list[Path]:
    """cgroup v1: the ``cpu`` controller's folders of this process, innermost first.

    The controller is mounted at ``root/cpu`` (or ``root/cpu,cpuacct``) and named per line
    (``5:cpu,cpuacct:/slurm/job1``); the mount's root, and ``root`` itself (a controller
    mounted there, as in some containers), end the list.
    """
    base = next((b for b in (root / "cpu", root / "cpu,cpuacct") if b.is_dir()), root / "cpu")
    in_cpu = _group_and_parents(base, lambda _, controllers: "cpu" in controllers.split(","))
    return [*in_cpu, base, root]


def _v1_quota(d: Path) -> float | None:
    quota_s, period_s = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
    try:
        quota, period = float(quota_s or -1), float(period_s or -1)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None  # -1: v1's "no limit"


def cgroup_cpu_limit(root: str | os.PathLike | None = None) -> float | None:
    """The cgroup CPU quota in cores (e.g. 1.5), or ``None`` when there is none.

    cgroup v2: ``cpu.max`` (``"QUOTA PERIOD"`` or ``"max PERIOD"``); cgroup v1:
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``. Either way the tightest along our group and
    its parents (a Slurm job's or a systemd slice's limit is set on a parent).
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
    v1 = [q for q in map(_v1_quota, _own_v1_cpu_dirs(base)) if q is not None]
    return min(v1) if v1 else None


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
    torch_threads: int  # torch intra-op threads of this process (its forward pass on the CPU)
    loader_workers: int  # DataLoader worker processes (image decoding)
    source: str  # where `available` came from: "affinity", "cgroup", "affinity/ranks", ...
    device_type: str = "cpu"  # where the forward pass runs ("cpu", "cuda"): it decides the split
    # threads of this process that decode images beside the forward pass, each with one torch
    # thread (the cache's decode thread when there are no workers); they share the `total`
    # cores with the forward pass, which leaves them most of the time waiting for room
    decode_threads: int = 0

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
    device_type: str = "cpu",
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
        device_type: where the forward pass runs (``torch.device.type``: ``"cpu"``,
            ``"cuda"``, ...); recorded. Only the chosen split depends on it.

    ``torch_threads + loader_workers`` never exceeds the available cores. Chosen workers
    (``workers=None``) depend on the device:

    * on the CPU the forward pass needs the cores: no worker below 3 cores, where a decoding
      process would take a whole core from the forward pass (costlier than decoding on a
      thread beside it); otherwise about one in six cores, since decoding a probe image
      costs a small fraction of its CPU forward pass;
    * on any other device (CUDA) the forward pass needs almost no CPU and decoding sets the
      pace (one core decodes 250-500 images/s; a GPU runs resnet18 at thousands): every core
      but ``accelerator_main_threads(budget)`` (1, or 2 from 8 cores up) decodes, and those
      few stay with this process for its launches, host-device copies, pinning and the HDF5
      writer thread. One core alone has no worker.

    Explicit workers are kept (up to the budget less one core) and the forward pass gets the
    rest, on every device: with ``requested`` the two together stay within it.

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
    if workers is None and device_type != "cpu":
        threads = accelerator_main_threads(budget)
        workers = budget - threads
    elif workers is None:
        workers = 0 if budget < 3 else max(1, round(budget / 6))
        threads = max(1, budget - workers)
    elif requested:  # --threads is the total: explicit workers come out of it
        workers = min(workers, budget - 1)
        threads = budget - workers
    else:
        workers = min(workers, cores - 1)
        threads = max(1, min(budget, cores - workers))
    return ThreadPlan(cores, requested or None, threads + workers, threads, workers, source,
                      device_type=str(device_type))


def accelerator_main_threads(budget: int) -> int:
    """Torch threads :func:`plan_threads` leaves to a process whose forward pass runs on an
    accelerator (CUDA) when it chooses the workers: 1, or 2 from 8 cores up.

    Why so few: with workers the main process only collects decoded batches, launches the
    model and copies tensors between host and device; its intra-op threads would mostly spin
    while the workers are short of cores. The second thread (8+ cores) gives the host side of
    the copies, the pin-memory thread and the HDF5 writer thread a core of their own.
    """
    return 1 if budget < 8 else 2


def shm_free_bytes(path: str | os.PathLike = "/dev/shm") -> int | None:
    """Bytes free in the shared-memory file system DataLoader workers hand batches over in
    (None where there is none to ask, e.g. macOS)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return int(st.f_bavail) * int(st.f_frsize)


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


# ------------------------------------------------------------------ threads from idle cores
# Why: torch's intra-op threads help analyses made of many small operations a little on idle
# cores and hurt them badly on busy ones. A parallel region waits at its barrier for the
# thread that another process's job has pushed off its core, so on a 2-core machine with one
# core busy, 2 threads run 3-4x slower than 1 (dissection's analysis step, issue 13) and a
# teacher forward pass of 64 images at 48 px took 658 ms wall / 508 ms CPU with 2 threads
# against 110 ms / 67 ms with 1 (load ~4). So those analyses use only the cores idle now.


def _cpu_times(stat_path: Path, cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (idle jiffies, total jiffies)}`` for ``cpus`` from a ``/proc/stat`` file."""
    try:
        lines = stat_path.read_text().splitlines()
    except OSError:
        return None
    out: dict[int, tuple[int, int]] = {}
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu = int(name[3:])
            fields = [int(v) for v in rest.split()]
        except ValueError:
            continue
        if cpu in cpus and len(fields) >= 4:
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            out[cpu] = (idle, sum(fields[:8]))  # user .. steal (guest time is inside user)
    return out


def idle_cores(cpus: set[int] | None = None, interval: float = IDLE_SAMPLE_SECONDS,
               stat_path: str | os.PathLike | None = None) -> float | None:
    """Idle cores among ``cpus`` (default: this process's affinity) over ``interval`` s.

    The sum over the CPUs of their idle fraction (``idle + iowait`` jiffies over all jiffies,
    read from ``/proc/stat`` before and after sleeping ``interval``); this process sleeps
    meanwhile, so the figure is what the other jobs leave free. ``None`` where ``/proc/stat``
    cannot be read (not Linux) or no time passed.
    """
    if cpus is None:
        try:
            cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return None
    path = Path(stat_path) if stat_path is not None else PROC_STAT
    before = _cpu_times(path, cpus)
    if not before:
        return None
    time.sleep(interval)
    after = _cpu_times(path, cpus)
    if not after:
        return None
    idle = 0.0
    seen = False
    for cpu, (i0, t0) in before.items():
        if cpu not in after:
            continue
        i1, t1 = after[cpu]
        if t1 > t0:
            idle += min(1.0, max(0.0, (i1 - i0) / (t1 - t0)))
            seen = True
    return idle if seen else None


def free_core_threads(
    requested: int | None = None,
    *,
    workers: int = 0,
    cap: int | None = None,
    idle: float | None | str = "measure",
    plan: ThreadPlan | None = None,
    cgroup_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Torch intra-op threads for an analysis of many small tensor operations, and why.

    Starts from :func:`plan_threads` (affinity, cgroup quota, ``requested``, ``cap``; or the
    given ``plan``) and, unless the user asked for a number of threads, keeps only as many
    threads as there are idle cores (rounded half up: 1.5 idle cores keep 2 threads), never
    fewer than one.

    Args:
        requested: ``--threads``: an explicit number always wins (capped by the available
            cores only); ``None`` or 0 chooses.
        workers: DataLoader workers running beside the analysis (they take cores).
        cap: upper bound of the default (the caller's ``torch.get_num_threads()``).
        idle: idle cores: ``"measure"`` samples them now with :func:`idle_cores` (only when
            more than one thread is possible); ``None`` means unknown (the plan is kept).
        plan: a plan made by the caller (``requested`` and ``cap`` then unused).
        cgroup_root: the cgroup file system (tests point it at a fake one).

    Returns:
        A JSON-safe record: ``torch_threads`` (the choice), ``requested``,
        ``available_cores``, ``planned_threads``, ``workers``, ``idle_cores`` (rounded,
        ``None`` when not measured) and ``source`` (where the core count came from).

    Raises:
        ConfigError: ``requested`` or ``workers`` is negative (from :func:`plan_threads`).
    """
    if plan is None:
        plan = plan_threads(requested, workers=int(workers), cap=cap, cgroup_root=cgroup_root)
    threads = int(plan.torch_threads)
    if requested:
        idle = None  # the user's number is kept as planned, whatever the load
    elif idle == "measure":
        idle = idle_cores() if threads > 1 else None
    if idle is not None:
        threads = max(1, min(threads, math.floor(float(idle) + 0.5)))
    return {"torch_threads": threads, "requested": int(requested) if requested else None,
            "available_cores": int(plan.available), "planned_threads": int(plan.torch_threads),
            "workers": int(workers),
            "idle_cores": None if idle is None else round(float(idle), 2),
            "source": plan.source}


#: the choice of the innermost :func:`thread_scope` in effect, or None
_ACTIVE_CHOICE: ContextVar[dict[str, Any] | None] = ContextVar("interptool_thread_choice",
                                                               default=None)


@contextmanager
def thread_scope(requested: int | None = None) -> Iterator[dict[str, Any]]:
    """Run a block on :func:`free_core_threads`' choice and yield its record.

    Inside an enclosing scope, a block that asks for nothing reuses the enclosing choice
    without sampling again, so a stage that chooses once keeps one thread count for all it
    runs (faithfulness's memo of reference curves is keyed by the thread count). An explicit
    ``requested`` always makes its own choice. Torch's previous setting is restored after.
    The default is capped by ``torch.get_num_threads()``, so a program that limited torch's
    threads is not overridden.
    """
    active = _ACTIVE_CHOICE.get()
    if active is not None and not requested:
        yield active
        return
    import torch

    choice = free_core_threads(requested, cap=torch.get_num_threads())
    token = _ACTIVE_CHOICE.set(choice)
    try:
        with torch_threads(choice["torch_threads"]):
            yield choice
    finally:
        _ACTIVE_CHOICE.reset(token)


__all__ = ["IDLE_SAMPLE_SECONDS", "ThreadPlan", "accelerator_main_threads", "available_cpus",
           "cgroup_cpu_limit", "free_core_threads", "idle_cores", "plan_threads", "shm_free_bytes",
           "thread_scope",
           "torch_threads"]
