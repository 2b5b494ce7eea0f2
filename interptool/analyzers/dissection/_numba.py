"""Optional compiled CPU kernel for the dissection tally (numba; ``pip install interptool[fast]``).

One fused pass per firing (image, unit) pair: Pillow-bilinear upsampling with exactly the
arithmetic of :func:`interptool.analyzers.dissection._resize.resize_maps` (taps summed in
Pillow's order in float64, float32 after each pass, the same coefficient tables), the
threshold ``float32 value > T`` decided in float64, and the label counting of the masked
pixels, with no intermediate tensors. Only the parts of the map that can exceed ``T`` are
evaluated: each Pillow pass is a convex combination rounded to float32, so it never exceeds
the largest value it reads. So only output rows with a source row holding a cell above ``T``
(a hot row) among their taps are visited; the first pass is computed for their source rows
only, over the output columns reached by a hot cell; and a second-pass pixel is computed only
where one of its first-pass inputs is above ``T``. Results are identical to the torch path (tested in
``tests/test_dissection_numba.py``).

:func:`usable` is False when numba is missing or does not import; callers then use the torch
path.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from interptool.analyzers.dissection._resize import _pil_bilinear_taps, vertical_first

# numba is imported on first use (importing it costs ~0.2 s; loading the cached kernel ~0.3 s
# more, once per process): the torch path is used when it is not installed.
AVAILABLE = importlib.util.find_spec("numba") is not None

_KERNEL = None


def usable() -> bool:
    """Whether the kernel can run: numba is installed and imports (checked once)."""
    global AVAILABLE
    if AVAILABLE and _KERNEL is None:
        try:
            _compiled()
        except ImportError:  # e.g. a numba built for another numpy
            AVAILABLE = False
    return AVAILABLE


def _compiled():
    """The compiled kernel (numba's on-disk cache makes this a load after the first run)."""
    global _KERNEL
    if _KERNEL is None:
        from numba import njit

        _KERNEL = njit(cache=True, nogil=True)(_kernel)
    return _KERNEL


def _kernel(maps, tpair, g_idx, u_idx, ridx, rwt, cidx, cwt, ifirst, ilast, jfirst, jlast, rs,
            cs, P, pix, cat, L, intersect, pair_area, touched):  # pragma: no cover - compiled by numba
    """Count the masked pixels of ``k`` maps (see :func:`tally_pairs`).

    ``jfirst[c]``/``jlast[c]``: the first/last output column whose first-pass window holds
    source column ``c``; a first-pass value can exceed T only in the columns of a hot cell.
    ``ifirst``/``ilast``: the same for the second pass (output rows per source row).
    """
    k, h, w = maps.shape
    sh, tr = ridx.shape
    sw, tc = cidx.shape
    D = pix.shape[1]
    hx = np.empty((h, sw), np.float32)  # first (horizontal) pass, row by row on demand
    state = np.empty(h, np.int8)  # 0: row not computed, 1: computed
    hot = np.empty(h, np.bool_)  # source row holds a cell above T
    lo = np.empty(h, np.int64)  # first/last first-pass column above T (lo > hi: none)
    hi = np.empty(h, np.int64)
    hits = np.empty(sw, np.int64)  # masked columns of the current output row
    for q in range(k):
        T = tpair[q]
        x = maps[q]
        j0 = sw  # output columns [j0, j1] hold every first-pass value above T
        j1 = -1
        i0 = sh  # output rows [i0, i1] hold every pixel that can exceed T
        i1 = -1
        for r in range(h):
            state[r] = 0
            lo[r] = sw
            hi[r] = -1
            hot[r] = False
            for c in range(w):
                if np.float64(x[r, c]) > T:
                    hot[r] = True
                    if jfirst[c] < j0:
                        j0 = jfirst[c]
                    if jlast[c] > j1:
                        j1 = jlast[c]
            if hot[r]:
                if ifirst[r] < i0:
                    i0 = ifirst[r]
                if ilast[r] > i1:
                    i1 = ilast[r]
        if j1 < 0:
            continue
        base = g_idx[q] * P
        ubase = u_idx[q] * L
        n = 0
        for i in range(i0, i1 + 1):
            # can a pixel of output row i exceed T? only if one of its source rows is hot
            need = False
            for t in range(tr):
                if hot[ridx[i, t]]:
                    need = True
                    break
            if not need:
                continue
            jlo = sw
            jhi = -1
            for t in range(tr):
                r = ridx[i, t]
                if state[r] == 0:  # Pillow's horizontal pass of source row r (exact)
                    state[r] = 1
                    a = sw
                    b = -1
                    xr = x[r]
                    hr = hx[r]
                    for j in range(j0, j1 + 1):
                        if tc == 2:  # the bilinear upsampling case, taps hoisted
                            acc = (np.float64(xr[cidx[j, 0]]) * cwt[j, 0]
                                   + np.float64(xr[cidx[j, 1]]) * cwt[j, 1])
                        else:
                            acc = np.float64(xr[cidx[j, 0]]) * cwt[j, 0]
                            for s in range(1, tc):
                                acc = acc + np.float64(xr[cidx[j, s]]) * cwt[j, s]
                        v = np.float32(acc)
                        hr[j] = v
                        if np.float64(v) > T:
                            if a > j:
                                a = j
                            b = j
                    lo[r] = a
                    hi[r] = b
                if lo[r] < jlo:
                    jlo = lo[r]
                if hi[r] > jhi:
                    jhi = hi[r]
            # vertical pass, same order and rounding; hits first, then the counting (no
            # stores in the arithmetic loop)
            nh = 0
            if tr == 2:
                h0 = hx[ridx[i, 0]]
                h1 = hx[ridx[i, 1]]
                w0 = rwt[i, 0]
                w1 = rwt[i, 1]
                for j in range(jlo, jhi + 1):
                    acc = np.float64(h0[j]) * w0 + np.float64(h1[j]) * w1
                    if np.float64(np.float32(acc)) > T:
                        hits[nh] = j
                        nh += 1
            else:
                for j in range(jlo, jhi + 1):
                    acc = np.float64(hx[ridx[i, 0], j]) * rwt[i, 0]
                    for t in range(1, tr):
                        acc = acc + np.float64(hx[ridx[i, t], j]) * rwt[i, t]
                    if np.float64(np.float32(acc)) > T:
                        hits[nh] = j
                        nh += 1
            n += nh
            rowp = base + i * rs
            for e in range(nh):
                p = rowp + hits[e] * cs
                for d in range(D):
                    lab = pix[p, d]
                    intersect[ubase + lab] += 1
                    touched[q, cat[lab]] = 1
        pair_area[q] = n



def _reach(idx: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Per source index, the first and last output index whose taps ``idx`` (out, taps) read
    it (first > last: none). Padded taps repeat a real one, so they widen nothing."""
    n_out = idx.shape[0]
    first = np.full(n_in, n_out, np.int64)
    last = np.full(n_in, -1, np.int64)
    for o in range(n_out):
        for c in idx[o]:
            first[c] = min(first[c], o)
            last[c] = max(last[c], o)
    return first, last


def tally_pairs(maps: np.ndarray, tpair: np.ndarray, g_idx: np.ndarray, u_idx: np.ndarray,
                size: tuple[int, int], pix: np.ndarray, cat: np.ndarray, L: int,
                num_categories: int, intersect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upsample, threshold and count ``k`` firing maps in one compiled pass.

    Args:
        maps: (k, h, w) float32 maps of the firing pairs.
        tpair: (k,) float64 threshold of each pair's unit.
        g_idx, u_idx: (k,) int64 image (within the batch) and unit of each pair.
        size: (sh, sw) segmentation size of the batch.
        pix: (G * sh * sw, D) int32/int64 labels, pixel-major (row ``g * sh * sw + pixel``).
        cat: (L,) int64 category per label (``num_categories`` for label 0 / unused labels).
        L: number of label numbers.
        num_categories: C.
        intersect: (U * L,) int64, incremented in place at ``unit * L + label``.

    Returns:
        ``(pair_area, touched)``: (k,) int64 masked pixels per pair, and (k, C + 1) uint8
        1 where the pair's mask covers a pixel with a label of that category (column C:
        label 0 / unused).
    """
    sh, sw = int(size[0]), int(size[1])
    k, h, w = maps.shape
    # Pillow's pass order (see vertical_first): a vertical-first resize is the horizontal-first
    # resize of the transposed map, transposed back through the pixel strides
    if vertical_first(h, w, sh, sw):
        maps = np.ascontiguousarray(maps.transpose(0, 2, 1))
        ridx, rwt = _pil_bilinear_taps(w, sw)
        cidx, cwt = _pil_bilinear_taps(h, sh)
        rs, cs = 1, sw
    else:
        maps = np.ascontiguousarray(maps)
        ridx, rwt = _pil_bilinear_taps(h, sh)
        cidx, cwt = _pil_bilinear_taps(w, sw)
        rs, cs = sw, 1
    ifirst, ilast = _reach(ridx, maps.shape[1])
    jfirst, jlast = _reach(cidx, maps.shape[2])
    pair_area = np.zeros(k, np.int64)
    touched = np.zeros((k, num_categories + 1), np.uint8)
    _compiled()(maps.astype(np.float32, copy=False), np.ascontiguousarray(tpair, np.float64),
                np.ascontiguousarray(g_idx, np.int64), np.ascontiguousarray(u_idx, np.int64),
                ridx, rwt, cidx, cwt, ifirst, ilast, jfirst, jlast, rs, cs, sh * sw,
                np.ascontiguousarray(pix), np.ascontiguousarray(cat, np.int64), int(L),
                intersect, pair_area, touched)
    return pair_area, touched


def warm_up() -> float:
    """Compile (or load from numba's cache) the kernel now; returns the seconds it took.

    Benchmarks call it before timing so that the one-time load is reported on its own.
    """
    import time

    t0 = time.perf_counter()
    x = np.zeros((1, 2, 2), np.float32)
    x[0, 0, 0] = 1.0
    tally_pairs(x, np.zeros(1), np.zeros(1, np.int64), np.zeros(1, np.int64), (4, 4),
                np.zeros((16, 1), np.int32), np.zeros(1, np.int64), 1, 0, np.zeros(1, np.int64))
    return time.perf_counter() - t0
