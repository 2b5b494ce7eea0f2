"""Compiled (numba) kernels for the batched similarity bootstrap.

Two orders over the blocks of weighted class sums. *Class-major* (rank grids, the ImageNet
case): :func:`_class_rows` takes one class's row of every resample of a block while that
class's sums are in the L2 cache, then :func:`_cell_ranks` and :func:`_rank_cross` give each
resample's Spearman sums. *Resample-major* (exact ranks and hierarchies, which need whole
matrices): per resample, one call of :func:`_replicate` walks the K x K class-similarity matrices of every
model row by row: it normalises the row's class sums (class size), takes the logarithms it
needs (each model's row and each student's midpoint with the teacher, by :func:`_log_row`, a
vectorisable float64 logarithm: a scalar ``math.log`` costs ~8 ns without SVML), counts every
model's rank cells and top-k set (:func:`_row_pass`) and adds each student's Pearson sums, KL
and Jensen-Shannon rows and top-k overlap against the teacher (:func:`_pair_pass`); everything
one row needs stays in the L1 cache. Once the rank cells of the whole matrix are counted, the
Spearman cross-products (:func:`_rank_cross`).

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
    # _replicate calls these through module globals (numba resolves them when it compiles)
    global _row_jit, _pair_jit, _log_jit
    _row_jit, _pair_jit = _COMPILED["rows"], _COMPILED["pair"]
    # no "reassoc" here: the polynomial is evaluated in the order written; error_model
    # "numpy": no ZeroDivisionError check on the division, which kept the loop scalar
    _log_jit = njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")(_log_row)
    _COMPILED["log"] = _log_jit
    global _log32_jit
    _log32_jit = njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")(_log_row32)
    _COMPILED["log32"] = _log32_jit
    _COMPILED["replicate"] = njit(cache=True, nogil=True)(_replicate)
    global _topk_jit, _insert_jit
    _insert_jit = njit(cache=True, nogil=True, inline="always")(_insert_sorted)
    _topk_jit = njit(cache=True, nogil=True)(_topk_row)
    _COMPILED["topk"] = _topk_jit
    _COMPILED["class_rows"] = njit(cache=True, nogil=True)(_class_rows)
    _COMPILED["cell_ranks"] = njit(cache=True, nogil=True)(_cell_ranks)


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


# float64 bit patterns used by _log_row
_MANT = (1 << 52) - 1
_ONE_BITS = 0x3FF0000000000000  # 1.0
_EXP_MAGIC = 0x4330000000000000  # 2^52: OR-ing a small integer into its mantissa adds it
_EXP_BIAS = 4503599627370496.0 + 1023.0  # 2^52 + the exponent bias
_SQRT2 = math.sqrt(2.0)
# 2 atanh(s) = 2 s + 2 s^3 / 3 + 2 s^5 / 5 + ...; |s| <= 0.1716 after the range reduction,
# so terms to s^23 leave a truncation error below 2^-60 relative
_ATANH = tuple(2.0 / (2 * n + 1) for n in range(1, 12))
_row_jit = _pair_jit = _log_jit = _log32_jit = _topk_jit = _insert_jit = None


def _log_row(vals, vbits, mant, mbits, expo, ebits, out):  # pragma: no cover - numba
    """``out[j] = log(vals[j])`` (float64, within a few ulp of ``math.log``; measured <= 2.3e-16
    relative) for finite ``vals``. ``vbits``/``mbits``/``ebits`` are int64 views of
    ``vals``/``mant``/``expo`` (scratch rows): the exponent and mantissa are taken apart by
    integer operations on the bit patterns and the polynomial has no branch, so both loops
    vectorise. Zeros, subnormals and negative values (no IEEE exponent, or a sign) are rare
    and redone by ``np.log`` afterwards (0 -> -inf)."""
    n = vals.shape[0]
    special = 0
    for j in range(n):
        b = vbits[j]
        mbits[j] = (b & _MANT) | _ONE_BITS
        ebits[j] = (b >> 52) | _EXP_MAGIC
        special += 1 if (b >> 52) <= 0 else 0
    c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11 = _ATANH
    for j in range(n):
        m = mant[j]
        big = np.float64(m > _SQRT2)  # reduce the mantissa to [sqrt(1/2), sqrt(2))
        m = m - 0.5 * big * m
        e = expo[j] - _EXP_BIAS + big
        f = m - 1.0
        s = f / (2.0 + f)
        z = s * s
        p = c11
        p = p * z + c10
        p = p * z + c9
        p = p * z + c8
        p = p * z + c7
        p = p * z + c6
        p = p * z + c5
        p = p * z + c4
        p = p * z + c3
        p = p * z + c2
        p = p * z + c1
        out[j] = e * _LN2 + (2.0 * s + s * z * p)
    if special:
        for j in range(n):
            if (vbits[j] >> 52) <= 0:
                out[j] = np.log(vals[j]) if vals[j] != 0.0 else -np.inf


_MANT32 = (1 << 23) - 1
_ONE32 = 0x3F800000  # 1.0f
_SQRT2_32 = np.float32(_SQRT2)
_LN2_32 = np.float32(_LN2)
_ATANH32 = tuple(np.float32(c) for c in _ATANH[:5])


def _log_row32(vbits, mant, mbits, out):  # pragma: no cover - numba
    """``out[j] = log(v[j])`` in float32 (within ~1 ulp of ``np.log`` on float32, as the
    matrices' logs were taken before) from ``vbits``, the int32 bit patterns of non-negative
    finite float32 values ``v``; ``mant``/``mbits``: a float32 scratch row and its int32 view.
    Terms to s^11 of 2 atanh(s) (truncation < 2^-28 relative); branch-free, so it
    vectorises. Zeros and subnormals are redone afterwards (0 -> -inf)."""
    n = vbits.shape[0]
    special = 0
    for j in range(n):
        b = vbits[j]
        mbits[j] = (b & _MANT32) | _ONE32
        special += 1 if (b >> 23) <= 0 else 0
    c1, c2, c3, c4, c5 = _ATANH32
    one = np.float32(1.0)
    half = np.float32(0.5)
    two = np.float32(2.0)
    for j in range(n):
        m = mant[j]
        big = np.float32(m > _SQRT2_32)
        m = m - half * big * m
        e = np.float32((vbits[j] >> 23) - 127) + big
        f = m - one
        s = f / (two + f)
        z = s * s
        p = c5
        p = p * z + c4
        p = p * z + c3
        p = p * z + c2
        p = p * z + c1
        out[j] = e * _LN2_32 + (two * s + s * z * p)
    if special:
        for j in range(n):
            b = vbits[j]
            if (b >> 23) <= 0:
                if b == 0:
                    out[j] = -np.inf
                else:  # a subnormal, or a sign bit
                    mant[j] = np.float32(0.0)
                    mbits[j] = b
                    out[j] = np.log(mant[j])


def _replicate(X, r, cinv, valid, k, width, shifts, kmins, luts, lutlens, hist, G, top, S,
               SK, full, V, L, MT, ET, M32, L32):  # pragma: no cover - numba
    """Every per-row statistic of resample ``r`` in one pass over its rows.

    ``X`` (K, B, M width) are the weighted class sums of a block of resamples
    (:func:`interptool.analyzers.similarity._core.stacked_class_sums`), ``cinv`` (K,) the
    inverse class sizes of resample ``r`` (0 for empty classes), in ``X``'s dtype. For each
    valid row ``i`` and model ``m``: the normalised row ``S[m, i or 0] = X[i, r, m width + j]
    * cinv[i]`` (rounded to ``X``'s dtype, as the matrices the metrics are defined on), its
    logarithm, its rank cells / top-k (:func:`_row_pass`, model ``m``'s cell table
    ``luts[m, :lutlens[m]]``, counts into ``hist[m]``, cells into ``G[m]``, sets into
    ``top[m]``), and, for students, the pair sums against the teacher (:func:`_pair_pass`;
    the midpoint rounded to ``X``'s dtype before its logarithm). ``full``: keep every row of
    ``S`` (exact ranks and the hierarchy need whole matrices), else row 0 is reused.
    ``V``/``L`` (M + 1, K) float64 scratch: values and their logs; ``LM`` its int64 view;
    ``MT``/``ET`` (2, K): float64 rows [0] with int64 views [1]... see :func:`_log_row`.

    Returns (acc (M, 10), ent (M, 2)): per student the sums of :func:`_pair_pass`; per model
    the summed entropy and non-target entropy of the valid classes.
    """
    kk = X.shape[0]
    nm = S.shape[0] - 1  # the last slot holds the midpoint row
    acc = np.zeros((nm, 10))
    ent = np.zeros((nm, 2))
    VI = V.view(np.int64)
    MI = MT.view(np.int64)
    EI = ET.view(np.int64)
    M32I = M32.view(np.int32)
    is32 = SK.shape[2] > 0
    empty_keys = np.empty((0, 0), dtype=np.int32)
    for i in range(kk):
        if not valid[i]:
            continue
        ci = cinv[i]
        cd = np.float64(ci)
        sr = i if full else 0
        for m in range(nm):
            o = m * width
            srow = S[m, sr]
            for j in range(kk):
                srow[j] = X[i, r, o + j] * ci
            ent[m, 0] += np.float64(X[i, r, o + kk]) * cd
            ent[m, 1] += np.float64(X[i, r, o + kk + 1]) * cd
            if is32:
                _log32_jit(SK[m, sr], M32, M32I, L32[m])
            else:
                vrow = V[m]
                for j in range(kk):
                    vrow[j] = np.float64(srow[j])
                _log_jit(vrow, VI[m], MT, MI, ET, EI, L[m])
            nl = lutlens[m]
            keys = SK[m, sr:sr + 1] if nl > 0 else empty_keys
            _row_jit(S[m, sr:sr + 1], keys, valid, i, shifts[m], kmins[m], luts[m, :nl], k,
                     G[m, i:i + 1], hist[m], top[m, i:i + 1])
        t0 = S[0, sr]
        for m in range(1, nm):
            sm = S[m, sr]
            # the midpoint in X's dtype (as a NumPy (T + S) * 0.5 on the matrices), then its
            # log: exactly log T where S == T
            if is32:
                mrow32 = S[nm, 0]
                for j in range(kk):
                    mrow32[j] = (t0[j] + sm[j]) * np.float32(0.5)
                _log32_jit(SK[nm, 0], M32, M32I, L32[nm])
                n, sx, sy, sxx, syy, sxy, kl, jsd, ov, nv = _pair_jit(
                    S[0, sr:sr + 1], S[m, sr:sr + 1], L32[0:1], L32[m:m + 1],
                    L32[nm:nm + 1], valid, i, top[0, i:i + 1], top[m, i:i + 1], k)
            else:
                mrow = V[nm]
                for j in range(kk):
                    mrow[j] = np.float64((t0[j] + sm[j]) * 0.5)
                _log_jit(mrow, VI[nm], MT, MI, ET, EI, L[nm])
                n, sx, sy, sxx, syy, sxy, kl, jsd, ov, nv = _pair_jit(
                    S[0, sr:sr + 1], S[m, sr:sr + 1], L[0:1], L[m:m + 1], L[nm:nm + 1],
                    valid, i, top[0, i:i + 1], top[m, i:i + 1], k)
            acc[m, 0] += n
            acc[m, 1] += sx
            acc[m, 2] += sy
            acc[m, 3] += sxx
            acc[m, 4] += syy
            acc[m, 5] += sxy
            acc[m, 6] += kl
            acc[m, 7] += jsd
            acc[m, 8] += ov
            acc[m, 9] += nv
    return acc, ent


# --------------------------------------------------------------------------------------------
# class-major bootstrap (rank grids, no hierarchy): one class's rows of every resample of a
# block while that class's sums are in the L2 cache, then one rank pass per resample
# --------------------------------------------------------------------------------------------
_TOPK_CHUNK = 32


def _insert_sorted(tv, out, p, v, j):  # pragma: no cover - numba
    """Put value ``v`` (column ``j``) into the descending list ``tv``/``out`` at slot ``p``
    or above, shifting the smaller entries down one (the entry at ``p`` is dropped)."""
    while p > 0 and tv[p - 1] < v:
        tv[p] = tv[p - 1]
        out[p] = out[p - 1]
        p -= 1
    tv[p] = v
    out[p] = j


def _topk_row(row, skip, k, tv, out):  # pragma: no cover - numba
    """Indices of the ``k`` largest entries of ``row`` other than ``row[skip]`` into ``out``
    (descending; ties keep the lower index, as :func:`_row_pass`). ``tv``: float64 scratch
    (k,). Once ``k`` entries are held, chunks of the row are first counted against the
    current k-th value by a vectorised comparison; only a chunk with a larger entry is walked
    one entry at a time (few are, once the threshold is near the top)."""
    n = row.shape[0]
    filled = 0
    j = 0
    while j < n and filled < k:
        if j != skip:
            _insert_jit(tv, out, filled, np.float64(row[j]), j)
            filled += 1
        j += 1
    while j < n:
        e = min(j + _TOPK_CHUNK, n)
        thr = tv[k - 1]
        larger = 0
        for q in range(j, e):
            larger += 1 if np.float64(row[q]) > thr else 0
        if larger:
            for q in range(j, e):
                v = np.float64(row[q])
                if q == skip or not v > tv[k - 1]:
                    continue
                _insert_jit(tv, out, k - 1, v, q)
        j = e


def _class_rows(Y, i, cinv, valid, k, width, shifts, kmins, lutlens, U, rowacc,
                rowent):  # pragma: no cover - numba
    """Row ``i`` of every resample of a block, from that class's weighted sums.

    ``Y`` (B, M width): class ``i``'s sums of every model (:func:`_replicate`'s ``X[i]``);
    ``cinv`` (B, K) inverse class sizes (0 for empty classes) in ``Y``'s dtype (float32);
    ``valid`` (B, K) non-empty classes. For each resample ``r`` with ``valid[r, i]`` and
    each model ``m``: the normalised row (rounded to float32, as in :func:`_replicate`), its
    entropy sums into ``rowent[r, i, m]``, each entry's rank-grid key (the index into model
    m's cell table, clamped to ``0 .. lutlens[m] - 1``: no table lookup here, so the loop
    vectorises; :func:`_cell_ranks` maps keys to cells) into ``U[r, m, i]`` (the diagonal
    entry too; it is never counted), its top-k set, and per student the sums of
    :func:`_pair_pass` against the teacher into ``rowacc[r, i, m]``.
    """
    nb = Y.shape[0]
    nm = U.shape[1]
    kk = U.shape[3]
    S = np.empty((nm + 1, kk), dtype=np.float32)  # the last row: a student's midpoint
    SK = S.view(np.int32)
    L32 = np.empty((nm + 1, kk), dtype=np.float32)
    M32 = np.empty(kk, dtype=np.float32)
    M32I = M32.view(np.int32)
    tops = np.zeros((nm, 1, k), dtype=np.int32)
    tv = np.empty(k, dtype=np.float64)
    half = np.float32(0.5)
    for r in range(nb):
        if not valid[r, i]:
            continue
        ci = cinv[r, i]
        cd = np.float64(ci)
        for m in range(nm):
            o = m * width
            srow = S[m]
            for j in range(kk):
                srow[j] = Y[r, o + j] * ci
            rowent[r, i, m, 0] = np.float64(Y[r, o + kk]) * cd
            rowent[r, i, m, 1] = np.float64(Y[r, o + kk + 1]) * cd
            _log32_jit(SK[m], M32, M32I, L32[m])
            keys = SK[m]
            urow = U[r, m, i]
            shift = shifts[m]
            kmin = kmins[m]
            top_key = lutlens[m] - 1
            for j in range(kk):
                b = np.int64(keys[j])
                b = b ^ 0x7FFFFFFF if b < 0 else b
                u = (b >> shift) - kmin
                u = 0 if u < 0 else u
                u = top_key if u > top_key else u
                urow[j] = u
            _topk_jit(srow, i, k, tv, tops[m, 0])
        t0 = S[0]
        mid = S[nm]
        for m in range(1, nm):
            sm = S[m]
            for j in range(kk):
                mid[j] = (t0[j] + sm[j]) * half
            _log32_jit(SK[nm], M32, M32I, L32[nm])
            n, sx, sy, sxx, syy, sxy, kl, jsd, ov, nv = _pair_jit(
                S[0:1], S[m:m + 1], L32[0:1], L32[m:m + 1], L32[nm:nm + 1], valid[r], i,
                tops[0], tops[m], k)
            a = rowacc[r, i, m]
            a[0] = n
            a[1] = sx
            a[2] = sy
            a[3] = sxx
            a[4] = syy
            a[5] = sxy
            a[6] = kl
            a[7] = jsd
            a[8] = ov
            a[9] = nv


def _cell_ranks(U, valid, luts, lutlens, nbins, counts, cells, table):  # pragma: no cover
    """Average 1-based rank of every grid key of one resample's matrices.

    ``U`` (M, K, K): grid keys from :func:`_class_rows`; counted over the off-diagonal
    entries of ``valid`` rows into ``counts`` (M, >= max lutlens) int32, gathered into each
    model's cells (``luts[m]`` maps key -> cell, ``nbins[m]`` cells; ``cells`` float64
    scratch) and turned into ``table[m, key]``: the average rank of the key's cell (ties
    share their average rank), ready for :func:`_rank_cross`."""
    nm = U.shape[0]
    kk = U.shape[1]
    for m in range(nm):
        nl = lutlens[m]
        h = counts[m]
        h[:nl] = 0
        for i in range(kk):
            if not valid[i]:
                continue
            row = U[m, i]
            for j in range(kk):
                h[row[j]] += 1
            h[row[i]] -= 1
        nb = nbins[m]
        c = cells[:nb]
        c[:] = 0.0
        lut = luts[m]
        for u in range(nl):
            c[lut[u]] += h[u]
        before = 0.0
        for g in range(nb):
            n = c[g]
            c[g] = before + 0.5 * (n + 1.0)
            before += n
        t = table[m]
        for u in range(nl):
            t[u] = c[lut[u]]
