"""`interptool cache` under torchrun: two real processes (gloo on CPU), each writing its shard,
joined into one file that equals a one-process cache bitwise; a failed rank resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_cache  # noqa: E402
from test_cache import FakeDataset, FakeLoaded, make_student  # noqa: E402

from interptool.cache import ActivationCache, cache_activations  # noqa: E402
from interptool.cache._distributed import shard_path, shard_range  # noqa: E402

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
        "joined.h5", "single.h5"]  # shard files are gone, no lock file left
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
try:
    run = run_cache(FakeLoaded(make_student()), FakeDataset(20, bad=bad), ["layer4"], sys.argv[1],
                    batch_size=4)
except InterptoolError as exc:
    print("ERROR", type(exc).__name__, exc, flush=True)
    sys.exit(2)
print("STATUS", run.status, run.n_done, run.images_computed, flush=True)
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
