"""``interptool <analyzer> CACHE.h5 [CACHE.h5 ...] --out DIR``: a command for every registered
analyzer without a hand-written one (e.g. ``interptool cka``), built from its registration:
the help from its summary, the flags from its Params dataclass, the work from its generic
``analyze(inputs, params)`` entry."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from interptool.cli._common import (
    add_common_args,
    add_params_arguments,
    out_folder,
    params_from_args,
)


def register_generated(subparsers: Any, spec: Any) -> None:
    """Add ``interptool <spec.name>`` to ``subparsers``."""
    data = "probe" if spec.needs == "probe" else "eval"
    p = subparsers.add_parser(
        spec.name, help=spec.summary,
        description=f"{spec.title}: {spec.summary}. Reads activation caches made on the same "
        f"{data} images (teacher first) and writes each result's files to --out "
        "(one folder per result when there are several).")
    p.add_argument("caches", nargs="+", metavar="CACHE.h5",
                   help=f"activation caches made on the {data} set, teacher first")
    p.add_argument("--out", required=True, type=out_folder, help="output folder")
    p.add_argument("--names", metavar="A,B",
                   help="model names, comma-separated (default: the names the caches record)")
    if spec.needs_layers:
        p.add_argument("--layer", action="append", dest="layers", metavar="NAME", required=True,
                       help="layer to analyse in every model (repeat or comma-separate)")
    add_params_arguments(p.add_argument_group(spec.title), spec.params)
    add_common_args(p)
    p.set_defaults(func=lambda args: run(spec.name, args))


def _model_name(cache: Any) -> str:
    info = getattr(cache, "model_info", None)
    if isinstance(info, dict) and info.get("name"):
        return str(info["name"])
    return Path(str(cache.path)).stem


def run(name: str, args: argparse.Namespace) -> int:
    from interptool._provenance import output_lock
    from interptool.analyzers import get_analyzer

    spec = get_analyzer(name)
    params = params_from_args(args, spec.params, device=args.device)
    layers = [s.strip() for item in (getattr(args, "layers", None) or [])
              for s in item.split(",") if s.strip()]
    # held for the whole run, before any cache is read or anything under OUT written, as
    # `dissect` / `attribute` do: a second writer of the same --out stops with exit 2
    with output_lock(Path(args.out).resolve(), fix="choose another --out"):
        return _run_locked(name, args, spec, params, layers)


def _run_locked(name: str, args: argparse.Namespace, spec: Any, params: Any,
                layers: list[str]) -> int:
    from interptool.analyzers import AnalysisInputs
    from interptool.cache import ActivationCache
    from interptool.errors import ConfigError

    caches = []
    try:
        for path in args.caches:
            caches.append(ActivationCache(path))
        names = ([n.strip() for n in args.names.split(",")] if args.names
                 else [_model_name(c) for c in caches])
        if len(names) != len(caches) or len(set(names)) != len(names):
            if not args.names:
                raise ConfigError(
                    f"the caches' model names repeat ({', '.join(names)}): the same model "
                    "(or file) given twice? Name them with --names A,B")
            raise ConfigError(f"--names {args.names!r}: expected {len(caches)} distinct names, "
                              "one per cache")
        dataset = None
        if spec.needs == "probe" and caches[0].data_spec:
            from interptool.data import open_dataset

            dataset = open_dataset(caches[0].data_spec)
        inputs = AnalysisInputs(names=names, caches=caches, layers=[layers] * len(caches),
                                dataset=dataset, device=args.device,
                                seed=int(getattr(params, "seed", 0) or 0))
        results = spec.analyze_fn()(inputs, params)
    finally:
        for c in caches:
            c.close()
    results = results if isinstance(results, (list, tuple)) else [results]
    out = Path(args.out)
    for i, res in enumerate(results):
        folder = out if len(results) == 1 else out / ("_vs_".join(res.names) or str(i + 1))
        written = res.save(folder)
        if not args.quiet:
            print(f"{' vs '.join(res.names)}: {res.summary()} -> {len(written)} files in "
                  f"{folder}")
    return 0
