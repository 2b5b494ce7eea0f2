"""``interptool dissect``: network dissection of cached (or freshly cached) layer activations."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from interptool.cli._common import add_common_args, add_model_args, model_kwargs

_EPILOG = """\
examples:
  interptool dissect student.h5 --layer layer4 --out dissect/student
  interptool dissect student.h5 --layer layer3 --layer layer4 --probe broden:/data/broden1_224 \\
      --out dissect/student --protocol han2023 --bootstrap 1000 --seed 0
  interptool dissect --arch torchvision:resnet18 --checkpoint student.pth \\
      --probe broden:/data/broden1_224 --layer layer4 --out dissect/student

Each layer is written to OUT/<layer>/: tally.csv (NetDissect-Lite columns, unit 1-based),
summary.json (with the protocol record), iou.npz, concepts.csv, detectors_by_category.png,
thresholds_curve.png and units/unit_XXXX.png montages; with --bootstrap also intervals.csv
and block_stats.npz. With --arch the activations are cached first in OUT/activations.h5 (an
existing matching cache there is reused). See docs/dissection.md.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "dissect",
        help="network dissection: concept detectors per unit against a Broden probe",
        description="Score every unit of a layer against the concept labels of a Broden-format "
        "probe set (NetDissect-Lite semantics) and count concept detectors.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("cache", nargs="?", help="activation cache (.h5) made on the probe set; "
                   "omit it and give --arch to cache first")
    p.add_argument("--layer", action="append", required=True, dest="layers", metavar="NAME",
                   help="layer to dissect (repeat, or comma-separate, for several)")
    p.add_argument("--probe", metavar="SPEC", help="broden:PATH or builtin:concept-world?..; "
                   "default: the data spec recorded in the cache")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per layer)")
    g = p.add_argument_group("dissection")
    g.add_argument("--protocol", default="netdissect-lite",
                   help="settings preset: 'netdissect-lite' (default: object, part, scene, "
                   "texture, color; IoU 0.04; quantile 0.005) or 'han2023' (the KD paper's fork: "
                   "six categories incl. material; IoU 0.05)")
    g.add_argument("--categories", metavar="CAT,CAT",
                   help="categories to dissect against (default: the protocol's); images with "
                   "no label of these take no part")
    g.add_argument("--quantile", type=float, default=None,
                   help="top activation fraction defining the threshold (default: the "
                   "protocol's, 0.005)")
    g.add_argument("--iou-threshold", type=float, default=None,
                   help="detector when best IoU >= this (default: the protocol's, 0.04 or 0.05)")
    g.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="N bootstrap resamples of the probe images for 95%% intervals of the "
                   "detector counts (thresholds held at full-probe values); 0: none")
    g.add_argument("--seed", type=int, default=0,
                   help="bootstrap seed (same seed and probe: the same resamples for every model)")
    g.add_argument("--bootstrap-block-size", type=int, default=1, metavar="K",
                   help="probe images per resampled block (default 1)")
    g.add_argument("--category-area", choices=["overlap", "image"], default="overlap",
                   help="unit area per category: NetDissect-Lite's 'overlap' (default) or "
                   "'image' (every image carrying the category)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers for the masks")
    g.add_argument("--top-images", type=int, default=8, help="images per unit montage")
    g.add_argument("--montages", default="detectors",
                   help="'detectors' (default), 'all', 'none' or a number of top units")
    g.add_argument("--max-montages", type=int, default=64)
    g.add_argument("--no-figures", action="store_true",
                   help="write the tables only: no plots, no unit montages (faster; no "
                   "plotting library is loaded)")
    add_model_args(p, required=False)
    g2 = p.add_argument_group("caching (with --arch)")
    g2.add_argument("--cache-dtype", choices=["float16", "float32"], default="float32")
    g2.add_argument("--overwrite", action="store_true",
                    help="replace OUT/activations.h5 if it was made with other settings")
    add_common_args(p)
    p.set_defaults(func=run)


def _layers(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for item in args.layers:
        out += [s.strip() for s in item.split(",") if s.strip()]
    return out


def _montages(value: str) -> str | int:
    from interptool.errors import ConfigError

    if value in ("detectors", "all", "none"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--montages {value!r}: expected detectors, all, none or a number") \
            from None


def run(args: argparse.Namespace) -> int:
    from interptool.errors import ConfigError

    layers = _layers(args)
    out = Path(args.out)
    montages = _montages(args.montages)
    if args.cache and args.arch:
        raise ConfigError("give either a cache file or --arch (to cache first), not both")
    if not args.cache and not args.arch:
        raise ConfigError("give an activation cache (interptool dissect ACTS.h5 ...) or a "
                          "model (--arch ... --checkpoint ...) to cache first")
    from interptool._provenance import output_lock

    # held until every file is written; resolved so that `--out .` has a name to lock
    with output_lock(out.resolve(), fix="choose another --out"):
        return _run_locked(args, layers, out, montages)


def _run_locked(args: argparse.Namespace, layers: list[str], out: Path,
                montages: str | int) -> int:
    from interptool.analyzers.dissection import Dissection
    from interptool.cache import ActivationCache
    from interptool.errors import ConfigError

    probe: Any = args.probe
    cache_path = args.cache
    if args.arch:
        if not probe:
            raise ConfigError("--probe is required with --arch (e.g. --probe broden:PATH)")
        from interptool.cache import cache_activations
        from interptool.data import open_dataset
        from interptool.loading import load_model

        probe = open_dataset(probe)
        loaded = load_model(args.arch, **model_kwargs(args))
        cache_path = cache_activations(
            loaded, probe, layers, out / "activations.h5", batch_size=args.batch_size,
            workers=args.workers, dtype=args.cache_dtype, overwrite=args.overwrite,
            probe=True, device=args.device)

    dissection = Dissection(
        quantile=args.quantile, iou_threshold=args.iou_threshold, batch_size=args.batch_size,
        device=args.device, workers=args.workers, top_images=args.top_images,
        category_area=args.category_area,
        protocol=args.protocol, categories=args.categories, bootstrap=args.bootstrap,
        seed=args.seed, bootstrap_block_size=args.bootstrap_block_size)
    with ActivationCache(cache_path) as cache:
        if probe is None:
            if not cache.data_spec:
                raise ConfigError(f"{cache.path} records no data spec; pass --probe SPEC")
            from interptool.data import open_dataset

            probe = open_dataset(cache.data_spec)
        for layer in layers:
            cache.features(layer)  # fail early, naming the cached layers
        summaries = []
        for layer in layers:
            result = dissection.run(cache, layer, probe)
            result.save(out / layer, montages=montages, max_montages=args.max_montages,
                        figures=not args.no_figures)
            s = result.summary()
            summaries.append(s)
            if not args.quiet:
                cats = ", ".join(f"{k} {v}" for k, v in s["by_category"].items() if v)
                print(f"{layer}: {s['detectors']}/{s['units']} detectors (IoU >= "
                      f"{s['iou_threshold']:g}, protocol {s['protocol']['name']})"
                      + (" [95% CI {ci_low:g}, {ci_high:g}]".format(**s["intervals"]["detectors"])
                         if "intervals" in s else "")
                      + f", {s['unique_concepts']} unique concepts"
                      f"{' (' + cats + ')' if cats else ''} -> {out / layer}")
    if len(layers) > 1:
        from interptool._provenance import atomic_write_text

        atomic_write_text(out / "summary.json", json.dumps(summaries, indent=2) + "\n")
    return 0
