"""``run_compare``: caches, every analyzer on every model, summary.json and report.html.

Stages (each resumable):

1. load every model (cheap) and open the data sets;
2. cache logits (+ CKA layers) on the eval set and the dissection layers on the probe set,
   under ``DIR/cache/<model>_<eval|probe>.h5`` (``cache_activations`` reuses a complete
   matching cache and resumes an incomplete one);
3. dissection per model and layer, class similarity + CKA, attribution per method;
4. findings, ``summary.json``, ``report.html``.

Each analysis stage writes its part of the summary to ``DIR/.stages/<stage>.json`` together
with a key: the sha256 of everything the stage depends on (settings, the identity of the caches
it reads: checkpoint hash, data fingerprint, creation time). A re-run whose key matches loads
the stored part instead of recomputing it, so an interrupted run redoes only unfinished work.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from interptool._provenance import atomic_write_text, now_iso, seed_everything, versions
from interptool.errors import AnalysisError, ConfigError, InterptoolError
from interptool.report import _figures as figs
from interptool.report._config import CompareConfig

FORMAT = "interptool-summary/1"


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    """Per-stage progress lines (stderr, silenced by --quiet like the bars)."""
    import sys

    from interptool import _progress

    if not _progress._QUIET:
        print(f"[interptool] {msg}", file=sys.stderr, flush=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_jsonable(obj), sort_keys=True).encode()).hexdigest()


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (well-behaved at 0 and 1)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """mean(a - b) over items where both are finite, with a percentile bootstrap CI."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if d.size == 1 or n_boot <= 0:
        return (mean, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (mean, float(lo), float(hi))


class _Stages:
    """Done markers: ``.stages/<name>.json`` = {"key": sha256 of inputs, "payload": ...}."""

    def __init__(self, out: Path) -> None:
        self.dir = out / ".stages"
        self.reused: list[str] = []  # stages taken from an earlier run (their time is not here)

    def get(self, name: str, key: str) -> Any | None:
        p = self.dir / f"{name}.json"
        if not p.exists():
            return None
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError:  # a torn marker is simply redone
            return None
        return d.get("payload") if d.get("key") == key else None

    def put(self, name: str, key: str, payload: Any) -> Any:
        payload = _jsonable(payload)
        atomic_write_text(self.dir / f"{name}.json", json.dumps({"key": key, "payload": payload}))
        return payload

    def run(self, name: str, inputs: Any, fn: Callable[[], Any]) -> tuple[Any, bool]:
        """``(payload, reused)``: the stored payload when ``inputs`` match, else ``fn()``."""
        key = _hash(inputs)
        got = self.get(name, key)
        if got is not None:
            self.reused.append(name)
            return got, True
        return self.put(name, key, fn()), False


class _NamedCache:
    """An ActivationCache seen under the config's model name (analyzers name results by it)."""

    def __init__(self, cache: Any, name: str) -> None:
        self._cache = cache
        self.name = name

    def __getattr__(self, item: str) -> Any:
        return getattr(self._cache, item)


def _cache(loaded: Any, dataset: Any, layers: list[str], path: Path, **kw: Any) -> Path:
    """``cache_activations`` that reuses a matching cache (complete: no-op; incomplete:
    resumed) and rebuilds one made with other settings: files under DIR/cache are ours."""
    from interptool.cache import cache_activations
    from interptool.errors import CacheError

    try:
        return Path(cache_activations(loaded, dataset, layers, path, **kw))
    except CacheError as exc:
        if not path.exists():
            raise
        _log(f"{path.name}: {exc}; rebuilding it")
        return Path(cache_activations(loaded, dataset, layers, path, overwrite=True, **kw))


def _cache_identity(path: Path) -> dict[str, Any]:
    from interptool.cache import ActivationCache

    with ActivationCache(path) as c:
        a = c.attrs
        return {"file": path.name, "created": a.get("created"), "n": c.n,
                "checkpoint_sha256": a.get("checkpoint_sha256"),
                "data_fingerprint": c.data_fingerprint, "layers": c.layers}


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
class _Run:
    def __init__(self, cfg: CompareConfig, out: Path, config_text: str | None,
                 command: str | None, title: str | None) -> None:
        self.cfg = cfg
        self.out = out
        self.stages = _Stages(out)
        self.timings: dict[str, float] = {}
        self.config_text = config_text
        self.command = command
        self.title = title
        self.device = cfg.run.device
        self.loaded: dict[str, Any] = {}
        self.eval_ds = None
        self.probe_ds = None
        self.eval_cache: dict[str, Path] = {}
        self.probe_cache: dict[str, Path] = {}
        self.figures: dict[str, dict[str, str]] = {}

    # -- timing -------------------------------------------------------------------------------
    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 2)

    def add_figure(self, key: str, fig: Any, rel: str, caption: str) -> str:
        figs.save_png(fig, self.out / rel)
        self.figures[key] = {"path": rel, "caption": caption}
        return key

    # -- stage 1: models and data -------------------------------------------------------------
    def load(self) -> None:
        from interptool.data import open_dataset
        from interptool.loading import load_model

        for m in self.cfg.models.values():
            _log(f"loading model {m.name} ({m.arch})")
            try:
                loaded = load_model(m.arch, **m.load_kwargs(self.device))
            except InterptoolError as exc:
                # say which table of the config the failing model comes from
                raise ConfigError(
                    f"{self.cfg.source}: models.{m.name} (arch {m.arch!r}, checkpoint "
                    f"{m.checkpoint}): {exc}"
                ) from None
            self._check_layers(m, loaded)
            self.loaded[m.name] = loaded
        if self.cfg.data.eval:
            self.eval_ds = open_dataset(self.cfg.data.eval)
        if self.cfg.data.probe and self.cfg.analysis.dissection is not None:
            self.probe_ds = open_dataset(self.cfg.data.probe)
        if self.eval_ds is not None:
            ks = {n: lm.num_classes for n, lm in self.loaded.items()}
            if len(set(ks.values())) > 1:
                raise ConfigError(
                    f"{self.cfg.source}: models: the models have different numbers of classes "
                    f"({ks}); class similarity and attribution need one label space "
                    "(set num_classes, or compare models trained on the same classes)"
                )

    def _check_layers(self, m: Any, loaded: Any) -> None:
        """Unknown layer names are config errors, found before any caching starts."""
        import torch

        if not m.layers:
            return
        modules = dict(loaded.model.named_modules())
        if isinstance(loaded.model, torch.jit.ScriptModule):
            raise ConfigError(
                f"{self.cfg.source}: models.{m.name}.layers: a TorchScript model has no "
                "hookable layers; remove 'layers' (class similarity still works from logits)"
            )
        for layer in m.layers:
            if layer not in modules:
                close = difflib.get_close_matches(layer, [k for k in modules if k], n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(
                    f"{self.cfg.source}: models.{m.name}.layers: {layer!r} is not a module of "
                    f"{m.arch}{hint}; `interptool layers --arch {m.arch}` lists them"
                )

    # -- stage 2: caches ------------------------------------------------------------------------
    def cache(self) -> None:
        r = self.cfg.run
        sim = self.cfg.analysis.similarity
        for name, m in self.cfg.models.items():
            lm = self.loaded[name]
            if self.eval_ds is not None:
                layers = m.layers if (sim is not None and sim.cka) else []
                path = self.out / "cache" / f"{name}_eval.h5"
                _log(f"cache {name} on eval data ({len(self.eval_ds)} images)")
                self.eval_cache[name] = _cache(
                    lm, self.eval_ds, layers, path, batch_size=r.batch_size, workers=r.workers,
                    probe=False, seed=r.seed, device=self.device)
            if self.probe_ds is not None:
                path = self.out / "cache" / f"{name}_probe.h5"
                _log(f"cache {name} on probe data ({len(self.probe_ds)} images)")
                self.probe_cache[name] = _cache(
                    lm, self.probe_ds, self._dissect_layers(m), path, batch_size=r.batch_size,
                    workers=r.workers, probe=True, seed=r.seed, device=self.device)

    def _dissect_layers(self, m) -> list[str]:
        d = self.cfg.analysis.dissection
        return list(d.layers) if d is not None and d.layers else list(m.layers)

    # -- models table ---------------------------------------------------------------------------
    def models_table(self) -> list[dict[str, Any]]:
        from interptool.cache import ActivationCache

        teacher = self.cfg.teacher.name
        rows = []
        for name, m in self.cfg.models.items():
            lm = self.loaded[name]
            row: dict[str, Any] = {
                "name": name,
                "role": "teacher" if name == teacher else "student",
                "arch": m.arch,
                "params": int(sum(p.numel() for p in lm.model.parameters())),
                "checkpoint": m.checkpoint,
                "checkpoint_sha256": lm.checkpoint_sha256,
                "num_classes": lm.num_classes,
                "layers": m.layers,
                "preprocessing": lm.preprocessing.to_dict(),
                "accuracy": None,
                "accuracy_ci": None,
            }
            if name in self.eval_cache:
                with ActivationCache(self.eval_cache[name]) as c:
                    ok = c.labels >= 0
                    n = int(ok.sum())
                    k = int((c.logits[ok].argmax(1) == c.labels[ok]).sum())
                if n:
                    row["accuracy"] = k / n
                    row["accuracy_ci"] = list(wilson_interval(k, n))
                    row["n_labelled"] = n
            rows.append(row)
        return rows

    # -- stage 3a: dissection -------------------------------------------------------------------
    def dissection(self) -> dict[str, Any]:
        from interptool.analyzers.dissection import Dissection

        d = self.cfg.analysis.dissection
        assert d is not None and self.probe_ds is not None
        per_model: dict[str, dict[str, Any]] = {}
        categories = list(getattr(self.probe_ds, "categories", []))
        for name, m in self.cfg.models.items():
            per_model[name] = {}
            for layer in self._dissect_layers(m):
                inputs = {"settings": asdict(d), "cache": _cache_identity(self.probe_cache[name]),
                          "layer": layer, "probe": self.probe_ds.fingerprint}

                def work(name=name, layer=layer):
                    from interptool.cache import ActivationCache

                    _log(f"dissection {name} {layer}")
                    with ActivationCache(self.probe_cache[name]) as cache:
                        res = Dissection(quantile=d.quantile, iou_threshold=d.iou_threshold,
                                         batch_size=d.batch_size,
                                         device=self.device).run(cache, layer, self.probe_ds)
                        folder = self.out / "dissection" / name / layer
                        res.save(folder, montages=max(d.top_units, 0) or "none")
                        part = dissection_counts(res.to_frame(), d.iou_threshold,
                                                 d.iou_thresholds, categories)
                        part["top_units"] = part["top_units"][: max(d.top_units, 0)]
                        part["montage"] = None
                        if d.top_units > 0 and part["top_units"]:
                            rel = f"dissection/{name}/{layer}/top_units.png"
                            fig = unit_montage_figure(cache, layer, self.probe_ds, res,
                                                      part["top_units"], d.quantile)
                            figs.save_png(fig, self.out / rel)
                            part["montage"] = rel
                    return part

                part, reused = self.stages.run(f"dissection-{name}-{layer}", inputs, work)
                if reused:
                    _log(f"dissection {name} {layer}: done earlier, reused")
                per_model[name][layer] = part
        return self._dissection_section(per_model, categories)

    def _dissection_section(self, per_model: dict[str, Any], categories: list[str]) -> dict:
        d = self.cfg.analysis.dissection
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
        fig_ids.append(self.add_figure(
            "dissection_bars", figs.detector_bars(counts, cats), "dissection/detectors.png",
            f"Detector units and unique concepts per layer and category (IoU >= "
            f"{d.iou_threshold})."))
        fig_ids.append(self.add_figure(
            "dissection_curve", figs.detector_curve(d.iou_thresholds, curves, d.iou_threshold),
            "dissection/detectors_vs_threshold.png",
            "Detector count as a function of the IoU threshold (dashed: the chosen threshold). "
            "A ranking that holds across thresholds does not hinge on the cut-off."))
        top_rows = []
        for m, layers in per_model.items():
            for lay, part in layers.items():
                if part.get("montage"):
                    key = f"montage_{m}_{lay}"
                    self.figures[key] = {
                        "path": part["montage"],
                        "caption": f"{m} {lay}: top units (rows) and the probe images where "
                        "they fire most; the bright region is where the unit's map exceeds its "
                        "threshold."}
                    fig_ids.append(key)
                for u in part["top_units"]:
                    top_rows.append({"model": m, "layer": lay, **u})
        return {
            "intro": f"Network dissection (Bau et al. 2017) on the probe set: a unit is a "
            f"detector of a concept when the IoU of its thresholded map (top {d.quantile:g} "
            f"quantile) with the concept's masks is >= {d.iou_threshold:g}.",
            "settings": asdict(d),
            "categories": cats,
            "per_model": per_model,
            "tables": [{"title": "Detectors and unique concepts", "rows": rows},
                       {"title": "Top units", "rows": top_rows}],
            "figures": fig_ids,
        }

    # -- stage 3b: similarity and CKA -------------------------------------------------------------
    def similarity(self) -> dict[str, Any]:
        from interptool.analyzers.similarity import compare_similarity
        from interptool.cache import ActivationCache

        s = self.cfg.analysis.similarity
        assert s is not None
        teacher = self.cfg.teacher.name
        students = [m.name for m in self.cfg.students]
        inputs = {"settings": asdict(s), "seed": self.cfg.run.seed,
                  "caches": {n: _cache_identity(p) for n, p in self.eval_cache.items()}}

        def work() -> dict[str, Any]:
            _log("class similarity")
            caches = [ActivationCache(self.eval_cache[n]) for n in [teacher, *students]]
            try:
                named = [_NamedCache(c, n) for c, n in zip(caches, [teacher, *students])]
                if not students:
                    raise AnalysisError("class similarity transfer needs at least one student")
                res = compare_similarity(named[0], *named[1:], temperature=s.temperatures,
                                         n_boot=s.n_boot, seed=self.cfg.run.seed,
                                         k=min(5, max(1, caches[0].logits.shape[1] - 1)),
                                         device=self.device)
                res.save(self.out / "similarity")
                est = res.to_frame()
                t0 = res.temperatures[0]
                names = res.similarity[teacher].class_names
                from interptool.analyzers.similarity._plots import cluster_order

                order = cluster_order(res.similarity[teacher].matrices[t0])
                part: dict[str, Any] = {
                    "temperatures": res.temperatures,
                    "estimates": est.to_dict(orient="records"),
                    "models": {m: res.similarity[m].summary() for m in res.models},
                    "class_names": names,
                    "order": order,
                    "heatmaps": [],
                }
                for t in res.temperatures:
                    rel = f"similarity/report_heatmaps_T{t:g}.png"
                    fig = figs.heatmaps({m: _offdiag_nan(res.similarity[m].matrices[t])
                                         for m in res.models}, names, order=order,
                                        title=f"class similarity S (T={t:g}), "
                                        "teacher's clustered order, diagonal hidden")
                    figs.save_png(fig, self.out / rel)
                    part["heatmaps"].append({"T": t, "path": rel})
                if s.cka and students:
                    part["cka"] = self._cka(caches)
                return part
            finally:
                for c in caches:
                    c.close()

        part, reused = self.stages.run("similarity", inputs, work)
        if reused:
            _log("class similarity: done earlier, reused")
        return self._similarity_section(part)

    def _cka(self, caches: list[Any]) -> dict[str, Any]:
        from interptool.analyzers.cka import cka

        teacher = self.cfg.teacher
        names = [teacher.name, *[m.name for m in self.cfg.students]]
        rows, labels_r, blocks = [], [f"{teacher.name}.{lay}" for lay in teacher.layers], []
        cols: list[str] = []
        for c, n in zip(caches[1:], names[1:]):
            m = self.cfg.models[n]
            _log(f"CKA {teacher.name} vs {n}")
            res = cka(caches[0], c, teacher.layers, m.layers)
            mat = np.asarray(_cka_matrix(res), dtype=np.float64)
            blocks.append(mat)
            cols += [f"{n}.{lay}" for lay in m.layers]
            for i, la in enumerate(teacher.layers):
                for j, lb in enumerate(m.layers):
                    rows.append({"teacher layer": la, "student": n, "student layer": lb,
                                 "cka": float(mat[i, j])})
        full = np.concatenate(blocks, axis=1)
        rel = "similarity/cka.png"
        figs.save_png(figs.cka_matrix(full, labels_r, cols), self.out / rel)
        pd_rows = rows
        return {"rows": pd_rows, "matrix": full, "row_labels": labels_r, "col_labels": cols,
                "figure": rel}

    def _similarity_section(self, part: dict[str, Any]) -> dict[str, Any]:
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
            key = f"similarity_heatmaps_T{h['T']:g}"
            self.figures[key] = {"path": h["path"], "caption": f"Class-similarity matrices at "
                                 f"T={h['T']:g}: row i is the mean softmax over images of class "
                                 "i; classes in the teacher's clustered order."}
            fig_ids.append(key)
        tables = [
            {"title": f"Transfer of the teacher's class similarity (first temperature T={t0:g} "
                      "and others)", "rows": transfer,
             "note": "Pearson/Spearman over off-diagonal entries, KL and JS distance of the rows "
                     "(lower = closer), top-k nearest-class overlap, top-1 agreement; 95% paired "
                     "bootstrap CIs over images. 'A - B' rows are student differences."},
            {"title": "Within-class output entropy (nats)", "rows": ent},
        ]
        if part.get("cka"):
            self.figures["cka"] = {"path": part["cka"]["figure"],
                                   "caption": "Linear CKA between the teacher's layers (rows) "
                                   "and each student's layers (columns) on the eval images."}
            fig_ids.append("cka")
            tables.append({"title": "Linear CKA (teacher vs students)",
                           "rows": part["cka"]["rows"]})
        return {"intro": "Class similarity from logits (the paper's mechanism for KD: the "
                "teacher's soft outputs carry which classes resemble each other).",
                **part, "tables": tables, "figures": fig_ids}

    # -- stage 3c: attribution ----------------------------------------------------------------
    def attribution(self) -> dict[str, Any]:
        from interptool.analyzers.attribution import Attribution

        a = self.cfg.analysis.attribution
        assert a is not None and self.eval_ds is not None
        n = min(a.n_images, len(self.eval_ds))
        per_method: dict[str, Any] = {}
        for method in a.methods:
            inputs = {"settings": asdict(a), "method": method, "n": n, "seed": self.cfg.run.seed,
                      "models": {k: v.checkpoint_sha256 or k for k, v in self.loaded.items()},
                      "data": self.eval_ds.fingerprint}

            def work(method=method):
                results = {}
                for name, m in self.cfg.models.items():
                    _log(f"attribution {method} {name} ({n} images)")
                    params: dict[str, Any] = {}
                    if method == "grad_cam":
                        params["layer"] = a.layer or m.layers[-1]
                    elif method == "integrated_gradients":
                        params["steps"] = a.n_steps
                    seed_everything(self.cfg.run.seed)
                    results[name] = Attribution(method, **params).run(
                        self.loaded[name], self.eval_ds, n=n, batch_size=min(16, n),
                        device=self.device, out=self.out / "attribution" / method / name,
                        keep_images=min(n, 8), overwrite=True)
                return self._score_attribution(method, results, n)

            part, reused = self.stages.run(f"attribution-{method}", inputs, work)
            if reused:
                _log(f"attribution {method}: done earlier, reused")
            per_method[method] = part
        return self._attribution_section(per_method)

    def _score_attribution(self, method: str, results: dict[str, Any], n: int) -> dict:
        import pandas as pd

        from interptool.analyzers.attribution import (
            agreement,
            class_object_masks,
            faithfulness,
            localisation,
        )

        a = self.cfg.analysis.attribution
        seed = self.cfg.run.seed
        teacher = self.cfg.teacher.name
        d = self.out / "attribution" / method
        out: dict[str, Any] = {"agreement": {}, "localisation": {}, "faithfulness": {},
                               "per_image": {}}
        for name, res in results.items():
            if name == teacher:
                continue
            ag = agreement(results[teacher], res, seed=seed)
            ag.save(d / f"agreement_{name}")
            out["agreement"][name] = ag.to_dict()
            out["per_image"].setdefault("agreement_spearman", {})[name] = ag.spearman
        masks = None
        if hasattr(self.eval_ds, "load_segmentation"):
            try:
                h, w = results[teacher].maps.shape[1:]
                masks = class_object_masks(self.eval_ds, list(range(n)), size=(h, w))
            except AnalysisError as exc:
                _log(f"localisation skipped: {exc}")
        images = None
        for name, res in results.items():
            if masks is not None:
                loc = localisation(res, masks, seed=seed)
                loc.save(d / f"localisation_{name}")
                out["localisation"][name] = loc.to_dict()
                out["per_image"].setdefault("localisation_energy", {})[name] = loc.energy
            if a.faithfulness:
                images = self._model_inputs(name, n)
                f = faithfulness(self.loaded[name].model, images, res.maps, res.targets,
                                 mode="deletion", device=self.device, seed=seed,
                                 ids=res.ids)
                f.save(d / f"faithfulness_{name}")
                out["faithfulness"][name] = f.to_dict()
                out["per_image"].setdefault("deletion_auc", {})[name] = f.auc
        # image grid: the same images across models
        k = min(6, n)
        first = results[teacher]
        disp = first.images if first.images is not None else None
        if disp is not None:
            k = min(k, len(disp))
            fig = figs.attribution_grid(
                [disp[i] for i in range(k)], {m: r.maps[:k] for m, r in results.items()},
                # class names where the eval set has them (a bare index means little)
                row_titles=[self._class_name(int(x)) for x in first.labels[:k]],
                title=f"{method}: the same eval images across models (row label: class)")
            rel = f"attribution/{method}/grid.png"
            figs.save_png(fig, self.out / rel)
            out["grid"] = rel
        pd.DataFrame({m: r.predictions for m, r in results.items()}).to_csv(
            d / "predictions.csv", index=False)
        return out

    def _model_inputs(self, name: str, n: int):
        import torch

        pre = self.loaded[name].preprocessing
        tf = pre.probe_transform() if hasattr(self.eval_ds, "load_segmentation") \
            else pre.eval_transform()
        return torch.stack([tf(self.eval_ds.load_image(i)) for i in range(n)])

    def _attribution_section(self, per_method: dict[str, Any]) -> dict[str, Any]:
        agree, loc, faith, fig_ids = [], [], [], []
        for method, part in per_method.items():
            for m, d in part["agreement"].items():
                for metric in ("spearman", "cosine"):
                    if isinstance(d.get(metric), dict):
                        agree.append({"method": method, "student": m, "metric": metric,
                                      "value": d[metric]["mean"], "ci_low": d[metric]["ci_low"],
                                      "ci_high": d[metric]["ci_high"]})
            for m, d in part["localisation"].items():
                for metric in ("energy", "hit"):
                    if isinstance(d.get(metric), dict):
                        loc.append({"method": method, "model": m, "metric": metric,
                                    "value": d[metric]["mean"], "ci_low": d[metric]["ci_low"],
                                    "ci_high": d[metric]["ci_high"]})
                if isinstance(d.get("area"), dict):
                    loc.append({"method": method, "model": m, "metric": "mask area (chance)",
                                "value": d["area"]["mean"], "ci_low": None, "ci_high": None})
            for m, d in part["faithfulness"].items():
                if isinstance(d.get("auc"), dict):
                    faith.append({"method": method, "model": m, "metric": "deletion AUC",
                                  "value": d["auc"]["mean"], "ci_low": d["auc"]["ci_low"],
                                  "ci_high": d["auc"]["ci_high"]})
            if part.get("grid"):
                key = f"attribution_grid_{method}"
                self.figures[key] = {"path": part["grid"], "caption": f"{method} maps of the "
                                     "same images for every model."}
                fig_ids.append(key)
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

    def _class_name(self, label: int) -> str:
        names = getattr(self.eval_ds, "class_names", None)
        if names and 0 <= label < len(names):
            return f"{names[label]} ({label})"
        return str(label)

    # -- stage 4: findings and files ---------------------------------------------------------------
    def findings(self, summary: dict[str, Any]) -> list[dict[str, Any]]:
        return build_findings(summary, self.cfg, self.eval_cache)

    def execute(self) -> Path:
        t_all = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(self.cfg.run.seed)
        self.timed("load", self.load)
        self.timed("cache", self.cache)
        summary: dict[str, Any] = {
            "format": FORMAT,
            "title": self.title or f"interptool comparison: {self.cfg.teacher.name} and "
            f"{len(self.cfg.students)} student(s)",
            "teacher": self.cfg.teacher.name,
            "students": [m.name for m in self.cfg.students],
            "n_eval": len(self.eval_ds) if self.eval_ds is not None else None,
            "n_probe": len(self.probe_ds) if self.probe_ds is not None else None,
        }
        summary["models"] = self.timed("models", self.models_table)
        an = self.cfg.analysis
        if an.dissection is not None:
            summary["dissection"] = self.timed("dissection", self.dissection)
        if an.similarity is not None and self.cfg.students:
            summary["similarity"] = self.timed("similarity", self.similarity)
        if an.attribution is not None:
            summary["attribution"] = self.timed("attribution", self.attribution)
        summary["findings"] = self.findings(summary)
        self.timings["total"] = round(time.perf_counter() - t_all, 2)
        summary["figures"] = self.figures
        summary["provenance"] = {
            "created": now_iso(),
            "versions": versions(),
            "run": {**asdict(self.cfg.run), "device": self.device},
            "timings": self.timings,
            "reused_stages": list(self.stages.reused),
            "data": {k: v for k, v in (
                ("eval", self.cfg.data.eval),
                ("eval fingerprint", getattr(self.eval_ds, "fingerprint", None)),
                ("probe", self.cfg.data.probe),
                ("probe fingerprint", getattr(self.probe_ds, "fingerprint", None))) if v},
            "command": self.command or "run_compare()",
            "config_file": self.cfg.source,
        }
        summary["config"] = self.cfg.to_dict()
        summary["config_text"] = self.config_text
        summary = _jsonable(summary)
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        from interptool.report._html import render_html

        path = self.out / "report.html"
        render_html(summary, path)
        _log(f"report written in {self.timings['total']:.0f}s: {path}")
        return path


def _offdiag_nan(m: np.ndarray) -> np.ndarray:
    m = np.array(m, dtype=np.float64)
    np.fill_diagonal(m, np.nan)
    return m


def _cka_matrix(res: Any) -> np.ndarray:
    for attr in ("matrix", "values", "cka"):
        v = getattr(res, attr, None)
        if v is not None and not callable(v):
            return np.asarray(v)
    raise AnalysisError(f"CKA result {type(res).__name__} has no matrix attribute")


# --------------------------------------------------------------------------------------------
# dissection numbers from a result's table
# --------------------------------------------------------------------------------------------
def _col(df, *names: str) -> str:
    for n in names:
        if n in df.columns:
            return n
    raise AnalysisError(f"dissection table lacks a column among {names}; has {list(df.columns)}")


def dissection_counts(frame, iou_threshold: float, thresholds: list[float],
                      categories: list[str]) -> dict[str, Any]:
    """Detector counts from a per-unit table (one row per unit with its best label).

    A unit is a detector when its best IoU >= ``iou_threshold``; unique concepts are the
    distinct labels among the detectors. Per category: the units whose best label is of that
    category. ``curve``: the detector count at each of ``thresholds``.
    """
    ucol = _col(frame, "unit")
    scol = _col(frame, "score", "iou")
    lcol = _col(frame, "label", "label_name")
    ccol = _col(frame, "category")
    df = frame[[ucol, scol, lcol, ccol]].copy()
    df[scol] = df[scol].astype(float).fillna(0.0)
    det = df[df[scol] >= iou_threshold]
    by_cat = {}
    for c in sorted(set(det[ccol]) | set(categories), key=lambda x: (
            categories.index(x) if x in categories else len(categories), str(x))):
        sub = det[det[ccol] == c]
        by_cat[str(c)] = {"detectors": int(len(sub)), "unique": int(sub[lcol].nunique())}
    top = df.sort_values([scol, ucol], ascending=[False, True]).head(16)
    return {
        "units": int(len(df)),
        "detectors": int(len(det)),
        "unique_concepts": int(det[lcol].nunique()),
        "by_category": by_cat,
        "curve": [int((df[scol] >= t).sum()) for t in thresholds],
        "top_units": [{"unit": int(r[ucol]), "label": str(r[lcol]), "category": str(r[ccol]),
                       "iou": float(r[scol])} for _, r in top.iterrows()],
    }


def unit_montage_figure(cache: Any, layer: str, probe: Any, result: Any,
                        top_units: list[dict[str, Any]], quantile: float, n_images: int = 5):
    """Top images of each top unit with the region where the unit fires above threshold."""
    import torch
    import torch.nn.functional as F

    fmax = cache.feature_max(layer)  # (N, C)
    feats = cache.features(layer)
    thresholds = getattr(result, "thresholds", None)
    rows = []
    for u in top_units:
        # `unit` in tables is 1-based (NetDissect tally.csv convention)
        ch = int(u["unit"]) - 1
        if not 0 <= ch < fmax.shape[1]:
            continue
        if thresholds is not None:
            thr = float(np.asarray(thresholds)[ch])
        else:  # exact (1 - q) quantile of this unit over all images and positions
            vals = np.concatenate([b[:, ch].ravel() for _, b in cache.iter_features(layer)])
            thr = float(np.quantile(vals, 1 - quantile))
        top = np.argsort(-fmax[:, ch], kind="stable")[:n_images]
        imgs = []
        for i in top:
            img = np.asarray(probe.load_image(int(i)).convert("RGB"))
            fm = torch.as_tensor(np.asarray(feats[int(i), ch], dtype=np.float32))[None, None]
            up = F.interpolate(fm, size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            imgs.append(figs.overlay_mask(img, (up > thr).numpy()))
        rows.append((f"unit {u['unit']}\n{u['label']}\nIoU {u['iou']:.2f}", imgs))
    return figs.unit_montage(rows)


# --------------------------------------------------------------------------------------------
# findings
# --------------------------------------------------------------------------------------------
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


def _finding(measure: str, values: dict[str, Any], diff=None, *, higher_is_better: bool = True,
             teacher: str | None = None, models: list[str] | None = None,
             note: str = "") -> dict[str, Any]:
    """One findings row: the ranking of every model and one comparison per pair.

    ``diff(a, b)`` returns ``(mean of a - b, ci_low, ci_high)``. Each comparison names the
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
    for a, b in finding_pairs(names, teacher):
        va, vb = values[a], values[b]
        c: dict[str, Any] = {"a": a, "b": b, "comparison": f"{a} vs {b}", "better": None,
                             "difference": None, "ci_low": None, "ci_high": None,
                             "significant": None}
        d, lo, hi = (diff(a, b) if diff is not None else (None, None, None))
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
    return {"measure": measure, "direction": "higher" if higher_is_better else "lower",
            "values": values, "ranking": order, "best": best, "comparisons": comps,
            "note": note}


def build_findings(summary: dict[str, Any], cfg: CompareConfig,
                   eval_cache: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per measure with its direction (is higher or lower better), the models ranked
    best first, and a comparison for every pair of students and every student against the
    teacher: which model is better and whether the paired 95% CI of the difference excludes 0
    (counts without a resampling CI get ``significant=None``)."""
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
        out.append(_finding("accuracy (eval)", accs,
                            lambda a, b: paired_difference(correct[a], correct[b], seed=seed),
                            teacher=teacher, models=models))
    dis = summary.get("dissection")
    if dis:
        layers = list(dict.fromkeys(lay for m in dis["per_model"].values() for lay in m))
        for lay in layers:
            for key, label in (("detectors", "detector units"),
                               ("unique_concepts", "unique concepts")):
                vals = {m: d[lay][key] for m, d in dis["per_model"].items() if lay in d}
                out.append(_finding(f"{label} ({lay})", vals, teacher=teacher, models=models,
                                    note="count on the probe set; no resampling CI"))
    sim = summary.get("similarity")
    if sim:
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
                        return r["value"], r.get("ci_low"), r.get("ci_high")
                    if r["model"] == f"{b} - {a}":
                        lo, hi = r.get("ci_low"), r.get("ci_high")
                        return -r["value"], (None if hi is None else -hi), (
                            None if lo is None else -lo)
                return None, None, None

            if vals:
                out.append(_finding(label, vals, diff, higher_is_better=hib,
                                    teacher=teacher, models=models))
    att = summary.get("attribution")
    if att:
        for method, part in att["per_method"].items():
            per = part.get("per_image", {})
            for key, label, hib in (
                    ("agreement_spearman", f"{method}: map agreement with teacher", True),
                    ("localisation_energy", f"{method}: energy in class object", True),
                    ("deletion_auc", f"{method}: deletion AUC", False)):
                arrays = {m: np.asarray(v, dtype=np.float64) for m, v in per.get(key, {}).items()}
                if not arrays:
                    continue
                vals = {m: (float(np.nanmean(a)) if np.isfinite(a).any() else None)
                        for m, a in arrays.items()}
                out.append(_finding(label, vals, lambda a, b, arrays=arrays: paired_difference(
                    arrays[a], arrays[b], seed=seed), higher_is_better=hib, teacher=teacher,
                    models=models))
    return out


def run_compare(
    config: CompareConfig,
    out: str | Path,
    *,
    config_text: str | None = None,
    command: str | None = None,
    title: str | None = None,
) -> Path:
    """Run every configured analysis on every model and write the report; returns its path.

    ``DIR/report.html`` (self-contained), ``DIR/summary.json`` (every number of the report),
    and behind them ``DIR/cache/``, ``DIR/dissection/<model>/<layer>/``, ``DIR/similarity/``,
    ``DIR/attribution/<method>/``. Re-running with the same config resumes: complete caches
    and finished stages are reused (see the module docstring).
    """
    return _Run(config, Path(out), config_text, command, title).execute()
