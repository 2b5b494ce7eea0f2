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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

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

    def __init__(self, logits: np.ndarray, sl: SortedLabels, T: float, kind: str) -> None:
        self.logits, self.sl, self.T, self.kind = logits, sl, float(T), kind
        k = logits.shape[1]
        self._cache: dict[int, torch.Tensor] | None = (
            {} if len(sl.order) * (k + 2) * 8 <= PROBS_CACHE_BYTES else None
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


@contextmanager
def _cpu_single_thread(dev: torch.device) -> Iterator[None]:
    """Run the per-class matmuls on one CPU thread: they are small (B x n_i x K), and a
    thread pool on a busy machine made them ~15x slower (measured: 1.2 s vs 0.075 s for
    128 resamples of 10k x 100)."""
    if dev.type != "cpu":
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


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
    with _cpu_single_thread(dev):
        for i in range(k):
            a, z = int(sl.starts[i]), int(sl.stops[i])
            if a == z:
                continue
            torch.matmul(Wt[:, a:z], per.segment(i).to(dev), out=acc[i])
    out = acc.transpose(0, 1).cpu().numpy()
    return out[:, :, :k], out[:, :, k], out[:, :, k + 1]


def weighted_counts(W: np.ndarray, sl: SortedLabels) -> np.ndarray:
    """Per-class sums of weights (B, K): the effective class sizes of each resample."""
    Ws = W[:, sl.order]
    csum = np.concatenate([np.zeros((W.shape[0], 1)), np.cumsum(Ws, axis=1)], axis=1)
    return csum[:, sl.stops] - csum[:, sl.starts]


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
            "topk_overlap": _nanmean_rows(overlap / self.k, valid),
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
