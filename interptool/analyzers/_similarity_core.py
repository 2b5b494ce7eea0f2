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
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = (
            {} if len(sl.order) * k * 8 <= PROBS_CACHE_BYTES else None
        )

    def segment(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probs (n_i, K), entropy (n_i,), non-target entropy (n_i,)) of class ``i``."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        idx = self.sl.order[self.sl.starts[i]:self.sl.stops[i]]
        z = self.logits[idx].astype(np.float64) / self.T
        p, h = softmax_stats(z)
        q, hq = softmax_stats(z, np.full(len(idx), i))
        out = (q if self.kind == "dark_knowledge" else p, h, hq)
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
    sums = torch.zeros((b, k, k), dtype=torch.float64, device=dev)
    hsum = torch.zeros((b, k), dtype=torch.float64, device=dev)
    hqsum = torch.zeros((b, k), dtype=torch.float64, device=dev)
    with _cpu_single_thread(dev):
        for i in range(k):
            a, z = int(sl.starts[i]), int(sl.stops[i])
            if a == z:
                continue
            p, h, hq = per.segment(i)
            w = Wt[:, a:z]
            sums[:, i, :] = w @ torch.as_tensor(p, device=dev)
            hsum[:, i] = w @ torch.as_tensor(h, device=dev)
            hqsum[:, i] = w @ torch.as_tensor(hq, device=dev)
    return sums.cpu().numpy(), hsum.cpu().numpy(), hqsum.cpu().numpy()


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
    """Average (tie-aware, 1-based) ranks of a 1-D array; ~5x faster than
    scipy.stats.rankdata on 10^6 entries, which matters inside the bootstrap."""
    o = np.argsort(x)
    xs = x[o]
    new = np.empty(xs.size, dtype=bool)
    new[:1] = True
    new[1:] = xs[1:] != xs[:-1]
    group = np.cumsum(new) - 1
    bounds = np.flatnonzero(np.r_[new, True])
    avg = 0.5 * (bounds[:-1] + bounds[1:] - 1) + 1.0
    out = np.empty(xs.size, dtype=np.float64)
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


def topk_overlap(St: np.ndarray, Ss: np.ndarray, k: int) -> np.ndarray:
    """Per class (B, K): fraction of the teacher's k nearest classes also in the student's."""
    # membership only, so an O(K) partition per row suffices (no full sort)
    nt = _topk_set(St, k)
    ns = _topk_set(Ss, k)
    member = np.zeros(St.shape, dtype=bool)
    np.put_along_axis(member, nt, True, axis=-1)
    return np.take_along_axis(member, ns, axis=-1).sum(axis=-1) / k


def _nanmean_rows(v: np.ndarray, valid: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, v, 0.0).sum(1) / valid.sum(1)


def pair_metrics(St: np.ndarray, Ss: np.ndarray, valid: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Agreement of teacher and student class-similarity matrices, per resample.

    St, Ss: (B, K, K) row-normalised matrices; valid: (B, K) rows (classes) with samples.
    Returns arrays of shape (B,): pearson / spearman over off-diagonal entries, mean row KL
    (teacher || student, nats), mean row JS distance (base 2), mean top-k overlap.
    """
    b, kk, _ = St.shape
    m = offdiag_mask(valid)
    x = np.nan_to_num(St.reshape(b, kk * kk))
    y = np.nan_to_num(Ss.reshape(b, kk * kk))
    St0 = np.nan_to_num(St)
    Ss0 = np.nan_to_num(Ss)
    return {
        "pearson": _masked_pearson(x, y, m),
        "spearman": masked_spearman(x, y, m),
        "kl": _nanmean_rows(row_kl(St0, Ss0), valid),
        "js_distance": _nanmean_rows(row_js_distance(St0, Ss0), valid),
        "topk_overlap": _nanmean_rows(topk_overlap(St, Ss, k), valid),
    }


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
