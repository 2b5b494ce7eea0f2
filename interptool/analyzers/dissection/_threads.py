"""How many torch threads the dissection analysis uses.

The choice is shared with attribution and lives in :mod:`interptool._resources`
(:func:`~interptool._resources.free_core_threads`: the cores this process may use, capped by the
caller's ``torch.get_num_threads()``, then only as many threads as there are cores idle now,
sampled from ``/proc/stat``; docs/benchmarks_dissect.md has the measurements). This module
keeps dissection's record format (``mask_workers``) and the names its tests patch.
"""

from __future__ import annotations

import time  # noqa: F401  (tests patch time.sleep through this module)
from typing import Any

from interptool._resources import (
    IDLE_SAMPLE_SECONDS,
    accelerator_main_threads,
    free_core_threads,
    idle_cores,
    plan_threads,
)

#: how long the idle-core sample lasts (s)
SAMPLE_SECONDS = IDLE_SAMPLE_SECONDS

#: chosen mask workers start only from this many batches of probe images: a worker process
#: costs its start and the hand-over of its first batches, which a probe of a few batches does
#: not repay (480 images, 8 batches, 2 cores: one worker neither gained nor lost)
MIN_BATCHES_FOR_WORKERS = 4

__all__ = ["MIN_BATCHES_FOR_WORKERS", "SAMPLE_SECONDS", "analysis_threads", "idle_cores",
           "mask_workers"]


def start_method() -> str:
    """How this process starts new ones (DataLoader workers): the method set, else the
    platform's default (the first of ``get_all_start_methods()``), read without fixing it."""
    import multiprocessing

    return (multiprocessing.get_start_method(allow_none=True)
            or multiprocessing.get_all_start_methods()[0])


def mask_workers(requested: int | None, n_images: int, batch_size: int,
                 device_type: str = "cpu") -> int:
    """DataLoader worker processes decoding the probe's masks: ``requested`` when given,
    else chosen from the cores this process may use (affinity, cgroup quota, capped by the
    caller's ``torch.get_num_threads()``, as the cache's workers are).

    Why these numbers: reading the mask PNGs and flattening them costs about as much CPU as
    the thresholds and the tally together (480 probe images on the CPU: 0.54 s of a 1.1-1.2 s
    analysis), and it runs in Python, so threads cannot share it. On the CPU half the cores
    decode and the other half count (2 cores: one worker; 3,000 images: a median 6.1 s against
    7.0 s without); on any other device (CUDA) the counting needs almost no CPU and every
    core but :func:`~interptool._resources.accelerator_main_threads` decodes. No worker for
    fewer than :data:`MIN_BATCHES_FOR_WORKERS` batches, and never more workers than batches.
    None either where new processes are not forked (macOS and Windows, or a program that set
    another start method): there each worker imports torch again (seconds) and the probe
    object must pickle, which a duck-typed probe written for an audit may not.
    ``n_images``: images to decode (0 when the segmentations are memoised already).
    """
    if requested is not None:
        return int(requested)
    batches = -(-int(n_images) // max(1, int(batch_size)))
    if batches < MIN_BATCHES_FOR_WORKERS or start_method() != "fork":
        return 0
    import torch

    budget = plan_threads(None, cap=torch.get_num_threads(), device_type=device_type).total
    chosen = budget // 2 if device_type == "cpu" else budget - accelerator_main_threads(budget)
    return max(0, min(chosen, batches))


def analysis_threads(workers: int = 0, *, idle: float | None | str = "measure") -> dict[str, Any]:
    """Torch intra-op threads for one dissection run, and how they were chosen.

    ``workers``: DataLoader workers decoding masks (they take cores from the budget).
    ``idle``: idle cores (``"measure"``: sampled now with :func:`idle_cores`; ``None``:
    unknown, the plan is used as is). Returns a JSON-safe record with ``torch_threads``.
    """
    import torch

    plan = plan_threads(None, workers=int(workers), cap=torch.get_num_threads())
    choice = free_core_threads(plan=plan, idle=idle)
    return {"torch_threads": choice["torch_threads"],
            "available_cores": choice["available_cores"],
            "planned_threads": choice["planned_threads"], "mask_workers": int(workers),
            "idle_cores": choice["idle_cores"], "source": choice["source"]}
