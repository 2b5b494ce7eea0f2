"""Core counting from CPU affinity and cgroup quotas (fake cgroup trees), the thread plan, and
what the cache records and restores."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import interptool._resources as res
from interptool._resources import available_cpus, cgroup_cpu_limit, plan_threads
from interptool.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_cache import FakeDataset, FakeLoaded, make_student  # noqa: E402

# `machine` (a fake machine: cores, cgroup files) comes from conftest.py


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


def test_cgroup_v1_quota_of_own_group_and_parents(machine):
    """A Slurm job or systemd slice sets the v1 quota on the process's own group (or a
    parent), not on the controller's root."""
    machine.cores(16)
    machine.own_group("")  # v2 entry at the root: no v2 limit
    (Path(res.PROC_CGROUP)).write_text("12:cpu,cpuacct:/slurm/job1/step0\n0::/\n")
    machine.write("cpu/cpu.cfs_quota_us", "-1")
    machine.write("cpu/cpu.cfs_period_us", "100000")
    machine.write("cpu/slurm/job1/cpu.cfs_quota_us", "150000")  # the job: 1.5 cores
    machine.write("cpu/slurm/job1/cpu.cfs_period_us", "100000")
    machine.write("cpu/slurm/job1/step0/cpu.cfs_quota_us", "-1")
    machine.write("cpu/slurm/job1/step0/cpu.cfs_period_us", "100000")
    assert cgroup_cpu_limit() == pytest.approx(1.5) and available_cpus() == 1
    machine.write("cpu/slurm/job1/step0/cpu.cfs_quota_us", "50000")  # tighter still
    assert cgroup_cpu_limit() == pytest.approx(0.5) and available_cpus() == 1
    # a host path that is not under the mount (a container's own group mounted as the root)
    Path(res.PROC_CGROUP).write_text("12:cpu,cpuacct:/docker/abc\n")
    machine.write("cpu/cpu.cfs_quota_us", "300000")
    assert available_cpus() == 3


def test_explicit_threads_and_workers_stay_within_the_threads(machine):
    machine.cores(8)
    p = plan_threads(2, workers=2)  # --threads 2 --workers 2: 2 cores in total, not 4
    assert (p.total, p.torch_threads, p.loader_workers) == (2, 1, 1)
    p = plan_threads(1, workers=3)
    assert (p.total, p.torch_threads, p.loader_workers) == (1, 1, 0)
    p = plan_threads(6, workers=2)
    assert (p.total, p.torch_threads, p.loader_workers) == (6, 4, 2)


@pytest.mark.parametrize("omp,want", [("1", (4, 3, 1)), ("2", (2, 2, 0)), (None, (2, 2, 0))])
def test_torchruns_omp_default_is_not_a_thread_limit(tmp_path, machine, monkeypatch, omp, want):
    """torchrun sets OMP_NUM_THREADS=1 for every rank when it starts several per node; each
    rank still gets its share of the cores (8 cores / 2 local ranks here). A caller's own
    torch limit (2 threads here) is kept otherwise."""
    from interptool.cache._writer import _make_job

    machine.cores(8)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    torch.set_num_threads(2 if omp != "1" else 1)
    try:
        job = _make_job(FakeLoaded(make_student()), FakeDataset(4), ["layer4"], tmp_path / "t.h5",
                        batch_size=4, workers=None, threads=None, dtype="float32",
                        compression=None, skip_bad=False, probe=None, seed=0, device="cpu",
                        local_ranks=2)
    finally:
        torch.set_num_threads(before)
    plan = job.plan
    assert (plan.total, plan.torch_threads, plan.loader_workers) == want
    assert plan.available == 4 and plan.source == "affinity/ranks"


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


def test_plan_on_cuda_gives_the_cores_to_decoding(machine):
    """issue 13: a GPU's forward pass needs little CPU, so the chosen split gives all but one
    or two cores to DataLoader workers (the CPU split left a 16-core GPU node 3 decoders and
    13 idle intra-op threads); explicit --workers / --threads mean what they mean on the
    CPU, and the total never exceeds the cores."""
    machine.cores(16)
    p = plan_threads(device_type="cuda")
    assert (p.total, p.torch_threads, p.loader_workers, p.device_type) == (16, 2, 14, "cuda")
    assert plan_threads().to_dict()["device_type"] == "cpu"  # recorded with the plan
    cpu = plan_threads(device_type="cpu")  # the CPU split is unchanged
    assert (cpu.total, cpu.torch_threads, cpu.loader_workers) == (16, 13, 3)
    p = plan_threads(6, device_type="cuda")  # --threads 6: the total, mostly decoding
    assert (p.total, p.torch_threads, p.loader_workers) == (6, 1, 5)
    p = plan_threads(100, device_type="cuda")  # more than there is: capped
    assert (p.total, p.torch_threads, p.loader_workers) == (16, 2, 14)
    p = plan_threads(workers=3, device_type="cuda")  # explicit workers: as on the CPU
    assert (p.torch_threads, p.loader_workers) == (13, 3)
    p = plan_threads(4, workers=2, device_type="cuda")  # --threads 4 --workers 2
    assert (p.total, p.torch_threads, p.loader_workers) == (4, 2, 2)
    p = plan_threads(cap=4, device_type="cuda")  # a caller's torch limit bounds the total
    assert (p.total, p.torch_threads, p.loader_workers) == (4, 1, 3)
    p = plan_threads(local_ranks=8, device_type="cuda")  # 8 GPUs on 16 cores: 2 each
    assert (p.available, p.torch_threads, p.loader_workers) == (2, 1, 1)
    for n in (1, 2, 3, 7, 8, 9, 64):
        machine.cores(n)
        p = plan_threads(device_type="cuda")
        assert p.total == p.torch_threads + p.loader_workers == n and p.torch_threads >= 1
    machine.cores(1)
    assert plan_threads(device_type="cuda").loader_workers == 0  # one core: nothing to spare


def test_cache_plans_for_its_device(tmp_path, machine, monkeypatch):
    """The cache passes its device to the plan: a CUDA run on 16 cores gets 14 decoders.
    (No GPU needed: the device is faked, nothing runs.)"""
    import interptool.cache._writer as w

    machine.cores(16)
    with monkeypatch.context() as m:
        m.setattr(w, "_resolve_device", lambda loaded, device: torch.device("cuda"))
        m.setattr(w, "_model_device", lambda model: torch.device("cuda"))
        job = w._make_job(FakeLoaded(make_student()), FakeDataset(4), ["layer4"],
                          tmp_path / "t.h5", batch_size=4, workers=None, threads=16,
                          dtype="float32", compression=None, skip_bad=False, probe=None,
                          seed=0, device="cuda")
    plan = job.plan
    assert (plan.total, plan.torch_threads, plan.loader_workers) == (16, 2, 14)
    assert (plan.device_type, plan.decode_threads) == ("cuda", 0)
    job = w._make_job(FakeLoaded(make_student()), FakeDataset(4), ["layer4"], tmp_path / "t.h5",
                      batch_size=4, workers=None, threads=16, dtype="float32",
                      compression=None, skip_bad=False, probe=None, seed=0, device="cpu")
    assert (job.plan.torch_threads, job.plan.loader_workers, job.plan.device_type) == (
        13, 3, "cpu")


def test_cache_starts_no_more_workers_than_batches_left(tmp_path, machine, monkeypatch):
    """A 6-image set in batches of 4 is two batches: two of the plan's four workers would
    start a process each to decode nothing; a resume with one batch left starts one."""
    import interptool.cache._writer as w

    machine.cores(8)
    started: list[int] = []
    real = w.DataLoader

    def counting(*args, **kwargs):
        started.append(kwargs["num_workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(w, "DataLoader", counting)
    job = w._make_job(FakeLoaded(make_student()), FakeDataset(6), ["layer4"], tmp_path / "t.h5",
                      batch_size=4, workers=4, threads=8, dtype="float32", compression=None,
                      skip_bad=False, probe=None, seed=0, device="cpu")
    assert job.plan.loader_workers == 4
    job._loader(0)
    job._loader(4)
    assert started == [2, 1]


def test_cache_uses_records_and_restores_the_plan(tmp_path, machine):
    machine.cores(2)
    model = make_student()
    seen: list[int] = []
    model.layer1.register_forward_hook(lambda m, i, o: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    from interptool.cache import ActivationCache, run_cache

    decoding: list[tuple[str, int]] = []

    class Recording(FakeDataset):
        def on_item(self, i):
            decoding.append((threading.current_thread().name, torch.get_num_threads()))

    # the caller runs torch on 2 threads (tests/conftest.py sets 1): the decode thread would
    # otherwise take that count for its own torch work (ToTensor, Normalize)
    torch.set_num_threads(2)
    try:
        run = run_cache(FakeLoaded(model), Recording(8), ["layer4"], tmp_path / "t.h5",
                        batch_size=4, threads=2, workers=0)
        after_run = torch.get_num_threads()
        in_new_thread: list[int] = []
        t = threading.Thread(target=lambda: in_new_thread.append(torch.get_num_threads()))
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    # without workers, images are decoded by the cache's decode thread, not between batches
    # on the thread that runs the model, and its torch work runs on one thread: the forward
    # pass's 2 threads plus a 2-thread team of the decoder's would oversubscribe 2 cores ...
    assert decoding == [("interptool-cache-decode", 1)] * 8
    # ... the forward pass ran with the planned threads (the input-layout check on one blank
    # image, then two batches) ...
    assert seen == [2, 2, 2]
    # ... and the caller's setting is back, also as the default of threads started later
    assert after_run == 2 and in_new_thread == [2]
    with ActivationCache(run.path) as c:
        assert c.attrs["threads"] == {"available": 2, "requested": 2, "total": 2,
                                      "torch_threads": 2, "loader_workers": 0,
                                      "source": "affinity", "device_type": "cpu",
                                      "decode_threads": 1}


def test_decode_thread_leaves_the_model_threads_alone():
    """torch's thread count is per thread once a thread runs torch: the decode thread's 1
    does not reach the thread running the model, which keeps its count while it runs."""
    from interptool._workers import Prefetch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inside: list[int] = []

        def source():
            for i in range(3):
                inside.append(torch.get_num_threads())
                yield torch.ones(64, 64) * i

        it = Prefetch(source(), depth=1)
        main: list[int] = []
        for x in it:
            main.append(torch.get_num_threads())
            (x @ x).sum()
        assert inside == [1, 1, 1] and main == [2, 2, 2]
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ threads from idle cores
def _stat_text(busy: dict[int, int], idle: dict[int, int]) -> str:
    """A /proc/stat text with per-CPU user (busy) and idle jiffies, other fields zero."""
    lines = ["cpu  9 9 9 9 9 9 9 9 0 0"]
    lines += [f"cpu{c} {busy[c]} 0 0 {idle[c]} 0 0 0 0 0 0" for c in sorted(busy)]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 4"]) + "\n"


@pytest.fixture
def load(tmp_path, monkeypatch):
    """``load.busy({cpu: fraction})``: the next idle-core sample sees each CPU busy that
    fraction of the time (another job's load); ``load.samples`` counts the samples taken."""
    stat = tmp_path / "stat"
    monkeypatch.setattr(res, "PROC_STAT", stat)

    class Load:
        samples = 0
        after = ""

        def busy(self, fractions: dict[int, float]) -> None:
            zero = {c: 0 for c in fractions}
            stat.write_text(_stat_text(zero, zero))
            self.after = _stat_text({c: round(100 * f) for c, f in fractions.items()},
                                    {c: round(100 * (1 - f)) for c, f in fractions.items()})

        def sleep(self, seconds: float) -> None:  # the sample's wait: the other jobs run
            self.samples += 1
            stat.write_text(self.after)

    state = Load()
    monkeypatch.setattr(res.time, "sleep", state.sleep)
    return state


def test_idle_cores_sums_idle_fractions_of_own_cpus(tmp_path, monkeypatch, load):
    load.busy({0: 1.0, 1: 0.25, 2: 0.0})
    # cpu0 busy all the time, cpu1 idle 3/4 of it; cpu2 (idle) is not one of ours
    assert res.idle_cores({0, 1}) == pytest.approx(0.75)
    load.busy({0: 0.5, 1: 0.5})
    assert res.idle_cores({0, 1}) == pytest.approx(1.0)
    assert res.idle_cores({0}, stat_path=tmp_path / "missing") is None  # not Linux
    assert res.idle_cores({7}) is None  # none of our CPUs listed


@pytest.mark.parametrize("busy,want", [({0: 0.0, 1: 0.0}, 2),  # idle machine: both cores
                                       ({0: 1.0, 1: 0.0}, 1),  # a training job holds one
                                       ({0: 1.0, 1: 1.0}, 1),  # load ~4: still one thread
                                       ({0: 0.4, 1: 0.2}, 1),  # 1.4 idle cores: 1
                                       ({0: 0.3, 1: 0.1}, 2)])  # 1.6 idle cores: 2
def test_threads_follow_idle_cores_on_two_cores(machine, load, busy, want):
    machine.cores(2)
    load.busy(busy)
    got = res.free_core_threads()
    assert got["torch_threads"] == want and load.samples == 1
    assert got["idle_cores"] == pytest.approx(2 - sum(busy.values()))
    assert (got["available_cores"], got["planned_threads"], got["requested"]) == (2, 2, None)


def test_explicit_threads_win_over_the_load(machine, load):
    machine.cores(2)
    load.busy({0: 1.0, 1: 1.0})
    got = res.free_core_threads(2)
    assert got["torch_threads"] == 2 and got["requested"] == 2
    assert got["idle_cores"] is None and load.samples == 0  # not even measured
    load.busy({0: 0.0, 1: 0.0})
    assert res.free_core_threads(1)["torch_threads"] == 1  # 1 on an idle machine too
    with pytest.raises(ConfigError, match="--threads must be a positive integer"):
        res.free_core_threads(-1)


def test_threads_never_exceed_the_available_cores(machine, load):
    machine.cores(2)
    load.busy({c: 0.0 for c in range(8)})  # 8 idle CPUs listed, 2 of them ours
    assert res.free_core_threads()["torch_threads"] == 2
    assert res.free_core_threads(16)["torch_threads"] == 2  # a request above them: capped
    assert res.free_core_threads(cap=1)["torch_threads"] == 1  # torch limited by the caller
    assert load.samples == 1  # one thread at most: nothing to measure
    machine.cores(4)
    machine.write("cpu.max", "100000 100000")  # a 1-core quota, idle or not
    assert res.free_core_threads()["torch_threads"] == 1
    machine.write("cpu.max", "max 100000")
    assert res.free_core_threads(workers=1)["torch_threads"] == 3  # workers take a core
    # with no /proc/stat (not Linux) the plan is kept
    res.PROC_STAT.unlink()
    assert res.free_core_threads()["torch_threads"] == 4


def test_thread_scope_sets_reuses_and_restores(machine, load):
    machine.cores(2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        load.busy({0: 1.0, 1: 0.0})
        with res.thread_scope() as outer:
            assert outer["torch_threads"] == 1 and torch.get_num_threads() == 1
            load.busy({0: 0.0, 1: 0.0})  # the load changes: an inner scope keeps the choice
            with res.thread_scope() as inner:
                assert inner is outer and torch.get_num_threads() == 1
            with res.thread_scope(2) as explicit:  # an explicit number still wins
                assert explicit["torch_threads"] == 2 and torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2 and load.samples == 1
        with res.thread_scope() as fresh:  # outside any scope: measured again, now idle
            assert fresh["torch_threads"] == 2
        assert load.samples == 2
    finally:
        torch.set_num_threads(before)


class _SeenThreads(torch.nn.Module):
    """A linear classifier that records torch's thread count at every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, 3)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("busy,threads,want", [({0: 1.0, 1: 0.0}, None, 1),
                                               ({0: 0.0, 1: 0.0}, None, 2),
                                               ({0: 1.0, 1: 1.0}, 2, 2)])
def test_attribution_runs_on_the_choice_and_records_it(machine, load, busy, threads, want):
    from interptool.analyzers.attribution import Attribution

    machine.cores(2)
    load.busy(busy)
    net = _SeenThreads()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        attr = Attribution("saliency")
        r = attr.run(net, x, labels=[0, 1, 2, 0], batch_size=2, threads=threads,
                     keep_images=0)
        seen = attr.model_.seen  # the analyzer's prepared copy ran the passes
        assert seen and set(seen) == {want}
        assert torch.get_num_threads() == 2  # the caller's setting is back
        assert r.threads["torch_threads"] == want and r.threads["requested"] == threads
        assert r.provenance["threads"] == r.threads == r.to_dict()["threads"]
        # the maps do not depend on the choice: saliency of a linear model is |W[target]|
        w = net.fc.weight.detach().abs().reshape(3, 3, 4, 4).sum(dim=1)
        np.testing.assert_allclose(r.maps, w[[0, 1, 2, 0]].numpy(), rtol=1e-6)
    finally:
        torch.set_num_threads(before)


def test_workers_fit_the_shared_memory_their_batches_cross(tmp_path, machine, monkeypatch):
    """Workers keep two batches each in /dev/shm; where it cannot hold them, torch's queue
    dropped a batch it could not share and the run waited forever (a review reproduced it
    with a 64 KiB /dev/shm). Chosen workers are lowered to what fits, asked-for ones refused
    naming the fix."""
    import interptool.cache._writer as w
    from interptool.errors import CacheError

    machine.cores(16)

    def job(workers, free):
        monkeypatch.setattr(w, "shm_free_bytes", lambda: free)
        return w._make_job(FakeLoaded(make_student()), FakeDataset(4), ["layer4"],
                           tmp_path / "t.h5", batch_size=4, workers=workers, threads=16,
                           dtype="float32", compression=None, skip_bad=False, probe=None,
                           seed=0, device="cpu")

    per_batch = 4 * 4 * int(np.prod(FakeLoaded(make_student()).preprocessing.input_size))
    assert job(None, None).plan.loader_workers == 3  # nothing to ask (macOS): the plan
    assert job(None, 100 * 2**20).plan.loader_workers == 3  # room for all three
    roomy_for_one = int(2 * per_batch * 1.25) + 1
    plan = job(None, roomy_for_one).plan
    assert (plan.loader_workers, plan.torch_threads, plan.total) == (1, 13, 14)
    plan = job(None, 1024).plan  # 1 KiB: none; a thread of the process decodes
    assert (plan.loader_workers, plan.decode_threads) == (0, 1)
    with pytest.raises(CacheError, match=r"/dev/shm has 1 KiB free.*--shm-size.*--workers 0 \(decoded"):
        job(2, 1024)
    assert job(2, 100 * 2**20).plan.loader_workers == 2
