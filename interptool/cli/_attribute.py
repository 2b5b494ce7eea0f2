"""``interptool attribute``: attribution maps of one or more models, their scores and a grid.

Models: ``--arch A [--checkpoint C]`` for one model, and/or ``--model NAME=ARCH[,CHECKPOINT]``
(repeatable) for several; the first model is the reference ("teacher") for agreement. The
shared flags (``--num-classes``, ``--image-size``, ``--mean``, ``--std``, ``--key-map``,
``--trust-pickle``) apply to every model.

Writes to ``--out DIR``: ``attributions.h5`` (one model) or ``<name>/attributions.h5`` (one
folder per model), ``scores.json`` (per model and method: map summary, localisation when the
data set has segmentations, deletion/insertion faithfulness; agreement of every other model
with the first) and ``attributions.png`` (image, then one overlay per model x method).

The ``--n`` images are a seeded class-stratified sample of the data set (``--sample first``:
rows 0..N-1); ``scores.json`` records it under ``sample`` (method, seed, data-set ids, rows).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from interptool.analyzers.attribution import AttributionParams, ScoringParams
from interptool.cli._common import (
    add_common_args,
    add_model_args,
    add_params_arguments,
    load_kwargs,
    out_folder,
    seed_value,
)
from interptool.errors import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "attribute",
        help="attribution maps (saliency, IG, Grad-CAM, ...) with localisation, "
        "faithfulness and teacher-student agreement",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p, required=False)
    p.add_argument("--model", action="append", default=[], metavar="NAME=ARCH[,CHECKPOINT]",
                   help="a named model (repeatable); the first model is the teacher")
    p.add_argument("--data", required=True, help="data set spec (imagefolder:PATH, csv:FILE, "
                   "broden:PATH, builtin:concept-world?n=..)")
    p.add_argument("--method", action="append", default=[],
                   help="attribution method (repeatable): saliency, input_x_gradient, "
                   "integrated_gradients, smoothgrad, guided_backprop, grad_cam, occlusion "
                   "(default: integrated_gradients)")
    p.add_argument("--layer", help="layer for grad_cam, e.g. layer4")
    p.add_argument("--out", required=True, type=out_folder, help="output folder")
    p.add_argument("--n", type=int, default=64,
                   help="images attributed (default 64): a seeded class-stratified sample "
                   "of the data set when it has more (see --sample)")
    p.add_argument("--sample", choices=["stratified", "first"], default="stratified",
                   help="how the N images are chosen: stratified (default; equal shares per "
                   "class, seeded by --seed, ids recorded in scores.json) or first (rows "
                   "0..N-1)")
    p.add_argument("--target", default="label",
                   help="label (default), predicted, or a class index")
    p.add_argument("--steps", type=int, help="integrated gradients steps (default 32)")
    p.add_argument("--baseline", choices=["zeros", "mean", "blur"],
                   help="IG / occlusion reference input (default zeros)")
    # from the registry's AttributionParams, like the compare config's key of the same name;
    # its other fields have flags of their own here (repeatable --method, --steps, ...)
    add_params_arguments(p, AttributionParams, exclude=tuple(
        name for name in AttributionParams.field_names() if name != "internal_batch_size"))
    p.add_argument("--nt-samples", type=int, help="smoothgrad noisy samples (default 10)")
    p.add_argument("--stdevs", type=float, help="smoothgrad noise std, input units (0.15)")
    p.add_argument("--window", type=int, help="occlusion window in pixels (default 8)")
    p.add_argument("--stride", type=int, help="occlusion stride in pixels (default 4)")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="seed for the image sample, smoothgrad and bootstraps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--keep-raw", action="store_true", help="also store (N, C, H, W) maps")
    p.add_argument("--faithfulness-steps", type=int, default=16,
                   help="deletion/insertion steps (0 skips faithfulness)")
    p.add_argument("--patch", type=int, default=8, help="faithfulness patch side in pixels")
    p.add_argument("--faithfulness-baseline", choices=["blur", "mean", "zeros"],
                   default="blur", help="what deleted patches become / insertion starts "
                   "from (default blur)")
    p.add_argument("--masks", metavar="DIR",
                   help="object masks for localisation: DIR/<image id>.png per image "
                   "(non-zero = object, image size); Broden / concept-world data sets use "
                   "their own object masks without this flag")
    p.add_argument("--sanity-n", type=int, default=8,
                   help="images for the model-randomisation sanity check (default 8; 0 "
                   "skips it)")
    p.add_argument("--sanity-top-k", type=int, default=3,
                   help="top-level layers re-initialised, output side first (default 3)")
    p.add_argument("--sanity-threshold", type=float, default=0.5,
                   help="flag a method whose maps keep a Spearman correlation above this "
                   "with the trained model's after randomisation (default 0.5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing maps made with other settings")
    add_common_args(p)
    p.set_defaults(func=run)


def _parse_models(args: argparse.Namespace) -> list[tuple[str | None, str, str | None]]:
    models: list[tuple[str | None, str, str | None]] = []
    if args.arch:
        models.append((None, args.arch, args.checkpoint))
    elif args.checkpoint:
        raise ConfigError("--checkpoint needs --arch (or use --model NAME=ARCH,CHECKPOINT)")
    for spec in args.model:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"--model {spec!r}: expected NAME=ARCH[,CHECKPOINT], e.g. "
                              "--model student=interptool:cw-student,student.safetensors")
        if not _NAME_RE.match(name):
            raise ConfigError(f"--model name {name!r} may only hold letters, digits, '_.-'")
        arch, _, ckpt = rest.partition(",")
        models.append((name, arch, ckpt or None))
    if not models:
        raise ConfigError("no model given: use --arch ARCH [--checkpoint FILE] or "
                          "--model NAME=ARCH[,CHECKPOINT] (repeatable)")
    return models


def _method_params(method: str, args: argparse.Namespace) -> dict[str, Any]:
    from interptool.analyzers.attribution import METHODS

    # --internal-batch-size is not a method parameter: it goes to Attribution.run, which
    # applies it to every method that expands its inputs (occlusion and SmoothGrad too)
    flags = {"steps": args.steps, "baseline": args.baseline, "layer": args.layer,
             "nt_samples": args.nt_samples, "stdevs": args.stdevs, "window": args.window,
             "stride": args.stride, "seed": args.seed}
    defaults = METHODS[method].defaults
    return {k: v for k, v in flags.items() if v is not None and k in defaults}


def _target(value: str) -> str | int:
    if value in ("label", "predicted"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--target {value!r}: expected label, predicted or a class index"
                          ) from None


def run(args: argparse.Namespace) -> int:
    from interptool.analyzers.attribution import get_method

    # validate everything cheap before loading models or data
    methods = args.method or ["integrated_gradients"]
    for m in methods:
        get_method(m, _method_params(m, args) if m in _known() else {})
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--method given twice: {methods}")
    models = _parse_models(args)
    target = _target(args.target)
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    # the scoring flags, checked before any attribution runs (--sanity-threshold 2 was found
    # only after every map had been computed)
    ScoringParams(**{k: getattr(args, k) for k in ScoringParams.field_names()})
    # checked by its Params field (>= 1), as the compare config's key is
    internal_batch_size = AttributionParams(
        internal_batch_size=args.internal_batch_size).internal_batch_size

    from interptool._provenance import output_lock
    from interptool.data import open_dataset

    dataset = open_dataset(args.data)
    out = Path(args.out)
    # held for the whole run, before anything under OUT is opened, resumed or replaced;
    # resolved so that `--out .` has a name to lock
    with output_lock(out.resolve(), fix="choose another --out"):
        return _run_locked(args, dataset, out, models, methods, target, internal_batch_size)


def _run_locked(args: argparse.Namespace, dataset: Any, out: Path,
                models: list[tuple[str | None, str, str | None]], methods: list[str],
                target: str | int, internal_batch_size: int | None) -> int:
    import numpy as np

    from interptool._provenance import atomic_write_text, provenance
    from interptool.analyzers.attribution import (
        Attribution,
        ObjectMasks,
        faithfulness_batch,
        folder_masks,
        randomisation_check,
        score_maps,
        stratified_sample,
    )
    from interptool.common.jsonsafe import to_jsonable
    from interptool.loading import load_model

    out.mkdir(parents=True, exist_ok=True)
    kw = load_kwargs(args)
    loaded_models = []
    for name, arch, ckpt in models:
        loaded = load_model(arch, **{**kw, "checkpoint": ckpt})
        loaded_models.append((name or loaded.name, loaded))
    names = [n for n, _ in loaded_models]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names repeat ({', '.join(names)}); name them with "
                          "--model NAME=ARCH[,CHECKPOINT]")

    broden = hasattr(dataset, "load_segmentation")
    n = min(args.n, len(dataset))
    # the rows Attribution.run will attribute (the same for every model and method)
    rows = (stratified_sample(dataset.labels, n, args.seed)
            if args.sample == "stratified" and n < len(dataset) else np.arange(n))
    if args.masks:  # every mask present and of its image's size, before any model runs
        folder_masks(args.masks, dataset, [int(r) for r in rows], size=(1, 1))
    results: dict[str, dict[str, Any]] = {}
    scores: dict[str, Any] = {"models": {}, "agreement": {},
                              "teacher": names[0], "methods": methods, "target": target,
                              "data": args.data}
    display = None
    # masks must stay aligned with the pixels: no crop when masks are scored
    with_masks = bool(broden or args.masks)
    inputs_of = {}
    # every model's and method's settings that depend on the model or its input size (a
    # Grad-CAM layer without spatial maps, an occlusion window larger than the image), before
    # the first method runs: a late failure would waste the maps made before it
    for _, loaded in loaded_models:
        pre = loaded.preprocessing
        tds = dataset.torch_dataset(pre.probe_transform() if with_masks else pre.eval_transform())
        shape = tuple(_inputs(tds, rows[:1]).shape[1:])
        for m in methods:
            Attribution(m, **_method_params(m, args)).check(loaded, shape, device=args.device)
    for name, loaded in loaded_models:
        folder = out if len(loaded_models) == 1 else out / name
        pre = loaded.preprocessing
        transform = pre.probe_transform() if with_masks else pre.eval_transform()
        tds = dataset.torch_dataset(transform)
        inputs_of[name] = tds
        results[name] = {}
        for m in methods:
            attr = Attribution(m, keep_raw=args.keep_raw, **_method_params(m, args))
            results[name][m] = attr.run(loaded, dataset, n=n, batch_size=args.batch_size,
                                        target=target, device=args.device, out=folder,
                                        overwrite=args.overwrite, transform=transform,
                                        keep_images=0, sample=args.sample,
                                        sample_seed=args.seed,
                                        internal_batch_size=internal_batch_size)
            if not np.array_equal(results[name][m].indices, rows):  # one sample for all
                raise AssertionError("attribution sample differs from the planned rows")
        if display is None:
            display = _inputs(tds, rows[:8])
    # one scoring path with compare: agreement, localisation, deletion and insertion
    masks_by_size: dict[tuple[int, int], ObjectMasks] = {}

    def masks(size: tuple[int, int], scored: np.ndarray) -> ObjectMasks:
        if size not in masks_by_size:
            masks_by_size[size] = ObjectMasks(dataset, size, scored, folder=args.masks)
        return masks_by_size[size]

    teacher = names[0]
    per_method = {m: score_maps(
        {name: results[name][m] for name in names}, teacher=teacher,
        models={name: lm.model for name, lm in loaded_models},
        inputs=lambda name, r: _inputs(inputs_of[name], r),
        masks=masks if with_masks else None, modes=("deletion", "insertion"),
        patch=args.patch, steps=args.faithfulness_steps,
        baseline=args.faithfulness_baseline,
        batch_size=faithfulness_batch(internal_batch_size, args.batch_size),
        device=args.device, seed=args.seed, label=m) for m in methods}
    for name, loaded in loaded_models:
        model_scores: dict[str, Any] = {"model": loaded.to_dict(), "methods": {}}
        for m in methods:
            entry: dict[str, Any] = {"summary": results[name][m].to_dict()}
            if name in per_method[m]["localisation"]:
                entry["localisation"] = per_method[m]["localisation"][name]
            if name in per_method[m]["faithfulness"]:
                entry["faithfulness"] = per_method[m]["faithfulness"][name]
            # per-image scores by data-set id (the images of scores["sample"], in order)
            entry["per_image"] = {"ids": list(results[name][m].ids), **{
                measure: by_model[name] for measure, by_model in
                per_method[m]["per_image"].items() if name in by_model}}
            model_scores["methods"][m] = entry
        if args.sanity_n > 0:
            k = min(args.sanity_n, n)
            first = results[name][methods[0]]
            attrs = [Attribution(m, **_method_params(m, args)) for m in methods]
            model_scores["randomisation"] = randomisation_check(
                loaded.model, attrs, _inputs(inputs_of[name], rows[:k]), first.targets[:k],
                top_k=args.sanity_top_k, threshold=args.sanity_threshold, seed=args.seed,
                device=args.device, batch_size=args.batch_size,
                internal_batch_size=internal_batch_size).to_dict()
        scores["models"][name] = model_scores
    # how the images were chosen, with the data-set ids scored (issue 10)
    scores["sample"] = per_method[methods[0]]["sample"]
    for name in names[1:]:
        scores["agreement"][f"{teacher} vs {name}"] = {
            m: per_method[m]["agreement"][name] for m in methods}
    scores["provenance"] = provenance(seed=args.seed)
    atomic_write_text(out / "scores.json", json.dumps(to_jsonable(scores), indent=2,
                                                      default=str))
    _grid(out / "attributions.png", display, results, names, methods,
          getattr(dataset, "class_names", None))
    if not args.quiet:
        print(f"wrote {out / 'scores.json'}, {out / 'attributions.png'} and "
              f"{'attributions.h5' if len(names) == 1 else '<model>/attributions.h5'}")
        for name in names:
            for m in methods:
                e = scores["models"][name]["methods"][m]
                parts = [f"{name:>14s} {m:<22s}"]
                if "localisation" in e:
                    parts.append(f"energy-in-mask {_num(e['localisation']['energy']['mean'])}")
                if "faithfulness" in e:
                    parts.append(f"deletion AUC {_num(e['faithfulness']['deletion']['auc']['mean'])}"
                                 f" insertion AUC "
                                 f"{_num(e['faithfulness']['insertion']['auc']['mean'])}")
                print("  ".join(parts))
            if "randomisation" in scores["models"][name]:
                flagged = [m for m, f in scores["models"][name]["randomisation"]["flagged"]
                           .items() if f]
                print(f"{name:>14s} sanity check (top {args.sanity_top_k} layers randomised): "
                      f"{'flagged ' + ', '.join(flagged) if flagged else 'all methods pass'}")
    return 0


def _num(value: float | None) -> str:
    # a score is None when no row could be scored, e.g. every map is zero (Grad-CAM on a
    # token model's last block, whose patch tokens never reach the head)
    return "n/a" if value is None else f"{value:.3f}"


def _inputs(tds, rows):
    """Model inputs of the data-set ``rows`` (the rows the maps were computed on)."""
    import torch

    return torch.stack([torch.as_tensor(tds[int(i)][0]) for i in rows])


def _known() -> set[str]:
    from interptool.analyzers.attribution import METHODS

    return set(METHODS)


def _grid(path: Path, images, results, names, methods, class_names=None) -> None:
    """Rows = images; columns = the image (titled with its id and label), then one overlay
    per (model, method), each marked with that model's prediction."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from interptool._provenance import atomic_savefig
    from interptool.analyzers.attribution import display_images

    shown = display_images(images)
    k = len(shown)
    first = results[names[0]][methods[0]]

    def cls(c: int) -> str:
        if class_names and 0 <= c < len(class_names):
            return str(class_names[c])
        return str(c)

    maps = {(nm, m): np.asarray(results[nm][m].maps[:k]) for nm in names for m in methods}
    cols = 1 + len(names) * len(methods)
    fig, axes = plt.subplots(k, cols, figsize=(1.6 * cols, 1.75 * k + 0.5), squeeze=False)
    for r in range(k):
        img = shown[r].squeeze()
        gray = "gray" if shown[r].shape[-1] == 1 else None
        axes[r, 0].imshow(img, cmap=gray)
        lab = int(first.labels[r])
        axes[r, 0].set_title(f"{first.ids[r][-16:]}\n"
                             f"{'label ' + cls(lab) if lab >= 0 else 'unlabelled'}",
                             fontsize=6)
        c = 1
        for name in names:
            for m in methods:
                res = results[name][m]
                axes[r, c].imshow(img, cmap=gray)
                axes[r, c].imshow(maps[(name, m)][r], cmap="jet", alpha=0.5)
                # what the model predicted and which class the map explains
                axes[r, c].text(1, 1, f"pred {cls(int(res.predictions[r]))}\n"
                                f"tgt {cls(int(res.targets[r]))}", fontsize=5, va="top",
                                ha="left", transform=axes[r, c].transData,
                                bbox=dict(facecolor="white", alpha=0.7, lw=0, pad=0.5))
                if r == 0:
                    axes[r, c].set_title(f"{name}\n{m}", fontsize=7)
                c += 1
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    # atomic: a run killed while writing never leaves a torn attributions.png
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
