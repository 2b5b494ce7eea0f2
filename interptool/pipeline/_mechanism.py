"""The paper's mechanism across the models of a comparison: does class-similarity information
go with more concept detectors?

Han et al. (ICML 2023) argue that KD makes a student more interpretable because the teacher's
soft outputs carry class-similarity information. This panel puts, for every model of the
comparison, its detector fraction (per dissected layer) beside

* its within-class output entropy at the first temperature (the paper's measure: the mean
  entropy of the softmax over the images of each class, in nats), and
* for students, its similarity transfer from the teacher (Spearman correlation of the
  off-diagonal class-similarity entries with the teacher's),

and reports the Spearman rank correlation across models (``scipy.stats.spearmanr``) with an
exact permutation p-value (all ``n!`` orderings for ``n <= 8``). With few models the
correlation can take only a handful of values and cannot reach significance (with 4 models no
ordering gives two-sided p < 0.05): the panel says so instead of reading a trend into it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

__all__ = ["MIN_MODELS", "exact_spearman", "mechanism_section"]

#: fewer models than this: a Spearman correlation across them cannot reach p < 0.05
MIN_MODELS = 5


def exact_spearman(x: list[float], y: list[float]) -> dict[str, Any]:
    """Spearman's rho (``scipy.stats.spearmanr``) and its exact two-sided permutation p.

    ``p`` = share of the ``n!`` orderings of ``y`` whose |rho| is at least the observed one
    (``n <= 8``; above that the p-value of ``spearmanr``). NaN with fewer than 3 points or a
    constant variable.
    """
    from scipy.stats import spearmanr

    n = len(x)
    if n < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"n": n, "rho": math.nan, "p_value": math.nan, "p_method": "none"}
    rho = float(spearmanr(x, y).statistic)
    if n <= 8:
        rx = np.argsort(np.argsort(x, kind="stable"), kind="stable")
        ys = np.asarray(y, dtype=np.float64)
        hits = total = 0
        for perm in itertools.permutations(range(n)):
            r = spearmanr(rx, ys[list(perm)]).statistic
            hits += abs(r) >= abs(rho) - 1e-12
            total += 1
        return {"n": n, "rho": rho, "p_value": hits / total, "p_method": f"exact ({total} orderings)"}
    return {"n": n, "rho": rho, "p_value": float(spearmanr(x, y).pvalue),
            "p_method": "t approximation (scipy)"}


def _caveat(n: int) -> str:
    if n < 3:
        return f"only {n} model(s) with both values: no correlation can be computed."
    if n < MIN_MODELS:
        return (f"only {n} models: a rank correlation across so few points takes few values "
                f"and cannot reach p < 0.05 whatever the data (at least {MIN_MODELS} are "
                "needed); read it as a description of these models, not as evidence of a "
                "trend.")
    return (f"{n} models; the correlation is across models (each model one point), not "
            "across images, so it says nothing about any single model.")


def mechanism_section(summary: dict[str, Any], figures: Any) -> dict[str, Any] | None:
    """The panel's payload (table rows, correlations, figure id) from the summary's
    ``dissection`` and ``similarity`` parts; None when either is missing."""
    from interptool.report import mechanism_scatter

    dis, sim = summary.get("dissection"), summary.get("similarity")
    if not dis or not sim:
        return None
    t0 = sim["temperatures"][0]
    key_t = next((k for k in (sim.get("models") or {}).get(summary["teacher"], {})
                  .get("temperatures", {}) if float(k) == float(t0)), None)
    entropy = {}
    for m, d in (sim.get("models") or {}).items():
        per_t = d.get("temperatures", {})
        k = key_t if key_t in per_t else next((k for k in per_t if float(k) == float(t0)), None)
        if k is not None and per_t[k].get("entropy") is not None:
            entropy[m] = float(per_t[k]["entropy"])
    transfer = {}
    for r in sim.get("estimates", []):
        if (r["metric"] == "spearman" and r.get("role") == "student"
                and r.get("temperature") in (None, t0)):
            transfer.setdefault(r["model"], float(r["value"]))
    roles = dis.get("roles") or {}
    models = [m for m in dis["per_model"] if roles.get(m) != "baseline"]
    layers = list(dict.fromkeys(lay for m in models for lay in dis["per_model"][m]))
    rows, corr = [], []
    for layer in layers:
        frac = {m: dis["per_model"][m][layer]["detector_fraction"] for m in models
                if layer in dis["per_model"][m]}
        for m in frac:
            rows.append({"layer": layer, "model": m, "detector fraction": frac[m],
                         f"within-class entropy (T={t0:g}, nats)": entropy.get(m),
                         f"similarity transfer (Spearman with teacher, T={t0:g})":
                             transfer.get(m)})
        for what, xs in (("within-class entropy", entropy), ("similarity transfer", transfer)):
            both = [m for m in frac if m in xs]
            res = exact_spearman([xs[m] for m in both], [frac[m] for m in both])
            corr.append({"layer": layer, "x": what, "models": ", ".join(both), **res,
                         "caveat": _caveat(len(both))})
    last = layers[-1] if layers else None
    fig_id = None
    if last is not None:
        pts = [{"name": m, "y": dis["per_model"][m][last]["detector_fraction"],
                "entropy": entropy.get(m), "transfer": transfer.get(m)}
               for m in models if last in dis["per_model"][m]]
        fig = mechanism_scatter(pts, [("entropy", f"within-class entropy (T={t0:g}, nats)"),
                                      ("transfer", "similarity transfer (Spearman with "
                                                   "teacher)")],
                                f"detector fraction ({last})")
        c = [r for r in corr if r["layer"] == last]
        fig_id = figures.add(
            "mechanism", fig, "mechanism.png",
            f"Each point is a model: detector fraction in {last} against its within-class "
            f"output entropy (left) and its similarity transfer from the teacher (right; "
            f"students only). Spearman across models: " + "; ".join(
                f"{r['x']} rho = {r['rho']:.2f} (p = {r['p_value']:.2f}, n = {r['n']})"
                if math.isfinite(r["rho"]) else f"{r['x']}: n = {r['n']}, not computable"
                for r in c) + ".")
    return {"temperature": t0, "rows": rows, "correlations": corr, "figure": fig_id,
            "intro": "The paper's mechanism: KD passes the teacher's class-similarity "
                     "information to the student, and the student detects more concepts. "
                     "Across the models of this comparison, does more class-similarity "
                     "information (higher within-class entropy; closer similarity transfer) "
                     "go with a higher detector fraction?"}
