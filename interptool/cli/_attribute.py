"""``interptool attribute``: attribution maps of one or more models, their scores and a grid.

Models: ``--arch A [--checkpoint C]`` for one model, and/or ``--model NAME=ARCH[,CHECKPOINT]``
(repeatable) for several; the first model is the reference ("teacher") for agreement. The
shared flags (``--num-classes``, ``--image-size``, ``--mean``, ``--std``, ``--key-map``,
``--trust-pickle``) apply to every model.

Writes to ``--out DIR``: ``attributions.h5`` (one model) or ``<name>/attributions.h5`` (one
folder per model), ``scores.json`` (per model and method: map summary, localisation when the
data set has segmentations, deletion/insertion faithfulness; agreement of every other model
with the first) and ``attributions.png`` (image, then one overlay per model x method).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from interptool.cli._common import add_common_args, add_model_args, model_kwargs
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
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=64, help="first N images (default 64)")
    p.add_argument("--target", default="label",
                   help="label (default), predicted, or a class index")
    p.add_argument("--steps", type=int, help="integrated gradients steps (default 32)")
    p.add_argument("--baseline", choices=["zeros", "mean", "blur"],
                   help="IG / occlusion reference input (default zeros)")
    p.add_argument("--internal-batch-size", type=int, help="IG inputs per forward pass")
    p.add_argument("--nt-samples", type=int, help="smoothgrad noisy samples (default 10)")
    p.add_argument("--stdevs", type=float, help="smoothgrad noise std, input units (0.15)")
    p.add_argument("--window", type=int, help="occlusion window in pixels (default 8)")
    p.add_argument("--stride", type=int, help="occlusion stride in pixels (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed for smoothgrad and bootstraps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--keep-raw", action="store_true", help="also store (N, C, H, W) maps")
    p.add_argument("--faithfulness-steps", type=int, default=16,
                   help="deletion/insertion steps (0 skips faithfulness)")
    p.add_argument("--patch", type=int, default=8, help="faithfulness patch side in pixels")
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
    from interptool.analyzers._attribution_methods import METHODS

    flags = {"steps": args.steps, "baseline": args.baseline,
             "internal_batch_size": args.internal_batch_size, "layer": args.layer,
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
    import torch

    from interptool._provenance import atomic_write_text, provenance
    from interptool.analyzers._attribution_methods import get_method
    from interptool.analyzers._attribution_scores import _jsonable
    from interptool.analyzers.attribution import (
        Attribution,
        agreement,
        class_object_masks,
        faithfulness,
        localisation,
    )

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

    from interptool.data import open_dataset
    from interptool.loading import load_model

    dataset = open_dataset(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = model_kwargs(args)
    loaded_models = []
    for name, arch, ckpt in models:
        loaded = load_model(arch, **{**kw, "checkpoint": ckpt})
        loaded_models.append((name or loaded.name, loaded))
    names = [n for n, _ in loaded_models]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names repeat ({', '.join(names)}); name them with "
                          "--model NAME=ARCH[,CHECKPOINT]")

    broden = hasattr(dataset, "load_segmentation")
    results: dict[str, dict[str, Any]] = {}
    scores: dict[str, Any] = {"models": {}, "agreement": {},
                              "teacher": names[0], "methods": methods, "target": target,
                              "data": args.data}
    masks = None
    display = None
    for name, loaded in loaded_models:
        folder = out if len(loaded_models) == 1 else out / name
        pre = loaded.preprocessing
        transform = pre.probe_transform() if broden else pre.eval_transform()
        n = min(args.n, len(dataset))
        tds = dataset.torch_dataset(transform)
        images = torch.stack([torch.as_tensor(tds[i][0]) for i in range(n)])
        results[name] = {}
        model_scores: dict[str, Any] = {"model": loaded.to_dict(), "methods": {}}
        for m in methods:
            attr = Attribution(m, keep_raw=args.keep_raw, **_method_params(m, args))
            res = attr.run(loaded, dataset, n=n, batch_size=args.batch_size, target=target,
                           device=args.device, out=folder, overwrite=args.overwrite)
            results[name][m] = res
            entry: dict[str, Any] = {"summary": res.to_dict()}
            if broden:
                if masks is None:
                    masks = class_object_masks(dataset, range(n), size=res.maps.shape[1:])
                entry["localisation"] = localisation(res, masks, seed=args.seed).to_dict()
            if args.faithfulness_steps > 0:
                entry["faithfulness"] = {
                    mode: faithfulness(loaded.model, images, res.maps, res.targets,
                                       mode=mode, patch=args.patch,
                                       steps=args.faithfulness_steps,
                                       batch_size=max(args.batch_size, 32),
                                       device=args.device, ids=res.ids,
                                       seed=args.seed).to_dict()
                    for mode in ("deletion", "insertion")}
            model_scores["methods"][m] = entry
        scores["models"][name] = model_scores
        if display is None:
            display = images[:8]
    teacher = names[0]
    for name in names[1:]:
        scores["agreement"][f"{teacher} vs {name}"] = {
            m: agreement(results[teacher][m], results[name][m], seed=args.seed).to_dict()
            for m in methods}
    scores["provenance"] = provenance(seed=args.seed)
    atomic_write_text(out / "scores.json", json.dumps(_jsonable(scores), indent=2,
                                                      default=str))
    _grid(out / "attributions.png", display, results, names, methods)
    if not args.quiet:
        print(f"wrote {out / 'scores.json'}, {out / 'attributions.png'} and "
              f"{'attributions.h5' if len(names) == 1 else '<model>/attributions.h5'}")
        for name in names:
            for m in methods:
                e = scores["models"][name]["methods"][m]
                parts = [f"{name:>14s} {m:<22s}"]
                if "localisation" in e:
                    parts.append(f"energy-in-mask {e['localisation']['energy']['mean']:.3f}")
                if "faithfulness" in e:
                    parts.append(f"deletion AUC {e['faithfulness']['deletion']['auc']['mean']:.3f}"
                                 f" insertion AUC "
                                 f"{e['faithfulness']['insertion']['auc']['mean']:.3f}")
                print("  ".join(parts))
    return 0


def _known() -> set[str]:
    from interptool.analyzers._attribution_methods import METHODS

    return set(METHODS)


def _grid(path: Path, images, results, names, methods) -> None:
    """Rows = images; columns = the image, then one overlay per (model, method)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from interptool.analyzers.attribution import _display

    shown = _display(images)
    k = len(shown)
    cols = 1 + len(names) * len(methods)
    fig, axes = plt.subplots(k, cols, figsize=(1.6 * cols, 1.6 * k + 0.4), squeeze=False)
    for r in range(k):
        img = shown[r].squeeze()
        gray = "gray" if shown[r].shape[-1] == 1 else None
        axes[r, 0].imshow(img, cmap=gray)
        c = 1
        for name in names:
            for m in methods:
                axes[r, c].imshow(img, cmap=gray)
                axes[r, c].imshow(results[name][m].maps[r], cmap="jet", alpha=0.5)
                if r == 0:
                    axes[r, c].set_title(f"{name}\n{m}", fontsize=7)
                c += 1
        if r == 0:
            axes[r, 0].set_title("image", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
