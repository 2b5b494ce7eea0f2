"""Core counting from CPU affinity and cgroup quotas (fake cgroup trees), the thread plan, and
what the cache records and restores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import interptool._resources as res
from interptool._resources import available_cpus, cgroup_cpu_limit, plan_threads
from interptool.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_cache import FakeDataset, FakeLoaded, make_student  # noqa: E402


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fake machine: ``cores(n)`` sets the affinity, ``write(rel, text)`` a cgroup file."""
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


def test_affinity_alone(machine):
    machine.cores(6)
    machine.write("cpu.max", "max 100000\n")  # no quota
    assert cgroup_cpu_limit() is None and available_cpus() == 6


def test_cgroup_v2_quota_caps_affinity_and_rounds_down(machine):
    machine.cores(8)
    machine.write("cpu.max", "150000 100000\n")  # 1.5 cores
    assert cgroup_cpu_limit() == pytest.approx(1.5)
    assert available_cpus() == 1
    machine.write("cpu.max", "400000 100000\n")
    assert available_cpus() == 4
    machine.write("cpu.max", "1600000 100000\n")  # quota above affinity: affinity wins
    assert available_cpus() == 8


def test_tightest_quota_along_own_group_and_parents(machine):
    machine.cores(16)
    machine.own_group("job/step")
    machine.write("cpu.max", "max 100000")
    machine.write("job/cpu.max", "300000 100000")  # the job: 3 cores
    machine.write("job/step/cpu.max", "max 100000")  # the step itself: unlimited
    assert available_cpus() == 3
    assert plan_threads().source == "cgroup"


def test_cgroup_v1_quota(machine):
    machine.cores(8)
    machine.write("cpu/cpu.cfs_quota_us", "200000")
    machine.write("cpu/cpu.cfs_period_us", "100000")
    assert available_cpus() == 2
    machine.write("cpu/cpu.cfs_quota_us", "-1")  # v1's "no limit"
    assert available_cpus() == 8


def test_plan_never_exceeds_the_cores(machine):
    machine.cores(8)
    p = plan_threads()
    assert (p.available, p.total, p.torch_threads, p.loader_workers) == (8, 8, 7, 1)
    p = plan_threads(2)  # --threads 2: no decoding process on 2 cores
    assert (p.total, p.torch_threads, p.loader_workers, p.requested) == (2, 2, 0, 2)
    p = plan_threads(100)  # more than there is: capped, and the request recorded
    assert (p.total, p.torch_threads, p.requested) == (7 + 1, 7, 100)
    p = plan_threads(workers=3)  # explicit workers keep their number, torch gets the rest
    assert (p.torch_threads, p.loader_workers) == (5, 3)
    p = plan_threads(cap=1)  # a caller that set torch to 1 thread keeps it
    assert (p.torch_threads, p.loader_workers) == (1, 0)
    p = plan_threads(local_ranks=2)  # torchrun with 2 processes on this machine: half each
    assert (p.available, p.torch_threads, p.loader_workers, p.source) == (4, 3, 1,
                                                                          "affinity/ranks")
    machine.cores(2)
    p = plan_threads(workers=4)
    assert p.torch_threads + p.loader_workers <= 2 and p.torch_threads >= 1
    machine.cores(1)
    p = plan_threads(workers=2)
    assert (p.torch_threads, p.loader_workers) == (1, 0)
    with pytest.raises(ConfigError, match="--threads must be a positive integer"):
        plan_threads(-1)
    with pytest.raises(ConfigError, match="--workers"):
        plan_threads(workers=-2)


def test_cache_uses_records_and_restores_the_plan(tmp_path, machine):
    machine.cores(2)
    model = make_student()
    seen: list[int] = []
    model.layer1.register_forward_hook(lambda m, i, o: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    from interptool.cache import ActivationCache, run_cache

    decoding: list[int] = []

    class Recording(FakeDataset):
        def on_item(self, i):
            decoding.append(torch.get_num_threads())

    run = run_cache(FakeLoaded(model), Recording(8), ["layer4"], tmp_path / "t.h5",
                    batch_size=4, threads=2, workers=0)
    assert decoding == [1] * 8  # images were decoded on one thread (idle ones would spin) ...
    assert seen == [2, 2]  # ... the forward pass ran with the planned threads ...
    assert torch.get_num_threads() == before  # ... and the caller's setting is back
    with ActivationCache(run.path) as c:
        assert c.attrs["threads"] == {"available": 2, "requested": 2, "total": 2,
                                      "torch_threads": 2, "loader_workers": 0,
                                      "source": "affinity"}
