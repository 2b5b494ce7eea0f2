"""Network dissection (Bau et al. 2017) with NetDissect-Lite's semantics, streamed and batched.

``Dissection(...).run(cache, layer, probe)`` reads one layer's activations from an activation
cache made on a Broden-format probe set (``broden:PATH`` or ``builtin:concept-world``) and
scores every unit against every concept label:

1. threshold ``T_k``: the ``1 - quantile`` quantile of unit ``k``'s activations over all
   images x positions, exact (``numpy.quantile(..., method="linear")``) by default;
2. per image, each unit map whose maximum exceeds ``T_k`` is upsampled to the segmentation
   size exactly as NetDissect-Lite's ``imresize(map, (sh, sw), mode='F')`` (Pillow bilinear on
   float32) and thresholded ``> T_k``;
3. over the set: intersections per (unit, label), label areas (image-level labels count
   ``sh * sw`` per image), and per (unit, category) the unit's mask area over the images where
   the category is present; ``IoU = I / (A_unit,cat + A_label - I + 1e-10)``;
4. per unit, the best label of each category (by primary category), then the best category.

NetDissect-Lite reuses a stale per-category accumulator for images carrying only
image-level labels; here it is computed afresh for every image. See docs/dissection.md.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from interptool._progress import progress, warn
from interptool._provenance import (
    BackgroundDigest,
    atomic_path,
    atomic_savefig,
    atomic_write_text,
    provenance,
)
from interptool._resources import torch_threads
from interptool._workers import (
    Prefetch,
    describe,
    loader_failed,
    release_loader,
    restore_worker_signal,
    set_aside_worker_signal,
    unwrap_worker_error,
    worker_died,
)
from interptool.analyzers.dissection._bootstrap import (
    BlockRecorder,
    BlockStats,
    bootstrap_table,
    check_pairable,
    ids_digest,
    paired_table,
    point_measures,
    resample_measures,
)
from interptool.analyzers.dissection._mask_store import StorePlan, plan_store, store_key
from interptool.analyzers.dissection._params import DissectionParams
from interptool.analyzers.dissection._protocol import (
    ResolvedProtocol,
    get_protocol,
    resolve_protocol,
)
from interptool.analyzers.dissection._quantile import ExactQuantile
from interptool.analyzers.dissection._resize import is_square
from interptool.analyzers.dissection._tally import (
    PackedSegItems,
    SegItem,
    SegmentationSet,
    TallyAccumulator,
)
from interptool.analyzers.dissection._threads import analysis_threads, mask_workers
from interptool.errors import (
    AnalysisError,
    CacheError,
    ConfigError,
    InterptoolError,
)

__all__ = ["Dissection", "DissectionResult"]

#: batches of segmentations in probe order; a generator, so that a run can close() it (and
#: with it the DataLoader's worker processes) as soon as it is done with them
_Batches = Generator[list[SegItem], None, None]

#: IoU thresholds of the detector-count curve (0.01 .. 0.20).
CURVE_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(1, 21))


def _open_probe(probe: Any) -> Any:
    if isinstance(probe, (str, os.PathLike)):
        from interptool.data import open_dataset

        probe = open_dataset(str(probe))
    missing = [a for a in ("load_segmentation", "categories", "label_category", "num_labels")
               if not hasattr(probe, a)]
    if missing:
        raise AnalysisError(
            f"probe {getattr(probe, 'spec', probe)!r} has no segmentation masks (missing "
            f"{', '.join(missing)}): dissection needs a Broden-format probe set: give "
            "probe='broden:PATH' (CLI: --probe broden:PATH) or "
            "'builtin:concept-world?n=..&size=..', and a cache made on that probe set"
        )
    return probe


def _model_name(cache: Any) -> str:
    """The model's name a cache records (``LoadedModel.name``), else the file's stem."""
    info = getattr(cache, "model_info", None)
    if isinstance(info, dict) and info.get("name"):
        return str(info["name"])
    return Path(str(getattr(cache, "path", "model"))).stem


def _label_names(probe: Any) -> list[str]:
    names = [str(n) for n in np.asarray(probe.label_names).tolist()]
    names += [""] * (int(probe.num_labels) - len(names))
    if not names[0]:
        names[0] = "-"  # NetDissect-Lite's name for label 0 (reported when no IoU is > 0)
    return names


class _LayerView:
    """Reads one cached layer as (B, U, H, W) float32 blocks; tokens become their patch grid.

    A token layer (N, T, D) is laid out from what the cache records about its model:
    ``num_prefix_tokens`` leading tokens without a position (class, distillation, register
    tokens: 1 for a ViT, 2 for DeiT distilled, 1 + 4 with registers) are dropped and the
    remaining ``T - prefix`` tokens fill ``token_grid`` (rows, cols) row by row. A cache made
    before these were recorded falls back to guessing: a square T (no prefix) or a square
    T - 1 (one class token).
    """

    def __init__(self, cache: Any, layer: str) -> None:
        self.cache, self.layer = cache, layer
        shape = tuple(cache.features(layer).shape)
        self.token_start = 0
        if len(shape) == 4:
            _, self.units, self.h, self.w = shape
            self.kind = "spatial"
        elif len(shape) == 3:
            _, t, d = shape
            self.token_start, (self.h, self.w) = _token_layout(cache, layer, t, d)
            self.units = d
            self.kind = "tokens"
        else:
            raise AnalysisError(
                f"{cache.path}: layer {layer!r} has shape {shape}; dissection needs a spatial "
                "feature map (N, C, H, W) (or patch tokens (N, T, D)); pooled or logit "
                "layers carry no position to compare with masks"
            )

    def blocks(self, batch_size: int):
        for start, arr in self.cache.iter_features(self.layer, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
            if self.kind == "tokens":
                x = x[:, self.token_start :, :].transpose(1, 2)
                x = x.reshape(x.shape[0], self.units, self.h, self.w)
            yield start, x


def _token_layout(cache: Any, layer: str, t: int, d: int) -> tuple[int, tuple[int, int]]:
    """``(prefix tokens, (rows, cols))`` of a cached token layer with ``t`` tokens.

    Read from the cache's ``num_prefix_tokens`` and ``token_grid`` attributes (recorded from
    the loaded model); without them a square ``t`` or ``t - 1`` is assumed (no prefix or one
    class token). Raises AnalysisError when the tokens after the prefix do not fill the grid.
    """
    attrs = getattr(cache, "attrs", None) or {}
    prefix = attrs.get("num_prefix_tokens")
    grid = attrs.get("token_grid") or None
    where = f"{cache.path}: layer {layer!r} holds tokens (N, T={t}, D={d})"
    fix = ("Cache a convolutional layer or a transformer block whose outputs are the model's "
           "token sequence (e.g. blocks.N of a ViT)")
    if prefix is None:  # a cache from before the token layout was recorded: infer it
        if is_square(t):
            prefix = 0
        elif t > 1 and is_square(t - 1):
            prefix = 1  # a leading class token has no position: dropped
        else:
            raise AnalysisError(
                f"{where}; the cache does not record the model's leading (class, "
                "distillation, register) tokens and T (or T-1 after a class token) is not a "
                "square number. "
                f"Re-create the cache with this interptool version (it records them), or: {fix}")
    prefix = int(prefix)
    n = t - prefix
    if grid is not None:
        rows, cols = (int(g) for g in grid)
        if n != rows * cols:
            raise AnalysisError(
                f"{where}; the model has {prefix} leading token(s) and a {rows}x{cols} patch "
                f"grid, so T should be {prefix + rows * cols}, not {t}: this layer is not the "
                f"model's token sequence. {fix}")
        return prefix, (rows, cols)
    if n < 1 or not is_square(n):
        raise AnalysisError(
            f"{where}; after the model's {prefix} leading token(s), {n} tokens do not form a "
            f"square grid and the cache records no token grid. {fix}")
    side = math.isqrt(n)
    return prefix, (side, side)


@dataclass
class DissectionResult:
    """Per-unit concept scores of one layer (NetDissect-Lite tally) and the raw counts.

    Attributes:
        layer: layer name. units: number of units.
        categories: probe categories, in ``category.csv`` order.
        label_names: name per label number (index = label number; 0 is "-").
        label_category: primary category index per label number (-1: unused number).
        thresholds: (U,) float64 activation thresholds ``T_k``.
        iou: (U, L) float64 IoU of every unit with every label.
        intersect: (U, L) int64 intersections. label_area: (L,) int64.
        unit_area: (U,) int64 total mask area. unit_cat_area: (U, C) int64 mask area per
            category (the IoU denominator's unit term).
        cat_label: (U, C) best label number per category. cat_iou: (U, C) its IoU.
        best_category: (U,) index of the best category. best_label: (U,) label number.
        best_iou: (U,) IoU of the best label (NetDissect-Lite's ``score``).
        top_images: (U, k) probe indices with the largest unit maxima (descending).
        top_values: (U, k) those maxima. top_maps: (U, k, H, W) their feature maps.
        iou_threshold, quantile: the settings used. config, provenance: JSON-safe dicts.
    """

    layer: str
    units: int
    categories: list[str]
    label_names: list[str]
    label_category: np.ndarray
    thresholds: np.ndarray
    iou: np.ndarray
    intersect: np.ndarray
    label_area: np.ndarray
    unit_area: np.ndarray
    unit_cat_area: np.ndarray
    cat_label: np.ndarray
    cat_iou: np.ndarray
    best_category: np.ndarray
    best_label: np.ndarray
    best_iou: np.ndarray
    top_images: np.ndarray
    top_values: np.ndarray
    top_maps: np.ndarray
    iou_threshold: float
    quantile: float
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    probe: Any = field(default=None, repr=False)
    #: the resolved protocol (name, categories, IoU threshold, quantile, images used/dropped,
    #: and the bootstrap settings when one was run); written into every output
    protocol: dict[str, Any] = field(default_factory=dict)
    #: per-block sufficient statistics (``Dissection(bootstrap=N)``), for resamples and pairs
    block_stats: BlockStats | None = field(default=None, repr=False)
    #: measures on each bootstrap resample (rows) when a bootstrap was run
    bootstrap_samples: pd.DataFrame | None = field(default=None, repr=False)
    #: the model dissected (one name; ``Dissection.run(..., name=)``, default from the cache)
    names: tuple[str, ...] = ()

    #: stem of the standard files written by :meth:`save` (see docs/extending.md)
    file_stem = "dissection"

    # ------------------------------------------------------------------ queries
    def detectors(self, iou_threshold: float | None = None) -> np.ndarray:
        """0-based indices of units whose best IoU is ``>= iou_threshold`` (default: the run's)."""
        t = self.iou_threshold if iou_threshold is None else float(iou_threshold)
        return np.flatnonzero(self.best_iou >= t)

    def unique_concepts(self, iou_threshold: float | None = None) -> int:
        """Number of distinct labels among the detectors."""
        return int(len(np.unique(self.best_label[self.detectors(iou_threshold)])))

    def thresholds_curve(self) -> list[dict[str, float]]:
        """Detectors (count and fraction of units) and unique concepts at IoU 0.01 .. 0.20."""
        return [{"iou_threshold": t, "detectors": int(len(self.detectors(t))),
                 "detector_fraction": float(self.detector_fraction(t)),
                 "unique_concepts": self.unique_concepts(t)} for t in CURVE_THRESHOLDS]

    def by_category(self, iou_threshold: float | None = None) -> dict[str, int]:
        """Detector count per best category (every category listed, zeros included)."""
        det = self.detectors(iou_threshold)
        counts = np.bincount(self.best_category[det], minlength=len(self.categories))
        return {c: int(counts[i]) for i, c in enumerate(self.categories)}

    def counts_by_category(self, iou_threshold: float | None = None) -> dict[str, dict[str, int]]:
        """Per best category: ``{"detectors": units, "unique": distinct labels}`` (all listed)."""
        det = self.detectors(iou_threshold)
        cats, labels = self.best_category[det], self.best_label[det]
        return {c: {"detectors": int((cats == i).sum()),
                    "unique": int(len(np.unique(labels[cats == i])))}
                for i, c in enumerate(self.categories)}

    def top_units(self, k: int) -> list[dict[str, Any]]:
        """The ``k`` units of highest best IoU (ties: lower unit first), 1-based ``unit``."""
        ranked = np.lexsort((np.arange(self.units), -self.best_iou))[: max(int(k), 0)]
        return [{"unit": int(u) + 1, "label": self.label_names[int(self.best_label[u])],
                 "category": self.categories[int(self.best_category[u])],
                 "iou": float(self.best_iou[u])} for u in ranked]

    def detector_fraction(self, iou_threshold: float | None = None) -> float:
        """Detectors / units: comparable across layers and models of different widths."""
        return len(self.detectors(iou_threshold)) / self.units if self.units else float("nan")

    def concept_table(self, iou_threshold: float | None = None) -> pd.DataFrame:
        """Concepts detected in this layer: one row per label that is some detector's best label.

        Columns: ``layer``, ``concept`` (label name), ``category``, ``units`` (detectors whose
        best label it is), ``fraction`` (``units`` / all units of the layer), ``max_iou`` (the
        best of those units' IoUs) and ``unit_ids`` (1-based, ';'-separated). Sorted by
        ``units`` (descending), then concept name.
        """
        det = self.detectors(iou_threshold)
        rows = []
        for lab in np.unique(self.best_label[det]):
            us = det[self.best_label[det] == lab]
            rows.append({"layer": self.layer, "concept": self.label_names[int(lab)],
                         "category": self.categories[int(self.best_category[us[0]])],
                         "units": int(len(us)), "fraction": len(us) / self.units,
                         "max_iou": float(self.best_iou[us].max()),
                         "unit_ids": ";".join(str(int(u) + 1) for u in us)})
        cols = ["layer", "concept", "category", "units", "fraction", "max_iou", "unit_ids"]
        frame = pd.DataFrame(rows, columns=cols)
        return frame.sort_values(["units", "concept"], ascending=[False, True], ignore_index=True)

    def concepts_gained_lost(self, other: DissectionResult,
                             iou_threshold: float | None = None) -> pd.DataFrame:
        """Concepts detected here or in ``other`` (e.g. the teacher), with what changed.

        One row per concept detected by either: ``concept``, ``category``, ``units`` (detectors
        here), ``units_other`` (detectors in ``other``), ``status``: ``"gained"`` (detected here,
        not in ``other``), ``"lost"`` (detected in ``other`` only) or ``"shared"``. Both results
        must use the same label space (same probe); the IoU threshold defaults to each
        result's own. Sorted by status (gained, lost, shared), then units, then concept.
        """
        if list(self.label_names) != list(other.label_names):
            raise AnalysisError(
                f"concepts_gained_lost: layer {self.layer!r} and {other.layer!r} were dissected "
                "on different label sets; dissect both on the same probe")
        t_other = other.iou_threshold if iou_threshold is None else iou_threshold
        mine = self.concept_table(iou_threshold).set_index("concept")
        theirs = other.concept_table(t_other).set_index("concept")
        rows = []
        for name in sorted(set(mine.index) | set(theirs.index)):
            a = int(mine.at[name, "units"]) if name in mine.index else 0
            b = int(theirs.at[name, "units"]) if name in theirs.index else 0
            cat = mine.at[name, "category"] if name in mine.index else theirs.at[name, "category"]
            rows.append({"concept": name, "category": cat, "units": a, "units_other": b,
                         "status": "shared" if a and b else ("gained" if a else "lost")})
        frame = pd.DataFrame(rows, columns=["concept", "category", "units", "units_other", "status"])
        frame["_o"] = frame["status"].map({"gained": 0, "lost": 1, "shared": 2})
        frame["_n"] = -(frame["units"] + frame["units_other"])
        return frame.sort_values(["_o", "_n", "concept"], ignore_index=True).drop(columns=["_o", "_n"])

    # ------------------------------------------------------------------ bootstrap
    def _measures(self) -> pd.Series:
        """The bootstrapped measures on the full probe (plain tally)."""
        vals: dict[str, float] = {"detectors": len(self.detectors()),
                                  "detector_fraction": self.detector_fraction(),
                                  "unique_concepts": self.unique_concepts()}
        vals.update({f"detectors[{c}]": v for c, v in self.by_category().items()})
        return pd.Series(vals, dtype=np.float64)

    def _need_stats(self, what: str) -> BlockStats:
        if self.block_stats is None:
            raise AnalysisError(
                f"{what}: layer {self.layer!r} was dissected without bootstrap statistics; run "
                "Dissection(bootstrap=1000) (CLI: --bootstrap 1000)")
        return self.block_stats

    def resample(self, n_resamples: int | None = None, seed: int | None = None) -> pd.DataFrame:
        """Measures on bootstrap resamples of the probe images (one row per resample).

        Defaults: the ``bootstrap`` and ``seed`` the dissection ran with. Thresholds are held
        at their full-probe values; see docs/dissection.md.
        """
        stats = self._need_stats("resample")
        boot = self.protocol.get("bootstrap", {})
        n = int(boot.get("resamples", 1000) if n_resamples is None else n_resamples)
        sd = int(boot.get("seed", 0) if seed is None else seed)
        if (self.bootstrap_samples is not None and n == boot.get("resamples")
                and sd == boot.get("seed")):
            return self.bootstrap_samples
        return resample_measures(stats, n, sd, self.iou_threshold)

    def intervals(self, level: float | None = None) -> pd.DataFrame:
        """Bootstrap intervals of detectors, detector fraction, unique concepts and per-category
        detectors: one row per measure (``estimate``, ``ci_low``, ``ci_high``, ``bias``, ``se``,
        ``method``, ``level``, ``resamples``, ``widened``). Every interval contains its estimate.
        """
        lvl = float(self.protocol.get("bootstrap", {}).get("level", 0.95) if level is None else level)
        return bootstrap_table(self._measures(), self.resample(), level=lvl)

    def paired_difference(self, other: DissectionResult, level: float | None = None) -> pd.DataFrame:
        """This result minus ``other``, per measure, with a **paired** bootstrap interval.

        Both must carry bootstrap statistics from the same probe (same kept images in the same
        order, same block size, same categories); both are resampled with this result's number
        of resamples and seed, so every resample draws the same images for the two models and
        the difference is taken resample by resample. Columns: ``measure``, ``a`` (this), ``b``
        (other), ``difference``, ``ci_low``, ``ci_high``, ``bias``, ``se``, ``p_value`` (two-sided
        bootstrap p of no difference; Holm-correct over a table with
        :func:`interptool.common.stats.holm_adjust`), ``method``, ``level``, ``resamples``.
        """
        a, b = self._need_stats("paired_difference"), other._need_stats("paired_difference")
        check_pairable(a, b)
        boot = self.protocol.get("bootstrap", {})
        n, sd = int(boot.get("resamples", 1000)), int(boot.get("seed", 0))
        lvl = float(boot.get("level", 0.95) if level is None else level)
        return paired_table(self._measures(), self.resample(n, sd), other._measures(),
                            other.resample(n, sd), level=lvl)

    def summary(self) -> dict[str, Any]:
        """JSON-safe headline numbers, the protocol and (after a bootstrap) the intervals."""
        out = {
            "layer": self.layer,
            "units": int(self.units),
            "detectors": int(len(self.detectors())),
            "detector_fraction": float(self.detector_fraction()),
            "unique_concepts": self.unique_concepts(),
            "by_category": self.by_category(),
            "by_category_fraction": {c: v / self.units if self.units else float("nan")
                                     for c, v in self.by_category().items()},
            "iou_threshold": float(self.iou_threshold),
            "quantile": float(self.quantile),
            "thresholds_curve": self.thresholds_curve(),
            "protocol": self.protocol,
        }
        if self.bootstrap_samples is not None:
            out["intervals"] = {
                r["measure"]: {k: (bool(r[k]) if k == "widened" else float(r[k]))
                               for k in ("estimate", "ci_low", "ci_high", "level", "bias",
                                         "widened")}
                for r in self.intervals().to_dict(orient="records")}
        return out

    # ------------------------------------------------------------------ tables
    def to_frame(self) -> pd.DataFrame:
        """One row per unit (unit order), NetDissect-Lite ``tally.csv`` columns.

        ``unit`` is 1-based; ``score`` and ``iou`` are the best IoU; per category ``c``:
        ``c-label`` (best label), ``c-truth`` (its area), ``c-activation`` (the unit's area in
        the label's category), ``c-intersect`` and ``c-iou``.
        """
        U = self.units
        rows: dict[str, Any] = {
            "unit": np.arange(1, U + 1),
            "category": [self.categories[c] for c in self.best_category],
            "label": [self.label_names[j] for j in self.best_label],
            "score": self.best_iou,
            "iou": self.best_iou,
        }
        # NetDissect-Lite reads c-activation through the label's primary category; label 0
        # (reported when nothing in c scores above 0) has the last category there.
        prim = self.label_category.copy()
        prim[prim < 0] = len(self.categories) - 1
        prim[0] = len(self.categories) - 1
        ar = np.arange(U)
        for ci, cat in enumerate(self.categories):
            lab = self.cat_label[:, ci]
            rows[f"{cat}-label"] = [self.label_names[j] for j in lab]
            rows[f"{cat}-truth"] = self.label_area[lab]
            rows[f"{cat}-activation"] = self.unit_cat_area[ar, prim[lab]]
            rows[f"{cat}-intersect"] = self.intersect[ar, lab]
            rows[f"{cat}-iou"] = self.cat_iou[:, ci]
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: summary, settings, provenance and the per-unit table (no full matrix)."""
        return {
            "names": list(self.names),
            "summary": self.summary(),
            "config": self.config,
            "provenance": self.provenance,
            "thresholds": [float(t) for t in self.thresholds],
            "units": json.loads(self.to_frame().to_json(orient="records")),
        }

    # ------------------------------------------------------------------ output
    def plot(self, ax: Any = None) -> Any:
        """Bar chart of detectors per category; returns the matplotlib Figure."""
        from interptool.analyzers.dissection._plots import plot_by_category

        return plot_by_category(self, ax=ax)

    def plot_thresholds_curve(self, ax: Any = None) -> Any:
        """Detectors and unique concepts against the IoU threshold; returns the Figure."""
        from interptool.analyzers.dissection._plots import plot_curve

        return plot_curve(self, ax=ax)

    def montage(self, unit: int) -> Any:
        """PIL image: the unit's top probe images with its thresholded mask outlined."""
        from interptool.analyzers.dissection._plots import unit_montage

        return unit_montage(self, unit)

    def montage_sheet(self, units: list[int]) -> Any:
        """PIL image: :meth:`montage` of each 0-based unit in ``units``, stacked top to bottom."""
        from interptool.analyzers.dissection._plots import montage_sheet

        return montage_sheet(self, units)

    def save(self, directory: str | os.PathLike, *, montages: str | int = "detectors",
             max_montages: int = 64, figures: bool = True) -> list[Path]:
        """Write the standard files (``dissection.csv`` = ``to_frame()``, ``dissection.json``
        = ``to_dict()``; :func:`~interptool.analyzers._base.save_result_files`), then
        NetDissect-Lite's ``tally.csv`` and ``summary.json``, ``iou.npz``, ``concepts.csv``,
        the two plots and montages; after a bootstrap also ``intervals.csv`` and
        ``block_stats.npz``.

        ``tally.csv`` rows are ordered by score, highest first, as NetDissect-Lite writes them.
        ``montages``: ``"detectors"`` (default: detector units, best first, at most
        ``max_montages``), ``"all"`` (every unit, at most ``max_montages``), an int (the top
        that many units by IoU) or ``"none"``. Montages need the probe's images.
        ``figures=False`` writes neither the two plots nor the montages (and imports no
        plotting library). Every file is written atomically: an interrupted save leaves the
        previous file or none, never a torn one, and no temporary file.
        """
        from interptool.analyzers._base import save_result_files

        out = Path(directory)
        paths: list[Path] = save_result_files(self, out, figures=False)
        frame = self.to_frame()
        order = np.lexsort((frame["unit"].to_numpy(), -self.best_iou))
        p = out / "tally.csv"
        atomic_write_text(p, frame.iloc[order].to_csv(index=False))
        paths.append(p)
        p = out / "summary.json"
        doc = {**self.summary(), "config": self.config, "provenance": self.provenance,
               "thresholds": [float(t) for t in self.thresholds]}
        atomic_write_text(p, json.dumps(doc, indent=2, sort_keys=False) + "\n")
        paths.append(p)
        p = out / "iou.npz"
        with atomic_path(p) as tmp:
            np.savez_compressed(tmp, iou=self.iou, intersect=self.intersect,
                                label_area=self.label_area, unit_area=self.unit_area,
                                unit_cat_area=self.unit_cat_area, thresholds=self.thresholds,
                                label_names=np.array(self.label_names),
                                categories=np.array(self.categories))
        paths.append(p)
        p = out / "concepts.csv"
        atomic_write_text(p, self.concept_table().to_csv(index=False))
        paths.append(p)
        if self.block_stats is not None:
            with atomic_path(out / "block_stats.npz") as tmp:
                self.block_stats.save(tmp)
            paths.append(out / "block_stats.npz")
        if self.bootstrap_samples is not None:
            p = out / "intervals.csv"
            atomic_write_text(p, self.intervals().to_csv(index=False))
            paths.append(p)
        if figures:
            paths += self._save_figures(out, montages, max_montages)
        return paths

    def _save_figures(self, out: Path, montages: str | int, max_montages: int) -> list[Path]:
        """The two plots and the unit montages (all units' montages rendered in one pass)."""
        import matplotlib.pyplot as plt

        from interptool.analyzers.dissection._plots import render_montages

        paths = []
        for name, fig in (("detectors_by_category.png", self.plot()),
                          ("thresholds_curve.png", self.plot_thresholds_curve())):
            atomic_savefig(fig, out / name, dpi=100, bbox_inches="tight")
            plt.close(fig)
            paths.append(out / name)
        for unit, image in render_montages(self, self._montage_units(montages, max_montages)):
            p = out / "units" / f"unit_{unit + 1:04d}.png"
            with atomic_path(p) as tmp:  # creates units/
                image.save(tmp, format="PNG", compress_level=1)  # fast; PNG stays lossless
            paths.append(p)
        return paths

    def _montage_units(self, montages: str | int, max_montages: int) -> list[int]:
        from interptool.analyzers.dissection._params import MontageParams

        MontageParams(montages=montages, max_montages=max_montages)  # ranked[:-3] cut units
        if self.probe is None or not hasattr(self.probe, "load_image") or montages == "none":
            return []
        ranked = np.lexsort((np.arange(self.units), -self.best_iou))
        if montages == "detectors":
            ranked = ranked[self.best_iou[ranked] >= self.iou_threshold]
        elif isinstance(montages, int):
            max_montages = min(max_montages, montages)
        elif montages != "all":
            raise ConfigError(f"montages={montages!r}; expected 'detectors', 'all', 'none' or "
                              "a number of units")
        return [int(u) for u in ranked[:max_montages]]


class Dissection:
    """Network dissection of one layer against a Broden-format probe (NetDissect-Lite rules).

    Args:
        quantile: top fraction of activations above the threshold (default: the protocol's,
            0.005 = the 99.5th percentile in both presets).
        iou_threshold: a unit is a detector when its best IoU is ``>=`` this (default: the
            protocol's, NetDissect-Lite 0.04; ``han2023`` 0.05).
        batch_size: images per streamed block (memory does not grow with the set size).
        device: torch device for the quantile merge, upsampling and counting.
        workers: DataLoader worker processes decoding the segmentation masks; ``None``
            (default) chooses from the cores and the device (:func:`mask_workers`: on the CPU
            half the cores, on CUDA all but one or two; none for a probe of a few batches or
            segmentations decoded already in this process). Recorded with the threads in
            ``result.config["threads"]["mask_workers"]``. The results do not depend on it.
        mask_store: a folder keeping the probe's decoded masks between runs and processes
            (:mod:`~interptool.analyzers.dissection._mask_store`): the first run decodes
            and writes them (about 2 bytes per mask pixel: ~12 GB for Broden), later runs
            on the same probe, categories and mask files read them back. Where a run's
            masks came from is recorded in ``result.config["segmentations"]``. Default:
            decoded every run (a probe that fits :data:`SEGMENTATION_MEMO_BYTES` is still
            decoded once per process).
        top_images: probe images kept per unit for the montages.
        category_area: ``"overlap"`` (NetDissect-Lite's code, default): a unit's mask in an
            image counts toward category c's denominator when it touches a pixel labelled
            with a c label, or the image has an image-level c label; ``"image"``: whenever
            the image carries any c label.
        protocol: ``"netdissect-lite"`` (default: object, part, scene, texture, color; IoU
            0.04) or ``"han2023"`` (the KD paper's fork: the six Broden categories including
            material; IoU 0.05). Images carrying no label of a selected category take no part
            in thresholds or tallies. Recorded in ``result.protocol``.
        categories: categories to dissect against (a list or ``"object,part"``); default:
            the protocol's that the probe has. Overrides are recorded.
        bootstrap: number of bootstrap resamples of the probe images (0: none). Keeps
            per-block statistics during the tally; thresholds stay at their full-probe values.
        seed: seed of the bootstrap resamples (the same seed gives the same resampled images
            for every model on the same probe: paired differences).
        bootstrap_block_size: probe images per resampled block (1: the ordinary bootstrap;
            larger blocks store fewer statistics).
        ci_level: confidence level of the bootstrap intervals.
    """

    def __init__(
        self,
        quantile: float | None = None,
        iou_threshold: float | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        workers: int | None = None,
        top_images: int = 8,
        *,
        mask_store: str | os.PathLike | None = None,
        category_area: str = "overlap",
        checksum: bool = True,
        protocol: str = "netdissect-lite",
        categories: str | list[str] | tuple[str, ...] | None = None,
        bootstrap: int = 0,
        seed: int = 0,
        bootstrap_block_size: int = 1,
        ci_level: float = 0.95,
    ) -> None:
        # every check lives in DissectionParams (ParamsError naming the field)
        self.params = DissectionParams(
            protocol=protocol, categories=categories, quantile=quantile,
            iou_threshold=iou_threshold, batch_size=batch_size, device=str(device),
            workers=workers, top_images=top_images,
            mask_store=None if mask_store is None else os.fspath(mask_store),
            category_area=category_area, checksum=checksum,
            bootstrap=bootstrap, seed=seed, bootstrap_block_size=bootstrap_block_size,
            ci_level=ci_level)
        from interptool.analyzers.dissection._protocol import parse_categories

        preset = get_protocol(protocol)
        self._given = {"quantile": quantile, "iou_threshold": iou_threshold}
        self.protocol = preset.name
        self.categories = parse_categories(categories)
        self.bootstrap = int(bootstrap)
        self.seed = int(seed)
        self.bootstrap_block_size = int(bootstrap_block_size)
        self.ci_level = float(ci_level)
        self.quantile = float(preset.quantile if quantile is None else quantile)
        self.iou_threshold = float(preset.iou_threshold if iou_threshold is None
                                   else iou_threshold)
        self.batch_size = int(batch_size)
        self.device = str(device)
        self.workers = None if workers is None else int(workers)
        self.mask_store = self.params.mask_store
        self.top_images = int(top_images)
        self.category_area = category_area
        self.checksum = bool(checksum)

    @classmethod
    def from_params(cls, params: DissectionParams) -> Dissection:
        """The analyzer configured by a :class:`DissectionParams`."""
        return cls(**{k: getattr(params, k) for k in params.field_names()})

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "quantile", "iou_threshold", "batch_size", "device", "workers", "mask_store",
            "top_images", "category_area", "protocol", "categories",
            "bootstrap", "seed", "bootstrap_block_size", "ci_level")}

    # ------------------------------------------------------------------ run
    def run(self, cache: Any, layer: str, probe: Any = None, *,
            name: str | None = None) -> DissectionResult:
        """Dissect ``layer`` of ``cache`` (path or ActivationCache) against ``probe``.

        ``probe``: a spec string or a BrodenDataset; default: the cache's ``data_spec``.
        ``name``: the model's name in the result (``result.names``); default: the name the
        cache records for its model, else the cache file's stem.
        """
        from interptool.cache import ActivationCache

        own = not isinstance(cache, ActivationCache)
        if own:
            cache = ActivationCache(cache)
        try:
            if probe is None:
                if not cache.data_spec:
                    raise AnalysisError(f"{cache.path}: the cache records no data spec; pass "
                                        "the probe set explicitly (probe='broden:PATH'; CLI: --probe)")
                probe = cache.data_spec
            probe = _open_probe(probe)
            self._check_alignment(cache, probe)
            result = self._run(cache, layer, probe)
            result.names = (name or _model_name(cache),)
            return result
        finally:
            if own:
                cache.close()

    def _check_alignment(self, cache: Any, probe: Any) -> None:
        fp = cache.data_fingerprint
        spec = getattr(probe, "spec", "probe")
        # A centre-cropped (eval) cache has features that no longer cover the whole image, so
        # they cannot be compared with the full-image masks: refuse rather than report detectors.
        transform = getattr(cache, "attrs", {}).get("transform")
        if transform is not None and transform != "probe":
            raise CacheError(
                f"{cache.path}: field 'transform' is {transform!r}, but dissection needs the probe "
                "transform (whole image resized, no crop) so features line up with the masks; "
                f"re-create the cache with: interptool cache ... --data {spec} --probe yes "
                "(or let `interptool dissect --arch ...` cache the probe set itself)"
            )
        from interptool.common.alignment import ImageSet, check_same_images

        check_same_images(
            ImageSet(str(cache.path), list(cache.ids), fp), ImageSet(spec, list(probe.ids),
                                                                     probe.fingerprint),
            error=CacheError, unknown_fingerprint_ok=True,
            fix=f"Images skipped while caching or another probe set break the alignment; "
                f"re-create the cache on the probe set: interptool cache ... --data {spec} "
                "(without --skip-bad)")

    def _run(self, cache: Any, layer: str, probe: Any) -> DissectionResult:
        device = torch.device(self.device)
        view = _LayerView(cache, layer)
        if cache.n == 0:
            raise AnalysisError(f"{cache.path}: the cache holds no images")
        # the protocol decides the categories and which images take part (NetDissect-Lite
        # drops images without a label of a selected category before anything is counted)
        proto = resolve_protocol(probe, self.protocol, categories=self.categories,
                                 iou_threshold=self._given["iou_threshold"],
                                 quantile=self._given["quantile"])
        # masks are decoded by worker processes when that pays (none when this process holds
        # them decoded already), and the tally's torch threads take the cores left over and
        # free now (docs/benchmarks_dissect.md)
        categories = list(proto.categories)
        # with a store every mask file is looked at (its key); else only up to the memo's bound
        state = _mask_files_state(probe, categories, None) if self.mask_store else None
        slot = _memo_slot(probe, categories, state)
        memoised = slot is not None and slot[0].get(slot[1]) is not None
        plan = None if memoised or not self.mask_store else self._plan_store(probe,
                                                                             categories, state)
        # held decoded or read from the store: nothing to decode, so no worker whatever was
        # asked (the cores go to the tally)
        segmentations = None
        try:
            workers = 0 if memoised or (plan is not None and plan.reader is not None) else \
                mask_workers(self.workers, len(probe), self.batch_size, device.type)
            threads = analysis_threads(workers)
            # mask workers start now, so their first batches (two per worker) are decoded
            # while the thresholds are computed (forked before this run starts a thread of
            # its own); the cache's checksum for the provenance is read on a thread while
            # both passes run
            segmentations = self._segmentations(probe, categories, slot, workers, plan)
            digest = BackgroundDigest(cache.path) if self.checksum else None
        except BaseException:  # the workers failed to start (fork: ENOMEM), Ctrl-C
            if segmentations is not None:
                segmentations.close()
            if plan is not None:
                plan.release()
            raise
        aside = None
        try:
            with torch_threads(threads["torch_threads"]):
                result = self._measure(cache, layer, probe, view, proto, segmentations,
                                       digest)
        except BaseException as exc:
            if not worker_died(exc):  # from the loader, or torch's SIGCHLD handler anywhere
                raise
            release_loader(exc)
            aside = set_aside_worker_signal()  # while the loader goes (finally below)
            raise AnalysisError(
                f"a worker process decoding the probe's masks died ({describe(exc)}); the "
                "usual cause is the out-of-memory killer: give the dissection fewer workers "
                "(--workers 1, or 0 to decode in this process) or a smaller --batch-size"
            ) from None
        finally:
            # workers stop now, not when the garbage collector finds them (a failed run's
            # error may be kept, with the frames that hold them, by the caller)
            segmentations.close()
            if plan is not None:  # also when the run ended before its first batch of masks
                plan.release()
            restore_worker_signal(aside)
            if digest is not None:
                digest.cancel()  # a failed run does not wait for it (done: no effect)
        result.config["threads"] = threads
        result.config["segmentations"] = plan.record() if plan is not None else {
            "source": "held decoded in this process" if memoised else "decoded",
            "store_file": None}
        return result

    def _plan_store(self, probe: Any, categories: list[str],
                    state: _FilesState | None) -> StorePlan:
        """Read the probe's store file, or write it while decoding; told to the user (even
        with --quiet) when the store cannot be used."""
        key = store_key(state.digest, probe, categories) if state is not None else None
        plan = plan_store(self.mask_store, key, probe, categories,
                          state.table_bytes if state is not None else 0)
        for note in plan.notes:
            warn(f"mask store: {note}")
        if plan.action == "none":
            warn(f"mask store {self.mask_store}: not used ({plan.why}); the masks are decoded")
        return plan

    def _measure(self, cache: Any, layer: str, probe: Any, view: _LayerView,
                 proto: ResolvedProtocol, segmentations: _Batches,
                 digest: BackgroundDigest | None) -> DissectionResult:
        """Both passes over the layer (thresholds, then the tally) and the result."""
        device = torch.device(self.device)
        U, H, W, N = view.units, view.h, view.w, cache.n
        keep = proto.keep
        all_kept = bool(keep.all())
        n_kept = proto.n_kept
        rank = np.cumsum(keep) - 1  # position of each image among the kept ones

        def kept_rows(start: int, n: int) -> np.ndarray | None:
            """Rows of a block to keep (None: all of them)."""
            return None if all_kept else np.flatnonzero(keep[start : start + n])

        p = 1.0 - self.quantile
        n_values = n_kept * H * W

        # ---- pass 1: thresholds (exact), finiteness, per-unit top images
        quant = ExactQuantile(U, n_values, p, device)
        k_top = min(self.top_images, n_kept)
        top_v = torch.empty((U, 0), dtype=torch.float32, device=device)
        top_i = torch.empty((U, 0), dtype=torch.int64, device=device)
        bar = progress(total=N * 2,
                       desc=f"dissect {layer}", unit="img")
        with bar:
            for start, x in view.blocks(self.batch_size):
                x = x.to(device)
                self._check_finite(x, cache, layer, start)
                nb = x.shape[0]
                img_idx = np.arange(start, start + nb)
                rows = kept_rows(start, nb)
                if rows is not None:
                    x, img_idx = x[torch.as_tensor(rows, device=device)], img_idx[rows]
                    if not len(rows):
                        bar.update(nb)
                        continue
                vals = x.permute(1, 0, 2, 3).reshape(U, -1)
                quant.add(vals)
                if k_top:
                    peak = x.flatten(2).amax(dim=2).T  # (U, B)
                    idx = torch.as_tensor(img_idx, device=device).expand(U, -1)
                    cv, ci = torch.cat([top_v, peak], 1), torch.cat([top_i, idx], 1)
                    # stable sort keeps the earlier image first among equal maxima
                    order = torch.sort(cv, dim=1, descending=True, stable=True).indices[:, :k_top]
                    top_v, top_i = cv.gather(1, order), ci.gather(1, order)
                bar.update(nb)
            thresholds = quant.result()

            # ---- pass 2: tally
            categories = list(proto.categories)
            label_category = proto.label_category
            tally = TallyAccumulator(thresholds, label_category,
                                     len(categories), device, self.category_area)
            recorder = BlockRecorder(tally, self.bootstrap_block_size) if self.bootstrap else None
            top_np = top_i.cpu().numpy()
            top_maps = np.zeros((U, k_top, H, W), dtype=np.float32)
            for (start, x), items in zip(view.blocks(self.batch_size), segmentations):
                if len(items) != x.shape[0] or items[0].index != start:
                    raise AnalysisError("internal: feature and segmentation batches misaligned")
                rows = kept_rows(start, x.shape[0])
                xs, its = x, items
                if rows is not None:
                    xs, its = x[torch.as_tensor(rows)], [items[r] for r in rows]
                if its and recorder is not None:
                    recorder.add(xs.to(device), its, rank[[it.index for it in its]])
                elif its:
                    tally.add(xs.to(device), its)
                sel = (top_np >= start) & (top_np < start + x.shape[0])
                uu, jj = np.nonzero(sel)
                if len(uu):
                    top_maps[uu, jj] = x[top_np[uu, jj] - start, uu].numpy()
                bar.update(x.shape[0])
        segmentations.close()  # the mask workers are done: not idle through the bootstrap

        counts = tally.counts()
        scores = _score(counts, label_category, len(categories))
        config = {**self.get_params(), "layer": layer, "layer_kind": view.kind,
                  "map_size": [H, W], "dropped_class_token": bool(view.token_start),
                  "prefix_tokens": int(view.token_start)}
        prov = provenance(
            cache=str(cache.path),
            cache_sha256=digest.result() if digest is not None else None,
            data_fingerprint=cache.data_fingerprint,
            probe_spec=getattr(probe, "spec", None),
            probe_fingerprint=getattr(probe, "fingerprint", None),
            model=cache.model_info,
            n_images=n_kept,
            n_images_total=N,
        )
        record = proto.to_dict()
        stats = None
        if recorder is not None:
            kept_ids = [cache.ids[i] for i in np.flatnonzero(keep)]
            stats = recorder.finish(label_category, categories,
                                    probe_fingerprint=getattr(probe, "fingerprint", None),
                                    ids_sha256=ids_digest(kept_ids))
            record["bootstrap"] = {
                "resamples": self.bootstrap, "seed": self.seed, "level": self.ci_level,
                "block_size": self.bootstrap_block_size, "blocks": stats.n_blocks,
                "resampled": "the probe images the protocol keeps, in blocks of block_size "
                             "consecutive images, drawn with replacement (multinomial weights)",
                "held_fixed": "unit activation thresholds at their full-probe values, the IoU "
                              "threshold and the best-label rules",
                "interval": "bias-corrected percentile (BC); widened to the estimate when it "
                            "misses it (column widened); bias = mean(resamples) - estimate",
            }
        result = DissectionResult(
            layer=layer, units=U, categories=categories, label_names=_label_names(probe),
            label_category=np.asarray(label_category, dtype=np.int64),
            thresholds=np.asarray(thresholds, dtype=np.float64),
            **counts, **scores,
            top_images=top_np, top_values=top_v.cpu().numpy(), top_maps=top_maps,
            iou_threshold=self.iou_threshold, quantile=self.quantile,
            config=config, provenance=prov, probe=probe, protocol=record, block_stats=stats,
        )
        if stats is not None:
            # the weighted-sum path with unit weights must reproduce the plain tally exactly
            direct = point_measures(stats, self.iou_threshold)
            plain = result._measures()
            if not np.array_equal(direct.to_numpy(), plain.to_numpy()):
                raise AnalysisError(f"internal: bootstrap statistics of layer {layer!r} do not "
                                    f"reproduce the tally ({direct.to_dict()} vs {plain.to_dict()})")
            # on a GPU the resamples' weighted sums run there too (the same numbers); on the
            # CPU the numba kernel (or numpy) is faster than torch's sparse products
            result.bootstrap_samples = resample_measures(
                stats, self.bootstrap, self.seed, self.iou_threshold,
                device=device if device.type == "cuda" else None)
        return result

    @staticmethod
    def _check_finite(x: torch.Tensor, cache: Any, layer: str, start: int) -> None:
        if bool(torch.isfinite(x).all()):
            return
        bad = ~torch.isfinite(x).flatten(2).all(dim=2)  # (B, U)
        b, u = (int(v) for v in torch.nonzero(bad)[0])
        raise AnalysisError(
            f"{cache.path}: layer {layer!r} has NaN/Inf activations (first: image {start + b} "
            f"{cache.ids[start + b]!r}, unit {u + 1} as numbered in tally.csv). Check the model weights, or "
            "re-create the cache with --dtype float32 if float16 overflowed"
        )

    def _segmentations(self, probe: Any, categories: list[str],
                       slot: tuple[dict, tuple] | None, workers: int,
                       plan: StorePlan | None = None) -> _Batches:
        """Batches of decoded segmentations (:class:`SegItem`) in probe order.

        A probe small enough (:data:`SEGMENTATION_MEMO_BYTES`) is decoded once per process
        and categories: dissecting several layers and models (``compare``: every model, both
        layers and the random-init controls) on it reuses the items, which the tally only
        reads. ``slot``: the probe's memo and this run's key (:func:`_memo_slot`; None: not
        memoisable, decoded every time). With ``workers`` the decoding starts when this is
        called: their first batches (two per worker) are decoded while the threshold pass
        runs, the rest while the tally does. ``plan``: the mask store's file to read them
        from, or to write them to as they are decoded."""
        cached = slot[0].get(slot[1]) if slot is not None else None
        if cached is not None:
            return (cached[s : s + self.batch_size] for s in range(0, len(cached),
                                                                  self.batch_size))
        if plan is not None and plan.reader is not None:
            # read ahead from now on, also while the thresholds are computed; started here,
            # before the run sets its torch threads, so the thread restores the process's
            # default, not the run's, whenever it ends
            plan.ahead = Prefetch(plan.reader.batches(self.batch_size), depth=2,
                                  name="interptool-mask-store")
            batches = _from_store(plan)
        else:
            batches = self._decode_segmentations(probe, categories, workers)
            if plan is not None and plan.writer is not None:
                batches = _storing(batches, plan)
        return batches if slot is None else _memoising(batches, slot, len(probe))

    def _decode_segmentations(self, probe: Any, categories: list[str],
                              workers: int) -> _Batches:
        ds = SegmentationSet(probe, categories)
        if workers == 0:  # decoded on demand, between the tally's batches
            return ([ds[i] for i in range(s, min(s + self.batch_size, len(ds)))]
                    for s in range(0, len(ds), self.batch_size))
        # the workers start now; two batches each are decoded ahead (bounded memory)
        loader = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=False,
                                             num_workers=workers,
                                             collate_fn=PackedSegItems.pack,
                                             prefetch_factor=2)
        return _from_workers(iter(loader))


def _memoising(batches: _Batches, slot: tuple[dict, tuple], n_items: int) -> _Batches:
    """Pass ``batches`` through and keep their items in the memo ``slot`` when all of them
    fit in :data:`SEGMENTATION_MEMO_BYTES`."""
    memo, key = slot
    kept: list[SegItem] | None = []
    size = 0
    for batch in batches:
        if kept is not None:
            size += sum(it.pixel.nbytes + it.label_counts.nbytes + it.scalars.nbytes
                        for it in batch)
            if size <= SEGMENTATION_MEMO_BYTES:
                kept.extend(batch)
            else:
                kept = None
        # stored before the last batch is handed over: the caller's zip() never resumes
        # this generator after its last item
        if kept is not None and len(kept) == n_items:
            memo.clear()  # one entry per probe: the latest categories
            memo[key] = kept
        yield batch


def _from_store(plan: StorePlan) -> _Batches:
    """The items read back from the store file by ``plan.ahead``, two batches ahead on a
    thread: reading, checking and widening the tables (file reads, CRC-32 and numpy casts
    release the GIL) overlap the counting, which on a GPU would otherwise wait. The thread
    and the file end with this (or with ``plan.release()`` if this never started)."""
    try:
        yield from plan.ahead
    finally:
        plan.release()


def _storing(batches: _Batches, plan: StorePlan) -> _Batches:
    """Pass ``batches`` through and append them to the store's partial file, made whole
    before the last batch is handed over (the caller's zip() never resumes this generator
    after it). A write that fails (a full disk) only ends the storing: the run goes on with
    the decoded masks, and says so."""
    from interptool._provenance import is_no_space, no_space_message

    writer = plan.writer
    try:
        for batch in batches:
            if writer is not None:
                try:
                    refused = writer.add(batch)
                    if refused:
                        plan.why = refused
                        writer.abort()
                        writer = None
                        warn(f"mask store: not stored: {refused}; the masks are decoded on "
                             "every run")
                    elif writer.complete:
                        writer.commit()
                        plan.written, writer = True, None
                except Exception as exc:  # noqa: BLE001 - a full disk, or whatever the file system says
                    writer.abort()
                    writer = None
                    where = plan.file or plan.folder
                    plan.why = (no_space_message(where) if is_no_space(exc)
                                else f"writing {where} failed ({exc})")
                    warn(f"mask store: not stored: {plan.why}; the run goes on")
            yield batch
    finally:
        if writer is not None:  # the run failed or stopped before the last batch
            writer.abort()


def _from_workers(batches: Iterator[PackedSegItems]) -> _Batches:
    """The workers' batches unpacked; a bad mask file found by a worker raises the worker's
    one-line error.

    The workers stop as soon as this ends (finished, closed, or failed), not whenever the
    garbage collector reaches the loader (:func:`~interptool._workers.release_loader`)."""
    error: BaseException | None = None
    aside = None
    try:
        for packed in batches:
            yield packed.unpack()
    except InterptoolError as exc:
        error = unwrap_worker_error(exc)  # raised below, without this one as its context
    except BaseException as exc:  # a worker killed (Dissection._run says so), Ctrl-C
        _, aside = loader_failed(exc)
        raise
    finally:
        del batches  # the last reference: the DataLoader shuts its workers down here
        restore_worker_signal(aside)
    if error is not None:
        raise error


def _memo_slot(probe: Any, categories: list[str],
               state: _FilesState | None = None) -> tuple[dict, tuple] | None:
    """The probe's memo of decoded segmentations and this run's key in it; None when the
    probe cannot be memoised (it does not list its mask files, one is unreadable, its masks
    surely exceed :data:`SEGMENTATION_MEMO_BYTES`, or it is not weak-referenceable).
    ``state``: the probe's :func:`_mask_files_state` when the caller has it already."""
    if state is None:
        state = _mask_files_state(probe, categories, SEGMENTATION_MEMO_BYTES)
    if state is None or state.table_bytes > SEGMENTATION_MEMO_BYTES:
        return None
    key = (getattr(probe, "fingerprint", None), len(probe), tuple(categories), state.digest)
    try:
        memo = _SEGMENTATION_MEMO.setdefault(probe, {})
    except TypeError:
        return None
    return memo, key


@dataclass(frozen=True)
class _FilesState:
    digest: str  # sha256 of every mask file's path, size and modification time
    table_bytes: int  # at least this many bytes of int32 tables decoded for the categories


def _mask_files_state(probe: Any, categories: list[str],
                      bound: int | None) -> _FilesState | None:
    """sha256 of every mask file's path, size and modification time (a probe changed on
    disk is decoded again) and a lower bound of its decoded tables; None when the probe
    does not list its files, one is missing, or the tables exceed ``bound`` (None: none).

    Why the bound: a Broden-scale probe (~300,000 mask files, ~20 GB decoded) is never
    memoised, and statting all its files cost ~3 s a run; the count stops at the first
    images whose tables (at least ``sh * sw`` int32 per file, :class:`SegItem`) overflow."""
    import hashlib

    if not hasattr(probe, "mask_files"):
        return None
    seg_size = getattr(probe, "seg_size", None)
    wanted = set(categories)
    h = hashlib.sha256()
    at_least = 0
    try:
        for i in range(len(probe)):
            for cat, files in probe.mask_files(i).items():
                for f in files:
                    st = os.stat(f)
                    h.update(f"{cat}\0{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
                if seg_size is not None and cat in wanted:
                    sh, sw = seg_size(i)
                    at_least += 4 * int(sh) * int(sw) * len(files)
            if bound is not None and at_least > bound:
                return None
    except (OSError, TypeError, ValueError, KeyError, IndexError):
        return None
    return _FilesState(h.hexdigest(), at_least)


#: decoded segmentations kept per probe object (weakly: dropped with the probe), when all of
#: them fit in this many bytes (label arrays); a larger probe is decoded on every run
SEGMENTATION_MEMO_BYTES = 256 * 2**20
_SEGMENTATION_MEMO: weakref.WeakKeyDictionary[Any, dict[tuple, list[SegItem]]] = \
    weakref.WeakKeyDictionary()


def _score(counts: dict[str, np.ndarray], label_category: np.ndarray,
           n_cat: int) -> dict[str, np.ndarray]:
    """IoU matrix and best labels/categories from the counts (NetDissect-Lite's rules)."""
    inter = counts["intersect"].astype(np.float64)
    cat = np.asarray(label_category, dtype=np.int64).copy()
    cat[0] = -1
    unit_cat = counts["unit_cat_area"].astype(np.float64)
    denom_unit = np.where(cat[None, :] >= 0, unit_cat[:, np.clip(cat, 0, None)], 0.0)
    iou = inter / (denom_unit + counts["label_area"][None, :].astype(np.float64) - inter + 1e-10)
    iou[:, cat < 0] = 0.0
    U = iou.shape[0]
    cat_label = np.zeros((U, n_cat), dtype=np.int64)
    cat_iou = np.zeros((U, n_cat), dtype=np.float64)
    for c in range(n_cat):
        masked = np.where(cat[None, :] == c, iou, 0.0)
        cat_label[:, c] = masked.argmax(axis=1)  # first maximum; label 0 when all are 0
        cat_iou[:, c] = masked[np.arange(U), cat_label[:, c]]
    # best category: the maximum; among equal scores the later category, as NetDissect-Lite's
    # reversed argsort gives
    best_cat = n_cat - 1 - np.argmax(cat_iou[:, ::-1], axis=1)
    ar = np.arange(U)
    return {
        "iou": iou,
        "cat_label": cat_label,
        "cat_iou": cat_iou,
        "best_category": best_cat,
        "best_label": cat_label[ar, best_cat],
        "best_iou": cat_iou[ar, best_cat],
    }
