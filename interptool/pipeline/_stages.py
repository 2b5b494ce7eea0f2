"""The stages of ``run_compare``, one function each, in the order they run.

1. :func:`load_models`: every model (cheap) and the data sets; layer names checked first;
2. :func:`build_caches`: logits (+ CKA layers) on the eval set and the dissection layers on
   the probe set, under ``DIR/cache/<model>_<eval|probe>.h5``;
3. :func:`models_table`, then :func:`dissection`, :func:`similarity` (with CKA) and
   :func:`attribution`: each analysis through the analyzers' public API, its payload stored
   as a resumable stage marker (:class:`~interptool.pipeline._stage_cache.StageCache`), its
   report section built by :mod:`interptool.report`.

Analyzers are imported inside the stages: ``interptool.pipeline`` stays light to import, and
tests can replace an analyzer on its package to simulate a crash.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from interptool._progress import say
from interptool._provenance import seed_everything
from interptool.common.layers import lookup_layer
from interptool.errors import AnalysisError, ConfigError, InterptoolError
from interptool.pipeline._context import RunContext
from interptool.pipeline._stage_cache import cache_identity
from interptool.report import (
    attribution_section,
    similarity_section,
)
from interptool.report import figures as figs


# --------------------------------------------------------------------------------------------
# 1. models and data
# --------------------------------------------------------------------------------------------
def load_models(run: RunContext) -> None:
    """Load every model and open the data sets; config errors before any caching."""
    from interptool.data import open_dataset
    from interptool.loading import load_model

    cfg = run.cfg
    for m in cfg.models.values():
        say(f"loading model {m.name} ({m.arch})")
        try:
            loaded = load_model(m.arch, **m.load_kwargs(run.device))
        except InterptoolError as exc:
            # say which table of the config the failing model comes from
            raise ConfigError(
                f"{cfg.source}: models.{m.name} (arch {m.arch!r}, checkpoint "
                f"{m.checkpoint}): {exc}"
            ) from None
        _check_layers(cfg.source, m, loaded)
        run.loaded[m.name] = loaded
    from interptool.pipeline._validate import validate_analyses

    validate_analyses(run)  # every analysis against every model, before any caching
    if cfg.data.eval:
        run.eval_ds = open_dataset(cfg.data.eval)
    if cfg.data.probe and cfg.analysis.dissection is not None:
        run.probe_ds = open_dataset(cfg.data.probe)
        from interptool.analyzers import get_analyzer

        # categories the probe lacks: named here, before caching (found after it before)
        get_analyzer("dissection").params_from_config(cfg.analysis.dissection).check_probe(
            run.probe_ds, where=f"{cfg.source}: analysis.dissection")
    if run.eval_ds is not None:
        ks = {n: lm.num_classes for n, lm in run.loaded.items()}
        if len(set(ks.values())) > 1:
            raise ConfigError(
                f"{cfg.source}: models: the models have different numbers of classes "
                f"({ks}); class similarity and attribution need one label space "
                "(set num_classes, or compare models trained on the same classes)"
            )
        _check_eval_classes(run, next(iter(ks.values())))


def _check_eval_classes(run: RunContext, k: int) -> None:
    """The eval labels must be the models' output indices: a data set that names another
    number of classes (an image folder with other class folders, another version of a
    built-in set), or labels past the models' outputs, would give accuracy and class
    similarity against the wrong classes, so it stops here, before any caching."""
    import numpy as np

    ds = run.eval_ds
    names = getattr(ds, "class_names", None)
    labels = np.asarray(getattr(ds, "labels", []))
    spec = getattr(ds, "spec", run.cfg.data.eval)
    if names is not None and len(names) != k:
        shown = ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"{run.cfg.source}: data.eval: {spec} has {len(names)} classes ({shown}) but the "
            f"models output {k}; the eval labels must be the models' class indices (an image "
            "folder's classes are its sub-folders in sorted order): give the data set the "
            "models were trained on")
    if labels.size and (labels < 0).all() and run.cfg.analysis.similarity is not None:
        raise ConfigError(
            f"{run.cfg.source}: data.eval: {spec} has no labels; class similarity compares "
            "the models' logits class by class and needs each image's true class: give a "
            "labelled data set (imagefolder:, csv: with a label column), or set "
            "[analysis] similarity = false")
    if labels.size and int(labels.max()) >= k:
        raise ConfigError(
            f"{run.cfg.source}: data.eval: {spec} has label {int(labels.max())} but the models "
            f"output {k} classes (0..{k - 1}); give the data set the models were trained on")


def _check_layers(source: str, m: Any, loaded: Any) -> None:
    """Unknown layer names are config errors, found before any caching starts."""
    import torch

    if not m.layers:
        return
    if isinstance(loaded.model, torch.jit.ScriptModule):
        raise ConfigError(
            f"{source}: models.{m.name}.layers: a TorchScript model has no "
            "hookable layers; remove 'layers' (class similarity still works from logits)"
        )
    for layer in m.layers:
        lookup_layer(loaded.model, layer, error=ConfigError,
                     where=f"{source}: models.{m.name}.layers: ")


# --------------------------------------------------------------------------------------------
# 2. caches
# --------------------------------------------------------------------------------------------
def _cache(run: RunContext, loaded: Any, dataset: Any, layers: list[str], path: Path,
           **kw: Any) -> Path:
    """Resume, never wipe: :func:`~interptool.pipeline._caches.cache_or_resume` (a cache made
    with other settings goes to a new file unless the user passed ``--overwrite``; any other
    cache fault stops the run and keeps the partial file)."""
    from interptool.pipeline._caches import cache_or_resume

    return cache_or_resume(loaded, dataset, layers, path, overwrite=run.overwrite, **kw)


def build_caches(run: RunContext) -> None:
    """Cache every model on the eval set (logits, CKA layers) and the probe set."""
    r = run.cfg.run
    eval_layers = _eval_needs_layers(run)
    for name, m in run.cfg.models.items():
        lm = run.loaded[name]
        if run.eval_ds is not None:
            layers = m.layers if eval_layers else []
            path = run.out / "cache" / f"{name}_eval.h5"
            say(f"cache {name} on eval data ({len(run.eval_ds)} images)")
            run.eval_cache[name] = _cache(
                run, lm, run.eval_ds, layers, path, batch_size=r.batch_size, workers=r.workers,
                probe=False, seed=r.seed, device=run.device)
        if run.probe_ds is not None:
            path = run.out / "cache" / f"{name}_probe.h5"
            say(f"cache {name} on probe data ({len(run.probe_ds)} images)")
            run.probe_cache[name] = _cache(
                run, lm, run.probe_ds, run.dissect_layers(name), path, batch_size=r.batch_size,
                workers=r.workers, probe=True, seed=r.seed, device=run.device)


def _eval_needs_layers(run: RunContext) -> bool:
    """Whether an enabled analysis reads layers from the eval caches (CKA, or a registered
    analyzer that declared ``needs="eval", needs_layers=True``)."""
    from interptool.analyzers import get_analyzer

    sim = run.cfg.analysis.similarity
    if sim is not None and sim.cka:
        return True
    return any(get_analyzer(n).needs == "eval" and get_analyzer(n).needs_layers
               and n not in BUILTIN_STAGES for n in run.cfg.analysis.enabled())


# --------------------------------------------------------------------------------------------
# 3. models table and analyses
# --------------------------------------------------------------------------------------------
def models_table(run: RunContext) -> list[dict[str, Any]]:
    """One row per model: architecture, size, checkpoint, preprocessing, eval accuracy."""
    from interptool.cache import ActivationCache
    from interptool.common.stats import wilson_interval

    teacher = run.cfg.teacher.name
    rows = []
    for name, m in run.cfg.models.items():
        lm = run.loaded[name]
        row: dict[str, Any] = {
            "name": name,
            "role": "teacher" if name == teacher else "student",
            "arch": m.arch,
            "params": int(sum(p.numel() for p in lm.model.parameters())),
            "checkpoint": m.checkpoint,
            "checkpoint_sha256": lm.checkpoint_sha256,
            "model_kwargs": dict(lm.model_kwargs),
            "num_classes": lm.num_classes,
            "layers": m.layers,
            "preprocessing": lm.preprocessing.to_dict(),
            "accuracy": None,
            "accuracy_ci": None,
        }
        if name in run.eval_cache:
            with ActivationCache(run.eval_cache[name]) as c:
                ok = c.labels >= 0
                n = int(ok.sum())
                k = int((c.logits[ok].argmax(1) == c.labels[ok]).sum())
            if n:
                row["accuracy"] = k / n
                ci = wilson_interval(k, n)
                row["accuracy_ci"] = [ci.low, ci.high]
                row["n_labelled"] = n
        rows.append(row)
    return rows


def dissection(run: RunContext) -> dict[str, Any]:
    """Dissect every model's layers and the random-init controls under one protocol, with
    bootstrap intervals and paired differences (:mod:`interptool.pipeline._dissect`)."""
    from interptool.pipeline._dissect import dissection_stage

    return dissection_stage(run)


def similarity(run: RunContext) -> dict[str, Any]:
    """Class-similarity transfer from the teacher to every student, and CKA."""
    s = run.cfg.analysis.similarity
    assert s is not None
    inputs = {"settings": asdict(s), "seed": run.cfg.run.seed,
              "caches": {n: cache_identity(p) for n, p in run.eval_cache.items()}}
    part, reused = run.stages.run("similarity", inputs, lambda: _similarity_work(run))
    if reused:
        say("class similarity: done earlier, reused")
    return similarity_section(part, run.figures)


def _similarity_work(run: RunContext) -> dict[str, Any]:
    # the package attribute, looked up at call time (tests replace it to simulate a crash)
    from interptool.analyzers import get_analyzer
    from interptool.analyzers import similarity as similarity_pkg
    from interptool.analyzers.similarity import cluster_order
    from interptool.cache import ActivationCache

    s = run.cfg.analysis.similarity
    p = get_analyzer("similarity").params_from_config(s, device=run.device,
                                                      seed=run.cfg.run.seed)
    teacher = run.cfg.teacher.name
    students = [m.name for m in run.cfg.students]
    say("class similarity")
    caches = [ActivationCache(run.eval_cache[n]) for n in [teacher, *students]]
    try:
        if not students:
            raise AnalysisError("class similarity transfer needs at least one student")
        res = similarity_pkg.compare_similarity(
            caches[0], *caches[1:], names=[teacher, *students], temperature=p.temperatures,
            n_boot=p.n_boot, seed=p.seed, matrix=p.matrix, ci=p.ci, device=p.device,
            k=p.k if p.k is not None else min(5, max(1, caches[0].logits.shape[1] - 1)))
        written = res.save(run.out / "similarity")
        t0 = res.temperatures[0]
        names = res.similarity[teacher].class_names
        order = cluster_order(res.similarity[teacher].matrices[t0])
        part: dict[str, Any] = {
            "temperatures": res.temperatures,
            "estimates": res.to_frame().to_dict(orient="records"),
            "models": {m: res.similarity[m].summary() for m in res.models},
            "class_names": names,
            "order": order,
            "heatmaps": [],
        }
        # the analyzer's own figures (one per temperature, in order): every model's S in the
        # teacher's clustered class order, one colour scale, diagonal hidden
        heat = [q for q in written if q.name.startswith("heatmaps_T")]
        for t, q in zip(res.temperatures, heat):
            part["heatmaps"].append({"T": t, "path": str(q.relative_to(run.out))})
        # CKA needs layers: models without any (TorchScript) are left out of it
        if s.cka and run.cfg.teacher.layers and any(m.layers for m in run.cfg.students):
            part["cka"] = _cka(run, caches)
        return part
    finally:
        for c in caches:
            c.close()


def _cka(run: RunContext, caches: list[Any]) -> dict[str, Any]:
    """Linear CKA of the teacher's layers (rows) against each student's (columns)."""
    from interptool.analyzers.cka import cka

    teacher = run.cfg.teacher
    names = [teacher.name, *[m.name for m in run.cfg.students]]
    rows, blocks, cols = [], [], []
    labels_r = [f"{teacher.name}.{lay}" for lay in teacher.layers]
    for c, n in zip(caches[1:], names[1:]):
        m = run.cfg.models[n]
        if not m.layers:
            say(f"CKA {teacher.name} vs {n}: skipped ({n} has no hookable layers)")
            continue
        say(f"CKA {teacher.name} vs {n}")
        res = cka(caches[0], c, teacher.layers, m.layers)
        mat = res.matrix.to_numpy(dtype=np.float64)
        blocks.append(mat)
        cols += [f"{n}.{lay}" for lay in m.layers]
        for i, la in enumerate(teacher.layers):
            for j, lb in enumerate(m.layers):
                rows.append({"teacher layer": la, "student": n, "student layer": lb,
                             "cka": float(mat[i, j])})
    full = np.concatenate(blocks, axis=1)
    rel = "similarity/cka.png"
    figs.save_png(figs.cka_matrix(full, labels_r, cols), run.out / rel)
    return {"rows": rows, "matrix": full, "row_labels": labels_r, "col_labels": cols,
            "figure": rel}


def attribution_settings(a: Any) -> dict[str, Any]:
    """The attribution config as its stage key sees it. Settings added later are left out at
    their default, so the stages of runs made before them are still reused."""
    settings = asdict(a)
    if settings.get("internal_batch_size") is None:
        settings.pop("internal_batch_size", None)
    return settings


def _model_identity(name: str, loaded: Any) -> Any:
    """What an attribution stage's maps depend on of one model: its checkpoint's checksum
    (the name for a random initialisation), with the constructor arguments when any were
    given (the same key as before model_kwargs existed when none were)."""
    ident = loaded.checkpoint_sha256 or name
    return [ident, dict(loaded.model_kwargs)] if loaded.model_kwargs else ident


def attribution(run: RunContext) -> dict[str, Any]:
    """Attribution maps per method and model, scored against the teacher's."""
    a = run.cfg.analysis.attribution
    assert a is not None and run.eval_ds is not None
    n = min(a.n_images, len(run.eval_ds))
    per_method: dict[str, Any] = {}
    from interptool._resources import thread_scope

    # one torch-thread choice (only the cores idle now) for every method, model and score of
    # the stage: many small forward/backward passes, slower on threads that wait for busy cores
    with thread_scope():
        for method in a.methods:
            inputs = {"settings": attribution_settings(a), "method": method, "n": n,
                      "seed": run.cfg.run.seed,
                      "models": {k: _model_identity(k, v) for k, v in run.loaded.items()},
                      "data": run.eval_ds.fingerprint}
            part, reused = run.stages.run(f"attribution-{method}", inputs,
                                          lambda method=method: _attribute(run, method, n))
            if reused:
                say(f"attribution {method}: done earlier, reused")
            per_method[method] = part
    section = attribution_section(per_method, run.figures)
    # how the images were chosen (seed, data-set ids): the same for every method and model
    first = next(iter(per_method.values()), {})
    if first.get("sample"):
        smp = section["sample"] = first["sample"]
        how = {"stratified": f"a class-stratified sample (seed {smp['seed']}) of",
               "first": "the first", "all": "all"}.get(smp["method"], "")
        section["intro"] = (f"Attribution maps of {how} {smp['n']} of {smp['of']} eval images "
                            "for every model (the same images for every model; ids in "
                            "summary.json, attribution.sample).")
    return section


def _attribute(run: RunContext, method: str, n: int) -> dict[str, Any]:
    from interptool.analyzers.attribution import Attribution

    a = run.cfg.analysis.attribution
    results = {}
    for name in run.cfg.models:
        say(f"attribution {method} {name} ({n} images)")
        params: dict[str, Any] = {}
        if method == "grad_cam":
            from interptool.pipeline._validate import gradcam_layer

            params["layer"] = gradcam_layer(run, name)[0]
        elif method == "integrated_gradients":
            params["steps"] = a.n_steps
        seed_everything(run.cfg.run.seed)
        # a seeded class-stratified sample (issue 10), the same rows for every model
        results[name] = Attribution(method, **params).run(
            run.loaded[name], run.eval_ds, n=n, batch_size=min(16, n),
            device=run.device, out=run.out / "attribution" / method / name,
            keep_images=min(n, 8), overwrite=True, sample=a.sample,
            sample_seed=run.cfg.run.seed,
            # None: batch_size rows per pass (Attribution.run's default bound)
            internal_batch_size=a.internal_batch_size)
    return _score_attribution(run, method, results, n)


def _score_attribution(run: RunContext, method: str, results: dict[str, Any], n: int) -> dict:
    import pandas as pd

    from interptool.analyzers.attribution import ObjectMasks, faithfulness_batch, score_maps

    a = run.cfg.analysis.attribution
    seed = run.cfg.run.seed
    teacher = run.cfg.teacher.name
    d = run.out / "attribution" / method
    by_size: dict[tuple[int, int], ObjectMasks] = {}

    def object_masks(size: tuple[int, int], rows: Any) -> ObjectMasks:
        if size not in by_size:
            by_size[size] = ObjectMasks(run.eval_ds, size, rows)
        return by_size[size]

    masks = object_masks if hasattr(run.eval_ds, "load_segmentation") else None
    if masks is not None:
        try:  # a data set without class objects: localisation is left out, said once
            masks(tuple(int(v) for v in results[teacher].maps.shape[1:]),
                  results[teacher].indices)[0:1]
        except AnalysisError as exc:
            say(f"localisation skipped: {exc}")
            masks = None
    # the same scoring path as `interptool attribute`: deletion and insertion
    out = score_maps(results, teacher=teacher,
                     models={name: run.loaded[name].model for name in results},
                     inputs=lambda name, rows: _model_inputs(run, name, rows),
                     masks=masks, modes=("deletion", "insertion") if a.faithfulness else (),
                     # rows per model call of the curves: the config's internal batch, else
                     # derived from [run] batch_size as `interptool attribute` derives it
                     # from --batch-size (a fixed 64 ignored the run's batch size)
                     batch_size=faithfulness_batch(a.internal_batch_size,
                                                   run.cfg.run.batch_size),
                     device=run.device, seed=seed, out=d,
                     # the report draws these scores itself; a PNG per score result cost the
                     # demo ~20 s of matplotlib for files no page shows (CSV and JSON stay)
                     figures=False)
    # image grid: the same images across models
    first = results[teacher]
    if first.images is not None:
        k = min(6, n, len(first.images))
        fig = figs.attribution_grid(
            [first.images[i] for i in range(k)], {m: r.maps[:k] for m, r in results.items()},
            # class names where the eval set has them (a bare index means little)
            row_titles=[run.class_name(int(x)) for x in first.labels[:k]],
            title=f"{method}: the same eval images across models (row label: class)")
        rel = f"attribution/{method}/grid.png"
        figs.save_png(fig, run.out / rel)
        out["grid"] = rel
    pd.DataFrame({m: r.predictions for m, r in results.items()}).to_csv(
        d / "predictions.csv", index=False)
    return out


def _model_inputs(run: RunContext, name: str, rows: Any):
    """Model ``name``'s inputs for the eval data-set ``rows`` (the transform its maps used)."""
    import torch

    pre = run.loaded[name].preprocessing
    tf = pre.probe_transform() if hasattr(run.eval_ds, "load_segmentation") \
        else pre.eval_transform()
    return torch.stack([tf(run.eval_ds.load_image(int(i))) for i in rows])


# --------------------------------------------------------------------------------------------
# any other registered analyzer: one generic, resumable stage keyed by its name
# --------------------------------------------------------------------------------------------
#: analyses with a stage of their own above; every other registered analysis in the config
#: runs through :func:`generic_stage`
BUILTIN_STAGES = ("dissection", "similarity", "attribution")


def generic_stage(run: RunContext, name: str) -> dict[str, Any]:
    """Run a registered analyzer through its ``analyze(inputs, params)`` on every model
    (teacher first), save each result under ``DIR/<name>/<models>/`` and build its section.

    The stage marker is ``.stages/<name>.json``; its key covers the settings and the caches.
    """
    from interptool.analyzers import AnalysisInputs, get_analyzer
    from interptool.cache import ActivationCache
    from interptool.common.jsonsafe import to_jsonable
    from interptool.report import generic_section

    spec = get_analyzer(name)
    settings = getattr(run.cfg.analysis, name)
    params = spec.params_from_config(settings, device=run.device, seed=run.cfg.run.seed)
    paths = run.probe_cache if spec.needs == "probe" else run.eval_cache
    names = [run.cfg.teacher.name, *[m.name for m in run.cfg.students]]
    inputs_key = {"settings": asdict(settings), "seed": run.cfg.run.seed,
                  "caches": {n: cache_identity(paths[n]) for n in names}}

    def work() -> dict[str, Any]:
        say(f"{name}")
        caches = [ActivationCache(paths[n]) for n in names]
        try:
            inputs = AnalysisInputs(
                names=names, caches=caches, layers=[run.cfg.models[n].layers for n in names],
                dataset=run.probe_ds if spec.needs == "probe" else run.eval_ds,
                models=[run.loaded[n] for n in names] if spec.needs_model else None,
                device=run.device, seed=run.cfg.run.seed)
            results = spec.analyze_fn()(inputs, params)
            results = results if isinstance(results, (list, tuple)) else [results]
            parts = []
            for i, res in enumerate(results):
                folder = Path(name) / ("_vs_".join(res.names) or str(i + 1))
                written = res.save(run.out / folder)
                parts.append({
                    "names": list(res.names), "summary": res.summary(),
                    "rows": to_jsonable(res.to_frame().to_dict(orient="records")),
                    "figures": [str(p.relative_to(run.out)) for p in written
                                if p.suffix == ".png"]})
            return {"params": params.to_dict(), "results": parts}
        finally:
            for c in caches:
                c.close()

    part, reused = run.stages.run(name, inputs_key, work)
    if reused:
        say(f"{name}: done earlier, reused")
    return generic_section(spec.title, spec.summary, part, run.figures, key=name)

