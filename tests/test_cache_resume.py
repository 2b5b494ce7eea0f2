"""Resume after a real SIGKILL: the finished file equals an uninterrupted run's, byte for byte
in every dataset and every deterministic attribute."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cache import (  # noqa: E402
    FakeDataset,
    FakeLoaded,
    assert_same_content,
    make_student,
)

from interptool.cache import ActivationCache, cache_activations, run_cache  # noqa: E402
from interptool.errors import CacheError  # noqa: E402

N, BATCH = 30, 4
LAYERS = ["layer2.0.bn1", "layer4"]

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_cache import FakeDataset, FakeLoaded, make_student
from interptool.cache import run_cache
kill_at = int(sys.argv[2])
run_cache(FakeLoaded(make_student()), FakeDataset({n}, kill_at=kill_at if kill_at >= 0 else None),
          {layers!r}, sys.argv[1], batch_size={batch}, compression=sys.argv[3] or None)
print("finished")
"""


def _script(tmp_path: Path) -> Path:
    p = tmp_path / "run_cache_child.py"
    p.write_text(SCRIPT.format(tests=str(Path(__file__).parent), n=N, layers=LAYERS, batch=BATCH))
    return p


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _resume_and_compare(path: Path, tmp_path: Path, done: int, compression=None) -> None:
    # ``done``: the rows of the batches before the one being loaded at the kill. Images are
    # decoded by a thread up to three batches ahead of the forward pass (two queued, one
    # being decoded) and rows written by a writer thread up to three batches behind it (two
    # queued, one being written), so a kill may catch up to six batches computed or decoded
    # but unwritten (or none written at all): whole batches only, never a torn one.
    with ActivationCache(path, allow_incomplete=True) as c:
        flushed = c.n
    assert flushed % BATCH == 0 and done - 6 * BATCH <= flushed <= done, flushed
    done = flushed
    with pytest.raises(CacheError, match=rf"incomplete cache \({done} images.*[Rr]e-run"):
        ActivationCache(path)
    run = run_cache(FakeLoaded(make_student()), FakeDataset(N), LAYERS, path, batch_size=BATCH,
                    compression=compression)
    assert run.status == "resumed" and run.images_computed == N - done
    ref = cache_activations(FakeLoaded(make_student()), FakeDataset(N), LAYERS,
                            tmp_path / "one_shot.h5", batch_size=BATCH, compression=compression)
    assert_same_content(path, ref)
    with ActivationCache(path) as c:
        assert c.n == N and c.ids == FakeDataset(N).ids


def test_resume_after_sigkill_inside_the_run(tmp_path):
    path = tmp_path / "killed.h5"
    # item 13 is in the 4th batch: batches 0-2 (12 images) are on disk when the process dies
    proc = subprocess.run([sys.executable, str(_script(tmp_path)), str(path), "13", ""],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "finished" not in proc.stdout
    _resume_and_compare(path, tmp_path, done=12)


def test_resume_after_sigkill_from_outside_with_gzip(tmp_path):
    path = tmp_path / "killed_gz.h5"
    marker = tmp_path / "marker.txt"
    proc = subprocess.Popen(
        [sys.executable, str(_script(tmp_path)), str(path), "-1", "gzip"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(INTERPTOOL_TEST_MARKER=str(marker), INTERPTOOL_TEST_DELAY="0.05"),
    )
    try:
        deadline = time.monotonic() + 240
        # the child reports the item it is loading; stop it while it loads item 21 (6th batch)
        while not (marker.exists() and marker.read_text() == "21"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "child made no progress"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    _resume_and_compare(path, tmp_path, done=20, compression="gzip")
