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


def color_limit(mats: Sequence[np.ndarray], order: np.ndarray, hide_diagonal: bool = True) -> float:
    """One upper colour limit for several matrices drawn side by side (99th percentile of
    their displayed, block-averaged cells), so equal colours mean equal values across models."""
    vals = []
    for S in mats:
        M = np.array(S, dtype=np.float64, copy=True)
        if hide_diagonal:
            np.fill_diagonal(M, np.nan)
        A, _ = block_average(M, order)
        vals.append(A[np.isfinite(A)])
    finite = np.concatenate(vals) if vals else np.empty(0)
    v = float(np.percentile(finite, 99)) if finite.size else 1.0
    return v if v > 0 else 1.0


def heatmap(ax, S: np.ndarray, order: np.ndarray, names: Sequence[str], title: str,
            hide_diagonal: bool = True, vmax: float | None = None):
    """Draw ``S`` in ``order`` on ``ax``; the diagonal is hidden by default because it
    dominates the colour scale and the similarity structure lives off the diagonal.
    ``vmax``: upper colour limit (default: this matrix's 99th percentile, see
    :func:`color_limit` for a limit shared by several panels). Up to 40 classes every class
    is labelled; beyond, about 12 evenly spaced ticks name the first class of their row /
    block, so a region of a 1,000-class map can be found in ``nearest_classes.csv``."""
    M = np.array(S, dtype=np.float64, copy=True)
    if hide_diagonal:
        np.fill_diagonal(M, np.nan)
    A, bs = block_average(M, order)
    if vmax is None:
        vmax = color_limit([S], order, hide_diagonal)
    import matplotlib

    # hidden diagonal and empty classes (NaN) show white, not a colour of the scale
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(A, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    k = len(order)
    if bs == 1 and k <= 40:
        labels = [str(names[i]) for i in order]
        ax.set_xticks(range(k), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(k), labels, fontsize=6)
    else:
        nb = A.shape[0]
        ticks = np.unique(np.linspace(0, nb - 1, min(nb, 12)).round().astype(int))
        labels = [str(names[order[t * bs]])[:18] for t in ticks]
        ax.set_xticks(ticks, labels, rotation=90, fontsize=5)
        ax.set_yticks(ticks, labels, fontsize=5)
        ax.set_xlabel(f"{k} classes, clustered" + (f"; {bs}x{bs} blocks averaged" if bs > 1 else ""),
                      fontsize=7)
    ax.set_title(title, fontsize=9)
    return im


def scatter_offdiag(ax, St: np.ndarray, Ss: np.ndarray, title: str, seed: int = 0) -> None:
    """Teacher vs student off-diagonal entries on log axes (subsampled beyond MAX_POINTS),
    with the identity line; both axes share one range."""
    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator

    k = St.shape[0]
    off = ~np.eye(k, dtype=bool) & np.isfinite(St) & np.isfinite(Ss)
    x, y = St[off], Ss[off]
    if x.size > MAX_POINTS:
        idx = np.random.default_rng(seed).choice(x.size, MAX_POINTS, replace=False)
        x, y = x[idx], y[idx]
    floor = 1e-8
    x, y = np.maximum(x, floor), np.maximum(y, floor)
    # bigger, opaque points when few; small translucent ones when thousands overlap
    size, alpha = (10, 0.7) if x.size <= 2000 else (2, 0.25)
    ax.scatter(x, y, s=size, alpha=alpha, linewidths=0)
    if x.size:
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        pad = (hi / lo) ** 0.03 if hi > lo else 2.0
        lo, hi = lo / pad, hi * pad
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        # narrow ranges: labels at 1, 2, 5 x 10^n as plain numbers (the default minor labels,
        # "2x10^-2 3x10^-2 ...", overlap); wide ranges: about 6 decade labels only
        narrow = np.log10(hi / lo) < 2
        for axis in (ax.xaxis, ax.yaxis):
            if narrow:
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            else:
                axis.set_major_locator(LogLocator(base=10, numticks=7))
                axis.set_major_formatter(LogFormatterSciNotation())
            axis.set_minor_locator(LogLocator(base=10, subs=(3.0, 4.0, 6.0, 7.0, 8.0, 9.0)
                                              if narrow else "auto", numticks=50))
            axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("teacher S[i, j] (i != j)")
    ax.set_ylabel("student S[i, j]")
    ax.set_title(title, fontsize=9)
