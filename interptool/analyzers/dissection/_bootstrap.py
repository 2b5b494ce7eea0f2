"""Bootstrap of detector counts over probe images, from per-block sufficient statistics.

What is resampled, what is held fixed
-------------------------------------
The probe images (those the protocol keeps) are cut into blocks of ``block_size`` consecutive
images (``block_size=1``: one block per image, the ordinary bootstrap). During the tally, each
block's contribution to NetDissect-Lite's three sums is kept, sparse over the labels present
in the block:

* ``I_b[k, l]``   intersections of unit k's mask with label l,
* ``A_b[k, c]``   unit k's mask area counted for category c,
* ``a_b[l]``      label l's area.

The unit thresholds ``T_k`` are **held at their full-probe values**: a resample reweights the
images' counts, it does not recompute quantiles (a resampled quantile would need every
activation again; holding it fixed measures the sampling noise of the concept scores given the
units' thresholds). A resample with block weights ``w`` (multinomial counts: how often each
block is drawn in ``n_blocks`` draws with replacement) is the weighted sum

    I*[k, l] = sum_b w_b I_b[k, l],   A*[k, c] = sum_b w_b A_b[k, c],   a*[l] = sum_b w_b a_b[l]
    IoU*[k, l] = I* / (A*[k, cat(l)] + a*[l] - I* + 1e-10)

followed by NetDissect-Lite's best-label rules, so no image is re-tallied. With every weight 1
the weighted sum is the plain tally and gives exactly the same numbers (tested).

Only (unit, label) pairs whose full-probe intersection is positive can score above 0 in any
resample (weights are non-negative), so the resample works on those pairs alone.

Paired differences
------------------
Weights come from ``numpy.random.default_rng(seed)`` one resample after another, so two
results dissected on the same probe (same kept images, same order, same block size) get the
same resampled images for the same seed; the difference of a measure between two models is
taken resample by resample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from interptool.common.stats import (
    bc_p_value,
    interval_from_resamples,
    multinomial_weights,
    paired_difference,
)
from interptool.errors import AnalysisError

__all__ = ["BlockRecorder", "BlockStats", "bootstrap_table", "paired_table", "resample_measures"]

# float64 entries per (resamples x pairs) work array in one chunk of resamples (16 MiB)
_WORK_ENTRIES = 1 << 21
CI_METHOD = "bc"
# Use the compiled kernel (numba) when numba imports and the work (stored intersections x
# resamples) is large enough to repay its one-time compilation (about 20 s, then cached on
# disk); tests lower the bar or turn it off to check both paths give the same numbers. The
# kernel is single-threaded: numba's parallel mode took 3.5x longer to compile.
USE_NUMBA = True
NUMBA_MIN_WORK = 2 * 10**8
_NUMBA_KERNEL: Any = None
_NUMBA_OK = importlib.util.find_spec("numba") is not None
prange = range  # plain loops (kept as ``prange`` so a parallel build needs one change)


def _evaluate_kernel(Wt, p_ptr, p_blk, p_val, uc_ptr, uc_blk, uc_val, la_ptr, la_blk, la_val,
                     pair_cat, pair_label, denom_col, unit_ptr, thr, n_units, C, L,
                     det_out, uniq_out, cat_out):  # pragma: no cover - compiled by numba
    """For block weights ``Wt`` (blocks, R): weighted sums, IoU per active pair, NetDissect-Lite's
    best label (first on ties within a category) and best category (later on ties); counts of
    detectors, distinct labels and detectors per category per resample. The inner loops run
    over the R resamples (contiguous: vectorised). Sums are of
    integers times integer weights, exact in float64 in any order, so the result equals the
    numpy path's."""
    R = Wt.shape[1]
    n_uc = uc_ptr.shape[0] - 1
    ucs = np.zeros((n_uc, R))
    for col in prange(n_uc):
        for k in range(uc_ptr[col], uc_ptr[col + 1]):
            v = uc_val[k]
            b = uc_blk[k]
            for r in range(R):
                ucs[col, r] += Wt[b, r] * v
    las = np.zeros((L, R))
    for col in prange(L):
        for k in range(la_ptr[col], la_ptr[col + 1]):
            v = la_val[k]
            b = la_blk[k]
            for r in range(R):
                las[col, r] += Wt[b, r] * v
    n_act = unit_ptr.shape[0] - 1
    unit_best = np.zeros((n_act, R))
    unit_cat = np.zeros((n_act, R), dtype=np.int64)
    unit_lab = np.zeros((n_act, R), dtype=np.int64)
    for a in prange(n_act):
        best = np.full(R, -1.0)
        best_cat = np.zeros(R, dtype=np.int64)
        best_lab = np.zeros(R, dtype=np.int64)
        seg_max = np.full(R, -1.0)
        seg_lab = np.zeros(R, dtype=np.int64)
        inter = np.zeros(R)
        p0, p1 = unit_ptr[a], unit_ptr[a + 1]
        for p in range(p0, p1):
            inter[:] = 0.0
            for k in range(p_ptr[p], p_ptr[p + 1]):
                v = p_val[k]
                b = p_blk[k]
                for r in range(R):
                    inter[r] += Wt[b, r] * v
            dc = denom_col[p]
            lab = pair_label[p]
            for r in range(R):
                iou = inter[r] / (ucs[dc, r] + las[lab, r] - inter[r] + 1e-10)
                if iou > seg_max[r]:  # first label wins ties within a category
                    seg_max[r] = iou
                    seg_lab[r] = lab
            if p + 1 == p1 or pair_cat[p + 1] != pair_cat[p]:
                cat = pair_cat[p]
                for r in range(R):
                    if seg_max[r] >= best[r]:  # later category wins ties
                        best[r] = seg_max[r]
                        best_cat[r] = cat
                        best_lab[r] = seg_lab[r]
                    seg_max[r] = -1.0
        unit_best[a] = best
        unit_cat[a] = best_cat
        unit_lab[a] = best_lab
    for r in prange(R):
        seen = np.zeros(L, dtype=np.bool_)
        ndet = 0
        for a in range(n_act):
            if unit_best[a, r] >= thr:
                c = unit_cat[a, r]
                lab = unit_lab[a, r]
                if unit_best[a, r] <= 0.0:  # nothing scored: label 0 "-", last category
                    c = C - 1
                    lab = 0
                ndet += 1
                seen[lab] = True
                cat_out[r, c] += 1
        if thr <= 0.0 and n_units > n_act:
            ndet += n_units - n_act
            cat_out[r, C - 1] += n_units - n_act
            seen[0] = True
        det_out[r] = ndet
        uniq_out[r] = seen.sum()


def _numba_kernel() -> Any:
    """The compiled kernel, or None when numba is missing or fails to import."""
    global _NUMBA_KERNEL, _NUMBA_OK
    if _NUMBA_KERNEL is None and _NUMBA_OK:
        try:
            from numba import njit

            _NUMBA_KERNEL = njit(cache=True, nogil=True)(_evaluate_kernel)
        except ImportError:
            _NUMBA_OK = False
    return _NUMBA_KERNEL


def ids_digest(ids: list[str]) -> str:
    """sha256 of the kept image ids in order (what a paired comparison must share)."""
    h = hashlib.sha256()
    for s in ids:
        h.update(str(s).encode())
        h.update(b"\0")
    return h.hexdigest()


class BlockRecorder:
    """Keeps a ``TallyAccumulator``'s counts per block of images, from its counting pass.

    The recorder installs itself as the tally's pair hook (:data:`PairHook` in ``_tally``):
    while the tally counts a batch, every (image, unit) pair's intersections, category areas
    and every image's label areas come to :meth:`_record` with the image they belong to, and
    are kept under that image's block. So the statistics cost no second tally of any image.
    ``add(feats, items, ranks)``: ``ranks`` are the images' positions among the kept images
    (block = rank // block_size).
    """

    def __init__(self, tally: Any, block_size: int) -> None:
        self.tally = tally
        self.block_size = int(block_size)
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
            "intersect": [], "unit_cat_area": [], "label_area": []}
        self.n_images = 0
        self._block_of: dict[int, int] = {}
        tally.hook = self._record

    def add(self, feats: torch.Tensor, items: list, ranks: np.ndarray) -> None:
        blocks = np.asarray(ranks, dtype=np.int64) // self.block_size
        self._block_of = {int(it.index): int(b) for it, b in zip(items, blocks)}
        self.n_images += len(items)
        self.tally.add(feats, items)

    def _record(self, name: str, items: list, image: np.ndarray, cols: np.ndarray,
                vals: np.ndarray) -> None:
        """The tally's pair hook: ``image`` indexes ``items`` (one group of the batch)."""
        group_blocks = np.array([self._block_of[int(it.index)] for it in items], np.int64)
        self._keep(name, group_blocks[image], cols, vals)

    def _keep(self, name: str, blocks: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        if len(cols):
            self._parts[name].append((np.asarray(blocks, np.int64),
                                      np.asarray(cols, np.int64), np.asarray(vals, np.int64)))

    def finish(self, label_category: np.ndarray, categories: list[str], *,
               probe_fingerprint: str | None, ids_sha256: str) -> BlockStats:
        """Build the :class:`BlockStats` once every kept image has been added."""
        t = self.tally
        n_blocks = -(-self.n_images // self.block_size)
        mats = {}
        for name, width in (("intersect", t.U * t.L), ("unit_cat_area", t.U * t.C),
                            ("label_area", t.L)):
            mats[name] = _csr(self._parts[name], n_blocks, width)
        return BlockStats.build(mats, t.U, np.asarray(label_category), list(categories),
                                self.block_size, self.n_images, probe_fingerprint, ids_sha256)


def _csr(parts: list, n_rows: int, width: int) -> Any:
    from scipy import sparse

    if parts:
        r = np.concatenate([p[0] for p in parts])
        c = np.concatenate([p[1] for p in parts])
        v = np.concatenate([p[2] for p in parts]).astype(np.float64)
    else:
        r = c = np.zeros(0, np.int64)
        v = np.zeros(0, np.float64)
    m = sparse.coo_matrix((v, (r, c)), shape=(n_rows, width)).tocsr()
    m.sum_duplicates()
    return m


@dataclass
class BlockStats:
    """Per-block sufficient statistics of one dissected layer (sparse, see module docstring).

    ``intersect``: CSR (n_blocks, P) over the P active (unit, label) pairs, sorted by unit, then
    category, then label (``pair_unit``, ``pair_cat``, ``pair_label``); ``unit_cat_area``: CSR
    (n_blocks, U*C); ``label_area``: CSR (n_blocks, L). Values are exact integer counts held as
    float64 (exact below 2**53).
    """

    units: int
    num_labels: int
    categories: list[str]
    label_category: np.ndarray
    block_size: int
    n_images: int
    n_blocks: int
    pair_unit: np.ndarray
    pair_cat: np.ndarray
    pair_label: np.ndarray
    intersect: Any
    unit_cat_area: Any
    label_area: Any
    probe_fingerprint: str | None = None
    ids_sha256: str = ""
    _layout: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, mats: dict[str, Any], units: int, label_category: np.ndarray,
              categories: list[str], block_size: int, n_images: int,
              probe_fingerprint: str | None, ids_sha256: str) -> BlockStats:
        L = len(label_category)
        inter = mats["intersect"]
        total = np.asarray(inter.sum(axis=0)).ravel()
        cols = np.flatnonzero(total > 0)
        u, lab = cols // L, cols % L
        cat = np.asarray(label_category, np.int64)[lab]
        ok = (lab > 0) & (cat >= 0)
        cols, u, lab, cat = cols[ok], u[ok], lab[ok], cat[ok]
        order = np.lexsort((lab, cat, u))
        cols, u, lab, cat = cols[order], u[order], lab[order], cat[order]
        return cls(units=int(units), num_labels=L, categories=list(categories),
                   label_category=np.asarray(label_category, np.int64),
                   block_size=int(block_size), n_images=int(n_images),
                   n_blocks=int(inter.shape[0]), pair_unit=u, pair_cat=cat, pair_label=lab,
                   intersect=inter[:, cols].tocsr(), unit_cat_area=mats["unit_cat_area"],
                   label_area=mats["label_area"], probe_fingerprint=probe_fingerprint,
                   ids_sha256=ids_sha256)

    # ---------------------------------------------------------------- layout
    def layout(self) -> dict[str, np.ndarray]:
        """Segment boundaries of the sorted pairs: (unit, category) segments and units."""
        if "seg_start" in self._layout:
            return self._layout
        P = len(self.pair_unit)
        key = self.pair_unit * (len(self.categories) + 1) + self.pair_cat
        seg_start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if P else np.zeros(0, np.int64)
        seg_unit = self.pair_unit[seg_start]
        seg_cat = self.pair_cat[seg_start]
        useg_start = (np.flatnonzero(np.r_[True, seg_unit[1:] != seg_unit[:-1]])
                      if len(seg_start) else np.zeros(0, np.int64))
        pair_seg = np.repeat(np.arange(len(seg_start)), np.diff(np.r_[seg_start, P]))
        seg_uloc = np.repeat(np.arange(len(useg_start)), np.diff(np.r_[useg_start, len(seg_start)]))
        unit_ptr = np.r_[seg_start[useg_start], P].astype(np.int64) if len(useg_start) else \
            np.zeros(1, np.int64)
        self._layout.update({"seg_start": seg_start, "seg_cat": seg_cat, "useg_start": useg_start,
                        "pair_seg": pair_seg, "seg_uloc": seg_uloc, "unit_ptr": unit_ptr,
                        "denom_col": self.pair_unit * len(self.categories) + self.pair_cat})
        return self._layout

    def _csc(self) -> list[np.ndarray]:
        """Column-major copies (per pair / unit-category / label: blocks and counts)."""
        if "csc" not in self._layout:
            arrays = []
            for m in (self.intersect, self.unit_cat_area, self.label_area):
                c = m.tocsc()
                c.sort_indices()
                arrays += [c.indptr.astype(np.int64), c.indices.astype(np.int64),
                           c.data.astype(np.float64)]
            self._layout["csc"] = arrays
        return self._layout["csc"]

    def pair_bound(self) -> np.ndarray:
        """(P,) an upper bound of each pair's IoU in **any** resample: the largest per-block
        ratio ``I_b / (A_b + a_b - I_b)``.

        A resample's IoU is ``sum_b w_b I_b / sum_b w_b D_b`` with ``D_b = A_b + a_b - I_b >= I_b``
        and weights ``w_b >= 0``; such a weighted mediant never exceeds the largest ratio
        ``I_b / D_b`` (blocks without an intersection add to the denominator only).
        """
        if "bound" not in self._layout:
            coo = self.intersect.tocoo()
            b, p, inter = coo.row, coo.col, coo.data
            C = len(self.categories)
            a_unit = np.asarray(self.unit_cat_area[b, self.pair_unit[p] * C + self.pair_cat[p]]).ravel()
            a_label = np.asarray(self.label_area[b, self.pair_label[p]]).ravel()
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(inter > 0, inter / (a_unit + a_label - inter), 0.0)
            bound = np.zeros(len(self.pair_unit))
            np.maximum.at(bound, p, np.nan_to_num(ratio, nan=1.0, posinf=1.0))
            self._layout["bound"] = bound
        return self._layout["bound"]

    def pruned(self, iou_threshold: float) -> BlockStats:
        """The statistics restricted to the pairs that can reach ``iou_threshold`` in some
        resample (:meth:`pair_bound`); for ``iou_threshold > 0`` they give the same detectors,
        best labels and categories (a pair below the threshold can be no detector's best
        label). Cached per threshold."""
        if iou_threshold <= 0:
            return self
        key = f"pruned:{float(iou_threshold)!r}"
        if key not in self._layout:
            # a margin far above float rounding keeps every pair that could reach the threshold
            keep = np.flatnonzero(self.pair_bound() >= iou_threshold * (1 - 1e-9))
            self._layout[key] = dataclasses.replace(
                self, pair_unit=self.pair_unit[keep], pair_cat=self.pair_cat[keep],
                pair_label=self.pair_label[keep], intersect=self.intersect[:, keep].tocsr(),
                _layout={})
        return self._layout[key]

    @property
    def nbytes(self) -> int:
        """Bytes held by the sparse statistics."""
        return int(sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
                       for m in (self.intersect, self.unit_cat_area, self.label_area)))

    # ---------------------------------------------------------------- evaluate
    def evaluate(self, weights: np.ndarray, iou_threshold: float, *,
                 compiled: bool | None = None,
                 device: str | torch.device | None = None) -> dict[str, np.ndarray]:
        """Measures for each row of block ``weights`` (R, n_blocks).

        Returns ``detectors`` (R,), ``unique_concepts`` (R,) and ``by_category`` (R, C), with
        NetDissect-Lite's rules: best label per category (first on ties), best category (later
        on ties), detector when the best IoU >= ``iou_threshold``.

        ``device``: a torch device to compute on (the sparse weighted sums and segment maxima
        as torch operations; a CUDA device for large probes). ``None``: numpy, or the numba
        kernel (``compiled``). Every path gives the same numbers: the weights are counts, so
        the float64 sums are exact integers whatever their order, and the IoUs are the same
        float operations (tested).
        """
        W = np.asarray(weights, dtype=np.float64)
        if W.ndim != 2 or W.shape[1] != self.n_blocks:
            raise AnalysisError(f"bootstrap weights: expected shape (R, {self.n_blocks}), got {W.shape}")
        if iou_threshold > 0 and not self._layout.get("is_pruned"):
            sub = self.pruned(iou_threshold)
            sub._layout["is_pruned"] = True
            return sub.evaluate(W, iou_threshold, compiled=compiled, device=device)
        if device is not None:
            return self._evaluate_torch(W, iou_threshold, torch.device(device))
        R, C, U = W.shape[0], len(self.categories), self.units
        lay = self.layout()
        if compiled is None:
            compiled = use_compiled(self, R)
        kernel = _numba_kernel() if compiled else None
        if kernel is not None:
            det = np.zeros(R, np.int64)
            uniq = np.zeros(R, np.int64)
            by_cat = np.zeros((R, C), np.int64)
            kernel(np.ascontiguousarray(W.T), *self._csc(), self.pair_cat.astype(np.int64),
                   self.pair_label.astype(np.int64), lay["denom_col"].astype(np.int64),
                   lay["unit_ptr"], float(iou_threshold), U, C, self.num_labels, det, uniq, by_cat)
            return {"detectors": det, "unique_concepts": uniq, "by_category": by_cat}
        Wt = W.T
        inter = np.ascontiguousarray((self.intersect.T @ Wt).T)
        ucat = np.ascontiguousarray((self.unit_cat_area.T @ Wt).T)
        larea = np.ascontiguousarray((self.label_area.T @ Wt).T)
        # same operation order as the plain tally's _score: I / (A_unit + A_label - I + 1e-10)
        iou = inter / (ucat[:, lay["denom_col"]] + larea[:, self.pair_label] - inter + 1e-10)
        n_act = len(lay["useg_start"])
        det_zero = iou_threshold <= 0  # units with no positive IoU still count when T <= 0
        n_inactive = U - n_act
        by_cat = np.zeros((R, C), np.int64)
        seen = np.zeros((R, self.num_labels), dtype=bool)
        if n_act:
            segmax = np.maximum.reduceat(iou, lay["seg_start"], axis=1)
            unitmax = np.maximum.reduceat(segmax, lay["useg_start"], axis=1)
            det = unitmax >= iou_threshold
            S = segmax.shape[1]
            # best segment: the last (latest category) whose maximum equals the unit's
            cand = np.where(segmax == unitmax[:, lay["seg_uloc"]], np.arange(S)[None, :], -1)
            bestseg = np.maximum.reduceat(cand, lay["useg_start"], axis=1)
            # first pair (lowest label number) reaching its segment's maximum
            P = iou.shape[1]
            candp = np.where(iou == segmax[:, lay["pair_seg"]], np.arange(P)[None, :], P)
            firstp = np.minimum.reduceat(candp, lay["seg_start"], axis=1)
            rr, uu = np.nonzero(det)
            bs = bestseg[rr, uu]
            zero = unitmax[rr, uu] <= 0  # nothing scored: label 0 "-", last category
            cat = np.where(zero, C - 1, lay["seg_cat"][bs])
            lab = np.where(zero, 0, self.pair_label[firstp[rr, bs]])
            by_cat += np.bincount(rr * C + cat, minlength=R * C).reshape(R, C)
            seen[rr, lab] = True
            n_det = det.sum(axis=1)
        else:
            n_det = np.zeros(R, np.int64)
        if det_zero and n_inactive:
            n_det = n_det + n_inactive
            by_cat[:, C - 1] += n_inactive
            seen[:, 0] = True
        return {"detectors": np.asarray(n_det, np.int64), "unique_concepts": seen.sum(axis=1),
                "by_category": by_cat}

    def _torch_layout(self, dev: torch.device) -> dict[str, Any]:
        """The statistics and segment layout as torch tensors on ``dev`` (kept per device):
        the three sums transposed to (columns, blocks) sparse CSR, so a resample chunk's
        weighted sums are one sparse-dense product each."""
        key = f"torch:{dev}"
        if key not in self._layout:
            lay = self.layout()

            def csr(m: Any) -> torch.Tensor:
                t = m.T.tocsr()
                t.sort_indices()
                with warnings.catch_warnings():  # torch calls its sparse CSR support "beta"
                    warnings.filterwarnings("ignore", "Sparse CSR tensor support")
                    return torch.sparse_csr_tensor(
                        torch.from_numpy(t.indptr.astype(np.int64)),
                        torch.from_numpy(t.indices.astype(np.int64)),
                        torch.from_numpy(t.data.astype(np.float64)), size=t.shape,
                        dtype=torch.float64, check_invariants=True).to(dev)

            def idx(a: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.asarray(a, dtype=np.int64)).to(dev)

            self._layout[key] = {
                "inter": csr(self.intersect), "ucat": csr(self.unit_cat_area),
                "larea": csr(self.label_area), "pair_label": idx(self.pair_label),
                "denom_col": idx(lay["denom_col"]), "pair_seg": idx(lay["pair_seg"]),
                "seg_uloc": idx(lay["seg_uloc"]), "seg_cat": idx(lay["seg_cat"]),
                "n_seg": len(lay["seg_start"]), "n_act": len(lay["useg_start"]),
            }
        return self._layout[key]

    def _evaluate_torch(self, W: np.ndarray, iou_threshold: float,
                        dev: torch.device) -> dict[str, np.ndarray]:
        """:meth:`evaluate` with torch operations on ``dev``: the numpy path's steps, with
        ``scatter_reduce`` over the sorted pairs' segment numbers in place of ``reduceat``."""
        t = self._torch_layout(dev)
        R, C, U, L = W.shape[0], len(self.categories), self.units, self.num_labels
        det_zero = iou_threshold <= 0  # units with no positive IoU still count when T <= 0
        n_inactive = U - t["n_act"]
        by_cat = torch.zeros((R, C), dtype=torch.int64, device=dev)
        seen = torch.zeros((R, L), dtype=torch.bool, device=dev)
        n_det = torch.zeros(R, dtype=torch.int64, device=dev)
        if t["n_act"]:
            Wt = torch.from_numpy(np.ascontiguousarray(W.T)).to(dev)  # (blocks, R)
            inter = torch.sparse.mm(t["inter"], Wt).T  # (R, P)
            ucat = torch.sparse.mm(t["ucat"], Wt).T
            larea = torch.sparse.mm(t["larea"], Wt).T
            # same operation order as the plain tally's _score: I / (A_unit + A_label - I + 1e-10)
            iou = inter / (ucat[:, t["denom_col"]] + larea[:, t["pair_label"]] - inter + 1e-10)
            P, S = iou.shape[1], t["n_seg"]
            pair_seg = t["pair_seg"].expand(R, -1)
            segmax = torch.full((R, S), -torch.inf, dtype=torch.float64, device=dev)
            segmax.scatter_reduce_(1, pair_seg, iou, "amax")
            seg_uloc = t["seg_uloc"].expand(R, -1)
            unitmax = torch.full((R, t["n_act"]), -torch.inf, dtype=torch.float64, device=dev)
            unitmax.scatter_reduce_(1, seg_uloc, segmax, "amax")
            det = unitmax >= iou_threshold
            # best segment: the last (latest category) whose maximum equals the unit's
            seg_no = torch.arange(S, device=dev).expand(R, -1)
            cand = torch.where(segmax == unitmax.gather(1, seg_uloc), seg_no, -1)
            bestseg = torch.full((R, t["n_act"]), -1, dtype=torch.int64, device=dev)
            bestseg.scatter_reduce_(1, seg_uloc, cand, "amax")
            # first pair (lowest label number) reaching its segment's maximum
            pair_no = torch.arange(P, device=dev).expand(R, -1)
            candp = torch.where(iou == segmax.gather(1, pair_seg), pair_no, P)
            firstp = torch.full((R, S), P, dtype=torch.int64, device=dev)
            firstp.scatter_reduce_(1, pair_seg, candp, "amin")
            rr, uu = torch.nonzero(det, as_tuple=True)
            bs = bestseg[rr, uu]
            zero = unitmax[rr, uu] <= 0  # nothing scored: label 0 "-", last category
            cat = torch.where(zero, C - 1, t["seg_cat"][bs])
            lab = torch.where(zero, 0, t["pair_label"][firstp[rr, bs]])
            by_cat += torch.bincount(rr * C + cat, minlength=R * C).reshape(R, C)
            seen[rr, lab] = True
            n_det = det.sum(dim=1)
        if det_zero and n_inactive:
            n_det = n_det + n_inactive
            by_cat[:, C - 1] += n_inactive
            seen[:, 0] = True
        return {"detectors": n_det.cpu().numpy().astype(np.int64),
                "unique_concepts": seen.sum(dim=1).cpu().numpy().astype(np.int64),
                "by_category": by_cat.cpu().numpy()}

    # ---------------------------------------------------------------- io
    def save(self, path: str | Path) -> Path:
        """Write the statistics to an ``.npz`` file (reload with :meth:`load`)."""
        path = Path(path)
        arrays: dict[str, Any] = {}
        for name in ("intersect", "unit_cat_area", "label_area"):
            m = getattr(self, name)
            arrays[f"{name}_data"], arrays[f"{name}_indices"] = m.data, m.indices
            arrays[f"{name}_indptr"], arrays[f"{name}_shape"] = m.indptr, np.array(m.shape)
        np.savez_compressed(
            path, **arrays, units=self.units, num_labels=self.num_labels,
            categories=np.array(self.categories), label_category=self.label_category,
            block_size=self.block_size, n_images=self.n_images, n_blocks=self.n_blocks,
            pair_unit=self.pair_unit, pair_cat=self.pair_cat, pair_label=self.pair_label,
            probe_fingerprint=np.array(self.probe_fingerprint or ""),
            ids_sha256=np.array(self.ids_sha256))
        return path

    @classmethod
    def load(cls, path: str | Path) -> BlockStats:
        """Read statistics written by :meth:`save`."""
        from scipy import sparse

        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise AnalysisError(f"{path}: cannot read bootstrap statistics ({e}); expected the "
                                "block_stats.npz that Dissection(bootstrap=N).run(...).save() writes") from None
        with z:
            mats = {name: sparse.csr_matrix((z[f"{name}_data"], z[f"{name}_indices"],
                                             z[f"{name}_indptr"]), shape=tuple(z[f"{name}_shape"]))
                    for name in ("intersect", "unit_cat_area", "label_area")}
            return cls(units=int(z["units"]), num_labels=int(z["num_labels"]),
                       categories=[str(c) for c in z["categories"]],
                       label_category=z["label_category"], block_size=int(z["block_size"]),
                       n_images=int(z["n_images"]), n_blocks=int(z["n_blocks"]),
                       pair_unit=z["pair_unit"], pair_cat=z["pair_cat"], pair_label=z["pair_label"],
                       probe_fingerprint=str(z["probe_fingerprint"]) or None,
                       ids_sha256=str(z["ids_sha256"]), **mats)


def use_compiled(stats: BlockStats, n_resamples: int) -> bool:
    """Whether the numba kernel runs: enabled, large enough work, and numba imports."""
    return (USE_NUMBA and stats.intersect.nnz * int(n_resamples) >= NUMBA_MIN_WORK
            and _numba_kernel() is not None)


def measure_names(categories: list[str]) -> list[str]:
    """Columns of :func:`resample_measures`, in order."""
    return (["detectors", "detector_fraction", "unique_concepts"]
            + [f"detectors[{c}]" for c in categories])


def _frame(stats: BlockStats, out: dict[str, np.ndarray]) -> pd.DataFrame:
    cols: dict[str, Any] = {
        "detectors": out["detectors"],
        "detector_fraction": out["detectors"] / stats.units,
        "unique_concepts": out["unique_concepts"],
    }
    for i, c in enumerate(stats.categories):
        cols[f"detectors[{c}]"] = out["by_category"][:, i]
    return pd.DataFrame(cols)


def point_measures(stats: BlockStats, iou_threshold: float) -> pd.Series:
    """The measures with every block weight 1 (equal to the plain tally's)."""
    return _frame(stats, stats.evaluate(np.ones((1, stats.n_blocks)), iou_threshold)).iloc[0]


def resample_measures(stats: BlockStats, n_resamples: int, seed: int,
                      iou_threshold: float, *,
                      device: str | torch.device | None = None) -> pd.DataFrame:
    """Measures on ``n_resamples`` bootstrap resamples (one row each), seeded.

    Weights are drawn with :func:`interptool.common.stats.multinomial_weights` from
    ``numpy.random.default_rng(seed)`` in resample order, so the rows do not depend on how the
    work is chunked, and two results with the same probe and seed see the same resamples.
    ``device``: a torch device (a GPU) computes the weighted sums with torch there
    (:meth:`BlockStats.evaluate`; the same numbers); ``None``: numpy or the numba kernel.
    """
    if int(n_resamples) < 1:
        raise AnalysisError(f"bootstrap={n_resamples}: expected a positive number of resamples")
    rng = np.random.default_rng(int(seed))
    # per chunk: the numba kernel holds only the (resamples x blocks) weights; the numpy and
    # torch paths (resamples x pairs) work arrays
    compiled = False if device is not None else use_compiled(stats, int(n_resamples))
    width = stats.n_blocks if compiled else len(stats.pair_unit)
    per = max(1, min(int(n_resamples), _WORK_ENTRIES // max(width, 1)))
    parts = []
    done = 0
    while done < n_resamples:
        r = min(per, int(n_resamples) - done)
        W = multinomial_weights(rng, stats.n_blocks, r)
        parts.append(_frame(stats, stats.evaluate(W, iou_threshold, compiled=compiled,
                                                  device=device)))
        done += r
    return pd.concat(parts, ignore_index=True)


def bootstrap_table(estimates: pd.Series, samples: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """One row per measure: estimate, ci_low, ci_high, bias, se, method, level, resamples, widened.

    Intervals are bias-corrected percentile intervals (:func:`interval_from_resamples`), widened
    to the estimate if they miss it (``widened``); ``bias`` = mean of the resamples - estimate.
    """
    rows = []
    for m in samples.columns:
        iv = interval_from_resamples(samples[m].to_numpy(), float(estimates[m]), level=level,
                                     method=CI_METHOD)
        rows.append({"measure": m, "estimate": iv.estimate, "ci_low": iv.low, "ci_high": iv.high,
                     "bias": iv.bias, "se": iv.se, "method": iv.method, "level": iv.level,
                     "resamples": iv.n, "widened": iv.widened})
    return pd.DataFrame(rows)


def check_pairable(a: BlockStats, b: BlockStats) -> None:
    """AnalysisError unless ``a`` and ``b`` resample the same images the same way."""
    problems = []
    if a.probe_fingerprint != b.probe_fingerprint:
        problems.append(f"probe fingerprints differ ({str(a.probe_fingerprint)[:12]}.. vs "
                        f"{str(b.probe_fingerprint)[:12]}..)")
    if a.ids_sha256 != b.ids_sha256:
        problems.append("the kept probe images differ (other images or another order)")
    if a.block_size != b.block_size:
        problems.append(f"block sizes differ ({a.block_size} vs {b.block_size})")
    if a.categories != b.categories:
        problems.append(f"categories differ ({', '.join(a.categories)} vs {', '.join(b.categories)})")
    if problems:
        raise AnalysisError("paired bootstrap difference: the two results were not dissected on the "
                            "same probe under the same protocol: " + "; ".join(problems)
                            + ". Dissect both on the same probe with the same protocol and "
                            "bootstrap_block_size")


def paired_table(est_a: pd.Series, samples_a: pd.DataFrame, est_b: pd.Series,
                 samples_b: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Per measure: a, b, difference a - b with its paired BC interval, bias and the p-value
    that inverts that interval (:func:`~interptool.common.stats.bc_p_value`)."""
    rows = []
    for m in samples_a.columns:
        sa, sb = samples_a[m].to_numpy(float), samples_b[m].to_numpy(float)
        iv = paired_difference(sa, sb, float(est_a[m]), float(est_b[m]), level=level, method=CI_METHOD)
        rows.append({"measure": m, "a": float(est_a[m]), "b": float(est_b[m]),
                     "difference": iv.estimate, "ci_low": iv.low, "ci_high": iv.high,
                     "bias": iv.bias, "se": iv.se,
                     # the p that inverts the same BC interval, so p < 1 - level exactly
                     # when the interval excludes 0 (a percentile p could contradict it)
                     "p_value": bc_p_value(sa - sb, iv.estimate),
                     "method": f"paired {iv.method}", "level": iv.level, "resamples": iv.n,
                     "widened": iv.widened})
    return pd.DataFrame(rows)
