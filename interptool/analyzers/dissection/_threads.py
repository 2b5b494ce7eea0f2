"""How many torch threads the dissection analysis uses.

The analysis is many small tensor operations (candidate tiles, boxes, gathers, bincounts).
Torch's intra-op threads help it a little on idle cores and hurt it badly on busy ones: a
parallel region waits at its barrier for the thread that another process's job has pushed
off its core (measured on 2 cores with one held by another job: 3-4x slower with 2 threads
than with 1; docs/benchmarks_dissect.md). So the analysis starts from the cores this process
may use (:func:`interptool._resources.plan_threads`: affinity, cgroup quota, the caller's
``torch.get_num_threads()`` as a cap) and keeps only as many threads as there are cores idle
right now, measured from ``/proc/stat`` over a few tens of milliseconds.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from interptool._resources import plan_threads

#: how long the idle-core sample lasts (s); short against any analysis worth threading
SAMPLE_SECONDS = 0.05


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


def idle_cores(cpus: set[int] | None = None, interval: float = SAMPLE_SECONDS,
               stat_path: str | Path = "/proc/stat") -> float | None:
    """Idle cores among ``cpus`` (default: this process's affinity) over ``interval`` s.

    The sum over the CPUs of their idle fraction (``idle + iowait`` jiffies over all jiffies);
    ``None`` where ``/proc/stat`` cannot be read (not Linux) or no time passed.
    """
    import os

    if cpus is None:
        try:
            cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return None
    path = Path(stat_path)
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


def analysis_threads(workers: int = 0, *, idle: float | None | str = "measure") -> dict[str, Any]:
    """Torch intra-op threads for one dissection run, and how they were chosen.

    ``workers``: DataLoader workers decoding masks (they take cores from the budget).
    ``idle``: idle cores (``"measure"``: sampled now with :func:`idle_cores`; ``None``:
    unknown, the plan is used as is). Returns a JSON-safe record with ``torch_threads``.
    """
    import torch

    plan = plan_threads(None, workers=int(workers), cap=torch.get_num_threads())
    threads = plan.torch_threads
    if idle == "measure":
        idle = idle_cores() if threads > 1 else None
    if idle is not None:
        # keep the threads that find a free core; round half up (1.5 idle cores: 2 threads)
        threads = max(1, min(threads, math.floor(float(idle) + 0.5)))
    return {"torch_threads": int(threads), "available_cores": int(plan.available),
            "planned_threads": int(plan.torch_threads), "mask_workers": int(workers),
            "idle_cores": None if idle is None else round(float(idle), 2),
            "source": plan.source}
