"""Findings: one row per measure ranking every model, with paired comparisons.

``build_findings(summary, cfg, eval_cache)`` reads the numbers the stages put in the summary
(and, for accuracy, the per-image correctness from the eval caches) and returns the rows the
report's findings table shows. Each row has the measure's direction (is higher or lower
better), the models ranked best first, and a comparison for every pair of students and every
student against the teacher: which model is better and whether the paired 95% CI of the
difference excludes 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from interptool.common.stats import interval_from_resamples
from interptool.pipeline._config import CompareConfig

__all__ = ["build_findings", "finding_pairs", "make_finding", "paired_difference"]

Diff = Callable[[str, str], tuple[Any, Any, Any]]


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95, *, with_p: bool = False) -> tuple[float, ...]:
    """mean(a - b) over the items where both are finite, with a paired percentile bootstrap
    interval over items; ``(mean, nan, nan)`` with fewer than two items. ``with_p``: a fourth
    element, the two-sided bootstrap p-value of no difference
    (:func:`interptool.common.stats.bootstrap_p_value`).

    Resamples draw ``d.size`` items with replacement (seeded; drawn in blocks of resamples so
    memory stays bounded at 50,000 items); the interval is made by
    :func:`interptool.common.stats.interval_from_resamples`, which keeps the estimate inside.
    """
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    d = d[np.isfinite(d)]
    tail = (math.nan,) if with_p else ()
    if d.size == 0:
        return (math.nan, math.nan, math.nan, *tail)
    mean = float(d.mean())
    if d.size == 1 or n_boot <= 0:
        return (mean, math.nan, math.nan, *tail)
    rng = np.random.default_rng(seed)
    block = max(1, 2**22 // d.size)  # about 32 MB of weights at a time
    means = np.concatenate([d[rng.integers(0, d.size, size=(min(block, n_boot - s), d.size))]
                            .mean(axis=1) for s in range(0, n_boot, block)])
    iv = interval_from_resamples(means, mean, level=level, method="percentile")
    if with_p:
        from interptool.common.stats import bootstrap_p_value

        return (iv.estimate, iv.low, iv.high, bootstrap_p_value(means - 0.0))
    return (iv.estimate, iv.low, iv.high)


def _finite(v: Any) -> bool:
    # numbers.Real covers numpy scalars; bool is not a measurement
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _rank(values: dict[str, float | None], higher_is_better: bool = True) -> list[str]:
    """Model names best first (ties keep config order); models without a value are dropped."""
    ok = {k: v for k, v in values.items() if _finite(v)}
    sign = -1.0 if higher_is_better else 1.0
    names = list(ok)
    return sorted(names, key=lambda k: (sign * ok[k], names.index(k)))


def finding_pairs(models: list[str], teacher: str | None) -> list[tuple[str, str]]:
    """The comparisons of a findings row: every pair of students (config order, so the
    paper's KD-vs-scratch pair is one of them) and then each student against the teacher."""
    students = [m for m in models if m != teacher]
    pairs = [(a, b) for i, a in enumerate(students) for b in students[i + 1:]]
    if teacher is not None and teacher in models:
        pairs += [(s, teacher) for s in students]
    return pairs


def make_finding(measure: str, values: dict[str, Any], diff: Diff | None = None, *,
                 higher_is_better: bool = True, teacher: str | None = None,
                 models: list[str] | None = None, note: str = "",
                 extra_pairs: list[tuple[str, str]] | None = None,
                 value_ci: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """One findings row: the ranking of every model and one comparison per pair.

    ``diff(a, b)`` returns ``(mean of a - b, ci_low, ci_high)`` or, with a two-sided p-value of
    no difference (used by the Holm correction over the table), ``(..., p_value)``.
    ``extra_pairs``: comparisons beyond :func:`finding_pairs` (e.g. each model against its
    random-init control); ``value_ci``: each value's own 95% interval. Each comparison names the
    ``better`` model under the measure's direction and reports ``difference = better - other``
    with its CI oriented the same way: for a lower-is-better measure the difference of a better
    model is negative. ``significant``: the CI excludes 0 (None when there is no CI).
    ``models``: the config order, which fixes the order of the pairs (default: ``values``').
    """
    order = _rank(values, higher_is_better)
    names = [m for m in (models if models is not None else list(values)) if m in order]
    # rank ties and pair order both follow the config, whatever order the analyzer used
    values = {m: values[m] for m in names} | {m: v for m, v in values.items() if m not in names}
    order = _rank(values, higher_is_better)
    comps = []
    pairs = finding_pairs(names, teacher)
    pairs += [p for p in (extra_pairs or []) if p not in pairs and p[0] in values
              and p[1] in values]
    for a, b in pairs:
        va, vb = values[a], values[b]
        c: dict[str, Any] = {"a": a, "b": b, "comparison": f"{a} vs {b}", "better": None,
                             "difference": None, "ci_low": None, "ci_high": None,
                             "significant": None, "p_value": None}
        got = tuple(diff(a, b)) if diff is not None else (None, None, None)
        d, lo, hi = got[:3]
        if len(got) > 3 and _finite(got[3]):
            c["p_value"] = float(got[3])
        if not _finite(d):
            d = va - vb
        if d == 0:
            c["better"], c["difference"] = "tie", d
        else:
            a_better = (d > 0) == higher_is_better
            flip = 1 if a_better else -1  # int: counts stay integers
            c["better"] = a if a_better else b
            c["difference"] = flip * d
            if _finite(lo) and _finite(hi):
                lo2, hi2 = sorted((flip * lo, flip * hi))
                c["ci_low"], c["ci_high"] = lo2, hi2
        if _finite(lo) and _finite(hi):
            if c["ci_low"] is None:
                c["ci_low"], c["ci_high"] = lo, hi
            c["significant"] = bool(lo > 0 or hi < 0)
        comps.append(c)
    best = order[0] if order else None
    if len(order) > 1 and values[order[0]] == values[order[1]]:
        best = "tie"
    row = {"measure": measure, "direction": "higher" if higher_is_better else "lower",
           "values": values, "ranking": order, "best": best, "comparisons": comps,
           "note": note}
    if value_ci:
        row["value_ci"] = {m: [lo, hi] for m, (lo, hi) in value_ci.items()
                           if _finite(lo) and _finite(hi)}
    return row


def build_findings(summary: dict[str, Any], cfg: CompareConfig,
                   eval_cache: dict[str, Path]) -> list[dict[str, Any]]:
    """The findings rows of a comparison (see the module docstring); counts without a
    resampling CI get ``significant=None``."""
    from interptool.cache import ActivationCache

    seed = cfg.run.seed
    teacher = cfg.teacher.name
    models = list(cfg.models)
    out: list[dict[str, Any]] = []
    correct: dict[str, np.ndarray] = {}
    for name, p in eval_cache.items():
        with ActivationCache(p) as c:
            ok = c.labels >= 0
            correct[name] = (c.logits.argmax(1) == c.labels)[ok].astype(np.float64)
    accs = {m["name"]: m["accuracy"] for m in summary["models"] if m["accuracy"] is not None}
    if accs:
        out.append(make_finding("accuracy (eval)", accs,
                                lambda a, b: paired_difference(correct[a], correct[b], seed=seed,
                                                                  with_p=True),
                                teacher=teacher, models=models))
    from interptool.pipeline._dissect import dissection_findings

    out += dissection_findings(summary.get("dissection"), teacher, models)
    out += _similarity_findings(summary.get("similarity"), teacher, models)
    out += _attribution_findings(summary.get("attribution"), teacher, models, seed)
    from interptool.pipeline._groups import group_findings
    from interptool.pipeline._verdicts import mark_holm

    out += group_findings(out, cfg)  # recipes (groups of seeds), when the config has groups
    return mark_holm(out)


def _similarity_findings(sim: dict[str, Any] | None, teacher: str,
                         models: list[str]) -> list[dict[str, Any]]:
    from interptool.pipeline._verdicts import p_from_interval

    if not sim:
        return []
    out = []
    t0 = sim["temperatures"][0]
    est = sim["estimates"]
    # (metric, label, higher is better): Spearman / agreement measure closeness to the
    # teacher (higher = closer); the JS distance is a distance (lower = closer)
    for metric, label, hib in (
            ("spearman", f"similarity transfer: Spearman with teacher (T={t0:g})", True),
            ("js_distance", f"similarity transfer: JS distance to teacher (T={t0:g})", False),
            ("top1_agreement", "top-1 agreement with teacher", True)):
        per_t = metric != "top1_agreement"
        vals = {}
        for r in est:
            if r["metric"] == metric and r.get("role") == "student" and (
                    not per_t or r.get("temperature") in (None, t0)):
                vals.setdefault(r["model"], r["value"])

        def diff(a, b, metric=metric, per_t=per_t):
            for r in est:
                if r["metric"] != metric or r.get("role") != "difference":
                    continue
                if per_t and r.get("temperature") not in (None, t0):
                    continue
                if r["model"] == f"{a} - {b}":
                    lo, hi = r.get("ci_low"), r.get("ci_high")
                    return r["value"], lo, hi, p_from_interval(r["value"], lo, hi)
                if r["model"] == f"{b} - {a}":
                    lo, hi = r.get("ci_low"), r.get("ci_high")
                    return -r["value"], (None if hi is None else -hi), (
                        None if lo is None else -lo), p_from_interval(r["value"], lo, hi)
            return None, None, None

        if vals:
            out.append(make_finding(label, vals, diff, higher_is_better=hib,
                                    teacher=teacher, models=models))
    return out


def _attribution_findings(att: dict[str, Any] | None, teacher: str, models: list[str],
                          seed: int) -> list[dict[str, Any]]:
    if not att:
        return []
    out = []
    for method, part in att["per_method"].items():
        per = part.get("per_image", {})
        for key, label, hib in (
                ("agreement_spearman", f"{method}: map agreement with teacher", True),
                ("localisation_energy", f"{method}: energy in class object", True),
                ("deletion_auc", f"{method}: deletion AUC", False),
                ("insertion_auc", f"{method}: insertion AUC", True),
                ("deletion_normalised", f"{method}: deletion, normalised vs random", True),
                ("insertion_normalised", f"{method}: insertion, normalised vs random", True)):
            arrays = {m: np.asarray(v, dtype=np.float64) for m, v in per.get(key, {}).items()}
            if not arrays:
                continue
            vals = {m: (float(np.nanmean(a)) if np.isfinite(a).any() else None)
                    for m, a in arrays.items()}
            out.append(make_finding(label, vals, lambda a, b, arrays=arrays: paired_difference(
                arrays[a], arrays[b], seed=seed, with_p=True), higher_is_better=hib,
                teacher=teacher, models=models))
    return out
