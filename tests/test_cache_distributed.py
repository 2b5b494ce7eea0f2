"""`interptool cache` under torchrun: two real processes (gloo on CPU), each writing its shard,
joined into one file that equals a one-process cache bitwise; a failed rank resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_cache  # noqa: E402
from test_cache import FakeDataset, FakeLoaded, make_student  # noqa: E402

from interptool.cache import ActivationCache, _distributed, cache_activations  # noqa: E402
from interptool.cache._distributed import ShardView, shard_path, shard_range  # noqa: E402
from interptool.cache._errors import CacheDiskFullError, CacheMismatchError  # noqa: E402
from interptool.cache._format import encode_attr  # noqa: E402
from interptool.errors import CacheError  # noqa: E402

TESTS = str(Path(__file__).parent)
SPEC = "builtin:concept-world?version=1&n=24&size=32"
# attributes that describe the run rather than the content
RUN_ATTRS = {"created", "versions", "threads", "distributed"}


def _env() -> dict[str, str]:
    # torchrun sets OMP_NUM_THREADS=1 per process; the one-process reference uses --threads 1
    # ranks that never meet fail within two minutes instead of hanging the test run
    return {**os.environ, "OMP_NUM_THREADS": "1", "INTERPTOOL_DIST_INIT_TIMEOUT": "120"}


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # One torchrun job at a time across pytest-xdist workers, so that four ranks do not share
    # two cores. (The hang once blamed on two jobs side by side was interptool's own: a second
    # process group made in one job, see the compare test. --standalone gives each job its own
    # free rendezvous port.)
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / "interptool-test-torchrun.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", *args], capture_output=True, text=True,
            env=_env(), cwd=cwd, timeout=600)


def _same_content(a: Path, b: Path) -> None:
    saved = set(test_cache.VOLATILE_ATTRS)
    test_cache.VOLATILE_ATTRS |= RUN_ATTRS
    try:
        test_cache.assert_same_content(a, b)
    finally:
        test_cache.VOLATILE_ATTRS.clear()
        test_cache.VOLATILE_ATTRS.update(saved)


@pytest.mark.parametrize("n,batch,world", [(24, 4, 2), (25, 4, 2), (3, 4, 2), (100, 7, 3),
                                           (64, 64, 4)])
def test_shards_are_contiguous_whole_batches(n, batch, world):
    ranges = [shard_range(n, batch, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (_, a1), (b0, _) in zip(ranges, ranges[1:]):
        assert a1 == b0  # contiguous, no gap, no overlap
    n_batches = [-(-(e - s) // batch) for s, e in ranges]
    for s, e in ranges:
        assert s % batch == 0 and (e % batch == 0 or e == n)
    assert max(n_batches) - min(n_batches) <= 1
    assert shard_path("/x/out.h5", 1, world) == Path(f"/x/out.rank1-of-{world}.h5")


def test_torchrun_two_processes_equal_one_process_bitwise(tmp_path):
    out, ref = tmp_path / "joined.h5", tmp_path / "single.h5"
    # a join into the same OUT killed earlier (SIGKILL, or torchrun's SIGTERM) left its
    # temporary file, as large as the cache: the next run removes it under OUT's lock
    (tmp_path / "joined.merging4242.h5").write_bytes(b"partial join")
    common = ["--arch", "interptool:cw-student", "--data", SPEC, "--layers", "layer3,layer4",
              "--batch-size", "4", "--quiet"]
    proc = _torchrun(["-m", "interptool", "cache", *common, "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one report, from rank 0
    assert proc.stdout.count("cached 24 images (layer3, layer4)") == 1, proc.stdout
    single = subprocess.run([sys.executable, "-m", "interptool", "cache", *common,
                             "--threads", "1", "--out", str(ref)],
                            capture_output=True, text=True, env=_env(), timeout=600)
    assert single.returncode == 0, single.stderr
    _same_content(out, ref)  # every dataset bitwise, every content attribute
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".h5") == [
        "joined.h5", "single.h5"]  # shard and stale join files are gone, no lock file left
    assert not list(tmp_path.glob("*.lock"))
    with h5py.File(out, "r") as f:
        dist = json.loads(f.attrs["distributed"])
    assert dist == {"world_size": 2, "shards": [
        {"rank": 0, "start": 0, "stop": 12, "n_done": 12, "file": "joined.rank0-of-2.h5"},
        {"rank": 1, "start": 12, "stop": 24, "n_done": 12, "file": "joined.rank1-of-2.h5"}]}
    # analyses read the joined file like any other
    from interptool.analyzers import ClassSimilarity

    with ActivationCache(out) as a, ActivationCache(ref) as b:
        assert a.n == 24 and a.layers == ["layer3", "layer4"]
        blocks = np.concatenate([blk for _, blk in a.iter_features("layer4", batch_size=5)])
        np.testing.assert_array_equal(blocks, b.features("layer4")[:].astype(np.float32))
        sa, sb = ClassSimilarity().run(a), ClassSimilarity().run(b)
        assert sa.n == 24
        np.testing.assert_array_equal(sa.matrices[1.0], sb.matrices[1.0])
    # the same command again: a cache hit on every rank, nothing rewritten
    before = out.stat().st_mtime_ns
    again = _torchrun(["-m", "interptool", "cache", *common, "--out", str(out)], tmp_path)
    assert again.returncode == 0 and "cache hit" in again.stdout, again.stderr[-3000:]
    assert out.stat().st_mtime_ns == before


DRIVER = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_cache import FakeDataset, FakeLoaded, make_student
from interptool.cache import run_cache
from interptool.errors import InterptoolError
bad = set(json.loads(sys.argv[2]))
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 4
try:
    run = run_cache(FakeLoaded(make_student()), FakeDataset(20, bad=bad), ["layer4"], sys.argv[1],
                    batch_size=batch)
except InterptoolError as exc:
    sys.stdout.write(f"ERROR {{type(exc).__name__}} {{exc}}\\n")
    sys.exit(2)
sys.stdout.write(f"STATUS {{run.status}} {{run.n_done}} {{run.images_computed}}\\n")
"""


def test_a_failed_rank_stops_all_and_the_shards_resume(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=TESTS))
    out = tmp_path / "r.h5"
    # 5 batches of 4: rank 0 gets items 0-7, rank 1 items 8-19; item 13 cannot be decoded
    first = _torchrun([str(driver), str(out), "[13]"], tmp_path)
    assert first.returncode != 0
    assert "DataError" in first.stdout and "cls1/img_013.png" in first.stdout, first.stdout
    assert "rank 1 of 2 failed" in first.stdout  # what rank 0 says
    assert not out.exists()
    s0, s1 = shard_path(out, 0, 2), shard_path(out, 1, 2)
    with ActivationCache(s0) as c:  # rank 0's shard is complete ...
        assert c.n == 8 and json.loads(json.dumps(c.attrs["shard"]))["stop"] == 8
    with ActivationCache(s1, allow_incomplete=True) as c:  # ... rank 1 kept its first batch
        assert c.n == 4 and c.ids == FakeDataset(20).ids[8:12]
    # the image is fixed (same ids, labels and sizes): the same command resumes
    second = _torchrun([str(driver), str(out), "[]"], tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    # both ranks print one status line; their writes may interleave on the shared pipe, so
    # count the statuses in the whole output rather than per line
    assert second.stdout.count("STATUS") == 2, second.stdout
    assert second.stdout.count("resumed 20 8") == 2, second.stdout  # 8 = items 12..19
    ref = cache_activations(FakeLoaded(make_student()), FakeDataset(20), ["layer4"],
                            tmp_path / "one.h5", batch_size=4)
    _same_content(out, ref)
    assert not s0.exists() and not s1.exists()


COUNT_DRIVER = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_cache import FakeDataset, FakeLoaded, make_student
from interptool.cache import _writer, run_cache
calls = {{"weights_sha256": 0, "channels_last_probe": 0}}
hash_weights, blank_input = _writer.weights_sha256, _writer._blank_input
def counted_hash(model):
    calls["weights_sha256"] += 1
    return hash_weights(model)
def counted_blank(*args):
    calls["channels_last_probe"] += 1
    return blank_input(*args)
_writer.weights_sha256, _writer._blank_input = counted_hash, counted_blank
run = run_cache(FakeLoaded(make_student()), FakeDataset(20), ["layer4"], sys.argv[1],
                batch_size=4)
sys.stdout.write(f"CALLS {{os.environ['RANK']}} {{calls['weights_sha256']}} "
                 f"{{calls['channels_last_probe']}} {{run.status}}\\n")
"""


def test_each_rank_hashes_its_weights_and_probes_the_layout_once(tmp_path):
    """A rank makes the whole-data-set job (to check it against the other ranks) and then
    the job of its shard; the second took the first one's weights checksum and channels-last
    decision (both used to be computed twice: seconds of hashing for a large model)."""
    driver = tmp_path / "driver.py"
    driver.write_text(COUNT_DRIVER.format(tests=TESTS))
    proc = _torchrun([str(driver), str(tmp_path / "c.h5")], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"CALLS {rank} 1 1 created" in proc.stdout, proc.stdout
    with ActivationCache(tmp_path / "c.h5") as cache:  # the shards' layout decision recorded
        assert cache.attrs["numerics"]["memory_format"] == "channels_last"
    ref = cache_activations(FakeLoaded(make_student()), FakeDataset(20), ["layer4"],
                            tmp_path / "one.h5", batch_size=4)
    _same_content(tmp_path / "c.h5", ref)


MISMATCH_DRIVER = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_cache import FakeDataset, FakeLoaded, make_student
from interptool.cache import run_cache
from interptool.errors import InterptoolError
rank, mode = int(os.environ["RANK"]), sys.argv[2]
model = make_student(rank if mode == "weights" else 0)
data = FakeDataset(20 + (rank if mode == "length" else 0))
try:
    run = run_cache(FakeLoaded(model), data, ["layer4"], sys.argv[1], batch_size=4)
except InterptoolError as exc:
    # one write per line: the ranks share the pipe, and with PYTHONUNBUFFERED print() writes
    # its pieces one by one, so two ranks' lines could interleave
    sys.stdout.write(f"ERROR {{rank}} {{type(exc).__name__}} {{exc}}\\n")
    sys.exit(2)
sys.stdout.write(f"STATUS {{rank}} {{run.status}} {{run.n_done}}\\n")
"""


@pytest.mark.parametrize("mode,message", [
    ("weights", "rank 1's model weights differ from rank 0's (weights_sha256 "),
    ("length", "rank 1's data set has 21 images, rank 0's 20: every rank must see the same "
               "data (a stale copy on a node's local disk?)"),
])
def test_ranks_with_another_model_or_data_set_stop_before_writing(tmp_path, mode, message):
    """Rank 1 with other weights, or seeing 21 images where rank 0 sees 20: each rank cut its
    shard from its own data set and checked it against its own model, so the join used to
    write a complete file with rank 0's weights_sha256 and rows of the other model, or with
    images missing. Now every rank stops with the same error before any file is written."""
    driver = tmp_path / "driver.py"
    driver.write_text(MISMATCH_DRIVER.format(tests=TESTS))
    out = tmp_path / "m.h5"
    proc = _torchrun([str(driver), str(out), mode], tmp_path)
    assert proc.returncode != 0, proc.stdout + proc.stderr[-3000:]
    for rank in (0, 1):  # the same one-line error on both ranks
        assert f"ERROR {rank} CacheError {out}: {message}" in proc.stdout, proc.stdout
    assert "STATUS" not in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driver.py"]  # nothing written


def _write_shard(out: Path, rank: int, world: int, batch: int, data=None, model_seed: int = 0):
    """The shard file rank ``rank`` of ``world`` writes in a torchrun run, written here in
    one process (the same writer and attributes as run_sharded's step 3)."""
    from interptool.cache._writer import _run_local

    data = data if data is not None else FakeDataset(20)
    start, stop = shard_range(len(data), batch, rank, world)
    run = _run_local(FakeLoaded(make_student(model_seed)), ShardView(data, start, stop),
                     ["layer4"], shard_path(out, rank, world), batch_size=batch, workers=0,
                     threads=1, dtype="float16", compression=None, overwrite=True,
                     skip_bad=False, probe=None, seed=0, device=None,
                     extra_attrs={"shard": {"rank": rank, "world_size": world, "start": start,
                                            "stop": stop, "of": out.name}})
    return {"rank": rank, "start": start, "stop": stop, "file": shard_path(out, rank, world).name,
            "n_done": run.n_done, "computed": run.images_computed, "skipped": run.skipped,
            "status": run.status}


def _final_job(out: Path, batch: int = 4):
    from interptool.cache._writer import _make_job

    return _make_job(FakeLoaded(make_student()), FakeDataset(20), ["layer4"], out,
                     batch_size=batch, workers=0, threads=1, dtype="float16", compression=None,
                     skip_bad=False, probe=False, seed=0, device=None)


def _spoil_incomplete(folder: Path, out: Path, shards: list) -> None:
    with h5py.File(shard_path(out, 1, 2), "a") as f:
        f.attrs["complete"] = False


def _spoil_row_count(folder: Path, out: Path, shards: list) -> None:
    shards[1]["n_done"] = 11  # rank 1 said it wrote 11 rows; the file holds 12


def _spoil_range(folder: Path, out: Path, shards: list) -> None:
    _write_shard(out, 1, 2, batch=6)  # items 12:20 (batch 6), where batch 4 cuts 8:20


def _spoil_weights(folder: Path, out: Path, shards: list) -> None:
    _write_shard(out, 1, 2, batch=4, model_seed=1)


def _spoil_data(folder: Path, out: Path, shards: list) -> None:
    other = FakeDataset(20)
    other.fingerprint = "another data set"
    _write_shard(out, 1, 2, batch=4, data=other)


def _spoil_missing(folder: Path, out: Path, shards: list) -> None:
    shard_path(out, 1, 2).unlink()


def _spoil_numerics(folder: Path, out: Path, shards: list) -> None:
    # a shard finished earlier with rows rounded another way (here: the default input layout)
    with h5py.File(shard_path(out, 1, 2), "r+") as f:
        f.attrs["numerics"] = encode_attr("numerics", {"device_type": "cpu"})


@pytest.mark.parametrize("spoil,message", [
    (_spoil_incomplete, "complete is False, expected True"),
    (_spoil_row_count, "n_done is 12, but rank 1 reported 11 rows"),
    (_spoil_range, 'shard is {"of": "j.h5", "rank": 1, "start": 12, "stop": 20, "world_size": '
                   '2}, expected {"of": "j.h5", "rank": 1, "start": 8, "stop": 20, "world_size": '
                   '2} (items 8:20 of 20 with --batch-size 4)'),
    (_spoil_weights, "weights_sha256 differs: the model's weights are not those that made"),
    (_spoil_data, "data_fingerprint differs"),
    (_spoil_missing, "rank 1 wrote this shard file but rank 0 does not see it: --out must be "
                     "on a file system every node shares"),
    (_spoil_numerics, "numerics is {'device_type': 'cpu'}, expected {'device_type': 'cpu', "
                      "'memory_format': 'channels_last'}"),
])
def test_the_join_refuses_a_stale_incomplete_or_foreign_shard_file(tmp_path, spoil, message):
    """_merge checks each shard file against what its rank reported and what rank 0 expects
    (it used to read only n_done): a stale OUT.rankK-of-N.h5 is never joined."""
    good = tmp_path / "good"
    good.mkdir()
    shards = [_write_shard(good / "j.h5", k, 2, batch=4) for k in range(2)]
    case = tmp_path / "case"
    shutil.copytree(good, case)
    out = case / "j.h5"
    reported = [dict(s) for s in shards]
    spoil(case, out, reported)
    with pytest.raises(CacheError) as err:
        _distributed._merge(_final_job(out), reported, out)
    text = str(err.value)
    assert message in text and "\n" not in text
    if spoil is not _spoil_missing:
        assert text.startswith(f"{shard_path(out, 1, 2)}: will not join this shard file into "
                               "j.h5: ")
        assert text.endswith("delete it and re-run the same command")
    assert not out.exists() and not list(case.glob("*merging*"))
    assert shard_path(out, 0, 2).exists()  # nothing deleted
    # the untouched shards do join (the checks refuse only what is wrong)
    joined = good / "j.h5"
    _distributed._merge(_final_job(joined), shards, joined)
    ref = cache_activations(FakeLoaded(make_student()), FakeDataset(20), ["layer4"],
                            tmp_path / "one.h5", batch_size=4, threads=1)
    _same_content(joined, ref)
    assert sorted(p.name for p in good.iterdir()) == ["j.h5"]


def test_the_join_checks_free_space_before_writing(tmp_path, monkeypatch):
    """The join writes a second copy of every row before it deletes the shards: without room
    for it, a one-line error before anything is written, and the shards are kept."""
    out = tmp_path / "j.h5"
    shards = [_write_shard(out, k, 2, batch=4) for k in range(2)]
    monkeypatch.setattr(_distributed, "free_bytes", lambda path: 1000)
    with pytest.raises(CacheDiskFullError, match=r"^not enough free space on .* to join the 2 "
                       rf"shard files into {out}: the join writes a copy as large as the "
                       r"shards \(0\.02 GiB with margin\) before deleting them, and 0\.00 GiB "
                       r"are free; the shard files are complete and kept; free space and re-run "
                       r"the same command$"):
        _distributed._merge(_final_job(out), shards, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.rank0-of-2.h5", "j.rank1-of-2.h5"]


def test_stale_join_files_are_removed_whatever_their_pid(tmp_path):
    """Only the temporary files of joins into this OUT; the caller holds OUT's lock, so no
    live join can own one (its pid may be another node's, or reused: not asked)."""
    out = tmp_path / "c.h5"
    stale = ["c.merging1.h5", f"c.merging{os.getpid()}.h5"]
    kept = ["c.h5", "c2.merging1.h5", "d.merging1.h5", "c.mergingX.h5", "c.rank0-of-2.h5"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 10)
    assert sorted(p.name for p in _distributed._remove_stale_joins(out)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert _distributed._remove_stale_joins(tmp_path / "missing" / "c.h5") == []


def test_shards_cut_by_another_batch_size_or_world_size_are_named(tmp_path):
    """A resume with another --batch-size or world size moves the shard boundaries: the error
    says so (it used to say data_fingerprint differs and suggest --overwrite)."""
    out = tmp_path / "s.h5"
    for k in range(2):
        _write_shard(out, k, 2, batch=4)  # items 0:8 and 8:20
    _distributed._check_leftover_shards(out, 20, 4, 2, overwrite=False)  # the same cut: fine
    with pytest.raises(CacheMismatchError) as err:
        _distributed._check_leftover_shards(out, 20, 6, 2, overwrite=False)
    assert str(err.value) == (
        f"{shard_path(out, 0, 2)}: shard range changed (was items 0:8 with --batch-size 4 and 2 "
        "ranks, now items 0:12 with --batch-size 6 and 2 ranks): resume with the original "
        "--batch-size and world size, or pass --overwrite to start again")
    assert err.value.fields == ["shard"]
    with pytest.raises(CacheMismatchError, match=r"s\.rank0-of-2\.h5: shard range changed \(was "
                       r"items 0:8 with --batch-size 4 and 2 ranks, now items 0:4 with "
                       r"--batch-size 4 and 3 ranks\)"):
        _distributed._check_leftover_shards(out, 20, 4, 3, overwrite=False)
    with pytest.raises(CacheMismatchError, match=r"s\.rank1-of-2\.h5: shard range changed \(was "
                       r"items 8:20 with --batch-size 4 and 2 ranks, now 1 ranks, so no rank 1"):
        (tmp_path / "s.rank0-of-2.h5").rename(tmp_path / "kept.h5")
        _distributed._check_leftover_shards(out, 20, 4, 1, overwrite=False)
    (tmp_path / "kept.h5").rename(shard_path(out, 0, 2))
    # the same --batch-size and world size cutting other items: the data set changed length,
    # which the original options cannot resume
    with pytest.raises(CacheMismatchError) as err:
        _distributed._check_leftover_shards(out, 24, 4, 2, overwrite=False)
    assert str(err.value) == (
        f"{shard_path(out, 0, 2)}: shard range changed (was items 0:8 with --batch-size 4 and 2 "
        "ranks, now items 0:12 with --batch-size 4 and 2 ranks): the data set now has 24 "
        "images, so this shard was cut from another data set; pass --overwrite to start again "
        "(or point --data at the data it was made from)")
    # --overwrite starts again: the shards of the other cut are deleted
    _distributed._check_leftover_shards(out, 20, 4, 3, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_torchrun_resume_with_another_batch_size_says_the_shard_range_changed(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=TESTS))
    out = tmp_path / "r.h5"
    for k in range(2):  # what a run with --batch-size 4 left (its join never ran)
        _write_shard(out, k, 2, batch=4)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("r.*")}
    proc = _torchrun([str(driver), str(out), "[]", "6"], tmp_path)
    assert proc.returncode != 0
    assert (f"ERROR CacheMismatchError {shard_path(out, 0, 2)}: shard range changed (was items "
            "0:8 with --batch-size 4 and 2 ranks, now items 0:12 with --batch-size 6 and 2 "
            "ranks): resume with the original --batch-size and world size, or pass --overwrite "
            "to start again") in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "rank 0 of 2 failed: " in proc.stdout  # what rank 1 says
    assert "data_fingerprint" not in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("r.*")} == before  # untouched


COMPARE_CONFIG = """
[data]
eval = "builtin:concept-world?version=1&n=24&size=32&seed=3&split=eval"

[models.teacher]
arch = "interptool:cw-student"
layers = ["layer4"]
image_size = 32
role = "teacher"

[models.small]
arch = "interptool:cw-teacher"
layers = ["layer4"]
image_size = 32

[analysis]
dissection = false
attribution = false
similarity = { temperatures = [1], n_boot = 20, cka = false }

[run]
batch_size = 4
seed = 1
"""


def _without_run_details(obj):
    """A saved JSON result without what names the run (output folder, creation time)."""
    if isinstance(obj, dict):
        return {k: _without_run_details(v) for k, v in obj.items() if k not in ("path", "created")}
    if isinstance(obj, list):
        return [_without_run_details(v) for v in obj]
    return obj


def test_compare_cache_stage_under_torchrun_equals_one_process(tmp_path):
    """`torchrun -m interptool compare`: every rank shards the caches, rank 0 alone analyses,
    holds the lock and writes the report; the joined caches equal a one-process run's.

    Two models mean two sharded caches in one torchrun job: this hung in gloo's
    init_process_group when the process group was destroyed after the first cache and made
    again for the second (torch restarts group names at 0, so the second rendezvous read the
    first one's stale keys in torchrun's store). The group is now made once per process."""
    (tmp_path / "c.toml").write_text(COMPARE_CONFIG)
    proc = _torchrun(["-m", "interptool", "compare", "c.toml", "--out", "dist", "--quiet"],
                     tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "interptool", "compare", "c.toml", "--out",
                             "one", "--quiet"], capture_output=True, text=True,
                            env=_env(), cwd=tmp_path, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    for name in ("teacher_eval.h5", "small_eval.h5"):
        dist = tmp_path / "dist" / "cache" / name
        with h5py.File(dist, "r") as f:
            shards = json.loads(f.attrs["distributed"])
        assert shards["world_size"] == 2
        assert [(s["start"], s["stop"]) for s in shards["shards"]] == [(0, 12), (12, 24)]
        _same_content(dist, tmp_path / "one" / "cache" / name)  # every dataset bitwise
    # no shard or lock files left; one summary, written by rank 0
    leftovers = [p.name for p in (tmp_path / "dist").rglob("*") if "rank" in p.name
                 or p.suffix == ".lock"]
    assert leftovers == []
    a = json.loads((tmp_path / "dist" / "summary.json").read_text())
    b = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert a["similarity"] == b["similarity"]
    # the analysis outputs: every table byte for byte, the JSON result but for its paths
    sim_a, sim_b = tmp_path / "dist" / "similarity", tmp_path / "one" / "similarity"
    tables = sorted(p.relative_to(sim_b) for p in sim_b.rglob("*.csv"))
    assert len(tables) >= 10 and Path("transfer.csv") in tables
    assert sorted(p.relative_to(sim_a) for p in sim_a.rglob("*.csv")) == tables
    for rel in tables:
        assert (sim_a / rel).read_bytes() == (sim_b / rel).read_bytes(), rel
    res_a = json.loads((sim_a / "similarity.json").read_text())
    res_b = json.loads((sim_b / "similarity.json").read_text())
    assert _without_run_details(res_a) == _without_run_details(res_b)


GROUP_DRIVER = """
import os, socket, sys, time
from interptool.cache import _distributed
from interptool.errors import CacheError
with socket.socket() as s:  # a free port: rank 0 serves the store there, rank 1 never comes
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                  INTERPTOOL_DIST_INIT_TIMEOUT="3")
t0 = time.monotonic()
try:
    _distributed._shard_group("gloo", 0)
except CacheError as exc:
    print("ERROR", round(time.monotonic() - t0), exc, flush=True)
    sys.exit(2)
print("NO ERROR")
"""


def test_ranks_that_never_meet_are_an_error_not_a_hang(tmp_path):
    """Rank 0 of a two-rank job whose rank 1 never starts: a CacheError after the init
    timeout (3 s here), naming the rank, the backend and the setting to raise."""
    proc = subprocess.run([sys.executable, "-c", GROUP_DRIVER], capture_output=True,
                          text=True, env={**_env(), "INTERPTOOL_DIST_INIT_TIMEOUT": "3"},
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR ")
    assert "rank 0: the torchrun processes did not form a gloo process group within 3 s" in line
    assert "INTERPTOOL_DIST_INIT_TIMEOUT" in line


def test_init_timeout_setting_is_checked(monkeypatch):
    from interptool.cache import _distributed
    from interptool.errors import ConfigError

    monkeypatch.setenv("INTERPTOOL_DIST_INIT_TIMEOUT", "45")
    assert _distributed._init_timeout().total_seconds() == 45
    monkeypatch.delenv("INTERPTOOL_DIST_INIT_TIMEOUT")
    assert _distributed._init_timeout().total_seconds() == 600
    monkeypatch.setenv("INTERPTOOL_DIST_INIT_TIMEOUT", "ten minutes")
    with pytest.raises(ConfigError, match="INTERPTOOL_DIST_INIT_TIMEOUT='ten minutes': "
                                          "expected a number of seconds"):
        _distributed._init_timeout()


def test_each_torchrun_rank_gets_its_own_gpu_before_loading(monkeypatch):
    """Under torchrun with --device cuda, a rank makes GPU LOCAL_RANK current before any model
    is loaded ("cuda" would otherwise put every rank's weights and CUDA context on GPU 0);
    more processes per node than GPUs is a clear error up front, not NCCL's "Duplicate GPU"
    after every rank loaded its model. (CUDA's calls are faked: no GPU is needed.)"""
    import torch

    from interptool.cache import use_rank_gpu
    from interptool.errors import ConfigError

    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1",
                       "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    # whatever index the command names: the rank's own, made current and loaded onto
    assert [use_rank_gpu("cuda"), use_rank_gpu("cuda:0"), use_rank_gpu("cpu")] == [
        "cuda:1", "cuda:1", "cpu"]
    assert current == [torch.device("cuda", 1)] * 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"4 processes per node but this node has 2 GPU\(s\)"
                                          r".*--nproc_per_node=2"):
        use_rank_gpu("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")  # not under torchrun: nothing changes
    assert use_rank_gpu("cuda:0") == "cuda:0" and len(current) == 2
