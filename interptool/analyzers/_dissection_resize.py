"""Bilinear resizing of unit maps that reproduces NetDissect-Lite's ``imresize(..., mode='F')``.

NetDissect-Lite upsamples each unit's feature map to the segmentation size with
``scipy.misc.imresize(feature_map, (sh, sw), mode='F')``, which converts the map to a PIL
float32 ("F") image and calls ``Image.resize((sw, sh), Image.BILINEAR)``. Pillow resizes
separably: a horizontal pass then a vertical pass, each accumulating in double precision
with a triangle filter over half-pixel-centred sample positions and storing float32.

Here both passes use Pillow's own coefficient rule (``precompute_coeffs`` in
``libImaging/Resample.c``) as a few gather-multiply-add tensor operations, so a whole batch
of maps is resized at once on any torch device, summing the taps in Pillow's order and
rounding to float32 exactly where Pillow rounds: the result is bit-identical to Pillow. For upsampling this equals
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` up to float
rounding; the matrices also handle downsampling (the filter widens, as in Pillow).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=64)
def _pil_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of Pillow's normalised bilinear filter weights."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear (triangle) filter support is 1
    inv = 1.0 / filterscale
    w = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        # Pillow truncates (int cast) after adding 0.5; the operands are >= 0 after clamping.
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        total = 0.0
        for x in range(xmin, xmax):
            d = abs((x - center + 0.5) * inv)
            k = 1.0 - d if d < 1.0 else 0.0
            w[xx, x] = k
            total += k
        if total != 0.0:
            w[xx, xmin:xmax] /= total
    w.setflags(write=False)
    return w


@lru_cache(maxsize=64)
def _pil_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's filter window per output index as (index, weight) arrays of shape (out, taps).

    Windows shorter than the widest are padded with weight 0 (adding ``+0.0`` leaves a
    double-precision running sum unchanged, so padding does not alter any result).
    """
    w = _pil_bilinear_weights(in_size, out_size)
    spans = []
    for row in range(out_size):
        nz = np.flatnonzero(w[row])
        spans.append((int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 1))
    taps = max(b - a for a, b in spans)
    idx = np.zeros((out_size, taps), dtype=np.int64)
    wt = np.zeros((out_size, taps), dtype=np.float64)
    for row, (a, b) in enumerate(spans):
        idx[row, : b - a] = np.arange(a, b)
        idx[row, b - a :] = a
        wt[row, : b - a] = w[row, a:b]
    return idx, wt


def resize_weights(in_size: int, out_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pillow-bilinear resampling matrix (out_size, in_size) as a float64 tensor on ``device``."""
    return torch.tensor(_pil_bilinear_weights(int(in_size), int(out_size)), device=device)


def _resample_axis(x: torch.Tensor, axis: int, out_size: int) -> torch.Tensor:
    """One Pillow pass along ``axis`` of a float32 tensor; accumulate in float64, store float32.

    The taps are summed one at a time, left to right, exactly as Pillow's C loop does: a
    matrix product (BLAS, fused multiply-add, blocked sums) would round differently in
    about one pixel per thousand, which can flip a pixel sitting right at a threshold.
    """
    idx_np, wt_np = _pil_bilinear_taps(int(x.shape[axis]), int(out_size))
    idx = torch.from_numpy(idx_np).to(x.device)
    wt = torch.from_numpy(wt_np).to(x.device)
    shape = [1] * x.dim()
    shape[axis] = out_size
    x64 = x.to(torch.float64)
    acc = None
    for t in range(idx.shape[1]):
        term = x64.index_select(axis, idx[:, t]) * wt[:, t].reshape(shape)
        acc = term if acc is None else acc + term
    return acc.to(torch.float32)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize float maps (K, H, W) to (K, sh, sw) exactly like Pillow's BILINEAR on mode "F".

    The input is read as float32 (what ``imresize(mode='F')`` stores); the horizontal pass
    runs first, then the vertical one, each accumulating in float64 and rounding its result
    to float32, as Pillow does. Returns float32 on the input's device.
    """
    sh, sw = int(size[0]), int(size[1])
    x = maps.to(torch.float32)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if vertical_first(h, w, sh, sw):
        x = _resample_axis(x, x.dim() - 2, sh)
        return _resample_axis(x, x.dim() - 1, sw)
    if w != sw:
        x = _resample_axis(x, x.dim() - 1, sw)
    if h != sh:
        x = _resample_axis(x, x.dim() - 2, sh)
    return x


def vertical_first(h: int, w: int, sh: int, sw: int) -> bool:
    """Whether to run the vertical pass first for an (h, w) -> (sh, sw) resize.

    Pillow <= 10 (NetDissect-Lite's era) always runs the horizontal pass first. Recent Pillow
    (13 here) starts with the vertical pass when it shrinks the height while the width grows;
    we follow it there. When both axes grow (every dissection: a 7x7 map to 112x112) the
    order is horizontal first in all versions and the result is bit-identical to Pillow.
    When both axes shrink, recent Pillow picks the order by an internal heuristic and our
    horizontal-first result can differ from it in the last float32 bit.
    """
    return sh < h and sw > w


def is_square(n: int) -> bool:
    """Whether ``n`` is a perfect square (a token count that forms a square grid)."""
    r = math.isqrt(n)
    return n > 0 and r * r == n


def _resize_fast(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float32 matrix-product version of :func:`resize_maps` (BLAS; not bit-exact)."""
    sh, sw = size
    x = maps.to(torch.float32)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    wh = resize_weights(w, sw, x.device).to(torch.float32)
    wv = resize_weights(h, sh, x.device).to(torch.float32)
    return torch.matmul(wv, torch.matmul(x, wh.T))


# Half-width of the band around the threshold, relative to a map's largest magnitude, inside
# which the float32 fast path is not trusted. Its error is a few float32 ulps of that
# magnitude (convex weights, <= 2 rounded passes); 2**-16 is ~256 ulps.
_BAND = 2.0 ** -16


def threshold_maps(maps: torch.Tensor, size: tuple[int, int],
                   thresholds: torch.Tensor) -> torch.Tensor:
    """``resize_maps(maps, size) > thresholds[:, None, None]`` as a (K, sh*sw) bool tensor.

    Computed with a fast float32 matrix product; only maps with a pixel within a safe band
    of their threshold are recomputed with the bit-exact Pillow emulation, so the result is
    identical to thresholding :func:`resize_maps` (checked in tests/test_quantile.py).
    """
    k = maps.shape[0]
    sh, sw = int(size[0]), int(size[1])
    approx = _resize_fast(maps, (sh, sw)).reshape(k, sh * sw)
    t = thresholds.to(torch.float64)[:, None]
    band = maps.detach().abs().flatten(1).amax(dim=1).to(torch.float64)[:, None] * _BAND
    band = band + t.abs() * _BAND
    # float32 comparisons against [T - band, T + band] (rounding T to float32 moves it by
    # 2**-24 relative, far inside the band): above the band -> in the mask, inside -> unsure
    lo = (t - band).to(torch.float32)
    hi = (t + band).to(torch.float32)
    mask = approx > hi
    unsure = ((approx >= lo) & ~mask).any(dim=1)
    if bool(unsure.any()):
        rows = torch.nonzero(unsure, as_tuple=True)[0]
        exact = resize_maps(maps[rows], (sh, sw)).reshape(len(rows), sh * sw)
        mask[rows] = exact.to(torch.float64) > t[rows]
    return mask
