"""Dissection on CUDA equals dissection on the CPU (run only where a GPU is present).

Documented tolerance: **none, results are identical**. The quantile state keeps stored
float32 activations (``topk`` selects, it does not compute) and the final blend runs in numpy
on the host; the masks come from float64 sums of Pillow's taps in Pillow's order, one
elementwise kernel per operation on both devices (no fused multiply-add across them), and
the counts are int64. A difference on some GPU would be a bug, not noise.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from interptool.analyzers.dissection import Dissection
from interptool.analyzers.dissection._quantile import ExactQuantile
from interptool.analyzers.dissection._resize import masked_pixels, resize_maps
from interptool.analyzers.dissection._tally import TallyAccumulator, seg_item
from interptool.cache import write_cache
from interptool.data import Segmentation

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]

CUDA = torch.device("cuda")
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
    kw = dict(quantile=0.1, checksum=False, top_images=2, categories=["object", "scene"])
    gpu = Dissection(device="cuda", **kw).run(path, "l", probe)
    cpu = Dissection(device="cpu", **kw).run(path, "l", probe)
    for name in ("thresholds", "iou", "intersect", "label_area", "unit_area", "unit_cat_area",
                 "best_label", "best_iou", "top_images", "top_maps"):
        np.testing.assert_array_equal(getattr(gpu, name), getattr(cpu, name), err_msg=name)
    assert gpu.config["device"] == "cuda"
