"""The dissection stage of ``compare``: protocol, bootstrap intervals, random-init controls.

* Every model's dissected layers are dissected under one protocol
  (``analysis.dissection.protocol`` / ``categories``) with ``bootstrap`` resamples of the probe
  images (the same seed for every model, so the resamples pair up across models);
* with ``baseline = "random-init"`` (the default) a seeded, randomly initialised copy of each
  architecture (same ``num_classes`` and preprocessing, seed ``run.seed``) is cached on the same
  probe and dissected the same way: its counts are what the architecture gives with no training;
* each (model, layer) is a resumable stage (``dissection-<model>-<layer>``) whose payload holds
  the counts, the detector fraction, their 95% bootstrap intervals, the concept table and the
  path of the per-resample measures (``bootstrap_samples.csv``), from which
  :func:`paired_differences` makes the paired intervals of every compared pair.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from interptool._progress import say
from interptool.pipeline._context import RunContext
from interptool.pipeline._stage_cache import cache_identity

__all__ = [
    "BASELINE_PREFIX",
    "Baseline",
    "MEASURES",
    "cache_baselines",
    "concepts_gained_lost",
    "dissection_stage",
    "load_baselines",
    "paired_differences",
    "plan_baselines",
    "random_init_model",
]

BASELINE_PREFIX = "random-init"
#: the detector measures compared across models (bootstrap columns of DissectionResult)
MEASURES = ("detectors", "detector_fraction", "unique_concepts")
# architectures that cannot be re-created with random weights from their name alone
_NO_RANDOM_INIT = ("hf:",)


@dataclass
class Baseline:
    """A random-init control: one per distinct architecture (and class count / input size)."""

    name: str
    arch: str
    members: list[str]
    seed: int
    layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(arch: str) -> str:
    tail = arch.rsplit(":", 1)[-1] if ":" in arch else Path(arch).stem
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tail) or "model"


def plan_baselines(run: RunContext) -> tuple[dict[str, Baseline], list[str]]:
    """``(baselines, notes)``: the controls the config asks for, by name, in config order.

    Models share a baseline when they have the same architecture, class count and input
    settings; TorchScript files and Hugging Face folders cannot be re-initialised from their
    architecture name and get none (said in ``notes``).
    """
    cfg = run.cfg
    d = cfg.analysis.dissection
    out: dict[str, Baseline] = {}
    notes: list[str] = []
    if d is None or getattr(d, "baseline", "none") != "random-init":
        return out, notes
    keys: dict[tuple, str] = {}
    for name, m in cfg.models.items():
        if Path(m.arch).suffix in (".pt", ".pth", ".ts", ".torchscript") or \
                m.arch.startswith(_NO_RANDOM_INIT):
            notes.append(f"{name}: no random-init baseline ({m.arch} cannot be re-initialised "
                         "from its architecture name)")
            continue
        lm = run.loaded.get(name)
        key = (m.arch, getattr(lm, "num_classes", m.num_classes), m.image_size,
               tuple(m.mean or ()), tuple(m.std or ()))
        if key not in keys:
            base = f"{BASELINE_PREFIX}.{_short(m.arch)}"
            bname, k = base, 2
            while bname in cfg.models or bname in out:
                bname, k = f"{base}-{k}", k + 1
            keys[key] = bname
            out[bname] = Baseline(bname, m.arch, [], int(cfg.run.seed))
        b = out[keys[key]]
        b.members.append(name)
        for lay in run.dissect_layers(name):
            if lay not in b.layers:
                b.layers.append(lay)
    return out, notes


def random_init_model(arch: str, seed: int, **load_kwargs: Any) -> Any:
    """``load_model(arch, checkpoint=None, init_seed=seed, **load_kwargs)``: the
    architecture's own initialisation drawn from ``seed`` (the same seed gives the same
    weights; the caller's random stream is not touched)."""
    from interptool.loading import load_model

    kw = {**load_kwargs, "checkpoint": None, "key_map": None, "trust_pickle": False}
    return load_model(arch, init_seed=int(seed), **kw)


def load_baselines(run: RunContext, baselines: dict[str, Baseline]) -> dict[str, Any]:
    """The random-init models (:func:`random_init_model`), each with its class count and
    input settings taken from its first member; a re-run gets the same weights, so the
    control's cache is found and resumed."""
    loaded = {}
    for b in baselines.values():
        m = run.cfg.models[b.members[0]]
        kw = m.load_kwargs(run.device)
        kw["num_classes"] = run.loaded[m.name].num_classes
        say(f"baseline {b.name}: {b.arch} with random weights (seed {b.seed})")
        loaded[b.name] = random_init_model(b.arch, b.seed, **kw)
    return loaded


def cache_baselines(run: RunContext) -> None:
    """Plan, load and cache the controls on the probe set (``DIR/cache/<name>_probe.h5``)."""
    from interptool.pipeline._caches import cache_or_resume

    baselines, notes = plan_baselines(run)
    run.baselines = baselines
    run.baseline_notes = notes
    for note in notes:
        say(note)
    if not baselines or run.probe_ds is None:
        return
    loaded = load_baselines(run, baselines)
    r = run.cfg.run
    for b in baselines.values():
        path = run.out / "cache" / f"{b.name}_probe.h5"
        say(f"cache {b.name} on probe data ({len(run.probe_ds)} images)")
        run.probe_cache[b.name] = cache_or_resume(
            loaded[b.name], run.probe_ds, b.layers, path, overwrite=run.overwrite,
            batch_size=r.batch_size, workers=r.workers, probe=True, seed=r.seed,
            device=run.device)


# --------------------------------------------------------------------------------------------
# one (model, layer)
# --------------------------------------------------------------------------------------------
def _params(run: RunContext) -> Any:
    """Every dissection setting of the config table, with the run's device and seed (the
    same bootstrap seed for every model: paired resamples)."""
    from interptool.analyzers import get_analyzer

    return get_analyzer("dissection").params_from_config(
        run.cfg.analysis.dissection, device=run.device, seed=run.cfg.run.seed)


def _dissect_one(run: RunContext, name: str, layer: str) -> dict[str, Any]:
    from interptool._provenance import atomic_path, atomic_write_text
    from interptool.analyzers.dissection import Dissection
    from interptool.cache import ActivationCache

    d = run.cfg.analysis.dissection
    top_k = max(d.top_units, 0)
    say(f"dissection {name} {layer}")
    folder = run.out / "dissection" / name / layer
    with ActivationCache(run.probe_cache[name]) as cache:
        res = Dissection.from_params(_params(run)).run(cache, layer, run.probe_ds, name=name)
        # tables only: the report draws the detector plots and the top units' sheet itself
        # (below), so the per-result plots and montages would be drawn for no page
        res.save(folder, figures=False)
    part: dict[str, Any] = {
        "units": int(res.units),
        "detectors": int(len(res.detectors())),
        "detector_fraction": float(res.detector_fraction()),
        "unique_concepts": res.unique_concepts(),
        "by_category": res.counts_by_category(),
        "curve": [int(len(res.detectors(t))) for t in d.iou_thresholds],
        "top_units": res.top_units(top_k),
        "montage": None,
        "protocol": res.protocol,
        "iou_threshold": float(res.iou_threshold),
        "quantile": float(res.quantile),
        "intervals": {},
        "samples": None,
        "concepts": res.concept_table().drop(columns=["layer"]).to_dict(orient="records"),
    }
    if res.bootstrap_samples is not None:
        part["intervals"] = {
            r["measure"]: {"estimate": r["estimate"], "ci_low": r["ci_low"],
                           "ci_high": r["ci_high"], "bias": r["bias"]}
            for r in res.intervals().to_dict(orient="records")}
        rel = f"dissection/{name}/{layer}/bootstrap_samples.csv"
        atomic_write_text(run.out / rel, res.bootstrap_samples.to_csv(index=False))
        part["samples"] = rel
    if part["top_units"]:
        rel = f"dissection/{name}/{layer}/top_units.png"
        sheet = res.montage_sheet([u["unit"] - 1 for u in part["top_units"]])
        with atomic_path(run.out / rel) as tmp:
            sheet.save(tmp, format="PNG")
        part["montage"] = rel
    return part


# --------------------------------------------------------------------------------------------
# pairs and concepts
# --------------------------------------------------------------------------------------------
def paired_differences(out: Path, part_a: dict[str, Any], part_b: dict[str, Any],
                       level: float = 0.95) -> dict[str, dict[str, float]]:
    """Per measure, ``a - b`` with its paired bootstrap interval and two-sided bootstrap p.

    Both parts come from the same probe with the same seed and number of resamples, so row
    ``i`` of the two ``bootstrap_samples.csv`` files resampled the same images: the difference
    is taken resample by resample (:func:`interptool.common.stats.paired_difference`, the
    bias-corrected percentile interval the dissection's own intervals use) and its p-value is
    the one that agrees with that interval (:func:`~interptool.pipeline._verdicts.bc_p_value`).
    Empty when either part has no bootstrap.
    """
    import pandas as pd

    from interptool.common.stats import paired_difference as paired_iv
    from interptool.pipeline._verdicts import bc_p_value

    if not part_a.get("samples") or not part_b.get("samples"):
        return {}
    sa = pd.read_csv(out / part_a["samples"])
    sb = pd.read_csv(out / part_b["samples"])
    if len(sa) != len(sb):
        return {}
    res = {}
    for m in MEASURES:
        if m not in sa or m not in sb:
            continue
        a, b = sa[m].to_numpy(float), sb[m].to_numpy(float)
        iv = paired_iv(a, b, float(part_a[m]), float(part_b[m]), level=level, method="bc")
        res[m] = {"difference": iv.estimate, "ci_low": iv.low, "ci_high": iv.high,
                  "p_value": bc_p_value(a - b, iv.estimate)}
    return res


def concepts_gained_lost(student: list[dict[str, Any]],
                         teacher: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Concepts a student detects that its teacher does not (gained), the reverse (lost), and
    shared ones, from two concept tables of the same layer name and probe.

    The same rule as :meth:`DissectionResult.concepts_gained_lost`, applied to stored concept
    tables (so a resumed run needs no re-dissection); rows ``concept, category, units``
    (student's detectors), ``units_teacher``, ``status``; sorted gained, lost, shared, then by
    total units, then name.
    """
    mine = {r["concept"]: r for r in student}
    theirs = {r["concept"]: r for r in teacher}
    rows = []
    for c in sorted(set(mine) | set(theirs)):
        a = int(mine[c]["units"]) if c in mine else 0
        b = int(theirs[c]["units"]) if c in theirs else 0
        cat = (mine.get(c) or theirs[c])["category"]
        rows.append({"concept": c, "category": cat, "units": a, "units_teacher": b,
                     "status": "shared" if a and b else ("gained" if a else "lost")})
    order = {"gained": 0, "lost": 1, "shared": 2}
    return sorted(rows, key=lambda r: (order[r["status"]], -(r["units"] + r["units_teacher"]),
                                       r["concept"]))


def _pairs_needed(run: RunContext, layer: str, have: dict[str, dict[str, Any]]) -> list[tuple]:
    from interptool.pipeline.findings import finding_pairs

    models = [m for m in run.cfg.models if layer in have.get(m, {})]
    pairs = finding_pairs(models, run.cfg.teacher.name)
    for b in getattr(run, "baselines", {}).values():
        pairs += [(m, b.name) for m in b.members if m in models and layer in have.get(b.name, {})]
    return pairs


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def dissection_stage(run: RunContext) -> dict[str, Any]:
    """Dissect every model's and every control's layers; paired differences; section."""
    from interptool.report import dissection_section

    d = run.cfg.analysis.dissection
    assert d is not None and run.probe_ds is not None
    baselines: dict[str, Baseline] = getattr(run, "baselines", {})
    per_model: dict[str, dict[str, Any]] = {}
    categories = list(getattr(run.probe_ds, "categories", []))
    names = [*run.cfg.models, *baselines]
    for name in names:
        per_model[name] = {}
        layers = baselines[name].layers if name in baselines else run.dissect_layers(name)
        for layer in layers:
            inputs = {"settings": asdict(d), "cache": cache_identity(run.probe_cache[name]),
                      "layer": layer, "probe": run.probe_ds.fingerprint,
                      "seed": run.cfg.run.seed}
            part, reused = run.stages.run(
                f"dissection-{name}-{layer}", inputs,
                lambda name=name, layer=layer: _dissect_one(run, name, layer))
            if reused:
                say(f"dissection {name} {layer}: done earlier, reused")
            per_model[name][layer] = part
    layers = list(dict.fromkeys(lay for m in per_model.values() for lay in m))
    pairs = []
    for layer in layers:
        for a, b in _pairs_needed(run, layer, per_model):
            diffs = paired_differences(run.out, per_model[a][layer], per_model[b][layer])
            for measure, v in diffs.items():
                pairs.append({"layer": layer, "a": a, "b": b, "measure": measure, **v})
    teacher = run.cfg.teacher.name
    gained_lost = {}
    for m in run.cfg.models:
        if m == teacher:
            continue
        for layer, part in per_model[m].items():
            if layer in per_model.get(teacher, {}):
                gained_lost.setdefault(m, {})[layer] = concepts_gained_lost(
                    part["concepts"], per_model[teacher][layer]["concepts"])
    first = next((p for m in per_model.values() for p in m.values()), {})
    protocol = dict(first.get("protocol") or {})
    settings = {**asdict(d), "quantile": first.get("quantile", d.quantile),
                "iou_threshold": first.get("iou_threshold", d.iou_threshold),
                "seed": run.cfg.run.seed}
    roles = {m: ("teacher" if m == teacher else "student") for m in run.cfg.models}
    roles.update({b: "baseline" for b in baselines})
    return dissection_section(
        per_model, categories, settings, run.figures, protocol=protocol, roles=roles,
        baselines={k: v.to_dict() for k, v in baselines.items()},
        baseline_notes=list(getattr(run, "baseline_notes", [])), pairs=pairs,
        gained_lost=gained_lost)


# --------------------------------------------------------------------------------------------
# findings rows
# --------------------------------------------------------------------------------------------
_LABELS = {"detectors": "detector units", "detector_fraction": "detector fraction",
           "unique_concepts": "unique concepts"}


def dissection_findings(dis: dict[str, Any] | None, teacher: str,
                        models: list[str]) -> list[dict[str, Any]]:
    """Findings rows per layer for the detector measures, each value with its 95% bootstrap
    interval and each comparison with its paired interval and bootstrap p.

    Controls (random-init baselines) are ranked with the models and each model is compared
    with its own architecture's control. When the models of a layer differ in width the
    detector fraction row comes first and the count row says to compare fractions.
    """
    from interptool.pipeline.findings import make_finding

    if not dis:
        return []
    per = dis["per_model"]
    baselines = dis.get("baselines") or {}
    extra = [(m, b) for b, v in baselines.items() for m in v["members"]]
    lookup = {(p["layer"], p["a"], p["b"], p["measure"]): p for p in dis.get("pairs") or []}
    boot = bool((dis.get("protocol") or {}).get("bootstrap"))
    layers = list(dict.fromkeys(lay for m in per.values() for lay in m))
    out = []
    for layer in layers:
        have = {m: per[m][layer] for m in [*models, *baselines] if layer in per.get(m, {})}
        widths = {m: int(p["units"]) for m, p in have.items()}
        differ = len(set(widths.values())) > 1
        keys = (("detector_fraction", "detectors", "unique_concepts") if differ
                else ("detectors", "detector_fraction", "unique_concepts"))
        for key in keys:
            vals = {m: p.get(key) for m, p in have.items()}
            if key == "detector_fraction":
                vals = {m: (v if v is not None else have[m]["detectors"] / max(widths[m], 1))
                        for m, v in vals.items()}
            cis = {m: ((p.get("intervals") or {}).get(key, {}).get("ci_low"),
                       (p.get("intervals") or {}).get(key, {}).get("ci_high"))
                   for m, p in have.items()}

            def diff(a: str, b: str, key: str = key, layer: str = layer) -> tuple:
                got = lookup.get((layer, a, b, key))
                if got is not None:
                    return got["difference"], got["ci_low"], got["ci_high"], got["p_value"]
                got = lookup.get((layer, b, a, key))
                if got is not None:
                    return -got["difference"], -got["ci_high"], -got["ci_low"], got["p_value"]
                return None, None, None

            if boot:
                note = ("95% bootstrap CIs over probe images; differences paired (the same "
                        "resampled images for both models)")
            else:
                note = "count on the probe set; no bootstrap (analysis.dissection.bootstrap = 0)"
            if differ and key != "detector_fraction":
                note += ("; the models differ in width (units: " + ", ".join(
                    f"{m} {u}" for m, u in widths.items()) + "): compare the detector fraction")
            out.append(make_finding(f"{_LABELS[key]} ({layer})", vals, diff, teacher=teacher,
                                    models=models, note=note, extra_pairs=extra,
                                    value_ci=cis))
    return out
