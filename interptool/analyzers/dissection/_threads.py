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

from interptool._resources import IDLE_SAMPLE_SECONDS, free_core_threads, idle_cores, plan_threads

#: how long the idle-core sample lasts (s)
SAMPLE_SECONDS = IDLE_SAMPLE_SECONDS

__all__ = ["SAMPLE_SECONDS", "analysis_threads", "idle_cores"]


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
