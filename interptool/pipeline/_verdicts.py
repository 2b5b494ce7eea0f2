"""What the findings table may claim: Holm's correction over the table, and the paper's
direction (KD > scratch > LS in concept detectors) stated in words with its interval.

* :func:`mark_holm`: every comparison that carries a two-sided p-value of no difference gets
  ``p_holm`` (Holm's step-down adjustment over all such comparisons in the table, one family)
  and ``holm`` (True when ``p_holm <= 0.05``: the difference survives the correction);
* :func:`p_from_interval`: the p-value of a normal approximation read off a 95% interval, for
  measures whose analyzer reports an interval but no resamples (class-similarity transfer);
* :func:`paper_directions`: whether the KD-vs-scratch and LS-vs-scratch detector differences
  agree with Han et al. (2023), disagree, or cannot be told apart from no difference.
"""

from __future__ import annotations

import math
import re
from typing import Any

# bc_p_value lives in interptool.common.stats (analyzers use it too); re-exported here for
# the callers that import it from this module.
from interptool.common.stats import bc_p_value, holm_adjust

__all__ = ["HOLM_ALPHA", "bc_p_value", "mark_holm", "p_from_interval", "paper_directions",
           "paper_summary_line", "recipe_of"]

HOLM_ALPHA = 0.05


def p_from_interval(estimate: Any, low: Any, high: Any, level: float = 0.95) -> float | None:
    """Two-sided p of "no difference" from a symmetric-normal reading of an interval.

    ``se = (high - low) / (2 z)`` with ``z`` the normal quantile of the level, ``p = 2 (1 -
    Phi(|estimate| / se))``. None when the interval is missing or has no width. Used only
    where the analyzer gives no resamples; bootstrap p-values are used everywhere else.
    """
    from scipy.stats import norm

    try:
        est, lo, hi = float(estimate), float(low), float(high)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (est, lo, hi)) or hi <= lo:
        return None
    se = (hi - lo) / (2 * float(norm.ppf(0.5 + level / 2)))
    return float(2 * norm.sf(abs(est) / se))


def mark_holm(rows: list[dict[str, Any]], alpha: float = HOLM_ALPHA) -> list[dict[str, Any]]:
    """Add ``p_holm`` and ``holm`` to every comparison of ``rows`` (in place; returned).

    The family is every comparison in the table that has a ``p_value``; comparisons without
    one get ``p_holm = None`` and ``holm = None`` (not part of the family).
    """
    slots = [c for r in rows for c in r.get("comparisons", [])]
    with_p = [c for c in slots if isinstance(c.get("p_value"), (int, float))
              and math.isfinite(c["p_value"])]
    adjusted = holm_adjust([c["p_value"] for c in with_p]) if with_p else []
    for c in slots:
        c["p_holm"], c["holm"] = None, None
    for c, adj in zip(with_p, adjusted):
        c["p_holm"] = float(adj)
        c["holm"] = bool(adj <= alpha)
    for r in rows:
        r["holm_family"] = len(with_p)
    return rows


# --------------------------------------------------------------------------------------------
# the paper's direction
# --------------------------------------------------------------------------------------------
_RECIPES = {
    "kd": ("kd", "distilled", "distill", "distillation", "logit-kd", "logit_kd"),
    "scratch": ("scratch", "ce", "baseline-ce", "from-scratch", "from_scratch", "vanilla"),
    "ls": ("ls", "label-smoothing", "label_smoothing", "labelsmoothing", "smoothing"),
}


def recipe_of(name: str) -> str | None:
    """``"kd"``, ``"scratch"`` or ``"ls"`` when ``name`` (a model or group name) says so.

    The name is split at ``-``, ``_``, ``.`` and digits; a part (or the whole name) must be one
    of the recipe's words exactly: ``kd``, ``kd-seed1``, ``resnet18_kd`` are KD; ``kids`` is
    not. None when no recipe or more than one matches.
    """
    low = name.lower()
    parts = {p for p in re.split(r"[-_.\d]+", low) if p} | {low}
    found = [r for r, words in _RECIPES.items() if parts & set(words)]
    return found[0] if len(found) == 1 else None


def _verdict(diff: float, lo: Any, hi: Any, want_positive: bool) -> str:
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "no interval"
    if lo > 0 or hi < 0:
        return "agrees" if (lo > 0) == want_positive else "disagrees"
    return "cannot tell"


def paper_directions(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per detector row (``detector units`` / ``detector fraction``, per layer) and per
    direction (KD vs scratch, scratch vs LS) found in the findings: the difference, its 95%
    interval and the verdict, with a sentence.

    Models are matched to recipes by :func:`recipe_of` on their group name (when in a group)
    or their own name; group rows (``"... [groups]"``) are preferred over single models.
    The paper (Han et al., ICML 2023, ResNet-18 layer4): KD 312 > scratch 275 > LS 219.
    """
    out = []
    for row in findings:
        m = re.match(r"(detector units|detector fraction)( \[groups\])? \((.+)\)$",
                     row["measure"])
        if not m:
            continue
        roles: dict[str, str] = {}
        for name in row["values"]:
            r = recipe_of(name)
            if r and r not in roles:
                roles[r] = name
        for (hi_r, lo_r, text) in (("kd", "scratch", "KD > scratch"),
                                   ("scratch", "ls", "scratch > LS")):
            if hi_r not in roles or lo_r not in roles:
                continue
            a, b = roles[hi_r], roles[lo_r]
            comp = next((c for c in row["comparisons"] if {c["a"], c["b"]} == {a, b}), None)
            if comp is None or comp["difference"] is None:
                continue
            # orient as a - b (KD minus scratch; scratch minus LS)
            if comp["better"] in (a, b):
                sign = 1 if comp["better"] == a else -1
            else:  # a tie: the interval is oriented comp["a"] - comp["b"]
                sign = 1 if comp["a"] == a else -1
            d = sign * comp["difference"]
            lo, hi = comp["ci_low"], comp["ci_high"]
            if lo is not None and hi is not None and sign < 0:
                lo, hi = -hi, -lo
            verdict = _verdict(d, lo, hi, True)
            ci = (f"[{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None
                  else "(no interval)")
            measure = m.group(1) + (" (group means)" if m.group(2) else "")
            head = f"{a} - {b} {measure} in {m.group(3)}: {d:+.3g} {ci}"
            if verdict == "agrees":
                say = f"{head}: agrees with the paper's direction ({text})."
            elif verdict == "disagrees":
                say = f"{head}: opposite to the paper's direction ({text})."
            elif verdict == "cannot tell":
                say = f"{head}: the interval includes 0, so the data cannot tell the direction."
            else:
                say = f"{head}: no interval, so the direction is not established."
            out.append({"measure": row["measure"], "direction": text, "a": a, "b": b,
                        "difference": d, "ci_low": lo, "ci_high": hi, "verdict": verdict,
                        "sentence": say, "group": bool(m.group(2))})
    if any(o["group"] for o in out):
        out = [o for o in out if o["group"]] + [o for o in out if not o["group"]]
    return out


def paper_summary_line(directions: list[dict[str, Any]]) -> str:
    """One line for the demo: the paper's two directions in the deepest dissected layer.

    Uses the detector-count rows (fractions when that is all there is), group rows first when
    the comparison has groups; says so when no model name matches the recipes.
    """
    if not directions:
        return ("paper's direction (KD > scratch > LS in detectors): not assessed (no models "
                "named kd / scratch / ls, or no dissection)")
    rows = [d for d in directions if d["measure"].startswith("detector units")] or directions
    rows = [d for d in rows if d["group"]] or rows
    layer = rows[-1]["measure"].rsplit("(", 1)[-1].rstrip(")")
    parts = []
    for d in rows:
        if not d["measure"].endswith(f"({layer})"):
            continue
        ci = (f"[{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]"
              if d["ci_low"] is not None and d["ci_high"] is not None else "(no interval)")
        word = {"agrees": "agrees", "disagrees": "opposite", "cannot tell":
                "interval includes 0: cannot tell"}.get(d["verdict"], "no interval")
        parts.append(f"{d['a']} - {d['b']} {d['difference']:+.3g} {ci} ({word})")
    return f"paper's direction (KD > scratch > LS in detectors, {layer}): " + "; ".join(parts)
