"""Compiled (numba) kernels for the batched similarity bootstrap.

Per resample, the K x K class-similarity matrices are processed in blocks of rows small enough
to stay in the CPU's L2 cache (at K = 1,000 the work is bound by memory traffic, not
arithmetic): for each block, every model's rank cells and top-k sets (:func:`_row_pass`) and
each student's Pearson sums, KL and Jensen-Shannon rows and top-k overlap against the teacher
(:func:`_pair_pass`); once the rank cells of the whole matrix are counted, the Spearman
cross-products (:func:`_rank_cross`). The logarithms are taken beforehand by NumPy, block by
block (vectorised, ~1 ns per value; a scalar ``math.log`` in numba costs ~8 ns without SVML).

numba is optional (``pip install interptool[fast]``); :func:`usable` is False when it is
missing, and :mod:`interptool.analyzers.similarity._core` then uses its NumPy path (exact,
about 10x slower at K = 1,000).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np

AVAILABLE = importlib.util.find_spec("numba") is not None
_COMPILED: dict[str, object] = {}

# KL clips the second distribution at this value (as ``_core.EPS``).
EPS = 1e-12
_LOG_EPS = math.log(EPS)
_LN2 = math.log(2.0)
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def usable() -> bool:
    """Whether the kernels can run (numba installed and importable; checked once)."""
    global AVAILABLE
    if AVAILABLE and not _COMPILED:
        try:
            _compile()
        except ImportError:  # e.g. a numba built for another numpy
            AVAILABLE = False
    return AVAILABLE


def _compile() -> None:
    from numba import njit

    _COMPILED["rows"] = njit(cache=True, nogil=True)(_row_pass)
    # reassociation lets LLVM vectorise the reductions (AVX2 / AVX-512: the pair pass ~2.5x
    # faster, measured 5.3 -> 2.0 ms per K = 1,000 matrix); sums then differ from the
    # sequential order by rounding only (~1e-13 relative). No "nnan"/"ninf": log(0) = -inf
    # and 0 * -inf occur in the unused lanes of the selects below and must stay IEEE.
    _COMPILED["pair"] = njit(cache=True, nogil=True, fastmath=_FASTMATH)(_pair_pass)
    _COMPILED["cross"] = njit(cache=True, nogil=True, fastmath=_FASTMATH)(_rank_cross)


def kernel(name: str):
    if not _COMPILED:
        _compile()
    return _COMPILED[name]


def _row_pass(T, keys, valid, row0, shift, kmin, lut, k, bins, hist, top):  # pragma: no cover
    """One pass over rows ``row0 .. row0 + R - 1`` of a (K, K) matrix, given as the (R, K)
    block ``T``: rank cells of the off-diagonal entries of valid rows and each valid row's k
    largest off-diagonal entries.

    ``keys``: ``T`` viewed as int32 (float32 bit patterns). When ``lut`` is non-empty, each
    entry's monotone key ``(key >> shift) - kmin`` (clamped) is mapped by ``lut`` to a rank
    cell, written to ``bins`` (R, K) and counted in ``hist`` (accumulated: the caller zeroes
    it once per matrix); otherwise ``bins``/``hist`` are left alone (exact ranks are computed
    outside). ``top`` (R, k) receives column indices; ties keep the lower index. ``valid`` is
    the whole matrix's (K,) row mask.
    """
    rows = T.shape[0]
    kk = T.shape[1]
    nl = lut.shape[0]
    use_bins = nl > 0
    tv = np.empty(k, dtype=np.float64)
    for r in range(rows):
        i = row0 + r
        if not valid[i]:
            continue
        filled = 0
        for j in range(kk):
            if j == i:
                continue
            v = np.float64(T[r, j])
            if use_bins:
                b = keys[r, j]
                if b < 0:
                    b = b ^ 0x7FFFFFFF
                u = (b >> shift) - kmin
                if u < 0:
                    u = 0
                elif u >= nl:
                    u = nl - 1
                g = lut[u]
                bins[r, j] = g
                hist[g] += 1
            # top-k insertion (k is small; most entries fail the first comparison)
            if filled < k:
                p = filled
                filled += 1
            elif v > tv[k - 1]:
                p = k - 1
            else:
                continue
            while p > 0 and tv[p - 1] < v:
                tv[p] = tv[p - 1]
                top[r, p] = top[r, p - 1]
                p -= 1
            tv[p] = v
            top[r, p] = j


def _pair_pass(T, S, LT, LS, LM, valid, row0, ttop, stop, k):  # pragma: no cover
    """Partial agreement sums of a student's rows ``S`` with the teacher's rows ``T`` (both
    (R, K) float32 blocks starting at row ``row0``; rows of ``valid`` classes only).

    ``LT``/``LS``/``LM`` are log T, log S and log((T + S) / 2); ``ttop``/``stop`` (R, k) each
    row's k nearest classes. Returns (n, sx, sy, sxx, syy, sxy, kl_sum, jsd_sum, ov_sum, nv):
    the Pearson sums over off-diagonal entries, the summed row KL (nats) and JS distances
    (bits), the top-k overlap count and the number of valid rows, to be added over blocks.
    Definitions as :meth:`interptool.analyzers.similarity._core.Reference.compare`.
    """
    rows = T.shape[0]
    kk = T.shape[1]
    n = 0.0
    sx = sy = sxx = syy = sxy = 0.0
    kl_sum = 0.0
    jsd_sum = 0.0
    ov_sum = 0
    nv = 0
    for r in range(rows):
        i = row0 + r
        if not valid[i]:
            continue
        nv += 1
        n += kk - 1
        kl = 0.0
        js = 0.0
        # branch-free body (selects, and a 0/1 weight for the diagonal) so the loop vectorises
        for j in range(kk):
            t = np.float64(T[r, j])
            s = np.float64(S[r, j])
            lt = np.float64(LT[r, j])
            ls_raw = np.float64(LS[r, j])
            lm = np.float64(LM[r, j])
            ls = ls_raw if s > EPS else _LOG_EPS
            kl += t * (lt - ls) if t > 0.0 else 0.0
            # JS: both terms vanish where t = s = 0 (midpoint 0)
            a = t * (lt - lm) if t > 0.0 else 0.0
            b = s * (ls_raw - lm) if s > 0.0 else 0.0
            js += 0.5 * (a + b)
            w = 1.0 if j != i else 0.0
            tw = w * t
            sw = w * s
            sx += tw
            sy += sw
            sxx += tw * t
            syy += sw * s
            sxy += tw * s
        kl_sum += kl
        jsd_sum += math.sqrt(max(js, 0.0) / _LN2)
        c = 0
        for a_ in range(k):
            for b_ in range(k):
                if stop[r, a_] == ttop[r, b_]:
                    c += 1
                    break
        ov_sum += c
    return n, sx, sy, sxx, syy, sxy, kl_sum, jsd_sum, ov_sum, nv


def _rank_cross(valid, tb, tG, sb, sG):  # pragma: no cover - numba
    """Spearman sums over the off-diagonal entries of valid rows: (rx, ry, rxx, ryy, rxy) of
    the teacher's and the student's average ranks ``tG[tb[i, j]]``, ``sG[sb[i, j]]``."""
    kk = tb.shape[0]
    rx = ry = rxx = ryy = rxy = 0.0
    for i in range(kk):
        if not valid[i]:
            continue
        for j in range(kk):
            w = 1.0 if j != i else 0.0
            gt = w * tG[tb[i, j]]
            gs = w * sG[sb[i, j]]
            rx += gt
            ry += gs
            rxx += gt * gt
            ryy += gs * gs
            rxy += gt * gs
    return rx, ry, rxx, ryy, rxy
