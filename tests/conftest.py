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

import pytest  # noqa: E402
import torch  # noqa: E402

# Two xdist workers on two cores: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fake machine: ``cores(n)`` sets the affinity, ``write(rel, text)`` a cgroup file."""
    import interptool._resources as res

    root = tmp_path / "cgroup"
    root.mkdir()
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/\n")
    monkeypatch.setattr(res, "CGROUP_ROOT", root)
    monkeypatch.setattr(res, "PROC_CGROUP", proc)

    class M:
        def cores(self, n: int) -> None:
            monkeypatch.setattr(res.os, "sched_getaffinity", lambda pid: set(range(n)))

        def write(self, rel: str, text: str) -> None:
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)

        def own_group(self, rel: str) -> None:
            proc.write_text(f"0::/{rel}\n")

    return M()
