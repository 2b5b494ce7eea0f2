"""Faults while caching, each reproduced for real: two writers on one file (two processes, with
and without HDF5's own file locking), a full disk (a small tmpfs where mounting is allowed,
else an injected ENOSPC), NaN weights and float16 overflow; plus atomic side files."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from test_cache import (  # noqa: E402
    FakeDataset,
    FakeLoaded,
    assert_same_content,
    direct_outputs,
    make_student,
)

from interptool._locks import OutputLockedError, lock_path, output_lock  # noqa: E402
from interptool._provenance import NoSpaceError, atomic_write_text  # noqa: E402
from interptool.cache import (  # noqa: E402
    ActivationCache,
    CacheLockedError,
    CacheMismatchError,
    CacheNonFiniteError,
    cache_activations,
    run_cache,
)
from interptool.errors import CacheError  # noqa: E402

TESTS = str(Path(__file__).parent)

# A child process running `interptool cache` through the CLI on the stand-in model and data
# of test_cache.py (seeded weights, deterministic images).
CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_cache import FakeDataset, FakeLoaded, make_student
import interptool.cli as cli
from interptool.cli import _cache
opts = json.loads(sys.argv[1])
if opts.get("no_space_check"):
    # let the disk fill up inside HDF5's own writes (the free-space check would stop earlier)
    import interptool.cache._writer as w
    w._enough_space = lambda path, need: True
if opts.get("inject_enospc_at"):
    # a full disk where mounting a small file system is not allowed: the n-th flush fails
    # exactly as h5py reports a real ENOSPC
    import h5py
    real, count = h5py.File.flush, [0]
    def flush(self):
        count[0] += 1
        if count[0] == opts["inject_enospc_at"]:
            raise RuntimeError("Unable to synchronously flush file (file write failed: "
                               "errno = 28, error message = 'No space left on device')")
        return real(self)
    h5py.File.flush = flush
class Held(FakeDataset):
    # stops at item `hold_at` (saying so in `marker`) until the file `gate` exists
    def on_item(self, i):
        if i == opts.get("hold_at"):
            import os, pathlib, time
            pathlib.Path(opts["marker"]).write_text(str(os.getpid()))
            while not os.path.exists(opts["gate"]):
                time.sleep(0.01)
cli._COMMANDS = ["cache"]
_cache._load_model = lambda args: FakeLoaded(make_student(opts.get("seed", 0)))
_cache._open_dataset = lambda spec: Held(opts["n"])
sys.exit(cli.main(["cache", "--arch", "interptool:cw-student", "--data", "fake:",
                   "--out", opts["out"], "--layers", opts.get("layers", "layer4"),
                   "--batch-size", str(opts.get("batch", 4)), "--dtype",
                   opts.get("dtype", "float16"), "--quiet", *opts.get("extra", [])]))
"""


def _child(tmp_path: Path) -> Path:
    p = tmp_path / "cache_child.py"
    p.write_text(CHILD.format(tests=TESTS))
    return p


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _run_child(tmp_path: Path, env: dict | None = None, **opts) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(_child(tmp_path)), json.dumps(opts)],
                          capture_output=True, text=True, env=env or _env(), timeout=600)


def _wait_for(pred, proc: subprocess.Popen, what: str, limit: float = 300) -> None:
    # a hang guard, not a timing assertion: the child only has to get there eventually
    deadline = time.monotonic() + limit
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"child never reached: {what}"
        time.sleep(0.01)


# -- two writers ------------------------------------------------------------------------------


@pytest.mark.parametrize("hdf5_locking", ["TRUE", "FALSE"])
def test_second_writer_is_refused_and_overwrite_cannot_remove_a_live_file(tmp_path,
                                                                          hdf5_locking):
    out = tmp_path / "shared.h5"
    marker, gate = tmp_path / "marker.txt", tmp_path / "gate"
    env = _env(HDF5_USE_FILE_LOCKING=hdf5_locking)
    opts = {"n": 24, "out": str(out), "hold_at": 9, "marker": str(marker), "gate": str(gate)}
    first = subprocess.Popen(
        [sys.executable, str(_child(tmp_path)), json.dumps(opts)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        # the first run is inside its batches (held at item 9: two batches are written)
        _wait_for(marker.exists, first, "item 9")
        holder = json.loads(lock_path(out).read_bytes().rstrip(b"\0"))
        assert holder["pid"] == first.pid
        for extra in ([], ["--overwrite"]):
            # another model: without the lock, --overwrite would have deleted the first file
            second = _run_child(tmp_path, env=env, n=24, out=str(out), seed=7, extra=extra)
            assert second.returncode == 2, second.stderr
            err = second.stderr.strip()
            assert len(err.splitlines()) == 1 and "Traceback" not in err
            assert re.fullmatch(
                rf"interptool cache: error: another interptool process \(pid {first.pid} on "
                rf"\S+, started at [0-9T:+-]+\) is writing {re.escape(str(out))}; wait for it "
                r"or choose another --out", err), err
            assert "--overwrite" not in err
        with h5py.File(out, "r", locking=False) as f:  # untouched by the second writer
            assert int(f.attrs["n_done"]) == 8 and not f.attrs["complete"]
        gate.touch()
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, stderr
    assert "cached 24 images" in stdout
    assert not lock_path(out).exists()
    # the file holds the first run's model, whole: identical to an undisturbed run
    ref = cache_activations(FakeLoaded(make_student(0)), FakeDataset(24), ["layer4"],
                            tmp_path / "ref.h5", batch_size=4)
    assert_same_content(out, ref)


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    target = tmp_path / "x.h5"
    code = (f"import sys, time; sys.path.insert(0, {TESTS!r})\n"
            "from interptool._locks import output_lock\n"
            f"with output_lock({str(target)!r}):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=rf"pid {proc.pid} on"):
            with output_lock(target):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_path(target).exists()  # the killed holder could not clean up ...
    with output_lock(target) as held:  # ... but the kernel dropped its lock
        assert held.info.pid == os.getpid()
    assert not lock_path(target).exists()


def test_same_process_cannot_take_one_output_twice(tmp_path):
    target = tmp_path / "y.h5"
    with output_lock(target):
        with pytest.raises(OutputLockedError, match="this interptool process .* already writing"):
            with output_lock(target):
                pass
        with pytest.raises(CacheLockedError):
            cache_activations(FakeLoaded(make_student()), FakeDataset(4), None, target)
    assert not target.exists()


def test_mismatch_is_its_own_kind_of_error(tmp_path):
    loaded, ds = FakeLoaded(make_student()), FakeDataset(8)
    path = cache_activations(loaded, ds, ["layer4"], tmp_path / "m.h5", batch_size=4)
    with pytest.raises(CacheMismatchError) as info:
        run_cache(loaded, ds, ["layer4"], path, dtype="float32")
    assert info.value.fields == ["dtype"] and info.value.path == path
    assert isinstance(info.value, CacheError)


# -- non-finite values --------------------------------------------------------------------------


class _Amp(nn.Module):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return x * self.gain


class _LocalMeanNet(nn.Module):
    """conv = 3x3 mean of the normalised pixels (|value| <= 2), amp = conv * gain."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 27)
        self.amp = _Amp(gain)
        self.fc = nn.Linear(2, 10)

    def forward(self, x):
        return self.fc(self.amp(self.conv(x)).mean((2, 3)) * 1e-5)


class _BrightAt(FakeDataset):
    """FakeDataset whose image ``k`` is all white (normalised value 2.0 everywhere)."""

    def __init__(self, n: int, k: int) -> None:
        super().__init__(n)
        self._imgs[k] = np.full_like(self._imgs[k], 255)


def test_float16_overflow_names_layer_image_and_fix(tmp_path):
    # local means of random pixels stay well below 1.6; the white image's are 2.0: with this
    # gain only its outputs pass 65504 (float16's largest value)
    model = _LocalMeanNet(gain=65520 / 1.6).eval()
    ds = _BrightAt(20, k=13)
    _, feats = direct_outputs(model, ds, ["amp"], 4)
    with np.errstate(over="ignore"):
        overflows = [i for i in range(20) if np.isinf(feats["amp"][i].astype(np.float16)).any()]
    assert overflows == [13]  # the known answer, computed without the cache
    path = tmp_path / "o.h5"
    loaded = FakeLoaded(model, arch="custom:localmean", name="localmean")
    with pytest.raises(CacheNonFiniteError) as info:
        run_cache(loaded, ds, ["conv", "amp"], path, batch_size=4)
    msg = str(info.value)
    assert info.value.layer == "amp" and info.value.image == ds.ids[13]
    assert re.search(r"layer 'amp' of model localmean holds Inf values, first for image "
                     r"cls1/img_013\.png; likely cause: float16 overflow.*--dtype float32", msg)
    assert "12 images written before are kept" in msg and "\n" not in msg
    with ActivationCache(path, allow_incomplete=True) as c:  # batches before it are kept
        assert c.n == 12 and c.ids == ds.ids[:12]
        assert np.isfinite(c.feature_max("amp")).all()
    # float32 holds the values: asked for explicitly, the same data caches fine
    with pytest.raises(CacheMismatchError, match="dtype"):
        run_cache(loaded, ds, ["conv", "amp"], path, batch_size=4, dtype="float32")
    run = run_cache(loaded, ds, ["conv", "amp"], path, batch_size=4, dtype="float32",
                    overwrite=True)
    assert run.n_done == 20
    with ActivationCache(path) as c:
        np.testing.assert_array_equal(c.features("amp")[:], feats["amp"])


def test_deferred_fault_test_on_cuda_finds_what_the_immediate_one_finds():
    """On CUDA the hook queues its finiteness test and reads it after the batch (no host wait
    inside the forward pass); on the same outputs it must name the same layer, row, kind and
    cause as the immediate test the CPU runs. Checked here with CPU tensors (the logic has no
    device-specific step)."""
    from interptool.cache._writer import _HookFault

    def outputs():
        clean = torch.ones(4, 3, 2, 2)
        nan = torch.ones(4, 3, 2, 2)
        nan[2, 1, 0, 1] = float("nan")
        neg_inf = torch.ones(4, 3, 2, 2)
        neg_inf[3, 0, 1, 1] = float("-inf")
        big = torch.ones(4, 3, 2, 2)
        big[1, 2, 0, 0] = -70000.0  # finite in float32, -inf in float16
        return clean, nan, neg_inf, big

    cases = [  # (layers as (name, output, copy dtype), expected slot)
        ([("a", 0, torch.float32), ("b", 1, torch.float32)], ("b", 2, "NaN", False)),
        ([("a", 2, torch.float32), ("b", 1, torch.float32)], ("a", 3, "Inf", False)),
        ([("a", 0, torch.float16), ("b", 3, torch.float16)], ("b", 1, "Inf", True)),
        ([("a", 2, torch.float16), ("b", 3, torch.float16)], ("a", 3, "Inf", False)),
        ([("a", 0, torch.float16)], None),
        # a module whose hook fires twice per forward pass (a shared ReLU): the first call's
        # NaN is the fault, whatever the second call's copy holds in that row
        ([("relu", 1, torch.float32), ("relu", 2, torch.float32)], ("relu", 2, "NaN", False)),
    ]
    for layers, want in cases:
        outs = outputs()
        for deferred in (False, True):
            _HookFault.clear()
            for name, k, dtype in layers:
                out = outs[k]
                feat = out.to(dtype, copy=True)
                if deferred:
                    _HookFault.defer(name, out, feat)
                elif not bool(torch.isfinite(feat).all()):
                    _HookFault.record(name, out, feat)
            if deferred:
                _HookFault.resolve()
            assert _HookFault.first() == want, (layers, deferred)
    _HookFault.clear()


def test_nan_weight_names_first_layer_image_and_parameter(tmp_path, monkeypatch, capsys):
    model = make_student()
    with torch.no_grad():
        model.layer3[0].conv1.weight[0, 0, 0, 0] = float("nan")
    loaded = FakeLoaded(model)
    path = tmp_path / "nan.h5"
    with pytest.raises(CacheNonFiniteError) as info:
        run_cache(loaded, FakeDataset(8), ["layer2", "layer3", "layer4"], path, batch_size=4)
    msg = str(info.value)
    # layer2 comes before the NaN weight and is finite; layer3 is the first to hold NaN
    assert re.search(r"layer 'layer3' of model cw-student holds NaN values, first for image "
                     r"cls0/img_000\.png; likely cause: the model's weights hold NaN/Inf "
                     r"\(layer3\.0\.conv1\.weight\)", msg), msg
    assert not path.exists()  # nothing durable was written: no file blocks the fixed command
    with pytest.raises(CacheNonFiniteError, match=r"the logits of model cw-student holds NaN"):
        run_cache(loaded, FakeDataset(8), None, path, batch_size=4)
    # through the CLI: exit 2, one line
    import interptool.cli as cli
    from interptool.cli import _cache

    monkeypatch.setattr(cli, "_COMMANDS", ["cache"])
    monkeypatch.setattr(_cache, "_load_model", lambda args: loaded)
    monkeypatch.setattr(_cache, "_open_dataset", lambda spec: FakeDataset(8))
    rc = cli.main(["cache", "--arch", "x", "--data", "fake:", "--layers", "layer4",
                   "--out", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "holds NaN" in err


# -- full disks ----------------------------------------------------------------------------------


class SmallFS:
    """A tmpfs of a given size mounted for the test (we run as root in CI), resizable."""

    def __init__(self, root: Path, size: str) -> None:
        self.root = root
        root.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                               f"interptool-test-{uuid.uuid4().hex[:8]}", str(root)],
                              capture_output=True, text=True)
        self.mounted = proc.returncode == 0
        self.why = proc.stderr.strip()

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.root)], check=True)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=False)


@pytest.fixture
def small_fs(tmp_path):
    fs = SmallFS(tmp_path / "small", "4m")
    yield fs
    fs.close()


N_BIG, BATCH_BIG = 240, 16
BIG_LAYERS = "layer2.0.bn1,layer4"  # float32: about 16 KB per image, chunks of 64 rows


def _ref(tmp_path: Path) -> Path:
    return cache_activations(FakeLoaded(make_student()), FakeDataset(N_BIG),
                             BIG_LAYERS.split(","), tmp_path / "ref.h5",
                             batch_size=BATCH_BIG, dtype="float32")


def _disk_full_then_resume(tmp_path: Path, out: Path, first: subprocess.CompletedProcess,
                           device: str, grow) -> None:
    assert first.returncode == 2, (first.stdout, first.stderr)
    err = first.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    m = re.fullmatch(rf"interptool cache: error: no space left on {device} while writing "
                     rf"{re.escape(str(out))}; (\d+) images are safe in it; free space and "
                     r"re-run the same command to resume", err)
    assert m, err
    safe = int(m.group(1))
    assert 0 < safe < N_BIG and safe % BATCH_BIG == 0
    # the file opens, says how much it holds, and holds exactly that, correctly
    with ActivationCache(out, allow_incomplete=True) as c:
        assert c.n == safe and not c.attrs["complete"] and c.ids == FakeDataset(N_BIG).ids[:safe]
    with ActivationCache(_ref(tmp_path)) as ref, h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["features/layer4"][:safe], ref.features("layer4")[:safe])
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no .tmp, no .lock
    grow()
    again = _run_child(tmp_path, n=N_BIG, out=str(out), layers=BIG_LAYERS, batch=BATCH_BIG,
                       dtype="float32")
    assert again.returncode == 0, again.stderr
    assert f"resumed and finished {N_BIG} images" in again.stdout
    assert_same_content(out, tmp_path / "ref.h5")


@pytest.mark.parametrize("where", ["free-space check", "inside HDF5's writes"])
def test_full_disk_keeps_a_resumable_file(tmp_path, small_fs, where):
    opts = {"no_space_check": where == "inside HDF5's writes"}
    if small_fs.mounted:
        out = small_fs.root / "c.h5"
        device = r"interptool-test-\w+ \(mounted at " + re.escape(str(small_fs.root)) + r"\)"
        first = _run_child(tmp_path, n=N_BIG, out=str(out), layers=BIG_LAYERS,
                           batch=BATCH_BIG, dtype="float32", **opts)
        _disk_full_then_resume(tmp_path, out, first, device, lambda: small_fs.resize("64m"))
    else:  # no mount permission: the same fault, injected at the 5th flush (3 batches)
        out = tmp_path / "inj" / "c.h5"
        out.parent.mkdir()
        first = _run_child(tmp_path, n=N_BIG, out=str(out), layers=BIG_LAYERS,
                           batch=BATCH_BIG, dtype="float32", inject_enospc_at=5)
        _disk_full_then_resume(tmp_path, out, first, r".+", lambda: None)


def test_injected_enospc_inside_a_flush(tmp_path):
    # always runs (no mount needed): the 6th flush (after attributes: init, 4 batches) fails
    out = tmp_path / "inj" / "c.h5"
    out.parent.mkdir()
    first = _run_child(tmp_path, n=N_BIG, out=str(out), layers=BIG_LAYERS, batch=BATCH_BIG,
                       dtype="float32", inject_enospc_at=6)
    _disk_full_then_resume(tmp_path, out, first, r".+", lambda: None)
    with ActivationCache(out) as c:
        assert c.n == N_BIG


def test_full_disk_at_start_leaves_nothing(tmp_path):
    fs = SmallFS(tmp_path / "tiny", "64k")  # smaller than the writer's space reserve
    try:
        if fs.mounted:
            out = fs.root / "c.h5"
            first = _run_child(tmp_path, n=8, out=str(out))
        else:
            out = tmp_path / "inj" / "c.h5"
            out.parent.mkdir()
            first = _run_child(tmp_path, n=8, out=str(out), inject_enospc_at=1)
        assert first.returncode == 2, first.stderr
        err = first.stderr.strip()
        assert re.fullmatch(r"interptool cache: error: no space left on .+ while writing "
                            rf"{re.escape(str(out))}; nothing was cached yet; free space and "
                            r"re-run the same command", err), err
        assert list(out.parent.iterdir()) == []  # no 0-byte file, no lock file
    finally:
        fs.close()


def test_atomic_text_on_a_full_disk_raises_and_leaves_no_tmp(tmp_path, monkeypatch):
    fs = SmallFS(tmp_path / "t", "64k")
    try:
        folder = fs.root if fs.mounted else tmp_path / "t"
        target = folder / "summary.json"
        target.write_text("old")
        if not fs.mounted:
            import interptool._provenance as prov

            def full(path):  # what NFS answers at fsync when the server's disk is full
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(prov, "fsync_file", full)
        with pytest.raises(NoSpaceError, match=rf"no space left on .+ while writing "
                                               rf"{re.escape(str(target))}; free space"):
            atomic_write_text(target, "x" * (1 << 20))
        assert target.read_text() == "old"
        assert [p.name for p in folder.iterdir()] == ["summary.json"]
    finally:
        fs.close()


def test_finished_cache_in_a_read_only_folder_is_still_a_hit(tmp_path, monkeypatch):
    fs = SmallFS(tmp_path / "ro", "8m")
    try:
        folder = fs.root if fs.mounted else tmp_path / "ro"
        loaded, ds = FakeLoaded(make_student()), FakeDataset(8)
        path = cache_activations(loaded, ds, ["layer4"], folder / "c.h5", batch_size=4)
        if fs.mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        else:  # no mount permission: the lock file cannot be created, as on a read-only mount
            import interptool._locks as locks

            real_open = locks.os.open

            def ro_open(p, flags, *a):
                if str(p).endswith(".lock") and flags & os.O_CREAT:
                    raise OSError(errno.EROFS, "Read-only file system")
                return real_open(p, flags, *a)

            monkeypatch.setattr(locks.os, "open", ro_open)
        assert run_cache(loaded, ds, ["layer4"], path, batch_size=4).status == "hit"
        from interptool._locks import LockUnavailableError

        with pytest.raises(CacheMismatchError, match="layers"):  # read, so it can be told
            run_cache(loaded, ds, ["layer3"], path, batch_size=4)
        with pytest.raises(LockUnavailableError, match=r"new\.h5\.lock: cannot create the "
                                                        r"lock file .*choose another --out"):
            run_cache(loaded, ds, ["layer4"], folder / "new.h5", batch_size=4)
    finally:
        fs.close()


def test_atomic_path_keeps_the_suffix_and_cleans_up(tmp_path):
    from interptool._provenance import atomic_path

    target = tmp_path / "iou.npz"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path
        np.savez(tmp, iou=np.arange(3))
    assert np.load(target)["iou"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="boom"):
        with atomic_path(target) as tmp:
            np.savez(tmp, iou=np.arange(5))
            raise ValueError("boom")
    assert np.load(target)["iou"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["iou.npz"]
