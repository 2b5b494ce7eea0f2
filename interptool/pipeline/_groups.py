"""Groups of checkpoints: seeds of one training recipe compared as a recipe.

``group = "scratch"`` in several ``[models.NAME]`` tables gathers them. For every findings row
(one measure over single models) a group row ``"<measure> [groups]"`` compares *recipes*:

* a group's value is the mean of its members' values, with a 95% Student-t interval over the
  members (``mean +- t_{0.975, n-1} SD / sqrt(n)``: the spread between seeds, the uncertainty
  that matters when the claim is about a recipe; :func:`interptool.common.stats.t_interval`);
  a model in no group stands for itself (no interval);
* two groups are compared by the difference of their means with Welch's t interval and
  p-value (``scipy.stats.ttest_ind(..., equal_var=False)``), each needing two or more
  members (members that all agree give no interval: a sample SD of 0 is not certainty); a group against a single model (e.g. the teacher) by a one-sample t-test of the
  members minus that model's value; two single models have no group-level interval (their
  comparison is in the single-model row).

The group rows join the Holm family of the findings table.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from interptool.pipeline._config import CompareConfig

__all__ = ["group_findings", "group_measure_name", "groups_of", "welch_difference"]


def groups_of(cfg: CompareConfig) -> dict[str, list[str]]:
    """Entity -> member models, in config order: each group, and each model in no group."""
    out: dict[str, list[str]] = {}
    for name, m in cfg.models.items():
        out.setdefault(m.group or name, []).append(name)
    return out


def group_measure_name(measure: str) -> str:
    """``"detector units (layer4)"`` -> ``"detector units [groups] (layer4)"``."""
    m = re.match(r"^(.*) (\([^()]*\))$", measure)
    return f"{m.group(1)} [groups] {m.group(2)}" if m else f"{measure} [groups]"


def welch_difference(a: list[float], b: list[float], level: float = 0.95
                     ) -> tuple[float, float, float, float]:
    """``(mean(a) - mean(b), ci_low, ci_high, p)``: Welch's t interval and two-sided p (both
    sides need two or more finite values; a side of one value is a fixed reference, tested
    with a one-sample t-test of the other side). NaN interval and p when neither side has two.
    """
    from scipy import stats

    x = np.asarray([v for v in a if _ok(v)], dtype=np.float64)
    y = np.asarray([v for v in b if _ok(v)], dtype=np.float64)
    if x.size == 0 or y.size == 0:
        return (math.nan,) * 4
    d = float(x.mean() - y.mean())
    if x.size < 2 and y.size < 2:
        return d, math.nan, math.nan, math.nan
    # Members that all agree (e.g. three seeds with 13 detectors each) have a sample SD of 0,
    # which does not make the difference exact: the t interval is undefined, so none is given
    # (NaN: the verdict is "cannot tell") rather than a zero-width interval with p = 0.
    if all(np.ptp(v) == 0 for v in (x, y) if v.size >= 2):
        return d, math.nan, math.nan, math.nan
    if x.size >= 2 and y.size >= 2:
        res = stats.ttest_ind(x, y, equal_var=False)
    elif x.size >= 2:
        res = stats.ttest_1samp(x - y[0], 0.0)
    else:
        res = stats.ttest_1samp(x[0] - y, 0.0)
    ci = res.confidence_interval(confidence_level=level)
    lo, hi = float(ci.low), float(ci.high)
    return d, min(lo, d), max(hi, d), float(res.pvalue)


def _ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def group_findings(rows: list[dict[str, Any]], cfg: CompareConfig) -> list[dict[str, Any]]:
    """One group row per single-model row (module docstring); none when no model has a group.

    ``rows``: the single-model findings rows (their ``values`` per model and direction).
    """
    from interptool.common.stats import t_interval
    from interptool.pipeline.findings import make_finding

    entities = groups_of(cfg)
    if all(len(v) == 1 and cfg.models[v[0]].group is None for v in entities.values()):
        return []
    teacher = cfg.teacher
    teacher_entity = teacher.group or teacher.name
    out = []
    for row in rows:
        per = row["values"]
        members = {e: [per[m] for m in ms if m in per and _ok(per[m])]
                   for e, ms in entities.items()}
        members = {e: v for e, v in members.items() if v}
        if len(members) < 2:
            continue
        values, cis = {}, {}
        for e, v in members.items():
            iv = t_interval(v)
            values[e] = iv.estimate
            # no interval from members without spread (see welch_difference)
            if iv.defined and np.ptp(v) > 0:
                cis[e] = (iv.low, iv.high)
        grp = make_finding(
            group_measure_name(row["measure"]), values,
            lambda a, b, members=members: welch_difference(members[a], members[b]),
            higher_is_better=row["direction"] == "higher", teacher=teacher_entity,
            models=list(members), value_ci=cis,
            note="recipe means over seeds (group members) with 95% t intervals; group "
                 "differences: Welch t interval and p; " + ", ".join(
                     f"{e}: {len(v)} member(s)" for e, v in members.items()))
        grp["group_members"] = {e: entities[e] for e in members}
        out.append(grp)
    return out
