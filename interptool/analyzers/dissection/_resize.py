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

The dissection tally only needs *where* the upsampled map exceeds the unit's threshold:
:func:`iter_masked_pixels` finds those pixels, evaluating (exactly) only the tiles and boxes
of the output that can exceed it (see the "Tile path" section below). This is the one tally
code path, on CPU and CUDA: a compiled (numba) kernel, a whole-map float32 path and a
histogram-sketch quantile were measured end to end and removed (docs/benchmarks_dissect.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


# Relative margin for the tile path's row bound: Pillow's float32 passes differ from real
# arithmetic by a few float32 ulps of the window's largest magnitude; 2**-16 is ~256 ulps.
_BAND = 2.0 ** -16


# ---------------------------------------------------------------------------------------
# Tile path: threshold only where the upsampled map can exceed the threshold.
#
# When both axes grow (every dissection geometry), Pillow's bilinear taps split the output
# grid into rectangular *tiles* of output pixels that share the same input window (at most
# 2 x 2 source cells: 16 x 16 pixels for 7 -> 112). Every tap weight is >= 0 and the weights
# of a pixel sum to 1, so each Pillow pass (float64 sum, rounded to float32) never exceeds
# the largest value it reads: a pixel can be above T only if one source cell of its window is
# (the same argument that lets units with max <= T be skipped). Only such tiles are
# evaluated, with Pillow's exact arithmetic (taps summed in order in float64, float32 after
# each pass), so the masks are those of :func:`resize_maps` bit for bit, with no float32
# approximation and no fallback. At q = 0.005 a firing 7x7 map has ~1 source cell above T,
# so ~4 of its 64 tiles are evaluated instead of the whole 112x112 map.


@dataclass(frozen=True)
class _AxisTiles:
    """Output indices of one axis grouped by identical Pillow input window."""

    start: torch.Tensor  # (G,) first output index of each group
    idx: torch.Tensor  # (G, T) input indices of the group's taps (padding repeats the first)
    wt: torch.Tensor  # (G, S, T) float64 weights per output index; NaN rows pad short groups
    span: int  # S, the longest group
    wt_t: torch.Tensor  # (G, T, S) the same weights tap-major (contiguous rows per tap)


@lru_cache(maxsize=64)
def _axis_tiles_np(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx, wt = _pil_bilinear_taps(in_size, out_size)
    starts = [0] + [i for i in range(1, out_size) if not np.array_equal(idx[i], idx[i - 1])]
    bounds = starts + [out_size]
    span = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    gw = np.full((len(starts), span, idx.shape[1]), np.nan)
    for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        gw[g, : b - a] = wt[a:b]
    return np.asarray(starts, dtype=np.int64), idx[starts].copy(), gw


_TILE_CACHE: dict[tuple[int, int, str], _AxisTiles] = {}


def _axis_tiles(in_size: int, out_size: int, device: torch.device) -> _AxisTiles:
    key = (int(in_size), int(out_size), str(device))
    if key not in _TILE_CACHE:
        start, idx, wt = _axis_tiles_np(*key[:2])
        _TILE_CACHE[key] = _AxisTiles(torch.from_numpy(start).to(device),
                                      torch.from_numpy(idx).to(device),
                                      torch.from_numpy(wt).to(device), int(wt.shape[1]),
                                      torch.from_numpy(wt.transpose(0, 2, 1).copy()).to(device))
    return _TILE_CACHE[key]


def above_bound(thresholds: torch.Tensor) -> torch.Tensor:
    """Per threshold ``T`` the float64 ``tau`` with ``float32(acc) > T  <=>  acc > tau``.

    Pillow stores each pass as float32 (round to nearest, ties to even) and the mask compares
    that float32 with the float64 threshold. ``t32``, the smallest float32 above ``T``, and
    its predecessor bound the rounding interval; ``acc`` rounds to ``>= t32`` when it is above
    their midpoint, or on it when ``t32`` is the even one. Comparing the float64 sum with
    ``tau`` skips materialising the float32 map.
    """
    t = thresholds.to(torch.float64)
    inf32 = torch.full_like(t, math.inf, dtype=torch.float32)
    a = t.to(torch.float32)
    t32 = torch.where(a.to(torch.float64) > t, a, torch.nextafter(a, inf32))
    lo = torch.nextafter(t32, -inf32)
    mid = (lo.to(torch.float64) + t32.to(torch.float64)) * 0.5  # exact: f32 values in f64
    even = (t32.view(torch.int32) & 1) == 0
    tau = torch.where(even, torch.nextafter(mid, torch.full_like(mid, -math.inf)), mid)
    # T at or above float32's largest value: no float32 map value can exceed it
    return torch.where(torch.isinf(t32), torch.full_like(tau, math.inf), tau)


def tiles_apply(in_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether :func:`iter_masked_pixels` uses the tile path: neither axis shrinks (every
    dissection geometry: maps are upsampled to the segmentation size)."""
    return int(size[0]) >= int(in_size[0]) and int(size[1]) >= int(in_size[1])


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` along dim 0 for any index shape (``index_select``: ~10x faster on CPU)."""
    if t.dim() > 2:  # 2-D rows: index_select on >2-D tensors is up to ~5x slower on CPU
        return t.flatten(1).index_select(0, idx.reshape(-1)).reshape(*idx.shape, *t.shape[1:])
    return t.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *t.shape[1:])


def iter_masked_pixels(maps: torch.Tensor, size: tuple[int, int], thresholds: torch.Tensor,
                       max_elements: int = 1 << 18, offsets: torch.Tensor | None = None):
    """Yield ``(map_index, pixel)`` chunks where ``resize_maps(maps, size) > thresholds``.

    ``pixel = row * sw + col`` (plus ``offsets[map_index]`` when given: e.g. the map's image
    times ``sh * sw``, so the caller can index a batch's flattened labels directly); int64
    tensors on the maps' device. Over all chunks the
    positions are exactly those of ``torch.nonzero`` on the thresholded :func:`resize_maps`
    (each once, in no particular order). When neither axis shrinks only the tiles that can
    exceed the threshold are evaluated, exactly (see above); a map larger than the output
    (no dissection geometry; kept for completeness) is resized whole with
    :func:`resize_maps`. Each chunk works on at most ``max_elements`` pixels (at least one
    tile or map), so memory does not depend on the number of maps.
    """
    sh, sw = int(size[0]), int(size[1])
    k, h, w = (int(v) for v in maps.shape)
    dev = maps.device
    t64 = thresholds.to(device=dev, dtype=torch.float64)
    if k == 0:
        return
    if not tiles_apply((h, w), (sh, sw)):
        step = max(1, max_elements // (sh * sw))
        for s in range(0, k, step):
            up = resize_maps(maps[s : s + step], (sh, sw)).reshape(-1, sh * sw)
            kk, px = torch.nonzero(up.to(torch.float64) > t64[s : s + step, None],
                                   as_tuple=True)
            kk = kk + s
            yield kk, px if offsets is None else px + _take(offsets, kk)
        return
    rows, cols = _axis_tiles(h, sh, dev), _axis_tiles(w, sw, dev)
    x = maps.to(torch.float32)  # what imresize(mode='F') hands to Pillow
    # tiles whose source window holds a cell above T. float32 x > float64 T  <=>
    # x >= t32, the smallest float32 above T: a 2-D float32 comparison, no float64 copy
    a = t64.to(torch.float32)
    t32 = torch.where(a.to(torch.float64) > t64, a,
                      torch.nextafter(a, torch.full_like(a, math.inf)))
    hot = (x.reshape(k, h * w) >= t32[:, None]).reshape(k, h, w)
    hot_r = hot.index_select(1, rows.idx[:, 0])
    for t in range(1, rows.idx.shape[1]):
        hot_r |= hot.index_select(1, rows.idx[:, t])
    cand = hot_r.index_select(2, cols.idx[:, 0])
    for t in range(1, cols.idx.shape[1]):
        cand |= hot_r.index_select(2, cols.idx[:, t])
    p_all, gr_all, gc_all = torch.nonzero(cand, as_tuple=True)  # (k, GR, GC) -> tiles
    n_all = p_all.numel()
    if n_all == 0:
        return
    tau_all = above_bound(t64)
    base_all = torch.zeros(k, dtype=torch.int64, device=dev) if offsets is None else offsets
    flat = x.reshape(-1)
    th, tw, taps = rows.span, cols.span, rows.idx.shape[1]
    # Stage 1, per tile: Pillow's horizontal pass on the window rows (exact), and the box of
    # rows x columns that can hold a pixel above T. Columns: the vertical pass never exceeds
    # the larger of its inputs, so column j needs max_r hx[r, j] > T (exact, no margin).
    # Rows: in real arithmetic the tile is bilinear, so row i is bounded by the largest
    # vertical interpolation z[i, c] over the window columns c; Pillow's float32 results
    # differ from it by a few float32 ulps of the window's largest |value|, and the margin
    # below is 2**-16 of that (~500 ulps), so no row that can exceed T is dropped.
    hx_all = torch.empty((n_all, taps, tw), dtype=torch.float64, device=dev)
    box = torch.empty((n_all, 4), dtype=torch.int64, device=dev)  # row0, rows, col0, cols
    step = max(1, max_elements // (th * tw))
    for s in range(0, n_all, step):
        p, gr, gc = p_all[s : s + step], gr_all[s : s + step], gc_all[s : s + step]
        ridx, cidx = _take(rows.idx, gr), _take(cols.idx, gc)  # (n, Tr), (n, Tc)
        # All arithmetic below is on 2-D (n, tile side) slices with one broadcast column:
        # torch's 3-D broadcasting over short trailing axes is ~8x slower on CPU.
        off = (p * (h * w))[:, None] + ridx * w  # (n, Tr) flat index of the window rows
        tc = cidx.shape[1]
        src = _take(flat, torch.cat([off + cidx[:, c : c + 1] for c in range(tc)], dim=1))
        src = src.to(torch.float64).reshape(-1, tc, taps).transpose(1, 2)  # (n, Tr, Tc)
        wh = _take(cols.wt_t, gc)  # (n, Tc, tw)
        wv = _take(rows.wt_t, gr)  # (n, Tr, th)
        tp = _take(t64, p)
        hx = hx_all[s : s + step]  # (n, Tr, tw)
        col_max = None
        for r in range(taps):
            # taps in Pillow's order, float64 sum, float32 result (NaN in padded columns)
            acc = src[:, r, 0:1] * wh[:, 0]
            for t in range(1, src.shape[2]):
                acc = acc + src[:, r, t : t + 1] * wh[:, t]
            hx[:, r] = acc.to(torch.float32)
            col_max = hx[:, r] if col_max is None else torch.maximum(col_max, hx[:, r])
        col_ok = col_max > tp[:, None]  # NaN (padding) compares False
        row_max = None
        for c in range(src.shape[2]):  # real-arithmetic vertical pass of window column c
            z = wv[:, 0] * src[:, 0, c : c + 1]
            for r in range(1, taps):
                z = z + wv[:, r] * src[:, r, c : c + 1]
            row_max = z if row_max is None else torch.maximum(row_max, z)
        margin = src.abs().flatten(1).amax(dim=1) * _BAND
        row_ok = row_max > (tp - margin)[:, None]
        box[s : s + step, 0:2] = _interval(row_ok)
        box[s : s + step, 2:4] = _interval(col_ok)
    # Stage 2: evaluate the boxes exactly, one box row per work row (rows of all boxes laid
    # end to end, so no padding rows), in a few column classes (box width rounded up to a
    # power of two, at most the tile's) so that padding stays small and calls stay few.
    keep = torch.nonzero((box[:, 1] > 0) & (box[:, 3] > 0), as_tuple=True)[0]
    if keep.numel() == 0:
        return
    lut_c = torch.tensor(_pow2_buckets(tw), device=dev)
    cls, order = torch.sort(_take(lut_c, _take(box[:, 3], keep)), stable=True)
    keep = _take(keep, order)
    uniq, counts = torch.unique_consecutive(cls, return_counts=True)
    s = 0
    for bw, cnt in zip(uniq.tolist(), counts.tolist()):
        per = max(1, max_elements // (th * bw))
        for s0 in range(s, s + cnt, per):
            sel = keep[s0 : min(s0 + per, s + cnt)]
            yield _eval_box_rows(_take(p_all, sel), _take(gr_all, sel), _take(gc_all, sel),
                                 _take(box, sel), _take(hx_all, sel), bw, rows, cols,
                                 tau_all, sw, base_all)
        s += cnt


def _pow2_buckets(span: int) -> list[int]:
    """Bucket size per box side 0..span: the next power of two, capped at ``span``."""
    return [0] + [min(1 << (v - 1).bit_length(), span) for v in range(1, span + 1)]


def _eval_box_rows(p: torch.Tensor, gr: torch.Tensor, gc: torch.Tensor, box: torch.Tensor,
                   hx: torch.Tensor, bw: int, rows: _AxisTiles, cols: _AxisTiles,
                   tau_all: torch.Tensor, sw: int,
                   base_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's vertical pass on the boxes of n tiles (width padded to ``bw``); masked pixels.

    ``hx`` (n, Tr, tw): the tiles' exact horizontal pass; ``box`` (n, 4): row0, rows, col0,
    cols within each tile. Every box row is one row of 2-D (rows, bw) work arrays: torch's
    3-D broadcasting over short trailing axes is several times slower on CPU.
    """
    dev = p.device
    n = p.numel()
    th, tw, taps = rows.span, cols.span, hx.shape[1]
    r0, nr, c0, nc = box.unbind(1)
    ac = torch.arange(bw, device=dev)
    ci = (c0[:, None] + ac).clamp_(max=tw - 1)  # (n, bw) column within the tile
    hxb = hx.gather(2, ci[:, None, :].expand(-1, taps, -1))  # (n, Tr, bw)
    # NaN beyond the box's columns: never above the threshold
    hxb = torch.where((ac < nc[:, None])[:, None, :], hxb, math.nan).reshape(n, taps * bw)
    # box rows end to end: tile of each work row and its row within the tile
    tile = torch.repeat_interleave(torch.arange(n, device=dev), nr)
    first = torch.cumsum(nr, 0) - nr  # first work row of each tile
    ri = torch.arange(tile.numel(), device=dev) - _take(first - r0, tile)
    gt = _take(gr, tile)
    wv = _take(rows.wt.reshape(-1, taps), gt * th + ri)  # (R, Tr) weights of the rows
    hr = _take(hxb, tile)  # (R, Tr * bw)
    acc = hr[:, :bw] * wv[:, 0:1]
    for t in range(1, taps):
        acc = acc + hr[:, t * bw : (t + 1) * bw] * wv[:, t : t + 1]
    pt = _take(p, tile)
    # float32(acc) > T  <=>  acc > tau; NaN (outside the box) never is
    hit = torch.nonzero((acc > _take(tau_all, pt)[:, None]).reshape(-1), as_tuple=True)[0]
    wr = hit // bw
    # pixel index: (tile row start + row) * sw + tile column start + box col0 + column
    rowbase = ((_take(rows.start, gt) + ri) * sw + _take(base_all, pt)
               + _take(cols.start, _take(gc, tile)) + _take(c0, tile))
    return _take(pt, wr), _take(rowbase, wr) + (hit - wr * bw)


_INTERVAL_LUT: dict[tuple[int, str], torch.Tensor] = {}


def _interval_lut(m: int, device: torch.device) -> torch.Tensor:
    """(2**m, 2) int64: for every m-bit pattern, ``[first set bit, last - first + 1]``."""
    key = (m, str(device))
    if key not in _INTERVAL_LUT:
        v = np.arange(1 << m)
        bits = (v[:, None] >> np.arange(m)) & 1
        first = np.where(bits.any(1), bits.argmax(1), m - 1)
        last = np.where(bits.any(1), m - 1 - bits[:, ::-1].argmax(1), first - 1)
        _INTERVAL_LUT[key] = torch.from_numpy(np.stack([first, last - first + 1], 1)).to(device)
    return _INTERVAL_LUT[key]


def _interval(ok: torch.Tensor) -> torch.Tensor:
    """(n, m) bool -> (n, 2) int64 ``[first True, count from it to the last True]`` (0 if none)."""
    m = ok.shape[1]
    if m <= 16:
        # the row as an m-bit number (a float32 matrix-vector product, exact below 2**24) and
        # a lookup table: ~20x faster on CPU than min/max reductions along a short last axis
        pw = torch.pow(2.0, torch.arange(m, device=ok.device, dtype=torch.float32))
        return _take(_interval_lut(m, ok.device), torch.mv(ok.to(torch.float32), pw).long())
    ar = torch.arange(m, device=ok.device)
    first = torch.where(ok, ar, m).amin(dim=1)
    last = torch.where(ok, ar, -1).amax(dim=1)
    return torch.stack([first.clamp(max=m - 1), (last - first + 1).clamp(min=0)], dim=1)


def masked_pixels(maps: torch.Tensor, size: tuple[int, int], thresholds: torch.Tensor,
                  max_elements: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
    """All of :func:`iter_masked_pixels` concatenated: ``(map_index, pixel)`` int64."""
    parts = list(iter_masked_pixels(maps, size, thresholds, max_elements))
    if not parts:
        e = torch.zeros(0, dtype=torch.int64, device=maps.device)
        return e, e
    return torch.cat([q for q, _ in parts]), torch.cat([px for _, px in parts])
