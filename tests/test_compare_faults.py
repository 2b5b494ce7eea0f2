"""compare resumes, never wipes (issue 11 item 3).

Faults reproduced: a forward failure injected in the middle of a cache, a lock held on a cache
file, a cache made with other settings. Each is checked against what must survive on disk.
"""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest

from interptool.cli import main

CONFIG = """
[data]
eval = "builtin:concept-world?version=1&n=48&size=32&seed=11&split=eval"
[models.teacher]
arch = "interptool:cw-student"
layers = ["layer4"]
image_size = 32
role = "teacher"
[models.small]
arch = "interptool:cw-student"
layers = ["layer4"]
image_size = 32
[analysis]
dissection = false
attribution = false
similarity = { temperatures = [1], n_boot = 20, cka = false }
[run]
batch_size = 16
seed = 1
"""


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _FailingForward:
    """Counts forward calls on batches of one model; raises like an out-of-memory on call
    ``fail_at``. The cache's check of the input layout (one blank image) is not a batch."""

    def __init__(self, model, fail_at: int | None) -> None:
        self.model, self.fail_at, self.calls = model, fail_at, 0
        self.forward = model.forward

    def __call__(self, x):
        if x.shape[0] == 1 and not bool(x.any()):
            return self.forward(x)
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.forward(x)


@pytest.fixture
def inject(monkeypatch):
    """``inject(fail_at)`` -> spy: wraps the forward of the second model compare loads
    ("small"; models load in config order) so that call ``fail_at`` raises."""
    import interptool.loading as loading

    real = loading.load_model
    state: dict = {}

    def load_model(arch, **kw):
        lm = real(arch, **kw)
        state["loaded"] = state.get("loaded", 0) + 1
        if state["loaded"] == 2:
            spy = _FailingForward(lm.model, state["fail_at"])
            lm.model.forward = spy
            state["spy"] = spy
        return lm

    monkeypatch.setattr(loading, "load_model", load_model)

    def arm(fail_at: int | None) -> dict:
        state.clear()
        state["fail_at"] = fail_at
        return state

    return arm


def test_forward_failure_mid_cache_keeps_partial_cache_and_rerun_resumes(
        tmp_path, inject, capsys):
    (tmp_path / "c.toml").write_text(CONFIG)
    out = tmp_path / "out"
    # 48 eval images in batches of 16: the third batch of "small" fails
    spy = inject(3)
    rc = main(["compare", str(tmp_path / "c.toml"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert "failed on a batch" in err and "out of memory" in err and "small" in err
    part = out / "cache" / "small_eval.h5"
    assert part.exists(), "the partial cache was deleted"
    with h5py.File(part, "r") as f:
        assert not bool(f.attrs["complete"])
        assert int(f.attrs["n_done"]) == 32  # the two batches before the failure are kept
        kept = np.array(f["logits"][:32])
    assert spy["spy"].calls == 3
    assert not (out / "report.html").exists()

    # the same command again, without the fault: it resumes (only the last batch runs)
    spy = inject(None)
    rc = main(["compare", str(tmp_path / "c.toml"), "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert spy["spy"].calls == 1  # 16 images left: one batch, not three
    with h5py.File(part, "r") as f:
        assert bool(f.attrs["complete"]) and int(f.attrs["n_done"]) == 48
        np.testing.assert_array_equal(np.array(f["logits"][:32]), kept)
    assert sorted(p.name for p in (out / "cache").glob("*.h5")) == [
        "small_eval.h5", "teacher_eval.h5"]
    assert (out / "report.html").exists()


def test_lock_conflict_stops_with_one_line_and_keeps_the_cache(tmp_path, capsys):
    from interptool._locks import output_lock

    (tmp_path / "c.toml").write_text(CONFIG)
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "c.toml"), "--out", str(out), "--quiet"]) == 0
    cache = out / "cache" / "small_eval.h5"
    before = _sha(cache)
    (out / ".stages").rename(tmp_path / "stages-away")  # make the analysis stages run again
    with output_lock(cache):  # another writer holds the cache file
        rc = main(["compare", str(tmp_path / "c.toml"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "small_eval.h5" in err and "--overwrite" not in err
    assert cache.exists() and _sha(cache) == before
    assert not list((out / "cache").glob("small_eval.*.h5"))  # no retry into another file


def test_settings_mismatch_writes_a_new_file_or_overwrites_only_when_asked(tmp_path, capsys):
    (tmp_path / "c.toml").write_text(CONFIG)
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "c.toml"), "--out", str(out), "--quiet"]) == 0
    old = out / "cache" / "small_eval.h5"
    old_sha = _sha(old)
    # the user changes the student's architecture: its cache no longer matches
    changed = CONFIG.replace('[models.small]\narch = "interptool:cw-student"',
                             '[models.small]\narch = "interptool:cw-teacher"')
    (tmp_path / "d.toml").write_text(changed)
    assert main(["compare", str(tmp_path / "d.toml"), "--out", str(out)]) == 0
    msgs = capsys.readouterr().err
    new = out / "cache" / "small_eval.2.h5"
    assert new.exists() and _sha(old) == old_sha  # kept, untouched
    assert "small_eval.2.h5" in msgs and "--overwrite" in msgs
    with h5py.File(new, "r") as f:
        assert "cw-teacher" in str(f.attrs["arch"])
    # a run with the old settings finds its file again; the new one is not touched either
    new_sha = _sha(new)
    assert main(["compare", str(tmp_path / "c.toml"), "--out", str(out), "--quiet"]) == 0
    assert _sha(old) == old_sha and _sha(new) == new_sha
    assert not (out / "cache" / "small_eval.3.h5").exists()
    # --overwrite: the mismatching file is replaced in place, nothing new beside it
    assert main(["compare", str(tmp_path / "d.toml"), "--out", str(out), "--quiet",
                 "--overwrite"]) == 0
    with h5py.File(old, "r") as f:
        assert "cw-teacher" in str(f.attrs["arch"])
    assert not (out / "cache" / "small_eval.3.h5").exists()
