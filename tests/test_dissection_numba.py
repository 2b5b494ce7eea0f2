"""The compiled (numba) tally kernel: masks bit-identical to Pillow, counts equal to the torch path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from interptool.analyzers.dissection import _numba as _dissection_numba
from interptool.analyzers.dissection import _tally as _dissection_tally
from interptool.analyzers.dissection._resize import resize_maps
from interptool.analyzers.dissection._tally import TallyAccumulator, seg_item

pytest.importorskip("numba")


def _ties(x: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Per map a threshold: an upsampled value (ties at T), a quantile, a source cell, < 0."""
    k = len(x)
    t = np.quantile(up.reshape(k, -1).astype(np.float64), 0.9, axis=1)
    for q in range(0, k, 3):
        t[q] = float(up[q].reshape(-1)[(7 * q) % up[q].size])  # exact upsampled value
    for q in range(1, k, 5):
        t[q] = float(x[q].reshape(-1)[q % x[q].size])  # a source cell
    t[2] = -0.25
    return t


@pytest.mark.parametrize("shape", [(7, 7, 112, 112), (14, 14, 112, 112), (2, 2, 32, 32),
                                   (7, 9, 30, 50), (1, 1, 5, 5), (16, 16, 16, 16),
                                   (12, 12, 6, 12), (13, 11, 5, 29)])  # last two shrink
def test_kernel_masks_equal_pillow(shape):
    # one label per pixel (label = pixel index) and one unit per map: the intersections are
    # the masks themselves, checked against Pillow and the torch emulation
    h, w, sh, sw = shape
    rng = np.random.default_rng(h * 100 + sw)
    k = 12
    x = np.maximum(rng.standard_normal((k, h, w)), 0).astype(np.float32)
    up = resize_maps(torch.from_numpy(x), (sh, sw)).numpy()
    pil = np.stack([np.asarray(Image.fromarray(m, mode="F").resize((sw, sh), Image.BILINEAR))
                    for m in x])
    np.testing.assert_array_equal(up, pil)
    t = _ties(x, up)
    P = sh * sw
    inter = np.zeros(k * P, np.int64)
    area, touched = _dissection_numba.tally_pairs(
        x, t, np.zeros(k, np.int64), np.arange(k), (sh, sw),
        np.arange(P, dtype=np.int32)[:, None], np.zeros(P, np.int64), P, 1, inter)
    want = pil.reshape(k, P).astype(np.float64) > t[:, None]
    np.testing.assert_array_equal(inter.reshape(k, P), want.astype(np.int64))
    np.testing.assert_array_equal(area, want.sum(1))
    np.testing.assert_array_equal(touched[:, 0], want.any(1))
    assert 0 < want.sum() < want.size


def _segs(rng, n):
    segs = []
    for i in range(n):
        size = (32, 32) if i % 3 else (20, 36)  # two segmentation sizes in one batch
        pixel = {"a": rng.integers(0, 3, (1, *size)),  # labels 0..2 (category 0)
                 "b": rng.choice([0, 3, 4], (2, *size)),  # two planes of category 1
                 "c": rng.choice([0, 5, 6], (1, *size)) if i % 4 else None}  # varying D
        pixel = {a: v for a, v in pixel.items() if v is not None}
        image = {"s": np.array([7, 7] if i % 2 else [], dtype=np.int64)}  # duplicates kept
        if i == 4:
            pixel = {}  # only image-level labels
        segs.append(SimpleNamespace(size=size, pixel=pixel, image=image))
    return segs


@pytest.mark.parametrize("mode", ["overlap", "image"])
@pytest.mark.parametrize("fmap", [(4, 4), (8, 8), (3, 5)])
def test_numba_tally_equals_torch_path(mode, fmap, monkeypatch):
    rng = np.random.default_rng(5)
    n, U = 12, 7
    label_category = np.array([-1, 0, 0, 1, 1, 2, 2, 3, -1])  # 7: image-level, 8: unused
    feats = rng.gamma(1.0, size=(n, U, *fmap)).astype(np.float32)
    feats[:, 0] = np.maximum(feats[:, 0] - 1.0, 0)  # sparse unit with ReLU zeros
    # thresholds at exact upsampled values: ties at T
    t = np.array([float(resize_maps(torch.from_numpy(feats[u % n, u][None]), (32, 32))
                        [0, 5, 3 + u]) for u in range(U)])
    t[1] = float(np.quantile(feats[:, 1], 0.9))
    t[2] = float(feats[:, 2].max()) + 1.0  # never fires
    items = [seg_item(i, s, ["a", "b", "c", "s"]) for i, s in enumerate(_segs(rng, n))]

    def run(use_numba: bool, pair_counts: int) -> dict:
        monkeypatch.setattr(_dissection_tally, "USE_NUMBA", use_numba)
        monkeypatch.setattr(_dissection_tally, "_PAIR_COUNTS", pair_counts)
        acc = TallyAccumulator(t, label_category, 4, torch.device("cpu"), mode)
        acc.add(torch.from_numpy(feats[:5]), items[:5])
        acc.add(torch.from_numpy(feats[5:]), items[5:])
        return acc.counts()

    got = run(True, 1 << 21)
    assert got["unit_area"].sum() > 0 and got["unit_area"][2] == 0
    for pair_counts in (1 << 21, 0):  # the torch path's per-pair and per-unit counting
        want = run(False, pair_counts)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_torch_path_when_numba_unusable(monkeypatch):
    # numba missing or failing to import: the accumulator silently takes the torch path
    monkeypatch.setattr(_dissection_numba, "AVAILABLE", False)
    called = []
    monkeypatch.setattr(_dissection_numba, "tally_pairs", lambda *a: called.append(a))
    assert not _dissection_numba.usable()
    seg = SimpleNamespace(size=(4, 4), pixel={"a": np.ones((1, 4, 4), np.int64)}, image={})
    acc = TallyAccumulator(np.array([0.5]), np.array([-1, 0]), 1, torch.device("cpu"))
    acc.add(torch.ones((1, 1, 2, 2)), [seg_item(0, seg, ["a"])])
    assert not called
    assert acc.counts()["intersect"].tolist() == [[0, 16]]
    assert acc.counts()["unit_cat_area"].tolist() == [[16]]
