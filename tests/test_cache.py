"""Activation-cache writer, hooks, reader and `interptool cache` CLI.

Known answers come from running the same model directly with hooks written here (not the
package's), on the same batches, so equality is exact.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from interptool.cache import ActivationCache, cache_activations, capture_layers, run_cache
from interptool.cache._format import chunk_rows
from interptool.errors import CacheError, ConfigError, DataError
from interptool.loading import ToNormalizedChannelsLast, split_normalization
from interptool.loading._zoo import ZOO

# -- stand-ins with the attributes of LoadedModel / ImageDataset (docs/architecture.md) ------


class FakePre:
    """Preprocessing stand-in: 32 px, eval = resize+centre crop, probe = resize only."""

    def __init__(self, size: int = 32) -> None:
        self.input_size = (3, size, size)
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.25, 0.25, 0.25)

    def _last(self, channels_last: bool) -> list:
        if channels_last:  # the same values, laid out as the cache feeds conv models on the CPU
            return [ToNormalizedChannelsLast(self.mean, self.std)]
        return [T.ToTensor(), T.Normalize(self.mean, self.std)]

    def eval_transform(self, *, channels_last: bool = False):
        s = self.input_size[1]
        return T.Compose([T.Resize(s), T.CenterCrop(s), *self._last(channels_last)])

    def probe_transform(self, *, channels_last: bool = False):
        s = self.input_size[1]
        return T.Compose([T.Resize((s, s)), *self._last(channels_last)])

    def to_dict(self):
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std)}


@dataclass
class FakeLoaded:
    model: nn.Module
    arch: str = "interptool:cw-student"
    checkpoint_sha256: str | None = None
    device: str = "cpu"
    preprocessing: FakePre = field(default_factory=FakePre)
    name: str = "cw-student"

    def to_dict(self):
        return {"arch": self.arch, "name": self.name, "checkpoint_sha256": self.checkpoint_sha256}


def make_student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ZOO["cw-student"](num_classes=10).eval()
    # Non-trivial BatchNorm statistics so that pre-ReLU outputs have both signs.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model


class _TorchDS(torch.utils.data.Dataset):
    def __init__(self, ds: FakeDataset, transform, skip_bad: bool) -> None:
        self.ds, self.transform, self.skip_bad = ds, transform, skip_bad

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        self.ds.on_item(i)
        try:
            img = self.ds.load_image(i)
        except DataError:
            if self.skip_bad:
                return None
            raise
        return self.transform(img), int(self.ds.labels[i]), i


class FakeDataset:
    """Deterministic random RGB images (sizes vary so the crop matters); some may be 'bad'."""

    def __init__(self, n: int = 20, seed: int = 0, bad=(), kill_at: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.spec = f"fake:n={n}&seed={seed}"
        self.ids = [f"cls{i % 3}/img_{i:03d}.png" for i in range(n)]
        self.labels = (np.arange(n) * 7 % 10).astype(np.int64)
        self._imgs = [
            rng.integers(0, 256, (36 + i % 5, 40, 3), dtype=np.uint8) for i in range(n)
        ]
        self.bad = set(bad)
        self.kill_at = kill_at
        h = hashlib.sha256()
        for i, lab, im in zip(self.ids, self.labels, self._imgs):
            h.update(f"{i}:{lab}:{im.shape}".encode())
        self.fingerprint = h.hexdigest()

    def __len__(self) -> int:
        return len(self.ids)

    def on_item(self, i: int) -> None:
        """Test hooks for the resume tests: die at item ``kill_at``; report progress."""
        if self.kill_at is not None and i == self.kill_at:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        marker = os.environ.get("INTERPTOOL_TEST_MARKER")
        if marker:
            Path(marker).write_text(str(i))
            time.sleep(float(os.environ.get("INTERPTOOL_TEST_DELAY", "0")))

    def load_image(self, i: int) -> Image.Image:
        if i in self.bad:
            raise DataError(f"{self.ids[i]}: cannot decode image (truncated file); fix or remove it")
        return Image.fromarray(self._imgs[i])

    def torch_dataset(self, transform, skip_bad: bool = False):
        return _TorchDS(self, transform, skip_bad)


def direct_outputs(model, ds, layers, batch_size, transform=None, keep=None,
                   channels_last=True):
    """Logits and layer outputs computed here with our own hooks, batch by batch; by default
    from channels-last input, as the cache feeds convolutional models on the CPU (the
    default layout rounds differently in the last bits)."""
    transform = transform or FakePre().eval_transform()
    modules = dict(model.named_modules())
    store: dict[str, list] = {k: [] for k in layers}
    handles = [
        modules[k].register_forward_hook(lambda m, i, o, k=k: store[k].append(o.detach().clone()))
        for k in layers
    ]
    idx = [i for i in range(len(ds)) if keep is None or i in keep]
    logits = []
    try:
        with torch.no_grad():
            for s in range(0, len(idx), batch_size):
                x = torch.stack([transform(ds.load_image(i)) for i in idx[s : s + batch_size]])
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                logits.append(model(x))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(logits).numpy(), {k: torch.cat(v).numpy() for k, v in store.items()}


# -- features, logits, labels ------------------------------------------------------------------


def test_features_logits_labels_equal_direct_forward(tmp_path):
    model = make_student()
    ds = FakeDataset(20)
    # layer1.0.bn1 is followed by an in-place ReLU: the cached copy must keep its negatives.
    layers = ["layer3", "layer1.0.bn1", "layer4"]
    path = run_cache(FakeLoaded(model), ds, layers, tmp_path / "a.h5", batch_size=8,
                     dtype="float32").path
    logits, feats = direct_outputs(model, ds, layers, 8)
    with ActivationCache(path) as c:
        assert c.n == 20 and c.layers == layers
        np.testing.assert_array_equal(c.logits, logits)
        np.testing.assert_array_equal(c.labels, ds.labels)
        assert c.ids == ds.ids
        for k in layers:
            got = c.features(k)[:]
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, feats[k])
            np.testing.assert_array_equal(c.feature_max(k), feats[k].max(axis=(2, 3)))
        assert (c.features("layer1.0.bn1")[:] < 0).any()
        blocks = list(c.iter_features("layer4", batch_size=7))
        assert [s for s, _ in blocks] == [0, 7, 14]
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), feats["layer4"])
        a = c.attrs
        for key in ("format", "complete", "n_done", "model", "arch", "checkpoint_sha256",
                    "preprocessing", "data_spec", "data_fingerprint", "layers", "layer_shapes",
                    "versions", "seed", "created", "skipped"):
            assert key in a, key
        assert a["complete"] is True or a["complete"] == 1
        assert a["data_fingerprint"] == ds.fingerprint and a["data_spec"] == ds.spec
        assert a["layer_shapes"] == {k: list(feats[k].shape[1:]) for k in layers}
        assert a["preprocessing"] == FakePre().to_dict()
        assert a["skipped"] == [] and a["seed"] == 0 and a["transform"] == "eval"
        assert a["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
        assert a["versions"]["h5py"] == h5py.__version__ and a["versions"]["interptool"]
        assert a["skip_bad"] is False and a["n_total"] == 20 and a["next_item"] == 20
        assert a["model"]["name"] == "cw-student"


def test_inplace_op_after_hooked_module_does_not_change_capture():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = conv(x)
        with capture_layers(model, ["0"]) as acts:
            model(x)
    assert (want < 0).any()
    torch.testing.assert_close(acts["0"], want, rtol=0, atol=0)


def test_float16_vs_float32(tmp_path):
    model = make_student()
    ds = FakeDataset(12)
    loaded = FakeLoaded(model)
    p16 = cache_activations(loaded, ds, ["layer3"], tmp_path / "h.h5", batch_size=6)
    p32 = cache_activations(loaded, ds, ["layer3"], tmp_path / "f.h5", batch_size=6,
                            dtype="float32")
    _, feats = direct_outputs(model, ds, ["layer3"], 6)
    with ActivationCache(p16) as a, ActivationCache(p32) as b:
        f16, f32 = a.features("layer3")[:], b.features("layer3")[:]
        assert f16.dtype == np.float16 and f32.dtype == np.float32
        np.testing.assert_array_equal(f16, feats["layer3"].astype(np.float16))
        np.testing.assert_array_equal(f32, feats["layer3"])
        # maxima are float32 and equal to the maxima of the stored (rounded) values
        assert a.feature_max("layer3").dtype == np.float32
        np.testing.assert_array_equal(a.feature_max("layer3"),
                                      f16.max(axis=(2, 3)).astype(np.float32))
        np.testing.assert_array_equal(a.logits, b.logits)  # logits always float32
        assert a.attrs["dtype"] == "float16" and b.attrs["dtype"] == "float32"


def test_chunks_along_n_and_compression(tmp_path):
    for row, item in [((512, 7, 7), 2), ((64, 56, 56), 2), ((10,), 4), ((2048, 14, 14), 4)]:
        rows = chunk_rows(row, item)
        nbytes = rows * int(np.prod(row)) * item
        assert rows == 1 or 64 * 1024 <= nbytes <= 1024 * 1024, (row, rows, nbytes)
    model = make_student()
    ds = FakeDataset(10)
    path = cache_activations(FakeLoaded(model), ds, ["layer2"], tmp_path / "z.h5",
                             batch_size=4, compression="gzip", dtype="float32")
    _, feats = direct_outputs(model, ds, ["layer2"], 4)
    with h5py.File(path) as f:
        d = f["features/layer2"]
        assert d.compression == "gzip" and d.chunks[1:] == d.shape[1:]
    with ActivationCache(path) as c:
        np.testing.assert_array_equal(c.features("layer2")[:], feats["layer2"])
    with pytest.raises(ConfigError, match="compression 'zip' is not supported"):
        cache_activations(FakeLoaded(model), ds, [], tmp_path / "q.h5", compression="zip")


def test_logits_only_and_probe_transform(tmp_path):
    model = make_student()
    ds = FakeDataset(9)
    ds.load_segmentation = lambda i: None  # Broden-like: the probe transform is chosen
    path = cache_activations(FakeLoaded(model), ds, None, tmp_path / "l.h5", batch_size=4)
    logits, _ = direct_outputs(model, ds, [], 4, transform=FakePre().probe_transform())
    with ActivationCache(path) as c:
        assert c.layers == [] and c.attrs["transform"] == "probe"
        np.testing.assert_array_equal(c.logits, logits)
        with pytest.raises(CacheError, match="layer4"):
            c.features("layer4")


def test_token_layers_of_a_vit(tmp_path):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                            img_size=32, patch_size=8, depth=2).eval()
    ds = FakeDataset(6)
    path = cache_activations(FakeLoaded(vit, arch="timm:vit_tiny"), ds, ["blocks.1"],
                             tmp_path / "v.h5", batch_size=4, dtype="float32")
    logits, feats = direct_outputs(vit, ds, ["blocks.1"], 4)
    with ActivationCache(path) as c:
        got = c.features("blocks.1")[:]
        assert got.shape == (6, 17, 192)  # 16 patches + class token, width 192
        np.testing.assert_array_equal(got, feats["blocks.1"])
        np.testing.assert_array_equal(c.feature_max("blocks.1"), feats["blocks.1"].max(axis=1))
        np.testing.assert_allclose(c.logits, logits, rtol=1e-6, atol=1e-6)


# -- hooks ---------------------------------------------------------------------------------


def _n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_after_success_and_exception(tmp_path):
    model = make_student()
    with capture_layers(model, ["layer2.0.conv1", "layer4"]) as acts:
        assert _n_hooks(model) == 2
        with torch.no_grad():
            model(torch.zeros(1, 3, 32, 32))
    assert set(acts) == {"layer2.0.conv1", "layer4"} and _n_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with capture_layers(model, ["layer3"]):
            raise RuntimeError("boom")
    assert _n_hooks(model) == 0
    # and through the writer, when the data fails mid-run
    with pytest.raises(DataError):
        cache_activations(FakeLoaded(model), FakeDataset(10, bad={6}), ["layer3"],
                          tmp_path / "x.h5", batch_size=4)
    assert _n_hooks(model) == 0


def test_unknown_layer_lists_close_names(tmp_path):
    model = make_student()
    with pytest.raises(CacheError, match=r"'layr4'.*layer4"):
        with capture_layers(model, ["layr4"]):
            pass
    with pytest.raises(CacheError, match="layer3.0.conv"):
        cache_activations(FakeLoaded(model), FakeDataset(4), ["layer3.0.conv3"], tmp_path / "u.h5")
    assert not (tmp_path / "u.h5").exists()  # nothing written for a bad request


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_gives_logits_only(tmp_path):
    model = make_student()
    traced = torch.jit.trace(model, torch.zeros(1, 3, 32, 32))
    ds = FakeDataset(5)
    with pytest.raises(CacheError, match="TorchScript"):
        cache_activations(FakeLoaded(traced), ds, ["layer4"], tmp_path / "t.h5")
    path = cache_activations(FakeLoaded(traced), ds, None, tmp_path / "t.h5", batch_size=5)
    logits, _ = direct_outputs(model, ds, [], 5)
    with ActivationCache(path) as c:
        np.testing.assert_allclose(c.logits, logits, rtol=1e-5, atol=1e-5)


# -- reuse, mismatch, incomplete, bad images ------------------------------------------------


def test_cache_hit_is_a_no_op_and_mismatch_errors(tmp_path):
    model = make_student()
    ds = FakeDataset(8)
    loaded = FakeLoaded(model)
    path = tmp_path / "c.h5"
    first = run_cache(loaded, ds, ["layer3", "layer4"], path, batch_size=4)
    assert first.status == "created"
    before = os.stat(path).st_mtime_ns
    again = run_cache(loaded, ds, ["layer4", "layer3"], path, batch_size=4)
    assert again.status == "hit" and "cache hit" in again.summary()
    sub = run_cache(loaded, ds, ["layer4"], path)  # a subset of the cached layers also hits
    assert sub.status == "hit"
    assert os.stat(path).st_mtime_ns == before
    with pytest.raises(CacheError, match=r"layers.*overwrite"):
        run_cache(loaded, ds, ["layer2"], path)
    with pytest.raises(CacheError, match="dtype"):
        run_cache(loaded, ds, ["layer4"], path, dtype="float32")
    with pytest.raises(CacheError, match="data_fingerprint differs"):
        run_cache(loaded, FakeDataset(9), ["layer4"], path)
    with pytest.raises(CacheError, match="weights_sha256 differs"):
        run_cache(FakeLoaded(make_student(seed=5)), ds, ["layer4"], path)
    redo = run_cache(loaded, ds, ["layer2"], path, overwrite=True)
    assert redo.status == "created"
    with ActivationCache(path) as c:
        assert c.layers == ["layer2"]


def test_foreign_file_is_not_clobbered(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("my notes")
    with pytest.raises(CacheError, match=r"notes\.h5: exists and is not an HDF5 file.*another "
                                         r"--out \(--overwrite would delete this file\)"):
        cache_activations(FakeLoaded(make_student()), FakeDataset(4), None, path)
    assert path.read_text() == "my notes"
    # an HDF5 file of someone else's: named as such, also kept
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(CacheError, match="not an interptool activation cache"):
        cache_activations(FakeLoaded(make_student()), FakeDataset(4), None, other)
    with h5py.File(other, "r") as f:
        assert f["x"][:].tolist() == [0, 1, 2]


def test_mismatch_messages_name_the_differences(tmp_path):
    loaded, ds = FakeLoaded(make_student()), FakeDataset(4)
    path = cache_activations(loaded, ds, None, tmp_path / "m.h5", batch_size=4)
    bigger = FakeLoaded(make_student(), preprocessing=FakePre(40))
    with pytest.raises(CacheError, match=r"preprocessing differs \(input_size: file has "
                                         r"\[3, 32, 32\], asked for \[3, 40, 40\]\)"):
        run_cache(bigger, ds, None, path)
    with_ckpt = FakeLoaded(make_student(), checkpoint_sha256="ab" * 32)
    with pytest.raises(CacheError, match=r"checkpoint_sha256 differs \(file: no checkpoint, "
                                         r"now: abababababab\.\.\.\)"):
        run_cache(with_ckpt, ds, None, path)


class _WantsSize(nn.Module):
    """Accepts only 16 px inputs, like a ViT built for one image size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        assert x.shape[-1] == 16, f"Input width ({x.shape[-1]}) doesn't match model (16)."
        return self.fc(self.conv(x).mean((2, 3)))


def test_forward_failure_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    loaded = FakeLoaded(_WantsSize().eval(), arch="custom:net", name="net")
    path = tmp_path / "f.h5"
    with pytest.raises(CacheError, match=r"model net failed on a batch of shape "
                                         r"\(4, 3, 32, 32\) \(AssertionError: Input width "
                                         r"\(32\).*check --image-size"):
        run_cache(loaded, FakeDataset(6), ["conv"], path, batch_size=4)
    assert not path.exists()  # nothing to resume: the corrected command starts afresh
    ok = FakeLoaded(_WantsSize().eval(), arch="custom:net", name="net",
                    preprocessing=FakePre(16))
    run = run_cache(ok, FakeDataset(6), ["conv"], path, batch_size=4)
    assert run.status == "created" and run.n_done == 6
    # through the CLI: exit code 2, one line, no traceback
    import interptool.cli as cli
    from interptool.cli import _cache

    monkeypatch.setattr(cli, "_COMMANDS", ["cache"])
    monkeypatch.setattr(_cache, "_load_model", lambda args: loaded)
    monkeypatch.setattr(_cache, "_open_dataset", lambda spec: FakeDataset(6))
    rc = cli.main(["cache", "--arch", "custom:net", "--data", "fake:", "--out",
                   str(tmp_path / "cli.h5"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("interptool cache: error: model net failed on a batch")


def test_interrupted_run_is_refused_then_resumed(tmp_path):
    model = make_student()
    layers = ["layer4"]
    path = tmp_path / "r.h5"
    with pytest.raises(DataError, match=r"cls1/img_013\.png"):
        run_cache(FakeLoaded(model), FakeDataset(20, bad={13}), layers, path, batch_size=4)
    with pytest.raises(CacheError, match=r"incomplete cache \(12 images.*[Rr]e-run"):
        ActivationCache(path)
    # the image is fixed (same ids, labels, sizes: same fingerprint) and the run resumes
    run = run_cache(FakeLoaded(model), FakeDataset(20), layers, path, batch_size=4)
    assert run.status == "resumed" and run.images_computed == 8
    one = cache_activations(FakeLoaded(model), FakeDataset(20), layers, tmp_path / "o.h5",
                            batch_size=4)
    assert_same_content(path, one)


def test_resume_with_other_numerics_is_refused_and_files_record_them(tmp_path):
    """A file records how its rows were rounded (device type; on CUDA the TF32 switches). An
    incomplete file started on a GPU (numerics edited to say so) is not resumed on the CPU:
    the rows would mix two roundings; the error names the field and both fixes. A file from
    before numerics were recorded resumes as before."""
    from interptool.cache import CacheMismatchError
    from interptool.cache._format import encode_attr

    model = make_student()
    path = tmp_path / "r.h5"
    with pytest.raises(DataError):
        run_cache(FakeLoaded(model), FakeDataset(12, bad={9}), ["layer4"], path, batch_size=4)
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["numerics"]) == {"device_type": "cpu",
                                                   "memory_format": "channels_last"}
    gpu = {"device_type": "cuda", "cudnn_allow_tf32": True, "matmul_allow_tf32": False}
    with h5py.File(path, "r+") as f:
        f.attrs["numerics"] = encode_attr("numerics", gpu)
    with pytest.raises(CacheMismatchError, match=r"numerics.*cuda.*same device.*--overwrite") as e:
        run_cache(FakeLoaded(model), FakeDataset(12), ["layer4"], path, batch_size=4)
    assert e.value.fields == ["numerics"]
    with h5py.File(path, "r+") as f:  # as written before numerics were recorded
        del f.attrs["numerics"]
    run = run_cache(FakeLoaded(model), FakeDataset(12), ["layer4"], path, batch_size=4)
    assert run.status == "resumed"
    with ActivationCache(path) as c:  # its first rows' numerics are unknown: not claimed
        assert c.n == 12 and "numerics" not in c.attrs


_PRECISION_PROBE = """
import json, torch
from interptool.common.numerics import fp32_precision
b = torch.backends
seen = [fp32_precision()]                      # torch's defaults
b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = False, True  # the legacy switches
seen.append(fp32_precision())
b.cudnn.conv.fp32_precision = "tf32"           # the per-operation settings: reading the
torch.set_float32_matmul_precision("highest")  # legacy switches now raises
seen.append(fp32_precision())
b.cudnn.conv.fp32_precision = "none"           # inherits from its parents
b.cudnn.fp32_precision = "ieee"
seen.append(fp32_precision())
print(json.dumps(seen))
"""


def test_cuda_numerics_are_read_through_torchs_precision_settings():
    """Since torch 2.9, reading the legacy allow_tf32 switches raises once a program used the
    per-operation precision settings: the cache reads the effective setting of each instead
    (in a child process: these are process-wide switches). Old files' booleans compare the
    same way."""
    import subprocess
    import sys

    from interptool.cache._writer import canonical_numerics

    run = subprocess.run([sys.executable, "-c", _PRECISION_PROBE], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    pairs = [(d["conv_fp32_precision"], d["matmul_fp32_precision"]) for d in seen]
    assert pairs == [("tf32", "ieee"), ("ieee", "tf32"), ("tf32", "ieee"), ("ieee", "ieee")]
    legacy = {"device_type": "cuda", "cudnn_allow_tf32": True, "matmul_allow_tf32": False}
    assert canonical_numerics(legacy) == {"device_type": "cuda", "conv_fp32_precision": "tf32",
                                          "matmul_fp32_precision": "ieee"}
    assert canonical_numerics({"device_type": "cpu"}) == {"device_type": "cpu"}


class _FlattensWithView(torch.nn.Module):
    """A conv model whose head assumes default strides (``view``), as older code does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 32 * 32, 10)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


@pytest.mark.parametrize("workers", [0, 1])
def test_channels_last_run_decodes_straight_into_channels_last_batches(workers):
    """A channels-last run's items carry 8-bit pixels and its collation normalises them into a
    channels-last batch (also in a worker process), so the forward pass gets its layout
    without a per-batch copy; bad images (None) are dropped as before; the values are the
    default transform's."""
    from interptool.cache._writer import _collate

    ds = FakeDataset(7)
    pre = FakePre()
    part, step = split_normalization(pre.eval_transform(channels_last=True))
    items = _TorchDS(ds, part, skip_bad=False)
    collate = functools.partial(_collate, step=step)
    loader = torch.utils.data.DataLoader(items, batch_size=4, num_workers=workers,
                                         collate_fn=collate)
    plain = _TorchDS(ds, pre.eval_transform(), skip_bad=False)
    for b, (x, y, idx) in enumerate(loader):
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        want = torch.stack([plain[i][0] for i in idx.tolist()])
        assert torch.equal(x, want)
        assert idx.tolist() == list(range(4 * b, min(4 * b + 4, 7)))
        assert y.dtype == torch.int64 and y.tolist() == [plain[i][1] for i in idx.tolist()]
    x, y, idx = collate([items[0], None, items[2]])
    assert idx.tolist() == [0, 2] and torch.equal(x, torch.stack([plain[0][0], plain[2][0]]))
    assert collate([None, None]) is None


class _OldStylePre(FakePre):
    """A preprocessing object written against the older interface: no ``channels_last``."""

    def eval_transform(self):
        return super().eval_transform()

    def probe_transform(self):
        return super().probe_transform()


class _TransformIgnoringDataset(FakeDataset):
    """A data set that hands out final tensors whatever transform it is given."""

    def torch_dataset(self, transform, skip_bad: bool = False):
        return _TorchDS(self, FakePre().eval_transform(), skip_bad)


def test_cache_runs_decode_into_channels_last_batches_and_old_interfaces_still_work(
        tmp_path, monkeypatch):
    """The cache's channels-last runs go through the normalising collation, and the model gets
    the loader's channels-last batch; runs in the default layout do not. A preprocessing
    object without the ``channels_last`` keyword and a data set that ignores the transform
    still cache, with the same values to the bit."""
    from interptool.cache import _writer

    calls = {"n": 0}
    real = _writer._collate

    def counting(items, step=None):
        calls["n"] += step is not None  # the collations of channels-last runs
        return real(items, step=step)

    monkeypatch.setattr(_writer, "_collate", counting)
    model = make_student()
    seen: list[tuple[bool, bool]] = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(
        (args[0].is_contiguous(memory_format=torch.channels_last), args[0].is_contiguous())))
    ds = FakeDataset(10)
    layers = ["layer4"]
    want_logits, want_feats = direct_outputs(model, ds, layers, 4)
    seen.clear()
    path = cache_activations(FakeLoaded(model), ds, layers, tmp_path / "a.h5", batch_size=4,
                             dtype="float32")
    assert calls["n"] == 3  # 10 images in batches of 4
    assert seen[-3:] == [(True, False)] * 3  # the loader's channels-last batch as it is
    runs = [path]
    calls["n"] = 0
    old_pre = FakeLoaded(model, preprocessing=_OldStylePre())
    runs.append(cache_activations(old_pre, ds, layers, tmp_path / "b.h5", batch_size=4,
                                  dtype="float32"))
    runs.append(cache_activations(FakeLoaded(model), _TransformIgnoringDataset(10), layers,
                                  tmp_path / "c.h5", batch_size=4, dtype="float32"))
    assert calls["n"] == 3  # only the last run's collation (its items are tensors already)
    hook.remove()
    for p in runs:
        with ActivationCache(p) as c:
            assert c.attrs["numerics"]["memory_format"] == "channels_last"
            np.testing.assert_array_equal(c.logits, want_logits)
            np.testing.assert_array_equal(c.features("layer4")[:], want_feats["layer4"])
    calls["n"] = 0
    cache_activations(FakeLoaded(model), ds, layers, tmp_path / "d.h5", batch_size=4,
                      dtype="float32", channels_last=False)
    assert calls["n"] == 0


def test_channels_last_input_by_default_on_cpu_else_the_default_layout(tmp_path):
    """Conv models get channels-last input on the CPU (faster oneDNN convolutions), recorded
    in numerics; their values equal a direct channels-last forward to the bit and a
    default-layout forward to float rounding. ``channels_last=False`` gives the default
    layout's values to the bit. A model that cannot take channels-last input (a ``view`` on
    a conv output) keeps the default layout by itself, and demanding it is a clear error."""
    from interptool.cache._errors import CacheError

    model = make_student()
    ds = FakeDataset(12)
    layers = ["layer3", "layer4"]
    cl_logits, cl_feats = direct_outputs(model, ds, layers, 4)
    plain_logits, plain_feats = direct_outputs(model, ds, layers, 4, channels_last=False)
    assert not np.array_equal(cl_feats["layer3"], plain_feats["layer3"])  # rounding differs
    np.testing.assert_allclose(cl_logits, plain_logits, rtol=1e-4, atol=1e-6)
    auto = cache_activations(FakeLoaded(model), ds, layers, tmp_path / "auto.h5", batch_size=4,
                             dtype="float32")
    off = cache_activations(FakeLoaded(model), ds, layers, tmp_path / "off.h5", batch_size=4,
                            dtype="float32", channels_last=False)
    for path, (want_logits, want_feats), numerics in (
            (auto, (cl_logits, cl_feats), {"device_type": "cpu",
                                           "memory_format": "channels_last"}),
            (off, (plain_logits, plain_feats), {"device_type": "cpu"})):
        with ActivationCache(path) as c:
            assert c.attrs["numerics"] == numerics
            np.testing.assert_array_equal(c.logits, want_logits)
            for k in layers:
                np.testing.assert_array_equal(c.features(k)[:], want_feats[k])

    viewer = _FlattensWithView().eval()
    with pytest.raises(RuntimeError, match="view"):  # the fault is real
        viewer(torch.zeros(1, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    path = cache_activations(FakeLoaded(viewer), ds, ["conv"], tmp_path / "v.h5", batch_size=4,
                             dtype="float32")
    logits, feats = direct_outputs(viewer, ds, ["conv"], 4, channels_last=False)
    with ActivationCache(path) as c:
        assert c.attrs["numerics"] == {"device_type": "cpu"}
        np.testing.assert_array_equal(c.logits, logits)
        np.testing.assert_array_equal(c.features("conv")[:], feats["conv"])
    with pytest.raises(CacheError, match="channels-last.*channels_last=None or False"):
        cache_activations(FakeLoaded(viewer), ds, ["conv"], tmp_path / "v2.h5", batch_size=4,
                          channels_last=True)


def test_prefetch_keeps_order_raises_in_place_and_stops():
    """The decoding thread's iterator: items in order, the source's error raised after the
    items before it (not earlier), and close() ends a thread blocked on a full queue."""
    import threading

    from interptool._workers import Prefetch

    def failing():
        yield from range(3)
        raise DataError("img_003.png: cannot decode")

    got = []
    it = Prefetch(failing(), depth=1)
    with pytest.raises(DataError, match="img_003"):
        for item in it:
            got.append(item)
    assert got == [0, 1, 2]
    produced = []

    def endless():
        while True:
            produced.append(1)
            yield len(produced)

    it = Prefetch(endless(), depth=2)
    assert [next(it), next(it)] == [1, 2]
    it.close()
    assert not any(t.name == "interptool-cache-decode" and t.is_alive()
                   for t in threading.enumerate())
    assert len(produced) <= 5  # bounded: two queued, one waiting to be put


def test_run_stopped_before_its_first_batch_leaves_no_file(tmp_path):
    """The first image fails: the file this run created holds no row, so it is removed (a
    0-row file would block the next run with another model as "made with other settings");
    fixed, the same command creates the full cache. (A hand-made file with attributes but no
    datasets still opens as 0 images: tests/test_cache_validation.py.)"""
    model = make_student()
    path = tmp_path / "first.h5"
    with pytest.raises(DataError, match=r"img_000"):
        run_cache(FakeLoaded(model), FakeDataset(8, bad={0}), ["layer4"], path, batch_size=4)
    assert not path.exists() and not list(tmp_path.iterdir())
    run = run_cache(FakeLoaded(model), FakeDataset(8), ["layer4"], path, batch_size=4)
    assert run.status == "created" and run.images_computed == 8


def test_skip_bad_lists_files_and_shrinks(tmp_path):
    model = make_student()
    bad = {2, 8, 9, 10, 11, 17}  # 8..11 is one whole batch
    ds = FakeDataset(18, bad=bad)
    run = run_cache(FakeLoaded(model), ds, ["layer3"], tmp_path / "s.h5", batch_size=4,
                    skip_bad=True, workers=2)
    keep = [i for i in range(18) if i not in bad]
    assert run.n_done == len(keep) and "6 bad image(s) skipped" in run.summary()
    with ActivationCache(run.path) as c:
        assert c.n == len(keep) and c.features("layer3").shape[0] == len(keep)
        assert c.attrs["skipped"] == [ds.ids[i] for i in sorted(bad)]
        assert c.attrs["skip_bad"] is True
        assert c.ids == [ds.ids[i] for i in keep]
        np.testing.assert_array_equal(c.labels, ds.labels[keep])
        # rows come from batches with holes, so compare image by image
        _, feats = direct_outputs(model, ds, ["layer3"], 1, keep=set(keep))
        np.testing.assert_allclose(c.features("layer3")[:], feats["layer3"].astype(np.float16),
                                   rtol=2e-3, atol=2e-3)
    # a complete cache with skipped files is not silently reused by a strict run
    with pytest.raises(CacheError, match="skip-bad"):
        run_cache(FakeLoaded(model), ds, ["layer3"], run.path, batch_size=4)


def test_bad_image_in_worker_names_the_file(tmp_path):
    import multiprocessing

    with pytest.raises(DataError) as info:
        cache_activations(FakeLoaded(make_student()), FakeDataset(16, bad={5}), None,
                          tmp_path / "w.h5", batch_size=4, workers=2)
    msg = str(info.value)
    assert "cls2/img_005.png" in msg and "Traceback" not in msg
    # the workers are gone while the error is held (torch's re-raised error kept the loader
    # alive in a reference cycle until the garbage collector ran, then waited 5 s a worker)
    assert multiprocessing.active_children() == []


# torch's SIGCHLD handler re-raising the death inside the loader's __del__ printed a traceback
# ahead of the one-line error (seen as this warning in 4 of 10 loaded runs before the fix)
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_worker_killed_is_a_clear_error(tmp_path):
    """A decoding worker killed (the out-of-memory killer's way) ends the run with a one-line
    CacheError saying so and what to change, not torch's traceback; no worker is left."""
    import multiprocessing

    # kill_at SIGKILLs the process that decodes item 9: a worker (never this one: workers=2)
    with pytest.raises(CacheError, match=r"worker process decoding images died .*--workers"):
        cache_activations(FakeLoaded(make_student()), FakeDataset(16, kill_at=9), None,
                          tmp_path / "k.h5", batch_size=4, workers=2)
    assert multiprocessing.active_children() == []


# -- helpers shared with test_cache_resume.py ---------------------------------------------

VOLATILE_ATTRS = {"created", "versions"}


def assert_same_content(a: str | Path, b: str | Path) -> None:
    """Every dataset and every deterministic attribute of two cache files are identical."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        assert sorted(names_a) == sorted(names_b)
        for name in names_a:
            if isinstance(fa[name], h5py.Dataset):
                assert fa[name].shape == fb[name].shape and fa[name].dtype == fb[name].dtype
                np.testing.assert_array_equal(fa[name][()], fb[name][()], err_msg=name)
        keys = set(fa.attrs) | set(fb.attrs)
        for k in sorted(keys - VOLATILE_ATTRS):
            va, vb = fa.attrs.get(k), fb.attrs.get(k)
            assert json.dumps(str(va)) == json.dumps(str(vb)), k


# -- CLI -----------------------------------------------------------------------------------


def test_cli_bad_layer_exit_2_without_traceback(tmp_path, monkeypatch, capsys):
    import interptool.cli as cli
    from interptool.cli import _cache

    monkeypatch.setattr(cli, "_COMMANDS", ["cache"])
    monkeypatch.setattr(_cache, "_load_model", lambda args: FakeLoaded(make_student()))
    monkeypatch.setattr(_cache, "_open_dataset", lambda spec: FakeDataset(6))
    out = tmp_path / "cli.h5"
    rc = cli.main(["cache", "--arch", "interptool:cw-student", "--data", "fake:",
                   "--layers", "layer3,layr4", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "interptool cache: error:" in err and "layr4" in err and "layer4" in err
    assert "Traceback" not in err and not out.exists()
    rc = cli.main(["cache", "--arch", "interptool:cw-student", "--data", "fake:",
                   "--layers", "layer3, layer4", "--out", str(out), "--quiet",
                   "--dtype", "float32", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert rc == 0 and str(out) in printed and "cached 6 images (layer3, layer4)" in printed
    rc = cli.main(["cache", "--arch", "interptool:cw-student", "--data", "fake:",
                   "--layers", "layer3,layer4", "--out", str(out), "--quiet", "--dtype", "float32"])
    assert rc == 0 and "cache hit" in capsys.readouterr().out


def test_real_model_and_concept_world(tmp_path, capsys):
    from interptool.data import open_dataset
    from interptool.loading import load_model

    loaded = load_model("interptool:cw-student")
    ds = open_dataset("builtin:concept-world?version=1&n=40&size=64")
    path = run_cache(loaded, ds, ["layer3", "layer4"], tmp_path / "cw.h5", batch_size=16,
                     dtype="float32").path
    # concept-world is Broden-style: the probe (no crop) transform is the default
    tf = loaded.preprocessing.probe_transform()
    modules = dict(loaded.model.named_modules())
    got: list = []
    h = modules["layer4"].register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
    try:
        with torch.no_grad():
            x = torch.stack([tf(ds.load_image(i)) for i in range(16)])
            # the cache feeds conv models channels-last on the CPU (same values to the bit)
            logits = loaded.model(x.contiguous(memory_format=torch.channels_last))
    finally:
        h.remove()
    with ActivationCache(path) as c:
        assert c.n == len(ds) and c.ids == list(ds.ids)
        np.testing.assert_array_equal(c.labels, ds.labels)
        np.testing.assert_array_equal(c.features("layer4")[:16], got[0].numpy())
        np.testing.assert_array_equal(c.logits[:16], logits.numpy())
        assert c.attrs["data_fingerprint"] == ds.fingerprint
        assert c.attrs["model"] == json.loads(json.dumps(loaded.to_dict(), default=str))
    proc = subprocess.run(
        [sys.executable, "-m", "interptool", "cache", "--arch", "interptool:cw-student",
         "--data", "builtin:concept-world?version=1&n=40&size=64", "--layers", "layer4",
         "--out", str(tmp_path / "cli.h5"), "--quiet"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "cli.h5") in proc.stdout and "40 images" in proc.stdout
    from interptool.cli import main

    rc = main(["cache", "--arch", "interptool:cw-student", "--data",
               "builtin:concept-world?version=1&n=40&size=64", "--layers", "layer9",
               "--out", str(tmp_path / "bad.h5"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "'layer9'" in err and "layer4" in err


def test_real_imagefolder_with_a_corrupt_file(tmp_path):
    from interptool.data import open_dataset
    from interptool.loading import load_model

    rng = np.random.default_rng(0)
    for c in "ab":
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "b" / "2.png").write_bytes(b"not a png")
    ds = open_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    loaded = load_model("interptool:cw-student")
    with pytest.raises(DataError, match=r"b/2\.png"):
        cache_activations(loaded, ds, ["layer4"], tmp_path / "strict.h5", batch_size=3)
    run = run_cache(loaded, ds, ["layer4"], tmp_path / "skip.h5", batch_size=3, skip_bad=True,
                    dtype="float32")
    keep = [i for i, name in enumerate(ds.ids) if name != "b/2.png"]
    tf = loaded.preprocessing.eval_transform()  # not Broden: the eval (crop) transform
    with torch.no_grad():
        want = loaded.model(torch.stack([tf(ds.load_image(i)) for i in keep]))
    with ActivationCache(run.path) as c:
        assert c.attrs["skipped"] == ["b/2.png"] and c.attrs["transform"] == "eval"
        assert c.ids == [ds.ids[i] for i in keep]
        np.testing.assert_array_equal(c.labels, ds.labels[keep])
        np.testing.assert_allclose(c.logits, want.numpy(), rtol=1e-5, atol=1e-5)


def test_write_cache_from_arrays_round_trip(tmp_path):
    from interptool.cache import write_cache

    rng = np.random.default_rng(3)
    feats = rng.normal(size=(5, 4, 3, 3)).astype(np.float32)
    path = write_cache(tmp_path / "w.h5", logits=rng.normal(size=(5, 2)), labels=[0, 1, 0, 1, 1],
                       ids=list("abcde"), features={"conv": feats}, dtype="float16")
    with ActivationCache(path) as c:
        assert c.ids == list("abcde") and c.layers == ["conv"]
        stored = c.features("conv")[:]
        np.testing.assert_array_equal(stored, feats.astype(np.float16))
        np.testing.assert_array_equal(c.feature_max("conv"), stored.max(axis=(2, 3)))


def test_bad_arguments_are_clear_errors(tmp_path):
    from interptool.errors import ConfigError

    loaded, ds = FakeLoaded(make_student()), FakeDataset(4)
    with pytest.raises(ConfigError, match="bfloat16.*float16, float32"):
        cache_activations(loaded, ds, None, tmp_path / "d.h5", dtype="bfloat16")
    with pytest.raises(ConfigError, match="batch_size"):
        cache_activations(loaded, ds, None, tmp_path / "d.h5", batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda'.*--device cpu"):
            cache_activations(loaded, ds, None, tmp_path / "d.h5", device="cuda")
    assert not (tmp_path / "d.h5").exists()


def test_leading_tokens_of_the_model_are_recorded(tmp_path):
    # LoadedModel.num_prefix_tokens / token_grid (e.g. DeiT distilled: class + distillation
    # tokens on a 14 x 14 grid); read when the loader provides them, absent otherwise
    loaded = FakeLoaded(make_student())
    plain = cache_activations(loaded, FakeDataset(4), None, tmp_path / "plain.h5", batch_size=4)
    loaded.num_prefix_tokens, loaded.token_grid = 2, (14, 14)
    tok = cache_activations(loaded, FakeDataset(4), None, tmp_path / "tok.h5", batch_size=4)
    with ActivationCache(plain) as a, ActivationCache(tok) as b:
        assert "num_prefix_tokens" not in a.attrs and "token_grid" not in a.attrs
        assert b.attrs["num_prefix_tokens"] == 2 and b.attrs["token_grid"] == [14, 14]
