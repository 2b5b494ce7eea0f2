"""Test-wide settings: offline, one torch thread per xdist worker, data under a temp dir."""

from __future__ import annotations

import os
import tempfile

# Nothing may be downloaded: any hub access is an error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Generated data sets (concept-world) go to a per-run folder, not the user's cache. Workers of
# one pytest-xdist run share it (generation is atomic), which keeps the suite fast.
_run_dir = os.environ.get("PYTEST_XDIST_TESTRUNUID", "local")
os.environ.setdefault(
    "INTERPTOOL_DATA", os.path.join(tempfile.gettempdir(), f"interptool-test-data-{_run_dir}")
)
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# Two xdist workers on two cores: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)
