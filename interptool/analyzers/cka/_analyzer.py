"""Linear CKA between the layers of two models on the same images (representation similarity).

Two estimators, both in float64:

* full batch (``minibatch=None``): exact linear CKA (Kornblith et al. 2019),
  ``||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred features. The
  covariances are accumulated over blocks of images with a pairwise (Chan et al.) update,
  so all N images are never held at once ("features" method); when the feature dimension is
  too large for that but N is small, centred Gram matrices are used instead ("gram").
* minibatch (``minibatch=m``): the unbiased estimator of Nguyen et al. (2021): the unbiased
  HSIC (Song et al. 2012) averaged over minibatches, then
  ``mean HSIC(X, Y) / sqrt(mean HSIC(X, X) * mean HSIC(Y, Y))``. The minibatches come from one
  seeded permutation of the images, the same for both models. Needs m >= 4.

See docs/similarity.md for costs and conventions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from interptool._progress import progress
from interptool._provenance import provenance
from interptool.errors import AnalysisError

__all__ = ["cka", "CKAResult", "linear_cka", "unbiased_hsic"]

POOLINGS = ("mean", "flatten")


# --------------------------------------------------------------------------------------------
# array-level estimators (also used by the tests)
# --------------------------------------------------------------------------------------------
def linear_cka(X: np.ndarray | torch.Tensor, Y: np.ndarray | torch.Tensor) -> float:
    """Exact linear CKA of two (N, p), (N, q) feature matrices, float64."""
    X = torch.as_tensor(X, dtype=torch.float64)
    Y = torch.as_tensor(Y, dtype=torch.float64, device=X.device)
    Xc = X - X.mean(0, keepdim=True)
    Yc = Y - Y.mean(0, keepdim=True)
    num = torch.linalg.matrix_norm(Xc.T @ Yc) ** 2
    den = torch.linalg.matrix_norm(Xc.T @ Xc) * torch.linalg.matrix_norm(Yc.T @ Yc)
    return float(num / den)


def unbiased_hsic(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012) of two (n, n) Gram matrices, n >= 4."""
    n = K.shape[0]
    K = K.clone()
    L = L.clone()
    K.fill_diagonal_(0.0)
    L.fill_diagonal_(0.0)
    k1 = K.sum(1)
    l1 = L.sum(1)
    tr = (K * L).sum()
    return (tr + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)) / (
        n * (n - 3)
    )


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------
@dataclass
class CKAResult:
    """Layer-by-layer linear CKA of model A (rows) against model B (columns).

    ``matrix``: DataFrame (layers_a x layers_b); ``method``: "features", "gram" or
    "minibatch"; ``minibatch``, ``seed``, ``pooling``, ``n`` (images), model names and files.
    """

    matrix: pd.DataFrame
    name_a: str
    name_b: str
    method: str
    pooling: str
    n: int
    minibatch: int | None = None
    seed: int = 0
    sources: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    #: stem of the standard files written by :meth:`save` (see docs/extending.md)
    file_stem = "cka"

    @property
    def names(self) -> tuple[str, ...]:
        """The two models compared: A (rows), B (columns)."""
        return (self.name_a, self.name_b)

    def summary(self) -> dict[str, Any]:
        """Headline numbers: the CKA of each layer of A with the most similar layer of B."""
        m = self.matrix
        best = {str(la): {"layer_b": str(m.loc[la].idxmax()), "cka": float(m.loc[la].max())}
                for la in m.index if np.isfinite(m.loc[la].to_numpy()).any()}
        return {"model_a": self.name_a, "model_b": self.name_b, "n": self.n,
                "method": self.method, "best_match": best}

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (layer_a, layer_b) with its CKA."""
        df = self.matrix.stack().rename("cka").reset_index()
        df.columns = ["layer_a", "layer_b", "cka"]
        return df

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_a": self.name_a, "model_b": self.name_b, "sources": self.sources,
            "method": self.method, "pooling": self.pooling, "n": self.n,
            "minibatch": self.minibatch, "seed": self.seed,
            "layers_a": list(self.matrix.index), "layers_b": list(self.matrix.columns),
            "cka": [[None if not np.isfinite(v) else float(v) for v in row]
                    for row in self.matrix.to_numpy()],
            "provenance": self.provenance,
        }

    def plot(self):
        """Heatmap of the CKA matrix (0..1) with values written in the cells."""
        return cka_heatmap(self.matrix.to_numpy(), list(self.matrix.index),
                           list(self.matrix.columns),
                           title=f"linear CKA ({self.method}, {self.pooling})",
                           xlabel=self.name_b, ylabel=self.name_a)

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``cka.csv`` (long table), ``cka.json`` (``to_dict()``) and ``cka.png``
        (the standard files of :func:`~interptool.analyzers._base.save_result_files`)."""
        from interptool.analyzers._base import save_result_files

        return save_result_files(self, directory)


def cka_heatmap(matrix: Any, row_labels: Sequence[str], col_labels: Sequence[str], *,
                title: str = "linear CKA", xlabel: str = "", ylabel: str = "") -> Any:
    """Annotated seaborn heatmap of CKA values in [0, 1] (cells written up to 400 of them);
    used by :meth:`CKAResult.plot` and the compare report."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from interptool.common.theme import theme

    m = np.asarray(matrix, dtype=np.float64)
    with theme():
        fig, ax = plt.subplots(figsize=(0.9 * len(col_labels) + 2.8, 0.6 * len(row_labels) + 1.8))
        sns.heatmap(m, vmin=0, vmax=1, cmap="magma", annot=m.size <= 400, fmt=".2f",
                    annot_kws={"size": 8}, xticklabels=list(col_labels),
                    yticklabels=list(row_labels), cbar_kws={"shrink": 0.8}, ax=ax)
        ax.tick_params(axis="x", labelrotation=45)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# cache access
# --------------------------------------------------------------------------------------------
def _open(cache: Any) -> tuple[Any, bool]:
    if isinstance(cache, (str, os.PathLike)):
        from interptool.cache import ActivationCache

        return ActivationCache(cache), True
    return cache, False


def _pool(block: np.ndarray, pooling: str) -> np.ndarray:
    """(n, C, H, W) / (n, T, D) / (n, C) -> (n, p) float64."""
    block = np.asarray(block, dtype=np.float64)
    if pooling == "flatten" or block.ndim == 2:
        return block.reshape(block.shape[0], -1)
    if block.ndim == 4:
        return block.mean(axis=(2, 3))
    if block.ndim == 3:
        return block.mean(axis=1)
    raise AnalysisError(f"cannot pool a feature block of shape {block.shape}")


def _finite(pooled: np.ndarray, cache: Any, layer: str, rows: Any) -> np.ndarray:
    """``pooled`` unchanged when finite; else an AnalysisError naming the cache file, the
    layer and the first image with NaN / inf (a mean over positions keeps any NaN or inf,
    so checking the pooled block catches every bad value of a pooled layer)."""
    bad = ~np.isfinite(pooled).all(axis=1)
    if not bad.any():
        return pooled
    row = int(np.asarray(rows)[np.flatnonzero(bad)[0]])
    ids = getattr(cache, "ids", None)
    image = ids[row] if ids is not None and row < len(ids) else f"row {row}"
    raise AnalysisError(
        f"{getattr(cache, 'path', '<cache>')}: features of layer {layer!r} hold NaN or inf, "
        f"first at row {row} (image {image!r}); expected finite activations. The model "
        "diverged (NaN weights) or float16 overflowed: re-create the cache with --dtype "
        "float32 from a working checkpoint.")


def _dim(cache: Any, layer: str, pooling: str) -> int:
    shape = tuple(cache.features(layer).shape[1:])
    if pooling == "flatten" or len(shape) == 1:
        return int(np.prod(shape))
    return int(shape[0] if len(shape) == 3 else shape[-1])


def _check_same_images(a: Any, b: Any) -> None:
    from interptool.common.alignment import ImageSet, check_same_images

    check_same_images(
        ImageSet(str(getattr(a, "path", "A")), list(a.ids), a.data_fingerprint),
        ImageSet(str(getattr(b, "path", "B")), list(b.ids), b.data_fingerprint),
        fix="CKA compares representations of the same images: cache both models on the same "
            "data.")


def _blocks(caches_layers: list[tuple[Any, str]], batch_size: int, pooling: str
            ) -> Iterator[list[np.ndarray]]:
    """Yield, block by block in image order, the pooled features of every (cache, layer)."""
    n = caches_layers[0][0].n
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield [_finite(_pool(c.features(layer)[start:stop], pooling), c, layer,
                       range(start, stop)) for c, layer in caches_layers]


def _constant_error(src: str, layer: str) -> AnalysisError:
    return AnalysisError(
        f"{src}: features of layer {layer!r} are constant over the images (zero variance), so "
        "CKA is undefined (0/0). Use another layer, more images, or check the cache."
    )


# --------------------------------------------------------------------------------------------
# estimators over caches
# --------------------------------------------------------------------------------------------
def _full_features(ca, cb, la, lb, pooling, batch_size, dev) -> np.ndarray:
    """Exact CKA from streamed, pairwise-merged centred (cross-)covariances."""
    entries = [(ca, x) for x in la] + [(cb, y) for y in lb]
    nA = len(la)
    n_seen = 0
    means: list[torch.Tensor | None] = [None] * len(entries)
    self_cov: list[torch.Tensor | None] = [None] * len(entries)
    cross: dict[tuple[int, int], torch.Tensor] = {}
    n = ca.n
    bar = progress(total=n, desc="CKA", unit="img")
    for blocks in _blocks(entries, batch_size, pooling):
        xs = [torch.as_tensor(b, device=dev) for b in blocks]
        nb = xs[0].shape[0]
        bm = [x.mean(0) for x in xs]
        xc = [x - m for x, m in zip(xs, bm)]
        tot = n_seen + nb
        f = n_seen * nb / tot
        deltas = [None if means[e] is None else bm[e] - means[e] for e in range(len(entries))]

        def merged(acc, e1, e2, c1=xc, d=deltas, f=f):
            cur = c1[e1].T @ c1[e2]
            if acc is None:
                return cur
            return acc + cur + f * torch.outer(d[e1], d[e2])

        for e in range(len(entries)):
            self_cov[e] = merged(self_cov[e], e, e)
        for i in range(nA):
            for j in range(len(lb)):
                cross[(i, j)] = merged(cross.get((i, j)), i, nA + j)
        for e in range(len(entries)):
            means[e] = bm[e] if means[e] is None else means[e] + deltas[e] * (nb / tot)
        n_seen = tot
        bar.update(nb)
    bar.close()
    norms = [float(torch.linalg.matrix_norm(c)) for c in self_cov]
    for e, nv in enumerate(norms):
        if nv == 0.0:
            c, layer = entries[e]
            raise _constant_error(str(getattr(c, "path", "")), layer)
    M = np.empty((nA, len(lb)))
    for (i, j), c in cross.items():
        M[i, j] = float(torch.linalg.matrix_norm(c) ** 2) / (norms[i] * norms[nA + j])
    return M


def _load_pooled(c, layer, pooling, batch_size) -> np.ndarray:
    parts = [_finite(_pool(b, pooling), c, layer, range(s, s + len(b)))
             for s, b in c.iter_features(layer, batch_size, np.float64)]
    return np.concatenate(parts, axis=0)


def _full_gram(ca, cb, la, lb, pooling, batch_size, dev) -> np.ndarray:
    """Exact CKA from centred Gram matrices (for N small relative to the feature size)."""
    grams = []
    for c, layer in [(ca, x) for x in la] + [(cb, y) for y in lb]:
        X = torch.as_tensor(_load_pooled(c, layer, pooling, batch_size), device=dev)
        X = X - X.mean(0, keepdim=True)
        G = X @ X.T
        nv = float(torch.linalg.matrix_norm(G))
        if nv == 0.0:
            raise _constant_error(str(getattr(c, "path", "")), layer)
        grams.append((G, nv))
    nA = len(la)
    M = np.empty((nA, len(lb)))
    for i in range(nA):
        for j in range(len(lb)):
            (G, gn), (H, hn) = grams[i], grams[nA + j]
            M[i, j] = float((G * H).sum()) / (gn * hn)
    return M


def _minibatch(ca, cb, la, lb, pooling, batch_size, m, seed, dev, max_memory) -> np.ndarray:
    n = ca.n
    nbatches = max(1, n // m)
    perm = np.random.default_rng(seed).permutation(n)
    # sizes between m and 2m - 1: every batch has >= 4 images
    batches = np.array_split(perm, nbatches)
    entries = [(ca, x) for x in la] + [(cb, y) for y in lb]
    dims = [_dim(c, layer, pooling) for c, layer in entries]
    in_memory = 8 * n * sum(dims) <= max_memory
    pooled = ([_load_pooled(c, layer, pooling, batch_size) for c, layer in entries]
              if in_memory else None)
    nA = len(la)
    hxy = torch.zeros((nA, len(lb)), dtype=torch.float64, device=dev)
    hself = torch.zeros(len(entries), dtype=torch.float64, device=dev)
    for idx in progress(batches, desc="CKA minibatches", unit="batch"):
        idx = np.sort(idx)  # h5py fancy indexing needs increasing indices; order is irrelevant
        grams = []
        for e, (c, layer) in enumerate(entries):
            X = (pooled[e][idx] if pooled is not None
                 else _finite(_pool(c.features(layer)[idx], pooling), c, layer, idx))
            X = torch.as_tensor(X, device=dev)
            grams.append(X @ X.T)
        for e in range(len(entries)):
            hself[e] += unbiased_hsic(grams[e], grams[e])
        for i in range(nA):
            for j in range(len(lb)):
                hxy[i, j] += unbiased_hsic(grams[i], grams[nA + j])
    hself /= len(batches)
    hxy /= len(batches)
    for e in range(len(entries)):
        if not float(hself[e]) > 0.0:
            c, layer = entries[e]
            raise _constant_error(str(getattr(c, "path", "")), layer)
    den = torch.sqrt(torch.outer(hself[:nA], hself[nA:]))
    return (hxy / den).cpu().numpy()


def cka(
    cache_a: Any,
    cache_b: Any,
    layers_a: str | Sequence[str],
    layers_b: str | Sequence[str] | None = None,
    *,
    pooling: str = "mean",
    minibatch: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    max_memory: int = 2 * 1024**3,
    names: Sequence[str] | None = None,
) -> CKAResult:
    """Linear CKA of every layer in ``layers_a`` (model A) with every layer in ``layers_b``
    (model B, default: the same names), on the same images.

    ``pooling``: "mean" averages the spatial positions (tokens) into an (N, C) matrix,
    "flatten" keeps every position (N, C*H*W). ``minibatch=None`` computes the exact full-batch
    value (streamed when the feature covariances fit in ``max_memory`` bytes, else via N x N
    Gram matrices if those fit, else an AnalysisError suggesting ``minibatch``);
    ``minibatch=m`` (>= 4) uses the unbiased minibatch estimator with a seeded permutation.
    Raises AnalysisError when the caches hold different images, a layer is missing, or a
    layer's features are constant. ``names``: the two models' names (default: each cache's
    ``name`` attribute, else "A" and "B"). Settings are checked by :class:`CKAParams`.
    """
    from interptool.analyzers.cka._params import CKAParams

    CKAParams(pooling=pooling, minibatch=minibatch, batch_size=batch_size,
              max_memory=max_memory, seed=seed, device=device)  # ParamsError naming a field
    if names is not None and len(names) != 2:
        raise AnalysisError(f"names={list(names)!r}: expected the two models' names")
    la = [layers_a] if isinstance(layers_a, str) else list(layers_a)
    lb = la if layers_b is None else ([layers_b] if isinstance(layers_b, str) else list(layers_b))
    if not la or not lb:
        raise AnalysisError("cka needs at least one layer for each model")
    if minibatch is not None and int(minibatch) < 4:
        raise AnalysisError(
            f"minibatch={minibatch}: the unbiased HSIC estimator needs at least 4 images per "
            "minibatch (use e.g. 256, or None for the exact full-batch CKA)"
        )
    dev = torch.device(device)
    ca, close_a = _open(cache_a)
    cb, close_b = _open(cache_b)
    try:
        _check_same_images(ca, cb)
        for c, layers in ((ca, la), (cb, lb)):
            for layer in layers:
                c.features(layer)  # CacheError naming the cached layers if absent
        n = ca.n
        if minibatch is None:
            if n < 2:
                raise AnalysisError(f"CKA needs at least 2 images, the caches hold {n}")
            da = [_dim(ca, x, pooling) for x in la]
            db = [_dim(cb, y, pooling) for y in lb]
            feat_bytes = 8 * (sum(p * p for p in da) + sum(q * q for q in db)
                              + sum(p * q for p in da for q in db))
            gram_bytes = 8 * (n * n * (len(la) + len(lb)) + n * max(da + db))
            if feat_bytes <= max_memory:
                method = "features"
                M = _full_features(ca, cb, la, lb, pooling, batch_size, dev)
            elif gram_bytes <= max_memory:
                method = "gram"
                M = _full_gram(ca, cb, la, lb, pooling, batch_size, dev)
            else:
                raise AnalysisError(
                    f"full-batch CKA needs ~{min(feat_bytes, gram_bytes) / 2**30:.1f} GiB "
                    f"(> max_memory {max_memory / 2**30:.1f} GiB) for layers {la} vs {lb} with "
                    f"pooling={pooling!r}; pass minibatch=256 (--cka-minibatch 256) for the "
                    "unbiased minibatch estimator, or pooling='mean'"
                )
        else:
            method = "minibatch"
            if n < int(minibatch):
                raise AnalysisError(
                    f"minibatch={minibatch} is larger than the {n} cached images; use a smaller "
                    "minibatch or minibatch=None (exact)"
                )
            M = _minibatch(ca, cb, la, lb, pooling, batch_size, int(minibatch), seed, dev,
                           max_memory)
        return CKAResult(
            matrix=pd.DataFrame(M, index=pd.Index(la, name=None), columns=pd.Index(lb)),
            name_a=str(names[0]) if names else str(getattr(ca, "name", "A")),
            name_b=str(names[1]) if names else str(getattr(cb, "name", "B")),
            method=method, pooling=pooling, n=int(n),
            minibatch=None if minibatch is None else int(minibatch), seed=int(seed),
            sources=[str(getattr(ca, "path", "")), str(getattr(cb, "path", ""))],
            provenance=provenance(
                caches=[str(getattr(c, "path", "")) for c in (ca, cb)],
                data_fingerprint=getattr(ca, "data_fingerprint", None),
                models=[getattr(c, "model_info", None) for c in (ca, cb)]),
        )
    finally:
        if close_a:
            ca.close()
        if close_b:
            cb.close()
