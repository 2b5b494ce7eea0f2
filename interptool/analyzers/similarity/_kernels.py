"""Compiled (numba) kernels for the batched similarity bootstrap.

Per resample, the agreement metrics of a student's K x K class-similarity matrix with the
teacher's are one fused pass over the K^2 entries (Pearson sums, KL and Jensen-Shannon rows,
Spearman rank cross-products, top-k overlap). The logarithms are taken beforehand by NumPy
(vectorised, ~1 ns per value; a scalar ``math.log`` in numba costs ~8 ns without SVML).

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
_PAIR_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


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
    # reassociation lets LLVM vectorise the pair pass's reductions (AVX2 / AVX-512: ~2.5x
    # faster, measured 5.3 -> 2.0 ms per K = 1,000 matrix); sums then differ from the
    # sequential order by rounding only (~1e-13 relative). No "nnan"/"ninf": log(0) = -inf
    # and 0 * -inf occur in the unused lanes of the selects below and must stay IEEE.
    _COMPILED["pair"] = njit(cache=True, nogil=True, fastmath=_PAIR_FASTMATH)(_pair_pass)


def kernel(name: str):
    if not _COMPILED:
        _compile()
    return _COMPILED[name]


def _row_pass(T, keys, valid, shift, kmin, lut, k, bins, hist, top):  # pragma: no cover - numba
    """One pass over a (K, K) matrix ``T``: rank bins of the off-diagonal entries of valid rows
    and each valid row's k largest off-diagonal entries.

    ``keys``: ``T`` viewed as int32 (float32 bit patterns). When ``lut`` is non-empty, each
    entry's monotone key ``(key >> shift) - kmin`` (clamped) is mapped by ``lut`` to a rank
    bin, written to ``bins`` and counted in ``hist``; otherwise ``bins``/``hist`` are left
    alone (exact ranks are computed outside). ``top`` (K, k) receives column indices; ties
    keep the lower index.
    """
    kk = T.shape[0]
    nl = lut.shape[0]
    use_bins = nl > 0
    if use_bins:
        for g in range(hist.shape[0]):
            hist[g] = 0
    tv = np.empty(k, dtype=np.float64)
    for i in range(kk):
        if not valid[i]:
            continue
        filled = 0
        for j in range(kk):
            if j == i:
                continue
            v = np.float64(T[i, j])
            if use_bins:
                b = keys[i, j]
                if b < 0:
                    b = b ^ 0x7FFFFFFF
                u = (b >> shift) - kmin
                if u < 0:
                    u = 0
                elif u >= nl:
                    u = nl - 1
                g = lut[u]
                bins[i, j] = g
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
                top[i, p] = top[i, p - 1]
                p -= 1
            tv[p] = v
            top[i, p] = j


def _pair_pass(T, S, LT, LS, LM, valid, tb, tG, sb, sG, ttop, stop, k):  # pragma: no cover
    """Agreement of a student's matrix ``S`` with the teacher's ``T`` (both (K, K) float32,
    rows of ``valid`` classes only): returns (pearson, spearman, kl, js_distance,
    topk_overlap) exactly as :meth:`interptool.analyzers.similarity._core.Reference.compare`
    defines them. ``LT``/``LS``/``LM`` are log T, log S and log((T + S) / 2); ``tb``/``sb`` rank-group ids of the off-diagonal entries and ``tG``/``sG``
    the average rank of each group; ``ttop``/``stop`` each row's k nearest classes.
    """
    kk = T.shape[0]
    n = 0.0
    sx = sy = sxx = syy = sxy = 0.0
    rx = ry = rxx = ryy = rxy = 0.0
    kl_sum = 0.0
    jsd_sum = 0.0
    ov_sum = 0
    nv = 0
    for i in range(kk):
        if not valid[i]:
            continue
        nv += 1
        n += kk - 1
        kl = 0.0
        js = 0.0
        # branch-free body (selects, and a 0/1 weight for the diagonal) so the loop vectorises
        for j in range(kk):
            t = np.float64(T[i, j])
            s = np.float64(S[i, j])
            lt = np.float64(LT[i, j])
            ls_raw = np.float64(LS[i, j])
            lm = np.float64(LM[i, j])
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
            gt = w * tG[tb[i, j]]
            gs = w * sG[sb[i, j]]
            rx += gt
            ry += gs
            rxx += gt * gt
            ryy += gs * gs
            rxy += gt * gs
        kl_sum += kl
        jsd_sum += math.sqrt(max(js, 0.0) / _LN2)
        c = 0
        for a_ in range(k):
            for b_ in range(k):
                if stop[i, a_] == ttop[i, b_]:
                    c += 1
                    break
        ov_sum += c
    nan = np.nan
    if n < 3:
        pearson = nan
        spearman = nan
    else:
        vx = sxx - sx * sx / n
        vy = syy - sy * sy / n
        pearson = (sxy - sx * sy / n) / math.sqrt(vx * vy) if vx > 0 and vy > 0 else nan
        vx = rxx - rx * rx / n
        vy = ryy - ry * ry / n
        spearman = (rxy - rx * ry / n) / math.sqrt(vx * vy) if vx > 0 and vy > 0 else nan
    if nv == 0:
        return pearson, spearman, nan, nan, nan
    return pearson, spearman, kl_sum / nv, jsd_sum / nv, ov_sum / (k * nv)
