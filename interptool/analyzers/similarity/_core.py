"""Numerical kernels shared by :class:`ClassSimilarity` and :func:`compare_similarity`.

Everything is expressed as *weighted class sums*: with a weight matrix ``W`` of shape
(B, N) (one row of ones for the point estimate, one row of bootstrap counts per resample),

    sums[b, i, :] = sum over samples n of class i of W[b, n] * p_n

so the point estimate and every bootstrap resample go through the same code. Samples are
sorted by class once, so each class is a contiguous segment and its contribution is one small
matmul ``W[:, seg] @ P[seg]`` -- O(B * N * K) in total, never a K x N one-hot product and never
a Python loop over samples.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from interptool.common.numerics import full_fp32_matmuls

# Below this a probability is treated as zero in a log (KL / JS guard).
EPS = 1e-12
# Per-sample probabilities are kept in memory when they take at most this many bytes;
# otherwise they are recomputed from the logits, class by class, for every bootstrap block.
PROBS_CACHE_BYTES = 512 * 1024 * 1024


def softmax_stats(z: np.ndarray, mask_col: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row softmax of ``z`` (float64) and its entropy (nats), numerically stable.

    ``mask_col`` (one column index per row) is excluded (logit -> -inf) before the softmax:
    the distribution over the *other* classes, renormalised (dark knowledge). Computing it from
    the masked logits rather than as ``p / (1 - p_target)`` stays exact when ``p_target`` is 1
    in float64.
    """
    z = np.array(z, dtype=np.float64, copy=True)
    zf = z
    if mask_col is not None:
        rows = np.arange(z.shape[0])
        zf = z.copy()
        zf[rows, mask_col] = 0.0  # finite stand-in: its probability is exactly 0 below
        z[rows, mask_col] = -np.inf
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    lse = m[:, 0] + np.log(s[:, 0])
    # H = logsumexp(z) - sum p z
    pz = np.einsum("ij,ij->i", p, zf)
    return p, lse - pz


@dataclass
class SortedLabels:
    """Labelled samples sorted by class: ``order`` (indices into the N samples) and per-class
    segment bounds ``starts[i]:stops[i]`` in that order."""

    order: np.ndarray
    starts: np.ndarray
    stops: np.ndarray
    num_classes: int

    @classmethod
    def build(cls, labels: np.ndarray, num_classes: int) -> SortedLabels:
        labelled = np.flatnonzero(labels >= 0)
        order = labelled[np.argsort(labels[labelled], kind="stable")]
        counts = np.bincount(labels[labelled], minlength=num_classes)
        stops = np.cumsum(counts)
        return cls(order=order, starts=stops - counts, stops=stops, num_classes=num_classes)

    @property
    def counts(self) -> np.ndarray:
        return self.stops - self.starts


class PerSample:
    """Per-sample quantities of one model at one temperature, segment by segment.

    ``kind`` "softmax" gives p = softmax(z / T); "dark_knowledge" gives the distribution over
    the non-target classes (target logit removed, renormalised). Both entropies (nats) are
    returned whatever the kind: the full softmax's and the non-target distribution's.
    Results are cached when they fit in :data:`PROBS_CACHE_BYTES`, else recomputed on demand
    (bounded memory for 50k x 1000 and beyond).
    """

    def __init__(self, logits: np.ndarray, sl: SortedLabels, T: float, kind: str,
                 cache: bool = True) -> None:
        self.logits, self.sl, self.T, self.kind = logits, sl, float(T), kind
        k = logits.shape[1]
        self._cache: dict[int, torch.Tensor] | None = (
            {} if cache and len(sl.order) * (k + 2) * 8 <= PROBS_CACHE_BYTES else None
        )

    def segment(self, i: int) -> torch.Tensor:
        """Class ``i``'s samples as one float64 CPU tensor (n_i, K + 2): the K probabilities,
        then the entropy and the non-target entropy -- one matmul per class gives all three
        weighted sums."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        idx = self.sl.order[self.sl.starts[i]:self.sl.stops[i]]
        z = self.logits[idx].astype(np.float64) / self.T
        p, h = softmax_stats(z)
        q, hq = softmax_stats(z, np.full(len(idx), i))
        out = torch.from_numpy(
            np.concatenate([q if self.kind == "dark_knowledge" else p, h[:, None], hq[:, None]],
                           axis=1)
        )
        if self._cache is not None:
            self._cache[i] = out
        return out


# MKL's gemm takes another kernel, with another summation order, for products of fewer than
# 4 rows on some CPUs (AMD EPYC Zen 4, MKL 2024.2: the rows of a 1-3 row product differ in the
# last bit from the same rows of a larger product; 4 rows and more agree). A resample's sums
# must not depend on how many resamples share its block (the thread count, the memory bound),
# so smaller products are padded with zero rows.
_MIN_GEMM_ROWS = 4


def rows_matmul(w: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> None:
    """``out = w @ m``, each row the same to the bit whatever the number of rows of ``w``."""
    n = w.shape[0]
    if n >= _MIN_GEMM_ROWS:
        torch.matmul(w, m, out=out)
        return
    padded = w.new_zeros((_MIN_GEMM_ROWS, w.shape[1]))
    padded[:n] = w
    out.copy_(torch.matmul(padded, m)[:n])


def single_thread_pool(workers: int) -> ThreadPoolExecutor:
    """Threads whose torch (and MKL) calls each run on one core.

    torch.set_num_threads sets MKL's thread count for the calling thread only
    (mkl_set_num_threads_local), so a matmul in a plain pool thread ran on MKL's default of
    every core: oversubscribed, and on some shapes summed in another order than the same
    matmul on the calling thread (replicates then depended on the thread count)."""
    return ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads,
                              initargs=(1,), thread_name_prefix="interptool-bootstrap")


@contextmanager
def _class_sum_matmuls(dev: torch.device) -> Iterator[None]:
    """Run the per-class matmuls on one CPU thread: they are small (B x n_i x K), and a
    thread pool on a busy machine made them ~15x slower (measured: 1.2 s vs 0.075 s for
    128 resamples of 10k x 100). On CUDA, run them in full float32 whatever the program
    allowed: TF32 would round every per-sample statistic to 10 mantissa bits (~1e-3)."""
    from interptool._resources import torch_threads

    if dev.type != "cpu":
        with full_fp32_matmuls():
            yield
        return
    with torch_threads(1):
        yield


def weighted_class_sums(
    W: np.ndarray, per: PerSample, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted per-class sums of probabilities (B, K, K), entropies (B, K) and non-target
    entropies (B, K).

    ``W`` (B, N) holds a weight per sample in the original order (labels < 0 are ignored).
    The matmuls run in float64 on ``device``.
    """
    sl = per.sl
    k = sl.num_classes
    b = W.shape[0]
    dev = torch.device(device)
    Wt = torch.as_tensor(W[:, sl.order], dtype=torch.float64, device=dev)
    # (K, B, K + 2): probabilities, entropy, non-target entropy; one matmul per class written
    # straight into its (contiguous) slot: at K = 1,000 the per-class overhead, not the
    # flops, dominates
    acc = torch.zeros((k, b, k + 2), dtype=torch.float64, device=dev)
    with _class_sum_matmuls(dev):
        for i in range(k):
            a, z = int(sl.starts[i]), int(sl.stops[i])
            if a == z:
                continue
            rows_matmul(Wt[:, a:z], per.segment(i).to(dev), acc[i])
    out = acc.transpose(0, 1).cpu().numpy()
    return out[:, :, :k], out[:, :, k], out[:, :, k + 1]


def weighted_counts(W: np.ndarray, sl: SortedLabels) -> np.ndarray:
    """Per-class sums of weights (B, K): the effective class sizes of each resample.

    One weighted ``bincount`` per resample over the samples in their original order (class
    ``K`` collects the unlabelled ones and is dropped): no (B, N) gather, cumulative sum and
    copy (~2 ms per resample at N = 50,000 in the bootstrap); integer counts are exact either
    way."""
    k = sl.num_classes
    cls = np.full(W.shape[1], k, dtype=np.intp)
    cls[sl.order] = np.repeat(np.arange(k), sl.counts)
    out = np.empty((W.shape[0], k))
    for r in range(W.shape[0]):
        out[r] = np.bincount(cls, weights=W[r], minlength=k + 1)[:k]
    return out


def normalise_rows(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Class means; rows of classes with no (weighted) samples are NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = sums / counts[..., None]
    out[counts == 0] = np.nan
    return out


def bootstrap_weights(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """``b`` resamples of ``n`` items with replacement, as counts (b, n) (float64).

    Drawn one resample at a time from one generator, so the stream -- and every CI -- does
    not depend on how the resamples are blocked.
    """
    W = np.empty((b, n), dtype=np.float64)
    for r in range(b):
        W[r] = np.bincount(rng.integers(0, n, size=n), minlength=n)
    return W


# --------------------------------------------------------------------------------------------
# agreement metrics, vectorised over a leading resample axis
# --------------------------------------------------------------------------------------------
def _masked_pearson(x: np.ndarray, y: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pearson r of x and y (B, M) over the entries where m (B, M) is True."""
    n = m.sum(axis=1)
    x = np.where(m, x, 0.0)
    y = np.where(m, y, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = x.sum(1) / n
        my = y.sum(1) / n
        dx = np.where(m, x - mx[:, None], 0.0)
        dy = np.where(m, y - my[:, None], 0.0)
        r = (dx * dy).sum(1) / np.sqrt((dx * dx).sum(1) * (dy * dy).sum(1))
    r[n < 3] = np.nan
    return r


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Average (tie-aware, 1-based) ranks of a 1-D array, except that entries equal to +inf
    (the masked-out entries of :func:`_masked_ranks`) get distinct ranks above every finite
    entry instead of their average (they are never used).

    One argsort (~0.1 s for 10^6 entries) is the whole cost when the finite values have no
    ties, the usual case for mean probabilities; ties are averaged only when present. About
    2x faster than ``scipy.stats.rankdata``, which matters inside the bootstrap.
    """
    n = x.size
    o = np.argsort(x)
    xs = x[o]
    tie = xs[1:] == xs[:-1]
    tie &= xs[1:] != np.inf
    out = np.empty(n, dtype=np.float64)
    if not tie.any():
        out[o] = np.arange(1, n + 1, dtype=np.float64)
        return out
    new = np.empty(n, dtype=bool)
    new[:1] = True
    new[1:] = ~tie
    group = np.cumsum(new) - 1
    bounds = np.flatnonzero(np.r_[new, True])
    avg = 0.5 * (bounds[:-1] + bounds[1:] - 1) + 1.0
    out[o] = avg[group]
    return out


def _masked_ranks(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Average ranks of x (B, M) among the entries where m is True (others get +inf and rank
    after every valid entry, so they do not shift the valid ranks)."""
    xm = np.where(m, x, np.inf)
    return np.stack([_average_ranks(row) for row in xm]) if len(xm) else xm


def masked_spearman(x: np.ndarray, y: np.ndarray, m: np.ndarray) -> np.ndarray:
    return _masked_pearson(_masked_ranks(x, m), _masked_ranks(y, m), m)


def offdiag_mask(valid_rows: np.ndarray) -> np.ndarray:
    """(B, K*K) mask of off-diagonal entries in rows of classes present in the resample."""
    b, k = valid_rows.shape
    off = ~np.eye(k, dtype=bool)
    return (valid_rows[:, :, None] & off[None]).reshape(b, k * k)


def _xlogx_rows(p: np.ndarray) -> np.ndarray:
    """sum_j p_j log p_j along the last axis (0 log 0 = 0)."""
    from scipy.special import xlogy

    return xlogy(p, p).sum(axis=-1)


def row_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats along the last axis; q is clipped at EPS, 0 log 0 = 0."""
    from scipy.special import xlogy

    return (xlogy(p, p) - xlogy(p, np.maximum(q, EPS))).sum(axis=-1)


def row_js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance along the last axis: sqrt(JS divergence in bits), in [0, 1]."""
    m = 0.5 * (p + q)
    js = 0.5 * row_kl(p, m) + 0.5 * row_kl(q, m)
    return np.sqrt(np.maximum(js, 0.0) / np.log(2.0))


def topk_neighbours(S: np.ndarray, k: int) -> np.ndarray:
    """Indices (..., K, k) of each row's k largest off-diagonal entries (ties: lower index)."""
    A = np.array(S, dtype=np.float64, copy=True)
    kk = A.shape[-1]
    A[..., np.arange(kk), np.arange(kk)] = -np.inf
    A = np.nan_to_num(A, nan=-np.inf)
    return np.argsort(-A, axis=-1, kind="stable")[..., :k]


def _topk_set(S: np.ndarray, k: int) -> np.ndarray:
    """Indices (..., K, k), in no particular order, of each row's k largest off-diagonal
    entries (exact ties at the k-th value may be broken either way)."""
    A = np.nan_to_num(np.array(S, dtype=np.float64, copy=True), nan=-np.inf)
    kk = A.shape[-1]
    A[..., np.arange(kk), np.arange(kk)] = -np.inf
    return np.argpartition(-A, k - 1, axis=-1)[..., :k]


def _topk_member(S: np.ndarray, k: int) -> np.ndarray:
    """Boolean (..., K, K): True where column j is one of row i's k nearest classes."""
    member = np.zeros(S.shape, dtype=bool)
    np.put_along_axis(member, _topk_set(S, k), True, axis=-1)
    return member


def topk_overlap(St: np.ndarray, Ss: np.ndarray, k: int) -> np.ndarray:
    """Per class (B, K): fraction of the teacher's k nearest classes also in the student's."""
    # membership only, so an O(K) partition per row suffices (no full sort)
    return np.take_along_axis(_topk_member(St, k), _topk_set(Ss, k), axis=-1).sum(axis=-1) / k


def _nanmean_rows(v: np.ndarray, valid: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, v, 0.0).sum(1) / valid.sum(1)


class Reference:
    """The teacher's side of :func:`pair_metrics` for one block of resamples, computed once
    and shared by every student (its ranks, nearest-class sets and sum p log p): with K =
    1,000 the ranks of 10^6 entries are the dominant cost of a resample."""

    def __init__(self, St: np.ndarray, valid: np.ndarray, k: int) -> None:
        b, kk, _ = St.shape
        self.St, self.valid, self.k = St, valid, k
        self.mask = offdiag_mask(valid)
        self.x = np.nan_to_num(St.reshape(b, kk * kk))
        self.St0 = np.nan_to_num(St)
        self._ranks: np.ndarray | None = None
        self._member: np.ndarray | None = None
        self._plogp: np.ndarray | None = None

    @property
    def ranks(self) -> np.ndarray:
        if self._ranks is None:
            self._ranks = _masked_ranks(self.x, self.mask)
        return self._ranks

    @property
    def member(self) -> np.ndarray:
        if self._member is None:
            self._member = _topk_member(self.St, self.k)
        return self._member

    @property
    def plogp(self) -> np.ndarray:
        if self._plogp is None:
            self._plogp = _xlogx_rows(self.St0)
        return self._plogp

    def compare(self, Ss: np.ndarray) -> dict[str, np.ndarray]:
        """Agreement of a student's matrices (B, K, K) with the teacher's, per resample."""
        from scipy.special import xlogy

        b, kk, _ = Ss.shape
        m, valid = self.mask, self.valid
        y = np.nan_to_num(Ss.reshape(b, kk * kk))
        Ss0 = np.nan_to_num(Ss)
        St0 = self.St0
        # KL(t || s) = sum t log t - sum t log s; JS = H(mid) - (H(t) + H(s)) / 2 with the
        # teacher's sum t log t reused (one xlogy pass per student term instead of five)
        kl = self.plogp - xlogy(St0, np.maximum(Ss0, EPS)).sum(-1)
        mid = 0.5 * (St0 + Ss0)
        js = 0.5 * (self.plogp + _xlogx_rows(Ss0)) - _xlogx_rows(mid)
        jsd = np.sqrt(np.maximum(js, 0.0) / np.log(2.0))
        overlap = np.take_along_axis(self.member, _topk_set(Ss, self.k), axis=-1).sum(-1)
        return {
            "pearson": _masked_pearson(self.x, y, m),
            "spearman": _masked_pearson(self.ranks, _masked_ranks(y, m), m),
            "kl": _nanmean_rows(kl, valid),
            "js_distance": _nanmean_rows(jsd, valid),
            # integer total / (k x classes): exact, so equal overlaps compare equal
            "topk_overlap": np.where(valid, overlap, 0).sum(1) / (self.k * valid.sum(1)),
        }


def pair_metrics(St: np.ndarray, Ss: np.ndarray, valid: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Agreement of teacher and student class-similarity matrices, per resample.

    St, Ss: (B, K, K) row-normalised matrices; valid: (B, K) rows (classes) with samples.
    Returns arrays of shape (B,): pearson / spearman over off-diagonal entries, mean row KL
    (teacher || student, nats), mean row JS distance (base 2), mean top-k overlap. Use
    :class:`Reference` directly to compare several students with one teacher.
    """
    return Reference(St, valid, k).compare(Ss)


def semantic_spearman(S: np.ndarray, valid: np.ndarray, sem: np.ndarray) -> np.ndarray:
    """Spearman (B,) between the symmetrised model similarity (S + S^T) / 2 and a semantic
    similarity matrix, over the pairs i < j of classes both present in the resample."""
    b, kk, _ = S.shape
    iu, ju = np.triu_indices(kk, k=1)
    sym = 0.5 * (S + np.swapaxes(S, 1, 2))
    x = np.nan_to_num(sym[:, iu, ju])
    m = valid[:, iu] & valid[:, ju]
    y = np.broadcast_to(sem[iu, ju], x.shape)
    return masked_spearman(x, y, m)


def fmt_t(t: float) -> str:
    """Compact temperature label used in keys and file names: 1.0 -> "1", 0.5 -> "0.5"."""
    return f"{float(t):g}"


def as_temperatures(temperature: float | Sequence[float]) -> list[float]:
    from interptool.errors import AnalysisError

    ts = [temperature] if np.isscalar(temperature) else list(temperature)
    try:
        ts = [float(t) for t in ts]
    except (TypeError, ValueError):
        raise AnalysisError(
            f"temperature must be a positive number or a list of them, got {temperature!r}"
        ) from None
    if not ts or any(not np.isfinite(t) or t <= 0 for t in ts):
        raise AnalysisError(
            f"temperature must be positive and finite, got {temperature!r} (e.g. 1 or [1, 4])"
        )
    return list(dict.fromkeys(ts))


# --------------------------------------------------------------------------------------------
# batched bootstrap: every model's class sums from one weighted reduction per block of
# resamples, then one fused pass per (teacher, student) and resample
# --------------------------------------------------------------------------------------------
# Up to this K the bootstrap keeps float64 sums and exact (argsort) ranks: cheap at that size
# and identical to recomputing each resample from scratch. Above it, float32 sums (relative
# error ~1e-7) and Spearman ranks on a fine grid (:class:`RankGrid`).
EXACT_K = 256
# Rank grid: quantile cells of the point estimate's entries, and the largest key table.
RANK_BINS = 1 << 15
_LUT_MAX = 1 << 16
# Bytes of the (K, B, models x (K + 2)) block of weighted class sums (resample-major pass), or
# of the (B, models, K, K) uint16 grid keys (class-major pass): sets B.
SUMS_BLOCK_BYTES = 512 * 1024 * 1024
# Per-sample statistics of all models are kept in memory up to this size (float32 at scale);
# beyond it they are recomputed class by class for every block (bounded memory).
STACKED_CACHE_BYTES = 1024 * 1024 * 1024
# Bytes of K x K work arrays one block of the NumPy (no numba) bootstrap may hold.
_FALLBACK_BLOCK_BYTES = 256 * 1024 * 1024
# Up to this K the NumPy path is used even with numba installed: its K x K passes are cheap
# there, and compiling the kernels the first time after installation (7-40 s measured) would
# cost more than the whole bootstrap (the demo's 12 classes: `make demo` right after install).
KERNEL_MIN_K = 64


def kernels_pay_off(num_classes: int) -> bool:
    """Whether the bootstrap uses the compiled kernels for ``num_classes`` classes: above
    :data:`KERNEL_MIN_K` and when numba is usable (checked, so compiled, only then)."""
    if num_classes <= KERNEL_MIN_K:
        return False
    from interptool.analyzers.similarity import _kernels

    return _kernels.usable()


def bootstrap_dtype(num_classes: int) -> np.dtype:
    """float64 up to :data:`EXACT_K` classes, float32 above (half the matmul time)."""
    return np.dtype(np.float64 if num_classes <= EXACT_K else np.float32)


class StackedSamples:
    """Per-sample statistics of every model at one temperature, side by side per class:
    ``segment(i)`` is (n_i, M (K + 2)): for model m the columns ``m (K + 2) ...`` hold its K
    probabilities (``kind`` "softmax" or "dark_knowledge"), its entropy and its non-target
    entropy, so one matmul of a block of resample weights gives every model's class sums."""

    def __init__(self, logits: Sequence[np.ndarray], sl: SortedLabels, T: float, kind: str,
                 dtype: np.dtype, device: str | torch.device = "cpu", keep: bool = True) -> None:
        self.logits, self.sl, self.T, self.kind = list(logits), sl, float(T), kind
        self.dtype = np.dtype(dtype)
        self.device = torch.device(device)
        k = sl.num_classes
        self.width = k + 2
        nbytes = len(sl.order) * len(self.logits) * self.width * self.dtype.itemsize
        self._cache: dict[int, torch.Tensor] | None = (
            {} if keep and nbytes <= STACKED_CACHE_BYTES else None)
        # float64 class sums (exact, unweighted) recorded while the segments are built: the
        # point estimate and each model's SimilarityResult come from the same softmax pass
        # as the bootstrap's per-sample statistics (it was computed three times: ~1 s CPU
        # per model at 50,000 x 1,000)
        self._point: dict[int, np.ndarray] = {}

    @property
    def num_models(self) -> int:
        return len(self.logits)

    def segment(self, i: int) -> torch.Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        idx = self.sl.order[self.sl.starts[i]:self.sl.stops[i]]
        parts = []
        point = []
        for z0 in self.logits:
            z = z0[idx].astype(np.float64) / self.T
            p, h = softmax_stats(z)
            q, hq = softmax_stats(z, np.full(len(idx), i))
            parts += [q if self.kind == "dark_knowledge" else p, h[:, None], hq[:, None]]
            point.append(np.concatenate([p.sum(0), q.sum(0), [h.sum(), hq.sum()]]))
        self._point[i] = np.stack(point)
        out = torch.from_numpy(np.concatenate(parts, axis=1).astype(self.dtype)).to(self.device)
        if self._cache is not None:
            self._cache[i] = out
        return out

    def point_sums(self) -> np.ndarray:
        """Unweighted float64 class sums of every model, (M, K, 2 K + 2): per class the sum of
        the softmax, of the non-target (dark-knowledge) distribution, of the entropy and of
        the non-target entropy; NaN for empty classes. Builds (and, when they fit, keeps)
        every segment once."""
        k = self.sl.num_classes
        out = np.full((self.num_models, k, 2 * k + 2), np.nan)
        for i in range(k):
            if self.sl.starts[i] == self.sl.stops[i]:
                continue
            if i not in self._point:
                self.segment(i)
            out[:, i] = self._point[i]
        return out


def block_size(num_classes: int, num_models: int, itemsize: int, n_boot: int) -> int:
    """Resamples per block so that the block of class sums stays within SUMS_BLOCK_BYTES."""
    per = num_classes * num_models * (num_classes + 2) * itemsize
    return int(max(1, min(256, SUMS_BLOCK_BYTES // per, n_boot)))


def stacked_class_sums(W: np.ndarray, st: StackedSamples, workers: int = 1,
                       out: torch.Tensor | None = None) -> np.ndarray:
    """Weighted class sums of every model for a block of resamples: (K, B, M (K + 2)).

    ``W`` (B, N) holds each sample's weight (its count in the resample) in the original order.
    One (B, n_i) @ (n_i, M (K + 2)) matmul per class, on ``st.device``; on the CPU each matmul
    runs on one thread and the classes are shared among ``workers`` threads (torch's own
    thread pool on small matmuls was ~14x slower on a busy 2-core machine). ``out``: a zeroed
    (K, >= B, M (K + 2)) tensor of ``st``'s dtype and device to write into, reused from block
    to block (a fresh 250 MB block cost ~4 ms per resample in page faults and zeroing at
    K = 1,000); rows of empty classes are never written, so they stay 0.
    """
    sl = st.sl
    k = sl.num_classes
    b = W.shape[0]
    dev = st.device
    tdtype = torch.float64 if st.dtype == np.float64 else torch.float32
    # convert, then gather with np.take: 4-6x less time than gathering float64 first
    # (0.6 -> 0.1 ms per resample at N = 50,000); the same values
    Wt = torch.from_numpy(np.take(W.astype(st.dtype), sl.order, axis=1)).to(dev)
    if out is None:
        acc = torch.zeros((k, b, st.num_models * st.width), dtype=tdtype, device=dev)
    else:
        acc = out[:, :b]

    def run(classes: range) -> None:
        for i in classes:
            a, z = int(sl.starts[i]), int(sl.stops[i])
            if a != z:
                rows_matmul(Wt[:, a:z], st.segment(i), acc[i])

    with _class_sum_matmuls(dev):
        if dev.type == "cpu" and workers > 1 and k > 1:
            step = -(-k // workers)
            with single_thread_pool(workers) as pool:
                list(pool.map(run, [range(a, min(k, a + step)) for a in range(0, k, step)]))
        else:
            run(range(k))
    return acc.cpu().numpy()


def _monotone_keys(x: np.ndarray) -> np.ndarray:
    """float32 values -> int64 keys with the same order (IEEE bit patterns, negatives
    flipped), the keys :func:`interptool.analyzers.similarity._kernels._row_pass` uses."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(b < 0, b ^ 0x7FFFFFFF, b)


class RankGrid:
    """How one model's matrix entries are ranked in the bootstrap replicates.

    Exact ranks need a sort of the K (K - 1) off-diagonal entries per resample (~40 ms at K =
    1,000, most of the old bootstrap's time). Above :data:`EXACT_K` classes the replicates use
    *rank groups* instead: cells between the :data:`RANK_BINS`-quantiles of the point
    estimate's entries (resolved on a float32 key grid of at most 2^16 keys: relative width
    <= 2^-7 over the full float32 range, ~2^-11 for typical probabilities); entries in
    one cell share their average rank, as ties do. The Spearman correlation then differs from
    the exact one by far less than its bootstrap spread (at K = 1,000, ~30 of 10^6 entries
    per cell: |difference| < 1e-4, tested). The point estimate itself always uses exact ranks.
    """

    def __init__(self, point: np.ndarray, valid: np.ndarray, binned: bool,
                 nbins: int = RANK_BINS) -> None:
        self.binned = bool(binned)
        self.lut = np.empty(0, dtype=np.int32)
        self.shift, self.kmin, self.nbins = 0, 0, 1
        if not self.binned:
            return
        kk = point.shape[0]
        m = valid[:, None] & ~np.eye(kk, dtype=bool)
        keys = np.sort(_monotone_keys(point.astype(np.float32)[m]))
        if keys.size == 0:
            self.binned = False
            return
        nb = int(min(nbins, keys.size))
        edges = keys[(np.arange(1, nb) * keys.size) // nb]
        lo, hi = int(keys[0]), int(keys[-1])
        shift = 0
        while (hi >> shift) - (lo >> shift) + 1 > _LUT_MAX:
            shift += 1
        self.shift, self.kmin, self.nbins = shift, lo >> shift, nb
        u = np.arange((hi >> shift) - (lo >> shift) + 1, dtype=np.int64) + self.kmin
        self.lut = np.searchsorted(edges >> shift, u, side="right").astype(np.int32)

    def rank_groups(self, T: np.ndarray, valid: np.ndarray, k: int,
                    groups: np.ndarray | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(group id per entry (K, K) int32, average 1-based rank per group, top-k (K, k))
        of one replicate's matrix ``T`` (off-diagonal entries of valid rows). ``groups``: a
        (K, K) int32 buffer to fill (reused across resamples: no page faults)."""
        from interptool.analyzers.similarity._kernels import kernel

        kk = T.shape[0]
        if groups is None:
            groups = np.zeros((kk, kk), dtype=np.int32)
        top = np.zeros((kk, k), dtype=np.int32)
        hist = np.zeros(self.nbins, dtype=np.int64)
        keys = T.view(np.int32) if self.binned else np.empty((0, 0), dtype=np.int32)
        kernel("rows")(T, keys, valid, 0, self.shift, self.kmin, self.lut, k, groups, hist, top)
        if self.binned:
            return groups, self.average_ranks(hist), top
        return (*self.exact_groups(T, valid, groups), top)

    @staticmethod
    def average_ranks(hist: np.ndarray) -> np.ndarray:
        """Average 1-based rank of each cell from the cell counts."""
        before = np.cumsum(hist) - hist
        return before + 0.5 * (hist + 1)

    @staticmethod
    def exact_groups(T: np.ndarray, valid: np.ndarray, groups: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Exact tie groups of the off-diagonal entries of valid rows of the whole (K, K)
        matrix ``T``: group ids into ``groups``, and each group's average rank."""
        kk = T.shape[0]
        m = valid[:, None] & ~np.eye(kk, dtype=bool)
        idx = np.flatnonzero(m.ravel())
        v = T.ravel()[idx]
        o = np.argsort(v, kind="stable")
        vs = v[o]
        new = np.empty(vs.size, dtype=bool)
        new[:1] = True
        new[1:] = vs[1:] != vs[:-1]
        gid = np.cumsum(new) - 1
        groups.ravel()[idx[o]] = gid
        starts = np.flatnonzero(new)
        counts = np.diff(np.r_[starts, vs.size])
        return groups, starts + 0.5 * (counts + 1)


def _workers() -> dict:
    """Threads for the bootstrap (the class-sum matmuls and the per-resample work), chosen by
    :func:`interptool._resources.free_core_threads`: the cores this process may use (affinity,
    cgroup quota), capped by torch's intra-op budget (which ``--threads`` sets), and, unless
    the user asked for a number, only as many as are idle now (on a loaded 2-core machine two
    threads were slower than one); at most 8. Returns its record (``torch_threads``)."""
    from interptool._resources import free_core_threads

    choice = free_core_threads(cap=torch.get_num_threads())
    choice["torch_threads"] = int(max(1, min(8, choice["torch_threads"])))
    return choice


def replicate_metrics(sums: np.ndarray, counts: np.ndarray, num_models: int, k: int,
                      grids: Sequence[RankGrid], sem: np.ndarray | None = None,
                      workers: int = 1) -> dict[tuple[int, str], np.ndarray]:
    """Every bootstrap metric of one block from its weighted class sums.

    ``sums`` (K, B, M (K + 2)) from :func:`stacked_class_sums`, ``counts`` (B, K) weighted class
    sizes, ``grids`` one :class:`RankGrid` per model. Returns {(model index, metric): (B,)}:
    "entropy" and "nontarget_entropy" for every model, the five pair metrics of each
    student (index >= 1) against the teacher (index 0), "hierarchy_spearman" with ``sem``.
    Same definitions as :meth:`Reference.compare` (tested against it). Resamples are spread
    over ``workers`` threads (NumPy and the numba kernels release the GIL).
    """
    kk, b, _ = sums.shape
    out: dict[tuple[int, str], np.ndarray] = {}
    for m in range(num_models):
        for name in ("entropy", "nontarget_entropy") + (("hierarchy_spearman",) if sem is not None else ()):
            out[(m, name)] = np.empty(b)
        if m:
            for name in _PAIR_NAMES:
                out[(m, name)] = np.empty(b)

    tables = _GridTables(grids)

    def one(r: int) -> None:
        for key, v in _one_replicate(sums, r, counts[r], num_models, k, grids, sem,
                                     tables).items():
            out[key][r] = v

    if workers > 1 and b > 1:
        with ThreadPoolExecutor(max_workers=min(workers, b)) as pool:
            list(pool.map(one, range(b)))
    else:
        for r in range(b):
            one(r)
    return out


_PAIR_NAMES = ("pearson", "spearman", "kl", "js_distance", "topk_overlap")


_WORKSPACE = threading.local()


def _buffers(kk: int, full: bool, k: int, num_models: int, nbins: int,
             dtype: np.dtype, binned: bool = False) -> dict[str, np.ndarray]:
    """Per-thread work arrays, reused from one resample to the next: allocating fresh arrays
    per resample cost more in page faults than the arithmetic.

    The rank cells ``G`` are uint16 whenever every cell id fits (grid cells, or the exact tie
    groups of K (K - 1) <= 2^16 entries) and the cell counts ``hist`` int32: at K = 1,000
    three models' counts, key tables and cell rows then stay in the 2 MiB L2 cache that
    their int64 / int32 versions overflowed (the rank-cell pass took 4.2 ms per model and
    resample in the replicate pass, 2.7 ms alone)."""
    key = (kk, full, k, num_models, nbins, np.dtype(dtype).str, binned)
    ws = getattr(_WORKSPACE, "buffers", None)
    if ws is None or ws[0] != key:
        # one slot more than models: its row 0 holds the midpoint of a student and the teacher
        S = np.empty((num_models + 1, kk if full else 1, kk), dtype)
        ws = (key, {"S": S,
                    "SK": (S.view(np.int32) if S.dtype == np.float32
                           else np.empty((num_models + 1, S.shape[1], 0), np.int32)),
                    "V": np.empty((num_models + 1, kk)), "L": np.empty((num_models + 1, kk)),
                    "MT": np.empty(kk), "ET": np.empty(kk),
                    "M32": np.empty(kk, np.float32),
                    "L32": np.empty((num_models + 1, kk), np.float32),
                    # zeroed once: the diagonal is never written and must be a valid cell id
                    "G": np.zeros((num_models, kk, kk), _cell_dtype(kk, nbins, binned)),
                    "top": np.zeros((num_models, kk, k), np.int32),
                    "hist": np.zeros((num_models, nbins), np.int32)})
        _WORKSPACE.buffers = ws
    return ws[1]


def _cell_dtype(kk: int, nbins: int, binned: bool) -> np.dtype:
    """Smallest dtype of the rank-cell ids of a (K, K) matrix: grid cells (< ``nbins``) when
    every model is ``binned``, else exact tie groups (< K (K - 1))."""
    most = nbins if binned else kk * (kk - 1)
    return np.dtype(np.uint16 if most <= 1 << 16 else np.int32)


class _GridTables:
    """Every model's rank-cell table in the arrays :func:`_kernels._replicate` takes (uint16
    cell ids when they fit: half the cache footprint of int32)."""

    def __init__(self, grids: Sequence[RankGrid]) -> None:
        self.binned = all(g.binned for g in grids)
        self.nbins = max(g.nbins for g in grids)
        self.model_nbins = np.array([g.nbins for g in grids], np.int64)
        self.shifts = np.array([g.shift for g in grids], np.int64)
        self.kmins = np.array([g.kmin for g in grids], np.int64)
        self.lens = np.array([g.lut.shape[0] for g in grids], np.int64)
        self.luts = np.zeros((len(grids), max(1, int(self.lens.max()))),
                             np.uint16 if self.nbins <= 1 << 16 else np.int32)
        for m, g in enumerate(grids):
            self.luts[m, :g.lut.shape[0]] = g.lut


# Keep whole K x K matrices in the work buffers instead of one row (only needed for exact
# ranks and the hierarchy; tests set it to check that the rows give the same numbers).
KEEP_WHOLE_MATRICES = False


def _one_replicate(sums: np.ndarray, r: int, c: np.ndarray, num_models: int, k: int,
                   grids: Sequence[RankGrid], sem: np.ndarray | None,
                   tables: _GridTables | None = None) -> dict[tuple[int, str], float]:
    """Metrics of resample ``r`` from the block's class sums ``sums`` (K, B, M (K + 2)) and its
    class sizes ``c``.

    One compiled pass over the rows (:func:`_kernels._replicate`: normalise, logs, rank
    cells, top-k and the pair sums of every student, one row at a time, in cache), then the
    Spearman cross-products over the cell ids of the whole matrix. With exact ranks
    (K <= EXACT_K) or a hierarchy the whole normalised matrices are kept.
    """
    from interptool.analyzers.similarity._kernels import kernel

    kk = sums.shape[0]
    width = kk + 2
    dtype = sums.dtype
    tables = tables or _GridTables(grids)
    full = KEEP_WHOLE_MATRICES or not tables.binned or sem is not None
    buf = _buffers(kk, full, k, num_models, tables.nbins, dtype, tables.binned)
    valid = c > 0
    nvalid = valid.sum()
    cinv = np.zeros(kk, dtype=dtype)
    cinv[valid] = 1.0 / c[valid]
    res: dict[tuple[int, str], float] = {}
    buf["hist"][:] = 0
    acc, ent_sums = kernel("replicate")(
        sums, r, cinv, valid, k, width, tables.shifts, tables.kmins, tables.luts, tables.lens,
        buf["hist"], buf["G"], buf["top"], buf["S"], buf["SK"], full, buf["V"], buf["L"],
        buf["MT"], buf["ET"], buf["M32"], buf["L32"])
    # rank groups of the whole matrices
    ranks = []
    for m in range(num_models):
        res[(m, "entropy")] = ent_sums[m, 0] / nvalid
        res[(m, "nontarget_entropy")] = ent_sums[m, 1] / nvalid
        if grids[m].binned:
            ranks.append(RankGrid.average_ranks(buf["hist"][m, :grids[m].nbins]))
        else:
            ranks.append(RankGrid.exact_groups(buf["S"][m], valid, buf["G"][m])[1])
        if sem is not None:
            Sn = buf["S"][m].astype(np.float64)
            Sn[~valid] = np.nan
            res[(m, "hierarchy_spearman")] = semantic_spearman(Sn[None], valid[None], sem)[0]
    cross = kernel("cross")
    nan = float("nan")
    for m in range(1, num_models):
        n, sx, sy, sxx, syy, sxy, kl_sum, jsd_sum, ov_sum, nv = acc[m]
        rx, ry, rxx, ryy, rxy = cross(valid, buf["G"][0], ranks[0], buf["G"][m], ranks[m])
        res[(m, "pearson")] = _corr(n, sx, sy, sxx, syy, sxy)
        res[(m, "spearman")] = _corr(n, rx, ry, rxx, ryy, rxy)
        res[(m, "kl")] = kl_sum / nv if nv else nan
        res[(m, "js_distance")] = jsd_sum / nv if nv else nan
        res[(m, "topk_overlap")] = ov_sum / (k * nv) if nv else nan
    return res


def class_major_block_size(num_classes: int, num_models: int, n_boot: int) -> int:
    """Resamples per block of :func:`class_major_metrics`: its (B, M, K, K) uint16 grid keys
    stay within SUMS_BLOCK_BYTES."""
    per = num_models * num_classes * num_classes * 2
    return int(max(1, min(256, SUMS_BLOCK_BYTES // per, n_boot)))


_RANK_WORKSPACE = threading.local()


def _rank_buffers(num_models: int, lut_len: int, nbins: int) -> tuple[np.ndarray, ...]:
    """Per-thread scratch of :func:`_kernels._cell_ranks` (key counts, cell ranks, key ->
    rank tables), reused from one resample to the next."""
    key = (num_models, lut_len, nbins)
    ws = getattr(_RANK_WORKSPACE, "buffers", None)
    if ws is None or ws[0] != key:
        ws = (key, (np.zeros((num_models, lut_len), np.int32), np.zeros(nbins),
                    np.zeros((num_models, lut_len))))
        _RANK_WORKSPACE.buffers = ws
    return ws[1]


def class_major_metrics(W: np.ndarray, st: StackedSamples, counts: np.ndarray, k: int,
                        tables: _GridTables, keys: np.ndarray, workers: int = 1,
                        fuse: bool | None = None) -> dict[tuple[int, str], np.ndarray]:
    """Every bootstrap metric of one block of resamples, class by class (rank grids, float32,
    no hierarchy: the path at ImageNet scale). Same metrics as :func:`replicate_metrics`.

    Why class-major: the resample-major path wrote every model's (K, B, M (K + 2)) class sums
    to memory and read them back row by row (~36 MB of memory traffic per resample at K =
    1,000; the matmuls ran at a fifth of their in-cache speed). Here one class's sums of all
    B resamples, ``W[:, seg] @ P[seg]`` (B, M (K + 2)), stay in the L2 cache while
    :func:`_kernels._class_rows` takes that row of every resample: normalise, logs, rank-grid
    keys (into ``keys`` (>= B, M, K, K) uint16), top-k and each student's pair sums. Then per
    resample :func:`_kernels._cell_ranks` counts the keys into the grid's cells and
    :func:`_kernels._rank_cross` gives the Spearman sums. Classes, then resamples, are shared
    among ``workers`` threads; every (resample, row) is computed by one thread and summed
    over rows in a fixed order, so the numbers do not depend on the number of threads.
    ``fuse``: each class's matmul right before its rows (default on the CPU); otherwise the
    class sums of a sub-block of resamples come from :func:`stacked_class_sums` first (on an
    accelerator: one batched reduction there, one copy to the host).
    """
    from interptool.analyzers.similarity._kernels import kernel

    sl = st.sl
    kk = sl.num_classes
    b = W.shape[0]
    nm = st.num_models
    valid = counts > 0
    cinv = np.zeros((b, kk), dtype=st.dtype)
    cinv[valid] = 1.0 / counts[valid]
    U = keys[:b]
    rowacc = np.zeros((b, kk, nm, 10))
    rowent = np.zeros((b, kk, nm, 2))
    rows = kernel("class_rows")
    args = (k, st.width, tables.shifts, tables.kmins, tables.lens)
    step = max(1, -(-kk // (8 * workers)))  # small chunks: a stalled thread is caught up
    chunks = [range(a, min(kk, a + step)) for a in range(0, kk, step)]
    fuse = st.device.type == "cpu" if fuse is None else bool(fuse)
    pool = single_thread_pool(workers) if workers > 1 else None

    def each(fn, items) -> None:
        if pool is None:
            for x in items:
                fn(x)
        else:
            list(pool.map(fn, items))

    try:
        if fuse:
            Wt = torch.from_numpy(np.take(W.astype(st.dtype), sl.order, axis=1))

            def cpu_classes(classes: range) -> None:
                Y = np.empty((b, nm * st.width), dtype=st.dtype)
                Yt = torch.from_numpy(Y)
                for i in classes:
                    a, z = int(sl.starts[i]), int(sl.stops[i])
                    if a != z:
                        rows_matmul(Wt[:, a:z], st.segment(i), Yt)
                        rows(Y, i, cinv, valid, *args, U, rowacc, rowent)

            with _class_sum_matmuls(st.device):
                each(cpu_classes, chunks)
        else:
            # sub-blocks of resamples bound the (K, B, M (K + 2)) sums as in the row path
            sub = block_size(kk, nm, st.dtype.itemsize, b)
            for s0 in range(0, b, sub):
                s1 = min(b, s0 + sub)
                sums = stacked_class_sums(W[s0:s1], st, workers)

                def device_classes(classes: range, sums=sums, s0=s0, s1=s1) -> None:
                    for i in classes:
                        if sl.starts[i] != sl.stops[i]:
                            rows(sums[i], i, cinv[s0:s1], valid[s0:s1], *args, U[s0:s1],
                                 rowacc[s0:s1], rowent[s0:s1])

                each(device_classes, chunks)

        cell_ranks, cross = kernel("cell_ranks"), kernel("cross")
        spear = np.zeros((b, nm, 5))

        def rank(r: int) -> None:
            hcounts, cells, table = _rank_buffers(nm, tables.luts.shape[1], tables.nbins)
            cell_ranks(U[r], valid[r], tables.luts, tables.lens, tables.model_nbins, hcounts,
                       cells, table)
            for m in range(1, nm):
                spear[r, m] = cross(valid[r], U[r, 0], table[0], U[r, m], table[m])

        each(rank, range(b))
    finally:
        if pool is not None:
            pool.shutdown()

    nvalid = valid.sum(1)
    acc = rowacc.sum(axis=1)
    ent = rowent.sum(axis=1)
    out: dict[tuple[int, str], np.ndarray] = {}
    nan = float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        for m in range(nm):
            out[(m, "entropy")] = ent[:, m, 0] / nvalid
            out[(m, "nontarget_entropy")] = ent[:, m, 1] / nvalid
        for m in range(1, nm):
            a = acc[:, m]
            nv = a[:, 9]
            out[(m, "pearson")] = np.array([_corr(*a[r, :6]) for r in range(b)])
            out[(m, "spearman")] = np.array([_corr(a[r, 0], *spear[r, m]) for r in range(b)])
            out[(m, "kl")] = np.where(nv > 0, a[:, 6] / nv, nan)
            out[(m, "js_distance")] = np.where(nv > 0, a[:, 7] / nv, nan)
            out[(m, "topk_overlap")] = np.where(nv > 0, a[:, 8] / (k * nv), nan)
    return out


def _corr(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float:
    """Pearson correlation from its sums (NaN below 3 entries or with no variance)."""
    if n < 3:
        return float("nan")
    vx = sxx - sx * sx / n
    vy = syy - sy * sy / n
    if not (vx > 0 and vy > 0):
        return float("nan")
    return float((sxy - sx * sy / n) / np.sqrt(vx * vy))


class BootstrapEvaluator:
    """Statistics of :func:`compare_similarity` for blocks of bootstrap resamples.

    Called with resample weights ``W`` (B, N) (how often each image is drawn), it returns
    {(model, temperature or None, metric): (B,)} with the keys of the point estimate. Every
    model's weighted class sums come from one matmul per class and block (on ``device``: one
    weighted reduction for all resamples of the block), the metrics from the fused kernels of
    :mod:`interptool.analyzers.similarity._kernels`, spread over threads: class by class
    (:func:`class_major_metrics`, ``class_major``) where rank grids are used and no hierarchy
    needs whole matrices, else resample by resample (:func:`stacked_class_sums` then
    :func:`replicate_metrics`). Without numba the metrics come from :class:`Reference` (exact
    ranks, float64; ~10x slower at K = 1,000). ``block`` is the number of resamples a call
    should get (memory bound). ``stacked``: the per-sample statistics (one
    :class:`StackedSamples` per temperature) when the caller already built them for the point
    estimate. ``workers``: threads (default: :func:`_workers`, recorded in ``threads``); each
    (resample, row) is computed by one thread, so the replicates do not depend on the number
    of threads.
    """

    def __init__(self, logits: Sequence[np.ndarray], names: Sequence[str], sl: SortedLabels,
                 labelled: np.ndarray, correct: Sequence[np.ndarray],
                 agree: Sequence[np.ndarray], temps: Sequence[float], matrix: str, k: int,
                 point_matrices: Sequence[Sequence[np.ndarray]], sem: np.ndarray | None,
                 device: str, n_boot: int, *, use_kernels: bool | None = None,
                 stacked: Sequence[StackedSamples] | None = None,
                 workers: int | None = None) -> None:
        self.names, self.sl, self.k, self.sem = list(names), sl, int(k), sem
        self.labelled, self.correct, self.agree = labelled, list(correct), list(agree)
        self.temps = list(temps)
        kk = sl.num_classes
        self.fast = kernels_pay_off(kk) if use_kernels is None else bool(use_kernels)
        dtype = bootstrap_dtype(kk) if self.fast else np.dtype(np.float64)
        if stacked is None or any(st.dtype != dtype for st in stacked):
            stacked = [StackedSamples(logits, sl, t, matrix, dtype, device) for t in self.temps]
        self.stacked = list(stacked)
        self.block = block_size(kk, len(self.names), dtype.itemsize, n_boot)
        if not self.fast:
            per_resample = kk * kk * 8 * (len(self.names) + 12)
            self.block = int(max(1, min(self.block, _FALLBACK_BLOCK_BYTES // per_resample)))
        valid = sl.counts > 0
        self.grids = [[RankGrid(np.asarray(P, dtype=np.float64), valid,
                                binned=self.fast and kk > EXACT_K)
                       for P in mats] for mats in point_matrices]
        # the class-major path (:func:`class_major_metrics`) wherever rank grids are used and
        # whole matrices are not needed; it sets the block size by its grid-key block
        self.class_major = (self.fast and sem is None and not KEEP_WHOLE_MATRICES
                            and all(g.binned for mats in self.grids for g in mats))
        self._keys: np.ndarray | None = None
        if self.class_major:
            self.block = class_major_block_size(kk, len(self.names), n_boot)
            self.tables = [_GridTables(grids) for grids in self.grids]
        self.log_k = np.log(kk)
        self.log_k1 = np.log(kk - 1) if kk > 2 else np.nan
        if workers is None:
            self.threads = _workers()
            self.workers = self.threads["torch_threads"]
        else:
            self.workers = int(max(1, workers))
            self.threads = {"torch_threads": self.workers, "source": "caller"}
        self._acc: torch.Tensor | None = None  # the block of class sums, reused

    def __call__(self, W: np.ndarray) -> dict[tuple[str, float | None, str], np.ndarray]:
        names, students = self.names, self.names[1:]
        out: dict[tuple[str, float | None, str], np.ndarray] = {}
        with np.errstate(invalid="ignore", divide="ignore"):
            lab_w = W @ self.labelled
            for m, c in zip(names, self.correct):
                out[(m, None, "accuracy")] = W @ c / lab_w
            for m, a in zip(students, self.agree):
                out[(m, None, "top1_agreement")] = W @ a / W.sum(1)
        counts = weighted_counts(W, self.sl)
        for ti, (t, st, grids) in enumerate(zip(self.temps, self.stacked, self.grids)):
            if self.class_major:
                if self._keys is None:
                    kk = self.sl.num_classes
                    self._keys = np.empty((self.block, len(names), kk, kk), np.uint16)
                res = class_major_metrics(W, st, counts, self.k, self.tables[ti], self._keys,
                                          self.workers)
                self._store(out, t, res)
                continue
            if self._acc is None:
                tdtype = torch.float64 if st.dtype == np.float64 else torch.float32
                self._acc = torch.zeros((self.sl.num_classes, self.block, st.num_models * st.width),
                                        dtype=tdtype, device=st.device)
            sums = stacked_class_sums(W, st, self.workers, out=self._acc)
            if self.fast:
                res = replicate_metrics(sums, counts, len(names), self.k, grids, self.sem,
                                        self.workers)
            else:
                res = _reference_metrics(sums, counts, len(names), self.k, self.sem)
            self._store(out, t, res)
        return out

    def _store(self, out: dict, t: float, res: dict[tuple[int, str], np.ndarray]) -> None:
        for (mi, metric), v in res.items():
            out[(self.names[mi], t, metric)] = v
            if metric == "entropy":
                out[(self.names[mi], t, "entropy_norm")] = v / self.log_k
            elif metric == "nontarget_entropy":
                out[(self.names[mi], t, "nontarget_entropy_norm")] = v / self.log_k1


def _reference_metrics(sums: np.ndarray, counts: np.ndarray, num_models: int, k: int,
                       sem: np.ndarray | None) -> dict[tuple[int, str], np.ndarray]:
    """The NumPy path of :class:`BootstrapEvaluator` (no numba): exact, as the point estimate."""
    kk = sums.shape[0]
    width = kk + 2
    valid = counts > 0
    out: dict[tuple[int, str], np.ndarray] = {}
    mats = []
    for m in range(num_models):
        o = m * width
        X = np.transpose(sums[:, :, o:o + width], (1, 0, 2)).astype(np.float64)
        S = normalise_rows(X[:, :, :kk], counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[(m, "entropy")] = np.where(valid, X[:, :, kk] / counts, 0.0).sum(1) / valid.sum(1)
            out[(m, "nontarget_entropy")] = (np.where(valid, X[:, :, kk + 1] / counts, 0.0).sum(1)
                                             / valid.sum(1))
        if sem is not None:
            out[(m, "hierarchy_spearman")] = semantic_spearman(S, valid, sem)
        mats.append(S)
    ref = Reference(mats[0], valid, k)
    for m in range(1, num_models):
        for metric, v in ref.compare(mats[m]).items():
            out[(m, metric)] = v
    return out
