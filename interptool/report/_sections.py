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


def _est_ci(part: Mapping[str, Any], key: str) -> str:
    """``"12 [9, 15]"``: the value with its 95% bootstrap interval when the payload has one."""
    from interptool.report._html import _fmt

    v = part.get(key)
    iv = (part.get("intervals") or {}).get(key)
    digits = 3 if isinstance(v, float) else 0
    if iv and iv.get("ci_low") is not None and iv.get("ci_high") is not None:
        lo, hi = iv["ci_low"], iv["ci_high"]
        if digits == 0:
            return f"{_fmt(v)} [{lo:.0f}, {hi:.0f}]"
        return f"{_fmt(v)} [{_fmt(float(lo))}, {_fmt(float(hi))}]"
    return _fmt(v)


def protocol_statement(protocol: Mapping[str, Any], settings: Mapping[str, Any],
                       baselines: Mapping[str, Any] | None = None,
                       notes: list[str] | None = None) -> str:
    """The sentence at the top of the dissection section: protocol, bootstrap and controls."""
    cats = ", ".join(protocol.get("categories") or []) or "the probe's categories"
    text = (f"Protocol {protocol.get('name', settings.get('protocol', '?'))}: categories "
            f"{cats}; a unit is a detector when its best IoU >= "
            f"{settings['iou_threshold']:g}, its threshold being the top "
            f"{settings['quantile']:g} quantile of its activations.")
    if protocol.get("images_total") is not None:
        text += (f" Images used: {protocol.get('images_used')} of "
                 f"{protocol.get('images_total')} (images with no label of a selected "
                 "category take no part).")
    boot = protocol.get("bootstrap")
    if boot:
        text += (f" Intervals: 95% bias-corrected percentile bootstrap over probe images "
                 f"({boot.get('resamples')} resamples, seed {boot.get('seed')}, blocks of "
                 f"{boot.get('block_size')} image(s)); unit thresholds held at their "
                 "full-probe values; differences between models are paired (the same "
                 "resampled images for both).")
    else:
        text += " No bootstrap was run (analysis.dissection.bootstrap = 0): counts only."
    if baselines:
        text += (" Control: " + "; ".join(
            f"{k} = {v['arch']} with random weights (seed {v['seed']}) for "
            f"{', '.join(v['members'])}" for k, v in baselines.items()) + ".")
    for n in notes or []:
        text += f" {n}."
    return text


def dissection_section(per_model: Mapping[str, Mapping[str, Any]], categories: list[str],
                       settings: Mapping[str, Any], figures: FigureSet, *,
                       protocol: Mapping[str, Any] | None = None,
                       roles: Mapping[str, str] | None = None,
                       baselines: Mapping[str, Any] | None = None,
                       baseline_notes: list[str] | None = None,
                       pairs: list[dict[str, Any]] | None = None,
                       gained_lost: Mapping[str, Mapping[str, list]] | None = None
                       ) -> dict[str, Any]:
    """Detector counts and fractions (with intervals) per model and layer, random-init
    controls, concept tables, concepts gained/lost, the threshold curve and the montages.

    ``per_model[model][layer]`` is a dissection stage payload (``units``, ``detectors``,
    ``detector_fraction``, ``unique_concepts``, ``by_category``, ``curve`` over
    ``settings["iou_thresholds"]``, ``intervals``, ``concepts``, ``top_units``, ``montage``).
    ``roles``: teacher / student / baseline per model; ``pairs``: paired differences
    (``layer, a, b, measure, difference, ci_low, ci_high, p_value``).
    """
    from interptool.report._panels import detector_fraction_panel

    protocol = dict(protocol or {})
    roles = dict(roles or {})
    baselines = dict(baselines or {})
    iou_threshold = settings["iou_threshold"]
    cats = [c for c in categories if any(
        c in per_model[m][lay]["by_category"] for m in per_model for lay in per_model[m])]
    rows = []
    counts: dict[str, dict[str, dict[str, dict[str, int]]]] = {}
    curves: dict[str, dict[str, list[int]]] = {}
    fractions: dict[str, dict[str, dict[str, Any]]] = {}
    concept_rows = []
    fig_ids: list[str] = []
    for m, layers in per_model.items():
        counts[m], curves[m], fractions[m] = {}, {}, {}
        for lay, part in layers.items():
            row = {"model": m, "role": roles.get(m, ""), "layer": lay, "units": part["units"],
                   "detectors [95% CI]": _est_ci(part, "detectors"),
                   "detector fraction [95% CI]": _est_ci(part, "detector_fraction"),
                   "unique concepts [95% CI]": _est_ci(part, "unique_concepts")}
            for c in cats:
                bc = part["by_category"].get(c, {"detectors": 0, "unique": 0})
                row[f"{c} det."] = bc["detectors"]
                row[f"{c} uniq."] = bc["unique"]
            rows.append(row)
            counts[m][lay] = {"total": {"detectors": part["detectors"],
                                        "unique": part["unique_concepts"]},
                              **part["by_category"]}
            curves[m][lay] = part["curve"]
            iv = (part.get("intervals") or {}).get("detector_fraction") or {}
            fractions[m][lay] = {"estimate": part.get("detector_fraction",
                                                      part["detectors"] / max(part["units"], 1)),
                                 "ci_low": iv.get("ci_low"), "ci_high": iv.get("ci_high")}
            for c in part.get("concepts") or []:
                concept_rows.append({"model": m, "layer": lay, "concept": c["concept"],
                                     "category": c["category"], "units": c["units"],
                                     "fraction": c["fraction"], "max IoU": c["max_iou"]})
    gl_rows = []
    for m, by_layer in (gained_lost or {}).items():
        for lay, items in by_layer.items():
            shared = sum(1 for r in items if r["status"] == "shared")
            for r in items:
                if r["status"] != "shared":
                    gl_rows.append({"student": m, "layer": lay, "status": r["status"],
                                    "concept": r["concept"], "category": r["category"],
                                    "student units": r["units"],
                                    "teacher units": r["units_teacher"],
                                    "shared concepts": shared})
    base_names = [m for m in per_model if roles.get(m) == "baseline"]
    fig_ids.append(figures.add(
        "dissection_fraction", detector_fraction_panel(fractions, base_names),
        "dissection/detector_fraction.png",
        "Detector fraction (detectors / units) per model and layer with its 95% bootstrap "
        "interval over probe images; hollow markers: random-init controls (what the "
        "architecture gives untrained)."))
    fig_ids.append(figures.add(
        "dissection_bars", figs.detector_bars(counts, cats), "dissection/detectors.png",
        f"Detector units and unique concepts per layer and category (IoU >= "
        f"{iou_threshold:g})."))
    fig_ids.append(figures.add(
        "dissection_curve",
        figs.detector_curve(settings["iou_thresholds"], curves, iou_threshold,
                            dashed=base_names),
        "dissection/detectors_vs_threshold.png",
        "Detector count as a function of the IoU threshold (vertical dashed line: the chosen "
        "threshold; dashed curves: random-init controls). A ranking that holds across "
        "thresholds does not hinge on the cut-off."))
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
    tables = [
        {"title": "Detectors, detector fraction and unique concepts", "rows": rows,
         "note": "Counts on the probe set with 95% bootstrap intervals over probe images. "
                 "The detector fraction (detectors / units) is comparable across models of "
                 "different widths; rows with role 'baseline' are the random-init controls."},
        {"title": "Concepts gained and lost against the teacher", "rows": gl_rows,
         "note": "Per student and layer: concepts some student unit detects and no teacher "
                 "unit does (gained), and the reverse (lost); units = detectors whose best "
                 "label is the concept. 'shared concepts' counts the ones both detect."},
        {"title": "Concepts detected per model and layer", "rows": concept_rows,
         "note": "Every concept that is some detector's best label, with the number of such "
                 "units and their fraction of the layer."},
        {"title": "Top units", "rows": top_rows},
    ]
    return {
        "intro": protocol_statement(protocol, settings, baselines, baseline_notes),
        "settings": dict(settings),
        "protocol": protocol,
        "categories": cats,
        "roles": roles,
        "baselines": baselines,
        "per_model": per_model,
        "pairs": list(pairs or []),
        "gained_lost": dict(gained_lost or {}),
        "tables": tables,
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
        for m, by_mode in part["faithfulness"].items():
            for mode, d in by_mode.items():
                for key, what in (("auc", "AUC"), ("normalised", "normalised vs random")):
                    if isinstance(d.get(key), dict):
                        faith.append({"method": method, "model": m,
                                      "metric": f"{mode} {what}", **_interval(d[key])})
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
        {"title": "Faithfulness (deletion and insertion)", "rows": faith,
         "note": "Target probability as the most-attributed patches are blurred away "
                 "(deletion: AUC lower = more faithful) or revealed on a blurred image "
                 "(insertion: higher = more faithful); 'normalised' is the gain over the "
                 "seeded random patch order divided by the unperturbed probability p0, so "
                 "calibrated and over-confident models compare fairly (higher = better)."},
    ]
    return {"intro": "Attribution maps of the first eval images for every model.",
            "per_method": per_method, "tables": [t for t in tables if t["rows"]],
            "figures": fig_ids}


def _interval(d: Mapping[str, Any]) -> dict[str, Any]:
    """A score summary ``{"mean", "ci_low", "ci_high"}`` as a table's value/CI columns."""
    return {"value": d["mean"], "ci_low": d["ci_low"], "ci_high": d["ci_high"]}


def generic_section(title: str, summary: str, part: Mapping[str, Any], figures: FigureSet, *,
                    key: str) -> dict[str, Any]:
    """The section of any registered analysis without a section builder of its own: one
    table per result (its ``to_frame()`` rows, titled by the models it describes) and its
    figures. ``part``: ``{"params", "results": [{"names", "summary", "rows", "figures"}]}``."""
    tables, fig_ids = [], []
    for r in part["results"]:
        who = " vs ".join(r["names"]) or title
        tables.append({"title": who, "rows": r["rows"]})
        for i, rel in enumerate(r["figures"], start=1):
            fig_ids.append(figures.register(f"{key}_{'_'.join(r['names'])}_{i}", rel,
                                            f"{title}: {who}"))
    return {"intro": f"{title}: {summary}.", **part, "tables": tables, "figures": fig_ids}

