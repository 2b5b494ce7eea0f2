"""Figures for class similarity: clustered, block-averaged heatmaps and teacher-vs-student
scatters that stay readable with 1,000 classes."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

MAX_CELLS = 100  # heatmaps never show more than this many rows / columns
MAX_POINTS = 20000  # scatter plots subsample (seeded) beyond this many entries


def cluster_order(S: np.ndarray) -> np.ndarray:
    """Leaf order of an average-linkage clustering of the rows of ``S`` (Hellinger distance,
    so zero rows and probability rows are handled alike). NaN rows (empty classes) count as
    zeros. Deterministic."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    k = S.shape[0]
    if k < 3:
        return np.arange(k)
    X = np.sqrt(np.clip(np.nan_to_num(S), 0.0, None))
    Z = linkage(X, method="average", metric="euclidean")
    return leaves_list(Z)


def block_average(M: np.ndarray, order: np.ndarray, max_cells: int = MAX_CELLS) -> tuple[np.ndarray, int]:
    """Reorder ``M`` by ``order`` and average it into at most ``max_cells`` x ``max_cells``
    blocks (NaN ignored). Returns (matrix, block size)."""
    A = M[np.ix_(order, order)]
    k = A.shape[0]
    if k <= max_cells:
        return A, 1
    bs = int(np.ceil(k / max_cells))
    nb = int(np.ceil(k / bs))
    pad = nb * bs - k
    P = np.pad(A, ((0, pad), (0, pad)), constant_values=np.nan)
    blocks = P.reshape(nb, bs, nb, bs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks -> NaN, expected
        out = np.nanmean(blocks, axis=(1, 3))
    return out, bs


def heatmap(ax, S: np.ndarray, order: np.ndarray, names: Sequence[str], title: str,
            hide_diagonal: bool = True):
    """Draw ``S`` in ``order`` on ``ax``; the diagonal is hidden by default because it
    dominates the colour scale and the similarity structure lives off the diagonal."""
    M = np.array(S, dtype=np.float64, copy=True)
    if hide_diagonal:
        np.fill_diagonal(M, np.nan)
    A, bs = block_average(M, order)
    finite = A[np.isfinite(A)]
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    im = ax.imshow(A, cmap="viridis", vmin=0.0, vmax=vmax if vmax > 0 else None,
                   interpolation="nearest")
    if bs == 1 and len(order) <= 40:
        labels = [str(names[i]) for i in order]
        ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(order)), labels, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"classes (clustered; {bs}x{bs} blocks averaged)" if bs > 1 else "classes")
    ax.set_title(title, fontsize=9)
    return im


def scatter_offdiag(ax, St: np.ndarray, Ss: np.ndarray, title: str, seed: int = 0) -> None:
    """Teacher vs student off-diagonal entries on log axes (subsampled beyond MAX_POINTS)."""
    k = St.shape[0]
    off = ~np.eye(k, dtype=bool) & np.isfinite(St) & np.isfinite(Ss)
    x, y = St[off], Ss[off]
    if x.size > MAX_POINTS:
        idx = np.random.default_rng(seed).choice(x.size, MAX_POINTS, replace=False)
        x, y = x[idx], y[idx]
    floor = 1e-8
    x, y = np.maximum(x, floor), np.maximum(y, floor)
    ax.scatter(x, y, s=3, alpha=0.4, linewidths=0)
    if x.size:
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("teacher S[i, j] (i != j)")
    ax.set_ylabel("student S[i, j]")
    ax.set_title(title, fontsize=9)
