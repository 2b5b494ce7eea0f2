"""Dissection protocols: which categories, which IoU threshold and quantile, which images.

A protocol fixes the choices that change detector counts between published dissections:

* ``netdissect-lite`` (default): NetDissect-Lite's defaults -- categories object, part, scene,
  texture, color (material off), IoU threshold 0.04, quantile 0.005.
* ``han2023``: the KD-interpretability paper's fork (Han et al., ICML 2023) -- all six Broden
  categories (material included), IoU threshold 0.05, quantile 0.005.

Whatever the protocol, images that carry no label of a selected category take no part in the
thresholds or the tallies, as NetDissect-Lite drops them when it reads ``index.csv``
(``index_has_any_data``), and each label's primary category is decided among the selected
categories only, with the probe's rule (NetDissect-Lite's ``primary_categories_per_index``).
The resolved protocol is recorded in every output (:meth:`ResolvedProtocol.to_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from interptool.errors import ConfigError

__all__ = ["PROTOCOLS", "Protocol", "ResolvedProtocol", "get_protocol", "resolve_protocol"]

DROP_RULE = ("images carrying no label of a selected category are left out of thresholds and "
             "tallies (NetDissect-Lite drops them when reading index.csv)")


@dataclass(frozen=True)
class Protocol:
    """A named set of dissection settings (categories in NetDissect-Lite's order)."""

    name: str
    categories: tuple[str, ...]
    iou_threshold: float
    quantile: float
    source: str


PROTOCOLS: dict[str, Protocol] = {
    "netdissect-lite": Protocol(
        "netdissect-lite", ("object", "part", "scene", "texture", "color"), 0.04, 0.005,
        "CSAILVision/NetDissect-Lite settings.py defaults (material off)"),
    "han2023": Protocol(
        "han2023", ("object", "part", "scene", "material", "texture", "color"), 0.05, 0.005,
        "Han et al., ICML 2023, official code Rok07/KD_XAI (all six Broden categories, IoU 0.05)"),
}


def get_protocol(name: str) -> Protocol:
    """The preset called ``name`` (ConfigError listing the presets otherwise)."""
    try:
        return PROTOCOLS[str(name).lower()]
    except KeyError:
        raise ConfigError(f"protocol={name!r}: unknown dissection protocol; expected one of "
                          f"{', '.join(PROTOCOLS)}") from None


def parse_categories(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"object,part"`` or a sequence -> tuple of names; None stays None (protocol's set)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(s).strip() for s in items if str(s).strip())
    if not names:
        raise ConfigError(f"categories={value!r}: expected at least one category name, e.g. "
                          "object,part,scene,texture,color")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise ConfigError(f"categories={value!r}: {', '.join(dupes)} listed twice")
    return names


@dataclass
class ResolvedProtocol:
    """A protocol applied to one probe: the categories used and the images kept.

    ``categories``: selected categories present in the probe, in the probe's order;
    ``absent``: requested categories the probe lacks (only allowed for a preset's default set);
    ``label_category``: (L,) primary category index into ``categories`` per label (-1: none);
    ``keep``: (N,) bool, images carrying a label of a selected category.
    """

    name: str
    categories: list[str]
    absent: list[str]
    iou_threshold: float
    quantile: float
    overrides: dict[str, Any]
    label_category: np.ndarray
    keep: np.ndarray
    primary_rule: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe record written beside every result."""
        return {
            "name": self.name,
            "categories": list(self.categories),
            "categories_absent_from_probe": list(self.absent),
            "iou_threshold": float(self.iou_threshold),
            "quantile": float(self.quantile),
            "overrides": dict(self.overrides),
            "images_total": int(self.keep.size),
            "images_used": self.n_kept,
            "images_dropped": int(self.keep.size - self.n_kept),
            "image_rule": DROP_RULE,
            "primary_category_rule": self.primary_rule,
            "source": self.source,
            **self.extra,
        }


def _primary_over(probe: Any, cats: list[str]) -> tuple[np.ndarray, str]:
    """Primary category per label among ``cats`` (index into ``cats``; -1 for none).

    BrodenDataset keeps the per-category coverage (``c_<cat>.csv``) and label.csv counts; the
    primary category is recomputed among the selected categories with the probe's own rule
    (NetDissect-Lite: the largest coverage, ties to the later category, 0 where not coded).
    Other probes give a fixed ``label_category``: labels whose category is not selected get -1.
    """
    all_cats = list(probe.categories)
    L = int(probe.num_labels)
    rule = getattr(probe, "primary_rule", None)
    coverage = getattr(probe, "_coverage", None)
    counts = getattr(probe, "_label_counts", None)
    out = np.full(L, -1, dtype=np.int64)
    if rule == "coverage" and coverage is not None and counts is not None:
        for n in counts:
            best = max((coverage[c].get(n, 0.0), k) for k, c in enumerate(cats))
            out[n] = best[1]
        return out, "coverage among the selected categories (NetDissect-Lite)"
    if rule == "count" and counts is not None:
        for n, cc in counts.items():
            sel = [(c, k) for c, k in cc if c in cats]
            if sel:
                top = max(k for _, k in sel)
                out[n] = cats.index(next(c for c, k in sel if k == top))
        return out, "label.csv image count among the selected categories"
    given = np.asarray(probe.label_category, dtype=np.int64)
    for i, c in enumerate(all_cats):
        if c in cats:
            out[: len(given)][given == i] = cats.index(c)
    return out, "the probe's label_category, restricted to the selected categories"


def _has_data(probe: Any, cats: list[str]) -> np.ndarray:
    """(N,) bool: image i lists a mask file or an image-level label of a selected category."""
    cells = getattr(probe, "_cells", None)
    n = len(probe)
    if cells is not None and len(cells) == n:  # BrodenDataset: index.csv cells, no decoding
        sel = set(cats)
        return np.array([any(c in sel for c in row) for row in cells], dtype=bool)
    keep = np.zeros(n, dtype=bool)
    for i in range(n):
        seg = probe.load_segmentation(i)
        keep[i] = any(np.asarray(seg.pixel[c]).shape[0] > 0 for c in cats if c in seg.pixel) or \
            any(np.asarray(seg.image[c]).size > 0 for c in cats if c in seg.image)
    return keep


def resolve_protocol(probe: Any, protocol: str = "netdissect-lite", *,
                     categories: str | Sequence[str] | None = None,
                     iou_threshold: float | None = None,
                     quantile: float | None = None) -> ResolvedProtocol:
    """Apply ``protocol`` (with explicit overrides) to ``probe``.

    ``categories`` None: the preset's categories that the probe has (a preset names categories
    a small probe may lack, e.g. concept-world has no material); an explicit list must name
    categories of the probe (ConfigError otherwise). ``iou_threshold``/``quantile`` None: the
    preset's. Overrides are recorded.
    """
    preset = get_protocol(protocol)
    probe_cats = list(probe.categories)
    requested = parse_categories(categories)
    overrides: dict[str, Any] = {}
    if requested is None:
        wanted = list(preset.categories)
    else:
        unknown = [c for c in requested if c not in probe_cats]
        if unknown:
            raise ConfigError(
                f"categories: {', '.join(unknown)} not in the probe "
                f"{getattr(probe, 'spec', '')!r} (it has {', '.join(probe_cats)}); "
                "drop them or use another probe")
        wanted = list(requested)
        if tuple(sorted(wanted)) != tuple(sorted(preset.categories)):
            overrides["categories"] = list(wanted)
    cats = [c for c in probe_cats if c in wanted]
    absent = [c for c in wanted if c not in probe_cats]
    if not cats:
        raise ConfigError(
            f"protocol {preset.name!r}: none of its categories ({', '.join(wanted)}) is in the "
            f"probe {getattr(probe, 'spec', '')!r} (it has {', '.join(probe_cats)}); pass "
            "categories= naming the probe's categories")
    if iou_threshold is not None and float(iou_threshold) != preset.iou_threshold:
        overrides["iou_threshold"] = float(iou_threshold)
    if quantile is not None and float(quantile) != preset.quantile:
        overrides["quantile"] = float(quantile)
    label_category, rule = _primary_over(probe, cats)
    keep = _has_data(probe, cats)
    if not keep.any():
        raise ConfigError(
            f"protocol {preset.name!r}: no probe image carries a label of the selected "
            f"categories ({', '.join(cats)}); select categories the probe labels")
    return ResolvedProtocol(
        name=preset.name, categories=cats, absent=absent,
        iou_threshold=preset.iou_threshold if iou_threshold is None else float(iou_threshold),
        quantile=preset.quantile if quantile is None else float(quantile),
        overrides=overrides, label_category=label_category, keep=keep, primary_rule=rule,
        source=preset.source)
