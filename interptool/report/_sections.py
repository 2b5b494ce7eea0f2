"""Report sections: tables, captions and summary figures built from the stages' payloads.

Each function takes the JSON payload a pipeline stage stored (numbers only, so a resumed run
renders the same page without recomputing) and a :class:`FigureSet`, and returns the section
dict that ``report.html.j2`` renders: ``intro``, ``tables`` (title, rows, note), ``figures``
(ids in the figure set) and the payload itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from interptool.report import _figures as figs
from interptool.report._figures import FigureSet

__all__ = ["attribution_section", "dissection_section", "similarity_section"]


def dissection_section(per_model: Mapping[str, Mapping[str, Any]], categories: list[str],
                       settings: Mapping[str, Any], figures: FigureSet) -> dict[str, Any]:
    """Detector counts per model and layer, the threshold curve and the top-unit montages.

    ``per_model[model][layer]`` is a dissection stage payload (``units``, ``detectors``,
    ``unique_concepts``, ``by_category``, ``curve`` over ``settings["iou_thresholds"]``,
    ``top_units``, ``montage``).
    """
    iou_threshold = settings["iou_threshold"]
    cats = [c for c in categories if any(
        c in per_model[m][lay]["by_category"] for m in per_model for lay in per_model[m])]
    rows = []
    counts: dict[str, dict[str, dict[str, dict[str, int]]]] = {}
    curves: dict[str, dict[str, list[int]]] = {}
    fig_ids: list[str] = []
    for m, layers in per_model.items():
        counts[m], curves[m] = {}, {}
        for lay, part in layers.items():
            row = {"model": m, "layer": lay, "units": part["units"],
                   "detectors": part["detectors"], "unique concepts": part["unique_concepts"]}
            for c in cats:
                bc = part["by_category"].get(c, {"detectors": 0, "unique": 0})
                row[f"{c} det."] = bc["detectors"]
                row[f"{c} uniq."] = bc["unique"]
            rows.append(row)
            counts[m][lay] = {"total": {"detectors": part["detectors"],
                                        "unique": part["unique_concepts"]},
                              **part["by_category"]}
            curves[m][lay] = part["curve"]
    fig_ids.append(figures.add(
        "dissection_bars", figs.detector_bars(counts, cats), "dissection/detectors.png",
        f"Detector units and unique concepts per layer and category (IoU >= "
        f"{iou_threshold})."))
    fig_ids.append(figures.add(
        "dissection_curve",
        figs.detector_curve(settings["iou_thresholds"], curves, iou_threshold),
        "dissection/detectors_vs_threshold.png",
        "Detector count as a function of the IoU threshold (dashed: the chosen threshold). "
        "A ranking that holds across thresholds does not hinge on the cut-off."))
    top_rows = []
    for m, layers in per_model.items():
        for lay, part in layers.items():
            if part.get("montage"):
                fig_ids.append(figures.register(
                    f"montage_{m}_{lay}", part["montage"],
                    f"{m} {lay}: top units (rows) and the probe images where they fire most; "
                    "the outlined region is where the unit's map exceeds its threshold."))
            for u in part["top_units"]:
                top_rows.append({"model": m, "layer": lay, **u})
    return {
        "intro": f"Network dissection (Bau et al. 2017) on the probe set: a unit is a "
        f"detector of a concept when the IoU of its thresholded map (top "
        f"{settings['quantile']:g} quantile) with the concept's masks is >= "
        f"{iou_threshold:g}.",
        "settings": dict(settings),
        "categories": cats,
        "per_model": per_model,
        "tables": [{"title": "Detectors and unique concepts", "rows": rows},
                   {"title": "Top units", "rows": top_rows}],
        "figures": fig_ids,
    }


def similarity_section(part: Mapping[str, Any], figures: FigureSet) -> dict[str, Any]:
    """Transfer of the teacher's class similarity, within-class entropy and CKA."""
    t0 = part["temperatures"][0]
    keep = ("spearman", "pearson", "kl", "js_distance", "topk_overlap", "top1_agreement")
    transfer = []
    for r in part["estimates"]:
        if r["metric"] in keep and r.get("role") in ("student", "difference"):
            transfer.append({"model": r["model"], "metric": r["metric"],
                             "T": r.get("temperature"), "value": r["value"],
                             "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high")})
    ent = [{"model": m, "T": t, **v} for m, d in part["models"].items()
           for t, v in d["temperatures"].items()]
    fig_ids = []
    for h in part["heatmaps"]:
        fig_ids.append(figures.register(
            f"similarity_heatmaps_T{h['T']:g}", h["path"],
            f"Class-similarity matrices at T={h['T']:g}: row i is the mean softmax over images "
            "of class i; classes in the teacher's clustered order."))
    tables = [
        {"title": f"Transfer of the teacher's class similarity (first temperature T={t0:g} "
                  "and others)", "rows": transfer,
         "note": "Pearson/Spearman over off-diagonal entries, KL and JS distance of the rows "
                 "(lower = closer), top-k nearest-class overlap, top-1 agreement; 95% paired "
                 "bootstrap CIs over images. 'A - B' rows are student differences."},
        {"title": "Within-class output entropy (nats)", "rows": ent},
    ]
    if part.get("cka"):
        fig_ids.append(figures.register(
            "cka", part["cka"]["figure"],
            "Linear CKA between the teacher's layers (rows) and each student's layers "
            "(columns) on the eval images."))
        tables.append({"title": "Linear CKA (teacher vs students)", "rows": part["cka"]["rows"]})
    return {"intro": "Class similarity from logits (the paper's mechanism for KD: the "
            "teacher's soft outputs carry which classes resemble each other).",
            **part, "tables": tables, "figures": fig_ids}


def attribution_section(per_method: Mapping[str, Mapping[str, Any]],
                        figures: FigureSet) -> dict[str, Any]:
    """Agreement with the teacher's maps, localisation and faithfulness per method."""
    agree, loc, faith, fig_ids = [], [], [], []
    for method, part in per_method.items():
        for m, d in part["agreement"].items():
            for metric in ("spearman", "cosine"):
                if isinstance(d.get(metric), dict):
                    agree.append({"method": method, "student": m, "metric": metric,
                                  **_interval(d[metric])})
        for m, d in part["localisation"].items():
            for metric in ("energy", "hit"):
                if isinstance(d.get(metric), dict):
                    loc.append({"method": method, "model": m, "metric": metric,
                                **_interval(d[metric])})
            if isinstance(d.get("area"), dict):
                loc.append({"method": method, "model": m, "metric": "mask area (chance)",
                            "value": d["area"]["mean"], "ci_low": None, "ci_high": None})
        for m, d in part["faithfulness"].items():
            if isinstance(d.get("auc"), dict):
                faith.append({"method": method, "model": m, "metric": "deletion AUC",
                              **_interval(d["auc"])})
        if part.get("grid"):
            fig_ids.append(figures.register(
                f"attribution_grid_{method}", part["grid"],
                f"{method} maps of the same images for every model."))
    tables = [
        {"title": "Agreement with the teacher's maps", "rows": agree,
         "note": "Per image Spearman rank correlation / cosine of the maps, mean with a 95% "
                 "bootstrap CI over images."},
        {"title": "Localisation (class object masks)", "rows": loc,
         "note": "Energy: share of positive attribution inside the class object's mask "
                 "(compare with the mask area, a uniform map's score); hit: pointing game."},
        {"title": "Faithfulness (deletion)", "rows": faith,
         "note": "Target probability as the most-attributed patches are blurred away; area "
                 "under the curve, lower = more faithful."},
    ]
    return {"intro": "Attribution maps of the first eval images for every model.",
            "per_method": per_method, "tables": [t for t in tables if t["rows"]],
            "figures": fig_ids}


def _interval(d: Mapping[str, Any]) -> dict[str, Any]:
    """A score summary ``{"mean", "ci_low", "ci_high"}`` as a table's value/CI columns."""
    return {"value": d["mean"], "ci_low": d["ci_low"], "ci_high": d["ci_high"]}
