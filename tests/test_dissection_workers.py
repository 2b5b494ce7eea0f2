"""Mask-decoding workers of the dissection analysis: how many are chosen, that the results do
not depend on them, and that a bad mask file found by a worker is still a one-line error."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from interptool.analyzers.dissection import Dissection
from interptool.analyzers.dissection._threads import MIN_BATCHES_FOR_WORKERS, mask_workers
from interptool.cache import write_cache
from interptool.cli import main
from interptool.data import open_dataset
from interptool.errors import DataError

WORLD = "builtin:concept-world?version=1&n=48&size=32"


@pytest.fixture
def cores(machine, monkeypatch):
    """``cores(n)``: this process may use ``n`` cores (affinity; no cgroup quota), and torch's
    thread count (which caps the choice; the suite sets it to 1) follows."""

    def set_cores(n: int) -> None:
        machine.cores(n)
        monkeypatch.setattr(torch, "get_num_threads", lambda: n)

    return set_cores


@pytest.mark.parametrize("n,device,n_images,want", [
    (2, "cpu", 480, 1),  # half the cores decode, half count
    (8, "cpu", 3000, 4),
    (1, "cpu", 3000, 0),  # one core: decoded between the tally's batches
    (16, "cuda", 3000, 14),  # the GPU counts: all cores but two decode
    (4, "cuda", 3000, 3),  # below 8 cores one stays with the process
    (16, "cuda", 5 * 64, 5),  # never more workers than batches
    (16, "cpu", (MIN_BATCHES_FOR_WORKERS - 1) * 64, 0),  # too few batches to repay a start
    (16, "cuda", 0, 0),  # segmentations held decoded already: nothing to decode
])
def test_chosen_mask_workers(cores, n, device, n_images, want):
    cores(n)
    assert mask_workers(None, n_images, 64, device) == want


def test_explicit_mask_workers_kept_and_torch_limit_respected(cores, monkeypatch):
    cores(8)
    assert mask_workers(0, 3000, 64) == 0
    assert mask_workers(3, 10, 64) == 3  # asked for: kept even for one batch
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # a program limited torch
    assert mask_workers(None, 3000, 64) == 0


def test_no_chosen_workers_where_processes_are_not_forked(cores, monkeypatch):
    import multiprocessing

    from interptool.analyzers.dissection import _threads

    cores(8)
    assert _threads.start_method() == "fork"  # Linux, Python 3.11: the suite's platform
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    assert _threads.start_method() == "spawn"
    assert mask_workers(None, 3000, 64) == 0  # spawn: re-imports torch, pickles the probe
    assert mask_workers(2, 3000, 64) == 2  # asked for: kept


def _world_cache(tmp_path, probe, units=6, seed=0):
    rng = np.random.default_rng(seed)
    feats = np.maximum(rng.standard_normal((len(probe), units, 4, 4)), 0).astype(np.float32)
    return write_cache(tmp_path / "c.h5", logits=np.zeros((len(probe), 2)), ids=probe.ids,
                       features={"l4": feats},
                       attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})


def test_results_equal_with_and_without_workers(tmp_path, cores):
    cores(2)
    path = _world_cache(tmp_path, open_dataset(WORLD))
    kw = dict(quantile=0.02, batch_size=8, checksum=False, bootstrap=30, seed=3)  # 6 batches
    # fresh probe objects: no run finds the other's segmentations memoised
    plain = Dissection(workers=0, **kw).run(path, "l4", open_dataset(WORLD))
    probe = open_dataset(WORLD)
    chosen = Dissection(**kw).run(path, "l4", probe)
    assert plain.config["threads"]["mask_workers"] == 0
    assert chosen.config["threads"]["mask_workers"] == 1  # 2 cores: one decodes
    assert chosen.config["threads"]["planned_threads"] == 1  # ... and one counts
    assert chosen.config["workers"] is None  # what was asked: chosen
    for name in ("intersect", "label_area", "unit_cat_area", "iou", "thresholds",
                 "top_images", "top_maps"):
        np.testing.assert_array_equal(getattr(chosen, name), getattr(plain, name), name)
    assert chosen.bootstrap_samples.equals(plain.bootstrap_samples)
    # the same probe object again: its segmentations are held decoded, so no worker starts
    # and the counting keeps both cores
    again = Dissection(**kw).run(path, "l4", probe)
    assert again.config["threads"]["mask_workers"] == 0
    assert again.config["threads"]["planned_threads"] == 2
    np.testing.assert_array_equal(again.iou, plain.iou)
    # ... also when workers were asked for: none would have anything to decode
    asked = Dissection(workers=2, **kw).run(path, "l4", probe)
    assert asked.config["threads"]["mask_workers"] == 0
    assert asked.config["threads"]["planned_threads"] == 2
    assert asked.config["workers"] == 2  # what was asked stays recorded


def test_mask_workers_stop_when_the_tally_ends_or_the_run_fails(tmp_path, monkeypatch):
    import multiprocessing

    from interptool.analyzers.dissection import _analyzer as an
    from interptool.errors import AnalysisError

    probe = open_dataset(WORLD)
    path = _world_cache(tmp_path, probe)
    children_while_resampling = []
    real = an.resample_measures

    def spy(*a, **k):
        children_while_resampling.append(len(multiprocessing.active_children()))
        return real(*a, **k)

    monkeypatch.setattr(an, "resample_measures", spy)
    r = Dissection(quantile=0.02, batch_size=4, workers=2, checksum=False, bootstrap=10).run(
        path, "l4", open_dataset(WORLD))
    assert r.config["threads"]["mask_workers"] == 2
    assert children_while_resampling == [0]  # not idle beside the bootstrap
    # a run that fails in the threshold pass, its error kept (as a notebook keeps the last)
    feats = np.ones((len(probe), 2, 4, 4), np.float32)
    feats[30, 1, 2, 2] = np.inf
    bad = write_cache(tmp_path / "inf.h5", logits=np.zeros((len(probe), 2)), ids=probe.ids,
                      features={"l4": feats},
                      attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    with pytest.raises(AnalysisError, match="NaN/Inf") as kept:
        Dissection(quantile=0.02, batch_size=4, workers=2, checksum=False).run(
            bad, "l4", open_dataset(WORLD))
    assert kept.value is not None and multiprocessing.active_children() == []


def test_bad_mask_found_by_a_worker_is_one_line(tmp_path, capsys):
    import multiprocessing

    root = tmp_path / "probe"
    shutil.copytree(open_dataset(WORLD).root, root)
    probe = open_dataset(f"broden:{root}")
    bad = probe.mask_files(41)["object"][0]  # decoded by a worker, in the sixth batch
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    path = _world_cache(tmp_path, probe)
    with pytest.raises(DataError) as info:
        Dissection(quantile=0.02, batch_size=8, workers=2, checksum=False).run(path, "l4",
                                                                             probe)
    msg = str(info.value)
    assert str(bad) in msg and "\n" not in msg and "Traceback" not in msg, msg
    # the workers are gone while the error is still held (not left to the garbage collector,
    # which shut them down only after a 5 s wait each)
    assert multiprocessing.active_children() == []
    rc = main(["dissect", str(path), "--layer", "l4", "--probe", f"broden:{root}",
               "--out", str(tmp_path / "out"), "--workers", "2", "--batch-size", "8",
               "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(bad) in err and len(err.splitlines()) == 1, err


def test_checksum_read_beside_the_passes_and_dropped_on_failure(tmp_path, monkeypatch):
    import hashlib

    from interptool.analyzers.dissection import _analyzer as an
    from interptool.errors import AnalysisError

    probe = open_dataset(WORLD)
    path = _world_cache(tmp_path, probe)
    r = Dissection(quantile=0.02, batch_size=8).run(path, "l4", probe)
    assert r.provenance["cache_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert Dissection(quantile=0.02, checksum=False).run(
        path, "l4", probe).provenance["cache_sha256"] is None

    made = []

    class Spy(an.BackgroundDigest):
        def __init__(self, p):
            super().__init__(p)
            self.cancelled = False
            made.append(self)

        def cancel(self):
            self.cancelled = True
            super().cancel()

    monkeypatch.setattr(an, "BackgroundDigest", Spy)
    feats = np.ones((len(probe), 2, 4, 4), np.float32)
    feats[5, 1, 2, 2] = np.nan
    bad = write_cache(tmp_path / "nan.h5", logits=np.zeros((len(probe), 2)), ids=probe.ids,
                      features={"l4": feats},
                      attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    with pytest.raises(AnalysisError, match="NaN"):
        Dissection(quantile=0.02).run(bad, "l4", probe)
    assert len(made) == 1 and made[0].cancelled  # the failed run did not wait for the hash


def test_packed_batches_round_trip_through_shared_memory():
    from interptool.analyzers.dissection._tally import PackedSegItems, SegItem

    rng = np.random.default_rng(5)
    items = [SegItem(i, (h, w), rng.integers(0, 500, size=(h * w, d), dtype=np.int32),
                     np.array([3, 3], np.int64), np.arange(4, dtype=np.int64), 0, 499)
             for i, (h, w, d) in enumerate([(4, 4, 2), (3, 5, 0), (2, 2, 3)])]
    packed = PackedSegItems.pack(items)
    assert packed.pixels.is_shared() and packed.pixels.numel() == 32 + 0 + 12
    assert all(it.pixel.size == 0 for it in packed.items)  # only the tensor carries pixels
    back = packed.unpack()
    for a, b in zip(items, back):
        assert (a.index, a.size, a.lo, a.hi) == (b.index, b.size, b.lo, b.hi)
        np.testing.assert_array_equal(a.pixel, b.pixel)
        assert b.pixel.dtype == np.int32 and b.pixel.shape == a.pixel.shape
        np.testing.assert_array_equal(a.scalars, b.scalars)
        np.testing.assert_array_equal(a.label_counts, b.label_counts)
    # copied out of shared memory at once: nothing received keeps /dev/shm or a descriptor
    assert not any(np.shares_memory(b.pixel, packed.pixels.numpy()) for b in back)


def test_batches_go_pickled_when_shared_memory_is_full(tmp_path, monkeypatch):
    from interptool.analyzers.dissection._tally import PackedSegItems, SegItem

    def full(self):
        raise RuntimeError("unable to allocate shared memory(shm): No space left on device")

    monkeypatch.setattr(torch.Tensor, "share_memory_", full)  # forked workers inherit it
    item = SegItem(0, (2, 2), np.arange(8, dtype=np.int32).reshape(4, 2),
                   np.zeros(0, np.int64), np.ones(8, np.int64), 0, 7)
    packed = PackedSegItems.pack([item])
    assert packed.pixels is None and packed.unpack()[0] is item
    probe = open_dataset(WORLD)
    path = _world_cache(tmp_path, probe)
    kw = dict(quantile=0.02, batch_size=8, checksum=False)
    a = Dissection(workers=2, **kw).run(path, "l4", open_dataset(WORLD))
    b = Dissection(workers=0, **kw).run(path, "l4", open_dataset(WORLD))
    assert a.config["threads"]["mask_workers"] == 2
    np.testing.assert_array_equal(a.intersect, b.intersect)
    np.testing.assert_array_equal(a.iou, b.iou)


class DuckProbe:
    """A duck-typed probe: what the dissection needs of a probe, taken from a real one, and
    nothing more (no ``mask_files``, no ``segmentation_digest``)."""

    def __init__(self, probe):
        self.probe = probe
        for name in ("ids", "spec", "fingerprint", "categories", "label_names",
                     "label_category", "num_labels"):
            setattr(self, name, getattr(probe, name))

    def __len__(self):
        return len(self.probe)

    def load_segmentation(self, i):
        return self.probe.load_segmentation(i)


class _DyingProbe(DuckProbe):
    """A duck-typed probe whose segmentation 20 kills the process decoding it."""

    def load_segmentation(self, i):
        if i == 20 and torch.utils.data.get_worker_info() is not None:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return self.probe.load_segmentation(i)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # see test_cache
def test_a_mask_worker_killed_is_a_clear_error(tmp_path, capsys):
    import multiprocessing

    from interptool.errors import AnalysisError

    world = open_dataset(WORLD)
    path = _world_cache(tmp_path, world)
    with pytest.raises(AnalysisError, match=r"worker process decoding the probe's masks died "
                                            r".*out-of-memory killer.*--workers"):
        Dissection(quantile=0.02, batch_size=4, workers=2, checksum=False).run(
            path, "l4", _DyingProbe(world))
    assert multiprocessing.active_children() == []


def test_memoised_worker_batches_hold_no_descriptors(tmp_path):
    import os

    probe = open_dataset(WORLD)
    path = _world_cache(tmp_path, probe)
    before = len(os.listdir("/proc/self/fd"))
    r = Dissection(quantile=0.02, batch_size=4, workers=2, checksum=False).run(path, "l4",
                                                                             probe)
    assert r.config["threads"]["mask_workers"] == 2
    held = len(os.listdir("/proc/self/fd")) - before
    assert held <= 1, held  # the memoised items hold private copies, not shared memory


def _raised_in(filename: str, exc: BaseException) -> BaseException:
    """``exc`` raised by code that claims to live in ``filename`` (its traceback says so)."""
    code = compile("raise exc", filename, "exec")
    try:
        exec(code, {"exc": exc})
    except BaseException as caught:  # noqa: BLE001 - handed back
        return caught
    raise AssertionError("not raised")


def test_worker_died_only_for_the_loaders_own_reports():
    from interptool._workers import worker_died

    died = RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed.")
    assert worker_died(died)
    assert worker_died(RuntimeError("DataLoader worker (pid(s) 7, 8) exited unexpectedly"))
    assert not worker_died(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    # a broken connection while fetching a batch's shared memory from a dead worker ...
    for where in ("/usr/lib/python3.11/multiprocessing/resource_sharer.py",
                  "/venv/site-packages/torch/multiprocessing/reductions.py"):
        assert worker_died(_raised_in(where, ConnectionResetError(104, "reset by peer")))
        assert worker_died(_raised_in(where, EOFError()))
    # ... but the same errors from a model, a data set's own reader, or a worker's error
    # re-raised by torch are what they are
    for where in ("/home/me/model.py", "/venv/site-packages/torch/_utils.py"):
        assert not worker_died(_raised_in(where, EOFError("Ran out of input")))
        assert not worker_died(_raised_in(where, ConnectionResetError(104, "reset")))
    assert not worker_died(EOFError("no traceback at all"))
