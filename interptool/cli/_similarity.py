"""``interptool similarity TEACHER.h5 STUDENT.h5 [MORE.h5 ...] --out DIR``: class-similarity
transfer from a teacher to its students (with bootstrap CIs) and layer-wise CKA."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from interptool.analyzers.cka import CKAParams
from interptool.analyzers.similarity import SimilarityParams
from interptool.cli._common import (
    add_common_args,
    add_params_arguments,
    out_folder,
    params_from_args,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "similarity",
        help="class similarity from logits: teacher vs students, with bootstrap CIs; CKA",
        description="Compare the class-similarity structure in the logits of a teacher and one "
        "or more students cached on the same images (see docs/similarity.md). Writes "
        "similarity.json (every scalar with its CI, provenance), transfer.csv, per-model "
        "matrices, nearest_classes.csv and figures to --out.",
    )
    p.add_argument("teacher", metavar="TEACHER.h5", help="activation cache of the teacher")
    p.add_argument("students", metavar="STUDENT.h5", nargs="+",
                   help="activation caches of the students (same images, same classes)")
    p.add_argument("--out", required=True, type=out_folder, help="output folder")
    # analyzer settings, defaults and help from SimilarityParams
    add_params_arguments(p.add_argument_group("class similarity"), SimilarityParams)
    p.add_argument("--class-names", metavar="FILE",
                   help="class names, one per line in output order (e.g. classes.txt) or a JSON "
                   "list; default: the names stored in the caches, else 0..K-1")
    p.add_argument("--hierarchy", metavar="FILE",
                   help="class hierarchy (JSON or CSV/TSV: class -> ancestor chain) for a "
                   "semantic-similarity check")
    p.add_argument("--cka-layers", default="auto", metavar="L1,L2|auto|none",
                   help="layers for CKA teacher vs each student: comma-separated names cached "
                   "in every file; 'auto' (default): the layers cached in all files; 'none': skip")
    p.add_argument("--cka-pooling", dest="pooling", choices=["mean", "flatten"], default=None,
                   help=CKAParams.field_info("pooling").metadata["help"])
    p.add_argument("--cka-minibatch", dest="minibatch", type=int, default=None, metavar="M",
                   help=CKAParams.field_info("minibatch").metadata["help"])
    p.add_argument("--hash-caches", action="store_true",
                   help="record the sha256 of each cache file in similarity.json (reads them)")
    add_common_args(p)
    p.set_defaults(func=run)


def _cka_layers(spec: str, caches: list) -> list[str]:
    from interptool.errors import ConfigError

    spec = (spec or "").strip()
    if spec.lower() == "none" or not spec:
        return []
    if spec.lower() == "auto":
        common = [layer for layer in caches[0].layers if all(layer in c.layers for c in caches[1:])]
        return common
    layers = [x.strip() for x in spec.split(",") if x.strip()]
    for c in caches:
        missing = [x for x in layers if x not in c.layers]
        if missing:
            raise ConfigError(
                f"--cka-layers: {', '.join(missing)} not cached in {c.path} (cached: "
                f"{', '.join(c.layers) or 'none'}); re-cache with --layers or pass --cka-layers none"
            )
    return layers


def _pair_folder(a: str, b: str) -> str:
    """``cka_<a>_vs_<b>``: one folder per pair (result files never carry model names)."""
    import re

    def safe(n: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", n).strip("_") or "model"

    return f"cka_{safe(a)}_vs_{safe(b)}"


def run(args: argparse.Namespace) -> int:
    from interptool._provenance import output_lock

    params = params_from_args(args, SimilarityParams, device=args.device)
    cka_params = params_from_args(args, CKAParams, device=args.device, seed=params.seed)

    out = Path(args.out)
    # held until similarity.json is rewritten, before anything under OUT is opened (a second
    # writer of the same --out stops with exit 2); resolved so that `--out .` has a name
    with output_lock(out.resolve(), fix="choose another --out"):
        return _run_locked(args, params, cka_params, out)


def _run_locked(args: argparse.Namespace, params: SimilarityParams, cka_params: CKAParams,
                out: Path) -> int:
    from interptool._provenance import atomic_write_text, sha256_file
    from interptool.analyzers.cka import run as run_cka
    from interptool.analyzers.similarity import run as run_similarity
    from interptool.cache import ActivationCache

    paths = [args.teacher, *args.students]
    caches = []
    try:
        for p in paths:
            caches.append(ActivationCache(p))
        layers = _cka_layers(args.cka_layers, caches)  # before the long part: fail early
        # an explicit --k is checked against K; the default adapts to small label spaces
        result = run_similarity(caches[0], *caches[1:], params=params,
                                hierarchy=args.hierarchy, class_names=args.class_names)
        written = result.save(out)
        cka_out = []
        for c, name in zip(caches[1:], result.students):
            if not layers:
                break
            res = run_cka(caches[0], c, layers, layers, cka_params,
                          names=[result.teacher, name])
            written += res.save(out / _pair_folder(result.teacher, name))
            cka_out.append(res.to_dict())
    finally:
        for c in caches:
            c.close()
    # enrich similarity.json with CKA and (optionally) file checksums
    summary = json.loads((out / "similarity.json").read_text())
    summary["cka"] = cka_out
    if args.hash_caches:
        for entry, p in zip(summary["inputs"], paths):
            entry["sha256"] = sha256_file(p)
    atomic_write_text(out / "similarity.json", json.dumps(summary, indent=1))
    if not args.quiet:
        est = result.to_frame()
        show = est[est["metric"].isin(["spearman", "kl", "topk_overlap", "top1_agreement",
                                       "accuracy"])]
        for _, r in show.iterrows():
            t = "" if r["temperature"] != r["temperature"] else f" T={r['temperature']:g}"
            print(f"{r['model']:>24s} {r['metric']:<15s}{t:<7s} {r['value']:.4f} "
                  f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]")
        print(f"wrote {len(written)} files to {out}")
    return 0
