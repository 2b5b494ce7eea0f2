"""Exact streaming quantiles and the Pillow-identical map resize used by dissection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from interptool.analyzers.dissection._quantile import ExactQuantile, topk_needed
from interptool.analyzers.dissection._resize import resize_maps


def _stream(x: np.ndarray, q: float, block: int) -> np.ndarray:
    """Feed (N, U, P) values per block of images; return per-unit thresholds."""
    n, u, p = x.shape
    est = ExactQuantile(u, n * p, 1 - q)
    for s in range(0, n, block):
        est.add(torch.from_numpy(x[s : s + block]).permute(1, 0, 2).reshape(u, -1))
    return est.result(), est


@pytest.mark.parametrize("n,u,p,q", [(50, 6, 9, 0.005), (3, 4, 4, 0.005), (1, 2, 1, 0.005),
                                     (120, 5, 49, 0.005), (20, 3, 4, 0.3), (37, 3, 4, 0.5),
                                     (9, 2, 16, 0.999)])
@pytest.mark.parametrize("block", [1, 7, 1000])
def test_exact_quantile_equals_numpy(n, u, p, q, block):
    rng = np.random.default_rng(n * 7 + u)
    x = rng.standard_normal((n, u, p)).astype(np.float32)
    x[:, 0] = np.maximum(x[:, 0], 0)  # many ties at zero (ReLU)
    x[:, 1] = np.round(x[:, 1])  # many ties everywhere
    got, _ = _stream(x, q, block)
    ref = np.quantile(x.transpose(1, 0, 2).reshape(u, -1).astype(np.float64), 1 - q, axis=1)
    np.testing.assert_array_equal(got, ref)  # bit-identical, not just close


def test_topk_needed_is_small():
    # the 0.995 quantile of 1e6 values needs only the largest ~5000
    assert topk_needed(1_000_000, 0.995) == 1_000_000 - int(999_999 * 0.995)
    assert topk_needed(1, 0.995) == 1


def test_resize_known_values():
    # 2x2 -> 4x4, Pillow bilinear with half-pixel centres: profile [1, .75, .25, 0]
    x = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    prof = np.array([1.0, 0.75, 0.25, 0.0])
    np.testing.assert_allclose(resize_maps(x, (4, 4))[0].numpy(), np.outer(prof, prof))


@pytest.mark.parametrize("shape", [(7, 7, 112, 112), (2, 2, 32, 32), (4, 4, 32, 32),
                                   (7, 9, 30, 50), (14, 14, 113, 97), (1, 1, 5, 5),
                                   (13, 11, 5, 29), (16, 16, 16, 16), (12, 12, 6, 12)])
def test_resize_bit_identical_to_pillow(shape):
    h, w, sh, sw = shape
    rng = np.random.default_rng(h * 100 + sw)
    x = (rng.standard_normal((12, h, w)) * 3).astype(np.float32)
    x[:4] = np.maximum(x[:4], 0)
    ours = resize_maps(torch.from_numpy(x), (sh, sw)).numpy()
    ref = np.stack([np.asarray(Image.fromarray(m, mode="F").resize((sw, sh), Image.BILINEAR))
                    for m in x])
    np.testing.assert_array_equal(ours, ref)
