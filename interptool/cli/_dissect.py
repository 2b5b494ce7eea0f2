"""``interptool dissect``: network dissection of cached (or freshly cached) layer activations."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from interptool.analyzers.dissection import DissectionParams, MontageParams
from interptool.cli._common import (
    add_common_args,
    add_model_args,
    add_params_arguments,
    load_kwargs,
    out_folder,
    params_from_args,
)

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
existing matching cache there is reused); --workers then also sets the cache step's
image-decoding workers (default: chosen from the cores, as `interptool cache` does).
See docs/dissection.md.
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
    p.add_argument("--out", required=True, type=out_folder,
                   help="output folder (one sub-folder per layer)")
    g = p.add_argument_group("dissection")
    # every analyzer setting, its default and its help come from DissectionParams
    add_params_arguments(g, DissectionParams)
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
    params = params_from_args(args, DissectionParams, device=args.device)  # checked first
    out = Path(args.out)
    montages = _montages(args.montages)
    # before the lock and the analysis: a negative count cut units off the end silently
    MontageParams(montages=montages, max_montages=args.max_montages)
    if args.cache and args.arch:
        raise ConfigError("give either a cache file or --arch (to cache first), not both")
    if not args.cache and not args.arch:
        raise ConfigError("give an activation cache (interptool dissect ACTS.h5 ...) or a "
                          "model (--arch ... --checkpoint ...) to cache first")
    from interptool._provenance import output_lock

    # held until every file is written; resolved so that `--out .` has a name to lock
    with output_lock(out.resolve(), fix="choose another --out"):
        return _run_locked(args, layers, params, out, montages)


def _run_locked(args: argparse.Namespace, layers: list[str], params: DissectionParams,
                out: Path, montages: str | int) -> int:
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
        loaded = load_model(args.arch, **load_kwargs(args))
        cache_path = cache_activations(
            loaded, probe, layers, out / "activations.h5", batch_size=params.batch_size,
            workers=params.workers, dtype=args.cache_dtype, overwrite=args.overwrite,
            probe=True, device=args.device)

    dissection = Dissection.from_params(params)
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
                      + (" [{level:g}% CI {ci_low:g}, {ci_high:g}]".format(
                          **{**s["intervals"]["detectors"],
                             "level": 100 * s["intervals"]["detectors"]["level"]})
                         if "intervals" in s else "")
                      + f", {s['unique_concepts']} unique concepts"
                      f"{' (' + cats + ')' if cats else ''} -> {out / layer}")
    if len(layers) > 1:
        from interptool._provenance import atomic_write_text

        atomic_write_text(out / "summary.json", json.dumps(summaries, indent=2) + "\n")
    return 0
