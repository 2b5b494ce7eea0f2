"""CUDA results equal CPU results, within a documented tolerance per area (run only where a
GPU is present; the device under test is the module constant ``CUDA``, which
``INTERPTOOL_GPU_DRY_RUN=1`` sets to the CPU to check the tests' use of the API without a GPU).

Float32 work on the two devices rounds differently (cuDNN/cuBLAS pick other algorithms and
summation orders than the CPU kernels), so it is compared against a tolerance scaled by the
size of the values; float64 work and integer counts are compared much more tightly or exactly.
Tolerances, and why:

* **dissection** (quantiles, masked pixels, tally, the whole analysis, the detector-count
  bootstrap): **identical**. The bootstrap's weighted sums are float64 sums of integer counts
  times integer weights (exact whatever the summation order). The
  quantile state keeps stored float32 activations (``topk`` selects, it does not compute) and
  the final blend runs in numpy on the host; the masks come from float64 sums of Pillow's taps
  in Pillow's order, one elementwise kernel per operation on both devices (no fused
  multiply-add across them), and the counts are int64. A difference would be a bug, not noise.
* **cache** (logits and layer outputs of a small ResNet, float32 storage): ``rtol 1e-4`` plus
  ``atol 3e-5 x`` the largest magnitude of that array, with TF32 off (cuDNN and cuBLAS
  ``allow_tf32 = False``): convolutions then differ by float32 rounding of other summation
  orders only. Measured on the CPU for this net and these images, float32 against float64:
  at most 4.6e-7 x scale per layer, so the tolerance has a margin of ~60 for the other
  device's rounding (and cuDNN's Winograd/FFT algorithms). PyTorch's default turns TF32 on for
  cuDNN convolutions (inputs rounded to 10 mantissa bits, unit roundoff ~5e-4): emulated on
  the CPU (inputs and weights truncated) it moved the layers by up to 3.1e-3 x scale, so
  under that default the tolerance is ``2e-2 x`` scale
  (:func:`test_cache_on_cuda_with_torch_default_tf32`). Ids, labels and the cache's identity
  attributes are equal exactly, and ``feature_max`` equals the maxima of the stored features
  exactly on each device (both rounded on the device the same way).
* **similarity bootstrap**: (a) K <= ``EXACT_K`` keeps float64 class sums (the device does
  the matmuls, the host the metrics): point estimates, intervals and replicates within
  ``rtol 1e-9`` (float64 summation order). (b) K > ``EXACT_K`` with the compiled kernels:
  float32 class sums (``stacked_class_sums`` on the device, then the same host kernels, where
  the CPU fuses each class's matmul into the kernel pass) differ by float32 rounding (~1e-7
  relative), which moves the replicates: ``1e-4`` absolute on Pearson, entropies, KL and JS,
  ``2e-4`` on the rank-grid Spearman (an entry may cross a grid cell), one top-k swap per
  row (``2 / (k K)``) on the top-k overlap; accuracy and top-1 agreement come from the
  weights alone (1e-12). Emulated on the CPU (the device path, ``fuse=False``, fed exact
  sums rounded once to float32) the replicates moved by at most 1.4e-8 and no top-k set
  changed. Without numba, K > EXACT_K also runs in float64 and (a)'s tolerance applies.
  Point estimates are host float64 on both devices (1e-12).
* **attribution** (captum through the adapter: integrated gradients, saliency, occlusion,
  Grad-CAM; TF32 off): per image, the relative Frobenius error of the raw map (and of the
  channel-reduced map) at most ``1e-3`` and every pixel within ``5e-3 x`` the image's largest
  magnitude. Why that loose: a gradient is discontinuous where a ReLU's input is 0, and
  rounding can flip such a gate. Measured on the CPU, float32 against float64 over 75
  images: typically 2e-7 (Frobenius), but one integrated-gradients image reached 2.0e-4
  (4.6e-4 x scale at one pixel); occlusion, a difference of nearly equal logits of this
  random net, up to 3e-5. Targets and predictions are equal exactly (the logits' top-two gap
  is checked to be far above rounding). captum called directly on CUDA equals the adapter on
  CUDA to ``rtol 1e-5`` (same kernels, same batches; cuDNN set deterministic). Faithfulness
  curves (softmax probabilities) within ``1e-6`` absolute, the normalised score within
  ``2e-6 / min p0`` (CPU float32 against float64: 1.5e-8 and 2e-8). SmoothGrad draws its
  noise from the input device's generator, so CUDA maps differ from CPU maps by design; on
  CUDA they are reproducible for a seed (``rtol 1e-6``, deterministic cuDNN).
* **CKA** (float64 throughout: streamed covariances, Gram matrices, the minibatch unbiased
  HSIC): the matrix within ``1e-10`` absolute; float64 summation order only.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from interptool.analyzers.dissection import Dissection
from interptool.analyzers.dissection._quantile import ExactQuantile
from interptool.analyzers.dissection._resize import masked_pixels, resize_maps
from interptool.analyzers.dissection._tally import TallyAccumulator, seg_item
from interptool.cache import write_cache
from interptool.data import Segmentation

# INTERPTOOL_GPU_DRY_RUN=1: the CPU stands in for CUDA, so the suite checks on every machine
# that these tests still use the API correctly (tests/test_gpu_dry_run.py); the numbers are
# then CPU against CPU and prove nothing about CUDA.
DRY_RUN = os.environ.get("INTERPTOOL_GPU_DRY_RUN") == "1"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not DRY_RUN and not torch.cuda.is_available(), reason="needs a GPU"),
]

CUDA = torch.device("cpu") if DRY_RUN else torch.device("cuda")
CPU = torch.device("cpu")


def _maps(k: int, h: int, w: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.maximum(rng.standard_normal((k, h, w)), 0).astype(np.float32))


@pytest.mark.parametrize("n,u,p,q", [(200, 8, 49, 0.005), (37, 3, 196, 0.05), (5, 2, 4, 0.5)])
def test_exact_quantile_on_cuda_equals_cpu_and_numpy(n, u, p, q):
    x = np.random.default_rng(n).gamma(1.0, size=(n, u, p)).astype(np.float32)
    x[:, 0] = np.round(x[:, 0])  # ties

    def run(device):
        est = ExactQuantile(u, n * p, 1 - q, device)
        for s in range(0, n, 16):
            est.add(torch.from_numpy(x[s : s + 16]).to(device).permute(1, 0, 2).reshape(u, -1))
        return est.result()

    ref = np.quantile(x.transpose(1, 0, 2).reshape(u, -1).astype(np.float64), 1 - q, axis=1)
    np.testing.assert_array_equal(run(CUDA), run(CPU))
    np.testing.assert_array_equal(run(CUDA), ref)


@pytest.mark.parametrize("shape", [(7, 7, 112, 112), (14, 14, 112, 112), (4, 4, 32, 32),
                                   (7, 9, 30, 50), (12, 12, 6, 12)])
def test_masked_pixels_on_cuda_equal_cpu(shape):
    h, w, sh, sw = shape
    x = _maps(60, h, w, seed=sh)
    exact = resize_maps(x, (sh, sw)).reshape(60, -1)
    t = exact.double().quantile(0.95, dim=1)
    t[3] = float(exact[3, 7])  # a threshold sitting exactly on an upsampled value

    def run(device):
        p, px = masked_pixels(x.to(device), (sh, sw), t.to(device))
        key = (p * sh * sw + px).cpu()
        return torch.sort(key).values

    assert torch.equal(run(CUDA), run(CPU))
    assert torch.equal(resize_maps(x.to(CUDA), (sh, sw)).cpu(), resize_maps(x, (sh, sw)))


def _segs(n: int, rng: np.random.Generator) -> list[SimpleNamespace]:
    out = []
    for i in range(n):
        pixel = {"a": rng.integers(0, 3, (1, 16, 16)), "b": rng.choice([0, 3, 4], (2, 16, 16))}
        image = {"s": np.array([5] if i % 2 else [], dtype=np.int64)}
        out.append(SimpleNamespace(size=(16, 16), pixel=pixel, image=image))
    return out


@pytest.mark.parametrize("mode", ["overlap", "image"])
def test_tally_on_cuda_equals_cpu(mode):
    rng = np.random.default_rng(3)
    feats = rng.gamma(1.0, size=(12, 6, 4, 4)).astype(np.float32)
    label_category = np.array([-1, 0, 0, 1, 1, 2])
    items = [seg_item(i, s, ["a", "b", "s"]) for i, s in enumerate(_segs(12, rng))]
    t = np.quantile(feats.transpose(1, 0, 2, 3).reshape(6, -1), 0.8, axis=1)

    def run(device):
        acc = TallyAccumulator(t, label_category, 3, device, mode)
        acc.add(torch.from_numpy(feats[:7]).to(device), items[:7])
        acc.add(torch.from_numpy(feats[7:]).to(device), items[7:])
        return acc.counts()

    gpu, cpu = run(CUDA), run(CPU)
    for key in cpu:
        np.testing.assert_array_equal(gpu[key], cpu[key], err_msg=key)
    assert cpu["unit_area"].sum() > 0


class _Probe:
    """Ten images: labels 1/2 (object) in rotating quadrants, scene 3 on odd images."""

    def __init__(self, n: int = 10):
        self.ids = [f"i{i}" for i in range(n)]
        self.spec, self.fingerprint = "gpu:probe", "gpu-probe"
        self.categories = ["object", "scene"]
        self.label_names = np.array(["-", "a", "b", "sky"])
        self.label_category = np.array([-1, 0, 0, 1])
        self.num_labels = 4

    def __len__(self):
        return len(self.ids)

    def load_segmentation(self, i):
        plane = np.zeros((8, 8), np.int64)
        r, c = divmod(i % 4, 2)
        plane[4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 1 + i % 2
        return Segmentation(size=(8, 8), pixel={"object": plane[None]},
                            image={"scene": np.array([3] if i % 2 else [], np.int64)})


def test_dissection_on_cuda_equals_cpu(tmp_path):
    probe = _Probe()
    feats = np.random.default_rng(7).gamma(1.0, size=(10, 5, 4, 4)).astype(np.float32)
    feats[:, :, :2, :2] += 2.0
    path = write_cache(tmp_path / "c.h5", logits=np.zeros((10, 2)), ids=probe.ids,
                       features={"l": feats},
                       attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    kw = dict(quantile=0.1, checksum=False, top_images=2, categories=["object", "scene"],
              bootstrap=300, seed=3)
    gpu = Dissection(device=str(CUDA), **kw).run(path, "l", probe)
    cpu = Dissection(device="cpu", **kw).run(path, "l", probe)
    for name in ("thresholds", "iou", "intersect", "label_area", "unit_area", "unit_cat_area",
                 "best_label", "best_iou", "top_images", "top_maps"):
        np.testing.assert_array_equal(getattr(gpu, name), getattr(cpu, name), err_msg=name)
    assert gpu.config["device"] == str(CUDA)
    # the detector-count bootstrap: weighted sums on the GPU, the same resamples exactly
    pd.testing.assert_frame_equal(gpu.bootstrap_samples, cpu.bootstrap_samples)
    st = cpu.block_stats
    W = np.random.default_rng(0).multinomial(st.n_blocks, np.full(st.n_blocks, 1 / st.n_blocks),
                                             size=64).astype(np.float64)
    for t in (0.0, 0.04, 0.3):
        on_gpu, on_cpu = st.evaluate(W, t, device=CUDA), st.evaluate(W, t)
        for key in on_cpu:
            np.testing.assert_array_equal(on_gpu[key], on_cpu[key], err_msg=f"{key} T={t}")


def test_dissection_on_cuda_with_mask_workers_equals_cpu(tmp_path):
    """Mask-decoding workers forked by a process that has initialised CUDA (they never touch
    it; the default on CUDA gives them most cores): the same counts as the CPU without."""
    probe = _Probe()
    feats = np.random.default_rng(11).gamma(1.0, size=(10, 5, 4, 4)).astype(np.float32)
    path = write_cache(tmp_path / "c.h5", logits=np.zeros((10, 2)), ids=probe.ids,
                       features={"l": feats},
                       attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    kw = dict(quantile=0.1, checksum=False, top_images=2, categories=["object", "scene"],
              batch_size=2)
    torch.zeros(1, device=CUDA)  # the context exists before the workers fork
    gpu = Dissection(device=str(CUDA), workers=2, **kw).run(path, "l", probe)
    cpu = Dissection(device="cpu", workers=0, **kw).run(path, "l", probe)
    assert gpu.config["threads"]["mask_workers"] == 2
    for name in ("thresholds", "iou", "intersect", "label_area", "unit_cat_area",
                 "top_images"):
        np.testing.assert_array_equal(getattr(gpu, name), getattr(cpu, name), err_msg=name)


def test_dissection_on_cuda_reading_a_mask_store_equals_cpu_decoding(tmp_path):
    """Masks written to a mask store by a CPU run and read back by a CUDA run (the tally then
    waits for no decoding): the same counts as the CPU decoding them."""
    from interptool.data import open_dataset

    spec = "builtin:concept-world?version=1&n=24&size=32"
    probe = open_dataset(spec)
    feats = np.random.default_rng(12).gamma(1.0, size=(24, 5, 4, 4)).astype(np.float32)
    path = write_cache(tmp_path / "c.h5", logits=np.zeros((24, 2)), ids=probe.ids,
                       features={"l": feats},
                       attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    kw = dict(quantile=0.1, checksum=False, top_images=2, batch_size=4)
    store = tmp_path / "store"
    cpu = Dissection(device="cpu", mask_store=store, **kw).run(path, "l", open_dataset(spec))
    gpu = Dissection(device=str(CUDA), mask_store=store, **kw).run(path, "l",
                                                                   open_dataset(spec))
    assert cpu.config["segmentations"]["source"] == "decoded and stored"
    assert gpu.config["segmentations"]["source"] == "read from the store"
    for name in ("thresholds", "iou", "intersect", "label_area", "unit_cat_area",
                 "top_images"):
        np.testing.assert_array_equal(getattr(gpu, name), getattr(cpu, name), err_msg=name)


# -- float32 on two devices: helpers ---------------------------------------------------------


@contextmanager
def _cuda_flags(*, conv_tf32: bool, matmul_tf32: bool = False, deterministic: bool = False):
    """TF32 for cuDNN convolutions and for cuBLAS float32 matmuls on or off, and cuDNN's
    deterministic algorithms, restored afterwards. No effect on the CPU."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic)
    cudnn.allow_tf32, matmul.allow_tf32 = conv_tf32, matmul_tf32
    cudnn.deterministic = deterministic
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic = before


@pytest.fixture
def ieee_fp32():
    """Float32 convolutions and matmuls in full float32 on CUDA (TF32 off)."""
    with _cuda_flags(conv_tf32=False):
        yield


def _assert_scaled_close(got: np.ndarray, want: np.ndarray, rtol: float, atol_scale: float,
                         what: str) -> None:
    """|got - want| <= rtol |want| + atol_scale * max |want|: float32 rounding of other
    summation orders is relative to the size of the whole array, not to each entry."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    scale = float(np.abs(want).max())
    assert scale > 0, f"{what}: all zero, the comparison would prove nothing"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_scale * scale, err_msg=what)


# -- cache ------------------------------------------------------------------------------------

CACHE_LAYERS = ["stem", "layer1.0.bn1", "layer3", "layer4"]


def _cache_on(device: torch.device, path):
    """Eight concept-world probe images through a seeded random cw-student, float32."""
    from interptool.cache import cache_activations
    from interptool.data import open_dataset
    from interptool.loading import load_model

    loaded = load_model("interptool:cw-student", num_classes=10, init_seed=3)
    ds = open_dataset("builtin:concept-world?version=1&n=8&size=64&seed=0")
    return cache_activations(loaded, ds, CACHE_LAYERS, path, batch_size=3, dtype="float32",
                             workers=0, threads=1, device=str(device)), ds


def _compare_caches(gpu_path, cpu_path, ds, rtol: float, atol_scale: float) -> None:
    from interptool.cache import ActivationCache

    with ActivationCache(gpu_path) as g, ActivationCache(cpu_path) as c:
        assert g.n == c.n == len(ds) and g.layers == c.layers == CACHE_LAYERS
        assert g.ids == c.ids == [str(i) for i in ds.ids]
        np.testing.assert_array_equal(g.labels, c.labels)
        np.testing.assert_array_equal(c.labels, ds.labels)
        for key in ("weights_sha256", "data_fingerprint", "layer_shapes", "dtype", "transform"):
            assert g.attrs[key] == c.attrs[key], key
        _assert_scaled_close(g.logits, c.logits, rtol, atol_scale, "logits")
        for layer in CACHE_LAYERS:
            got, want = g.features(layer)[:], c.features(layer)[:]
            assert got.dtype == want.dtype == np.float32
            _assert_scaled_close(got, want, rtol, atol_scale, layer)
            # the maxima are computed on the device from the same rounded copy
            np.testing.assert_array_equal(g.feature_max(layer), got.max(axis=(2, 3)))
            np.testing.assert_array_equal(c.feature_max(layer), want.max(axis=(2, 3)))
        # layer1.0.bn1 is followed by an in-place ReLU: both devices keep its negatives
        assert (g.features("layer1.0.bn1")[:] < 0).any()


def test_cache_on_cuda_equals_cpu(tmp_path, ieee_fp32):
    gpu, ds = _cache_on(CUDA, tmp_path / "gpu.h5")
    cpu, _ = _cache_on(CPU, tmp_path / "cpu.h5")
    _compare_caches(gpu, cpu, ds, rtol=1e-4, atol_scale=3e-5)


def test_cache_on_cuda_with_torch_default_tf32(tmp_path):
    """Under PyTorch's defaults (TF32 for cuDNN convolutions on Ampere and later, not for
    matmuls) the cache agrees with the CPU to TF32 precision: no row, layer or image mixed up.
    (On the CPU, emulating TF32 by truncating every convolution's inputs and weights to 10
    mantissa bits moved this net's layers by at most 3.1e-3 x scale.)"""
    with _cuda_flags(conv_tf32=True, matmul_tf32=False):
        gpu, ds = _cache_on(CUDA, tmp_path / "gpu.h5")
    cpu, _ = _cache_on(CPU, tmp_path / "cpu.h5")
    _compare_caches(gpu, cpu, ds, rtol=0.0, atol_scale=2e-2)
    from interptool.cache import ActivationCache

    # each file records how it was rounded (a resume must match it)
    with ActivationCache(gpu) as g, ActivationCache(cpu) as c:
        tf32 = {"conv_fp32_precision": "tf32", "matmul_fp32_precision": "ieee"}
        # a conv net on the CPU is fed channels-last input (oneDNN); CUDA keeps the default
        on_cpu = {"device_type": "cpu", "memory_format": "channels_last"}
        assert g.attrs["numerics"] == ({"device_type": "cuda", **tf32}
                                       if CUDA.type == "cuda" else on_cpu)
        assert c.attrs["numerics"] == on_cpu


# -- similarity bootstrap ---------------------------------------------------------------------


def _logits_cache(logits: np.ndarray, labels: np.ndarray, name: str) -> SimpleNamespace:
    """An in-memory stand-in for an ActivationCache (what compare_similarity reads)."""
    n = len(labels)
    return SimpleNamespace(logits=np.asarray(logits, np.float32),
                           labels=np.asarray(labels, np.int64), ids=[f"img{i}" for i in range(n)],
                           data_fingerprint="fp", name=name, path=f"{name}.h5", attrs={},
                           model_info=None)


def _structured(n: int, k: int, seed: int, noise: float, structure_seed: int = 0):
    """Logits with a shared class structure (so the similarity matrices correlate)."""
    base = np.random.default_rng(structure_seed).normal(size=(k, k)) * 2.0
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    z = base[y] + noise * rng.normal(size=(n, k))
    z[np.arange(n), y] += 4.0
    return z.astype(np.float32), y


def _similarity_on(device: torch.device, k: int, n: int, n_boot: int):
    from interptool.analyzers.similarity import compare_similarity

    z, y = _structured(n, k, seed=1, noise=1.0)
    s1, _ = _structured(n, k, seed=2, noise=2.0)
    s2, _ = _structured(n, k, seed=3, noise=1.0, structure_seed=5)
    caches = (_logits_cache(z, y, "t"), _logits_cache(s1, y, "kd"),
              _logits_cache(s2, y, "scratch"))
    return compare_similarity(*caches, k=5, n_boot=n_boot, seed=7, device=str(device))


def _compare_transfer(gpu, cpu, tolerance) -> None:
    """Same rows, same point estimates, intervals and replicates within ``tolerance(metric)``
    (an absolute tolerance, or None for float64 rtol 1e-9)."""
    eg, ec = gpu.estimates, cpu.estimates
    assert len(ec) > 0 and list(eg.columns) == list(ec.columns)
    for col in ("model", "role", "reference", "metric"):
        assert eg[col].tolist() == ec[col].tolist(), col
    np.testing.assert_array_equal(eg["temperature"], ec["temperature"])
    np.testing.assert_array_equal(eg["n_boot"], ec["n_boot"])
    # point estimates: host float64 from the same per-sample statistics on both devices
    np.testing.assert_allclose(eg["value"], ec["value"], rtol=1e-12, atol=1e-15)
    for i, row in ec.iterrows():
        tol = tolerance(row["metric"])
        for col in ("ci_low", "ci_high"):
            if tol is None:
                np.testing.assert_allclose(eg.at[i, col], row[col], rtol=1e-9, atol=1e-12,
                                           err_msg=f"{row['model']} {row['metric']} {col}")
            else:
                assert abs(eg.at[i, col] - row[col]) <= tol, (row["model"], row["metric"], col,
                                                              eg.at[i, col], row[col])
    assert gpu.bootstrap.keys() == cpu.bootstrap.keys()
    for key, want in cpu.bootstrap.items():
        tol = tolerance(key.rsplit("|", 1)[1])
        if tol is None:
            np.testing.assert_allclose(gpu.bootstrap[key], want, rtol=1e-9, atol=1e-12,
                                       err_msg=key)
        else:
            np.testing.assert_allclose(gpu.bootstrap[key], want, rtol=0, atol=tol, err_msg=key)
    # the intervals are real ones (not all NaN or zero-width)
    assert (ec["ci_high"] > ec["ci_low"]).sum() > len(ec) // 2


def test_similarity_bootstrap_small_k_on_cuda_equals_cpu():
    """K = 12 <= EXACT_K: float64 class sums on the device, the same host metrics."""
    from interptool.analyzers.similarity import _core

    assert 12 <= _core.EXACT_K
    gpu = _similarity_on(CUDA, k=12, n=600, n_boot=200)
    cpu = _similarity_on(CPU, k=12, n=600, n_boot=200)
    _compare_transfer(gpu, cpu, lambda metric: None)


def test_similarity_bootstrap_large_k_on_cuda_equals_cpu(ieee_fp32):
    """K = EXACT_K + 20: float32 class sums from ``stacked_class_sums`` on the device, the
    class-major kernels on the host (the CPU fuses each class's matmul into that pass)."""
    from interptool.analyzers.similarity import _core

    kk = _core.EXACT_K + 20
    k = 5
    fast = _core.kernels_pay_off(kk)
    if fast:
        assert _core.bootstrap_dtype(kk) == np.float32
    tol = {"spearman": 2e-4, "topk_overlap": 2.0 / (k * kk) + 1e-9}

    def tolerance(metric: str):
        if not fast:  # no numba: the float64 path at every K
            return None
        if metric in ("accuracy", "top1_agreement"):
            return 1e-12  # host float64 from the weights alone
        return tol.get(metric, 1e-4)

    gpu = _similarity_on(CUDA, k=kk, n=3 * kk, n_boot=48)
    cpu = _similarity_on(CPU, k=kk, n=3 * kk, n_boot=48)
    _compare_transfer(gpu, cpu, tolerance)


# -- attribution ------------------------------------------------------------------------------

# methods and parameters compared; each is a thin adapter over one captum call
ATTRIBUTION_PARAMS = {
    "integrated_gradients": {"steps": 8},
    "saliency": {},
    "occlusion": {"window": 8, "stride": 4},
    "grad_cam": {"layer": "layer2"},  # non-zero maps for all three images
}


def _attribution_model() -> nn.Module:
    """A seeded cw-student with non-trivial BatchNorm statistics (eval mode matters)."""
    from interptool.loading._zoo import ZOO

    torch.manual_seed(0)
    model = ZOO["cw-student"](num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _attribution_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 3, 9])


@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")
@pytest.mark.parametrize("method", list(ATTRIBUTION_PARAMS))
def test_attribution_on_cuda_equals_cpu(method, ieee_fp32):
    from interptool.analyzers.attribution import Attribution

    model = _attribution_model()
    x, y = _attribution_batch()
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(2, dim=1).values
    # predictions are compared exactly: the winner must lead far beyond float32 rounding
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3 * float(logits.abs().max())

    def run(device):
        return Attribution(method, keep_raw=True, **ATTRIBUTION_PARAMS[method]).run(
            model, x, labels=y, batch_size=4, device=str(device))

    gpu, cpu = run(CUDA), run(CPU)
    # the user's model is never moved (the adapter works on a prepared copy)
    assert all(p.device.type == "cpu" for p in model.parameters())
    np.testing.assert_array_equal(gpu.targets, y.numpy())
    np.testing.assert_array_equal(cpu.targets, y.numpy())
    np.testing.assert_array_equal(gpu.predictions, cpu.predictions)
    np.testing.assert_array_equal(cpu.predictions, logits.argmax(1).numpy())
    # the same settings; each records the device type it ran on and, on CUDA, how float32
    # convolutions and matmuls rounded (full float32 here: the ieee_fp32 fixture)
    on_cuda = ({"conv_fp32_precision": "ieee", "matmul_fp32_precision": "ieee"}
               if CUDA.type == "cuda" else {})
    assert gpu.params == {**cpu.params, "device_type": CUDA.type, **on_cuda}
    assert cpu.params["device_type"] == "cpu"
    for name, got, want in (("raw", gpu.raw, cpu.raw), ("maps", gpu.maps, cpu.maps)):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert got.shape == want.shape and got.shape[0] == 3, name
        for i in range(3):  # per image, on its own scale (see the module docstring)
            scale = float(np.abs(want[i]).max())
            assert scale > 0, f"{method} {name} image {i}: all zero"
            err = np.linalg.norm(got[i] - want[i]) / np.linalg.norm(want[i])
            assert err <= 1e-3, f"{method} {name} image {i}: relative error {err:.2e}"
            np.testing.assert_allclose(got[i], want[i], rtol=0, atol=5e-3 * scale,
                                       err_msg=f"{method} {name} image {i}")


def test_out_of_range_label_on_cuda_is_the_error_naming_the_image():
    """A plain nn.Module does not say how many classes it has; a label beyond its outputs
    must give the AnalysisError naming the image on CUDA too, where captum's gather would
    otherwise trip a device-side assert (reported later, and the CUDA context lost)."""
    from interptool.analyzers.attribution import Attribution
    from interptool.errors import AnalysisError

    model = _attribution_model()
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 99, 2])
    with pytest.raises(AnalysisError, match=r"label 99 of image '2' is out of range"):
        Attribution("saliency").run(model, x, labels=y, batch_size=4, device=str(CUDA))
    if CUDA.type == "cuda":  # the context still works
        assert float(torch.ones(2, device=CUDA).sum()) == 2.0


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_captum_direct_on_cuda_equals_the_adapter_on_cuda():
    """integrated gradients and saliency written directly against captum, on CUDA, give the
    adapter's maps on CUDA (same kernels and batches; deterministic cuDNN)."""
    from captum.attr import IntegratedGradients, Saliency

    from interptool.analyzers.attribution import Attribution

    model = _attribution_model()
    x, y = _attribution_batch()
    direct_model = copy.deepcopy(model)
    for m in direct_model.modules():  # what the adapter's private copy does
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    direct_model = direct_model.to(CUDA).eval()
    xc, yc = x.to(CUDA), y.to(CUDA)
    with _cuda_flags(conv_tf32=False, deterministic=True):
        ig = Attribution("integrated_gradients", keep_raw=True, steps=8).run(
            model, x, labels=y, batch_size=4, device=str(CUDA))
        ibs = ig.params["internal_batch_size"]
        assert ibs == 4  # the batch size bounds the rows of one pass
        ref_ig = IntegratedGradients(direct_model).attribute(
            xc.clone().requires_grad_(True), baselines=torch.zeros_like(xc), target=yc,
            n_steps=8, method="gausslegendre", internal_batch_size=max(ibs, len(x)))
        sal = Attribution("saliency", keep_raw=True).run(model, x, labels=y, batch_size=4,
                                                         device=str(CUDA))
        ref_sal = Saliency(direct_model).attribute(xc.clone().requires_grad_(True), target=yc)
    for name, res, ref in (("integrated_gradients", ig, ref_ig), ("saliency", sal, ref_sal)):
        ref = ref.detach().cpu().numpy()
        assert float(np.abs(ref).max()) > 0, name
        np.testing.assert_allclose(res.raw, ref, rtol=1e-5, atol=1e-7 * float(np.abs(ref).max()),
                                   err_msg=name)
        np.testing.assert_allclose(res.maps, np.abs(ref).sum(axis=1), rtol=1e-5,
                                   atol=1e-7 * float(np.abs(ref).sum(axis=1).max()), err_msg=name)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_faithfulness_on_cuda_equals_cpu(mode, ieee_fp32):
    """Deletion / insertion curves: the patch order comes from the same maps on the host,
    the perturbed forward passes (and the blur baseline) run on the device."""
    from interptool.analyzers.attribution import Attribution, faithfulness

    model = _attribution_model()
    x, y = _attribution_batch()
    maps = Attribution("saliency").run(model, x, labels=y, batch_size=4).maps

    def run(device):
        return faithfulness(model, x, maps, y.numpy(), mode=mode, patch=8, steps=8,
                            baseline="blur", batch_size=10, n_boot=200, seed=1,
                            device=str(device))

    gpu, cpu = run(CUDA), run(CPU)
    assert gpu.params == cpu.params
    np.testing.assert_array_equal(gpu.fractions, cpu.fractions)
    # softmax probabilities in float32: rounding of other summation orders (CPU float32
    # against float64 here: at most 1.5e-8)
    for name in ("curves", "auc", "curves_random", "auc_random", "p0"):
        np.testing.assert_allclose(getattr(gpu, name), getattr(cpu, name), rtol=0, atol=1e-6,
                                   err_msg=name)
    assert float(np.ptp(cpu.curves)) > 1e-3  # the perturbations change the probabilities
    # the normalised score divides a difference of two areas by p0: twice their error over p0
    atol = 2e-6 / float(cpu.p0.min())
    np.testing.assert_allclose(gpu.normalised, cpu.normalised, rtol=0, atol=atol)
    for key in ("auc", "normalised"):
        g, c = gpu.summary[key], cpu.summary[key]
        assert g.keys() == c.keys()
        for field_name, want in c.items():
            if isinstance(want, (float, np.floating)):
                assert abs(g[field_name] - want) <= atol, (key, field_name)


def test_smoothgrad_on_cuda_is_seeded():
    """SmoothGrad draws its noise with torch's generator of the input's device: on CUDA that
    is CUDA's generator, so maps are reproducible there for a seed (not equal to the CPU's,
    whose stream differs), and another seed gives other maps."""
    from interptool.analyzers.attribution import Attribution

    model = _attribution_model()
    x, y = _attribution_batch()

    def run(seed):
        with _cuda_flags(conv_tf32=False, deterministic=True):
            return Attribution("smoothgrad", nt_samples=4, stdevs=0.2, seed=seed).run(
                model, x, labels=y, batch_size=4, device=str(CUDA)).maps

    first, again, other = run(3), run(3), run(4)
    np.testing.assert_allclose(again, first, rtol=1e-6, atol=0)
    assert float(np.abs(other - first).max()) > 1e-3 * float(np.abs(first).max())


# -- CKA ----------------------------------------------------------------------------------------


def _reference_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Kornblith et al.'s formula with the centring matrix H, written out independently."""
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    return float(np.trace(K @ H @ L @ H) / np.sqrt(np.trace(K @ H @ K @ H) * np.trace(L @ H @ L @ H)))


@pytest.fixture
def cka_caches(tmp_path):
    """Two models' caches of the same 240 images: pooled layers l1, l2 (8 / 6 and 8 / 5
    channels, 3 x 3) and a wide layer w (32 x 4 x 4, flattened: the Gram path)."""
    from interptool.cache import write_cache

    rng = np.random.default_rng(0)
    n = 240
    a1 = rng.normal(size=(n, 8, 3, 3))
    a2 = np.tanh(a1 * 2) + 0.5 * rng.normal(size=a1.shape)
    b1 = np.einsum("nchw,cd->ndhw", a1, rng.normal(size=(8, 6))) + 0.3 * rng.normal(
        size=(n, 6, 3, 3))
    b2 = rng.normal(size=(n, 5, 3, 3))
    wa = rng.normal(size=(n, 32, 4, 4))
    wb = np.tanh(wa) + 0.5 * rng.normal(size=wa.shape)

    def make(name, feats):
        return write_cache(tmp_path / f"{name}.h5", logits=np.zeros((n, 3), np.float32),
                           labels=np.zeros(n, int), features=feats,
                           attrs={"data_fingerprint": "same", "model": {"name": name}},
                           dtype="float64")

    return (make("a", {"l1": a1, "l2": a2, "w": wa}), make("b", {"l1": b1, "l2": b2, "w": wb}),
            {"l1": (a1, b1), "w": (wa, wb)})


@pytest.mark.parametrize("layers,kwargs,method", [
    (["l1", "l2"], {}, "features"),
    (["l1", "l2"], {"batch_size": 7}, "features"),
    (["w"], {"pooling": "flatten", "max_memory": 2_000_000}, "gram"),
    (["l1", "l2"], {"minibatch": 32, "seed": 3}, "minibatch"),
    (["w"], {"pooling": "flatten", "minibatch": 16}, "minibatch"),
])
def test_cka_on_cuda_equals_cpu(cka_caches, layers, kwargs, method):
    from interptool.analyzers.cka import cka

    pa, pb, feats = cka_caches
    gpu = cka(pa, pb, layers, layers, device=str(CUDA), **kwargs)
    cpu = cka(pa, pb, layers, layers, device="cpu", **kwargs)
    assert gpu.method == cpu.method == method
    assert list(gpu.matrix.index) == list(cpu.matrix.index) == layers
    np.testing.assert_allclose(gpu.matrix.to_numpy(), cpu.matrix.to_numpy(), rtol=0, atol=1e-10)
    # the value itself, against the independent formula (pooled as cka pools)
    flatten = kwargs.get("pooling") == "flatten"
    a, b = feats[layers[0]]
    pool = (lambda v: v.reshape(len(v), -1)) if flatten else (lambda v: v.mean(axis=(2, 3)))
    exact = _reference_cka(pool(a), pool(b))
    if method != "minibatch":
        assert gpu.matrix.iloc[0, 0] == pytest.approx(exact, abs=1e-10)
    elif not flatten:  # the unbiased minibatch estimator is close to the exact value
        assert abs(gpu.matrix.iloc[0, 0] - exact) < 0.1
    else:  # 512 dimensions for 240 images: it removes the exact estimate's upward bias
        assert 0 < gpu.matrix.iloc[0, 0] < exact


def test_linear_cka_and_unbiased_hsic_on_cuda_equal_cpu():
    from interptool.analyzers.cka import linear_cka, unbiased_hsic

    rng = np.random.default_rng(4)
    X = rng.normal(size=(50, 7))
    Y = X @ rng.normal(size=(7, 4)) + 0.5 * rng.normal(size=(50, 4))
    want = linear_cka(X, Y)
    assert want == pytest.approx(_reference_cka(X, Y), abs=1e-12)
    got = linear_cka(torch.from_numpy(X).to(CUDA), torch.from_numpy(Y).to(CUDA))
    assert got == pytest.approx(want, abs=1e-12)
    K, L = torch.from_numpy(X @ X.T), torch.from_numpy(Y @ Y.T)
    h_cpu = float(unbiased_hsic(K, L))
    h_gpu = unbiased_hsic(K.to(CUDA), L.to(CUDA))
    assert h_gpu.device.type == CUDA.type
    assert float(h_gpu) == pytest.approx(h_cpu, rel=1e-12)
