"""``interptool data``: make the built-in concept-world set, check a local copy against its
manifest, describe a data set."""

from __future__ import annotations

import argparse
import json

from interptool.cli._common import add_common_args, out_folder, seed_value

# Shown in --help only (importing interptool.data here would load torch on every CLI start);
# tests/test_data.py checks it equals interptool.data's DEFAULT_VERSION.
HELP_DEFAULT_VERSION = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data", help="data sets: make concept-world, check a copy, describe a spec",
        description="Data-set utilities. Specs: imagefolder:PATH, csv:FILE, broden:PATH, "
        "builtin:concept-world?version=..&n=..&size=..&seed=..&split=..",
    )
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")

    mk = sub.add_parser("make", help="generate a built-in data set on disk")
    mk.add_argument("which", choices=["concept-world"], help="the built-in set to generate")
    mk.add_argument("--out", required=True, type=out_folder, help="output folder (Broden layout)")
    mk.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    mk.add_argument("--size", type=int, default=64, help="image side in px (default 64); "
                    "masks are size//2")
    mk.add_argument("--seed", type=seed_value, default=0, help="base seed (default 0)")
    mk.add_argument("--split", default="probe", choices=["train", "eval", "probe"],
                    help="split: disjoint derived seeds (default probe)")
    mk.add_argument("--version", dest="cw_version", metavar="{1,2}", default=None,
                    help=f"concept-world generator version (default {HELP_DEFAULT_VERSION}); 1 is the "
                    "original 10-class set, for caches and models made with it; recorded in "
                    "concept_world.json as 'generator'")
    mk.add_argument("--overwrite", action="store_true", help="replace a different set in --out")
    add_common_args(mk)
    mk.set_defaults(func=_make)

    ck = sub.add_parser("check", help="validate a local copy against a data manifest")
    ck.add_argument("name", help="manifest name (see 'interptool data manifests') or a .toml")
    ck.add_argument("path", help="folder holding the local copy")
    ck.add_argument("--quick", action="store_true",
                    help="skip the per-file existence check of Broden index.csv entries")
    ck.add_argument("--json", action="store_true", help="print the report as JSON")
    add_common_args(ck)
    ck.set_defaults(func=_check)

    ls = sub.add_parser("manifests", help="list the known data manifests")
    add_common_args(ls)
    ls.set_defaults(func=_manifests)

    info = sub.add_parser("info", help="open a data spec and print its summary (JSON)")
    info.add_argument("spec", help="data spec, e.g. imagefolder:PATH or builtin:concept-world")
    add_common_args(info)
    info.set_defaults(func=_info)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _make(args: argparse.Namespace) -> int:
    from interptool.data import make_concept_world

    # the version is validated by make_concept_world (a DataError: one line, exit 2), not
    # by argparse, whose usage dump would bury the message
    extra = {} if args.cw_version is None else {"version": args.cw_version}
    root = make_concept_world(args.out, n=args.n, size=args.size, seed=args.seed,
                              split=args.split, overwrite=args.overwrite, **extra)
    version = json.loads((root / "concept_world.json").read_text())["generator"]
    print(f"concept-world version {version} ({args.split}, n={args.n}, size={args.size}, "
          f"seed={args.seed}) written to {root}; open it with broden:{root}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from interptool.data import check_dataset

    rep = check_dataset(args.name, args.path, deep=not args.quick)
    print(json.dumps(rep.to_dict(), indent=1) if args.json else rep.format())
    return 0 if rep.ok else 2


def _manifests(args: argparse.Namespace) -> int:
    from interptool.data import list_manifests, load_manifest

    for name, path in list_manifests().items():
        m = load_manifest(path)
        print(f"{name:16s} {m.get('format', ''):13s} {m.get('title', '')}  [{path}]")
    return 0


def _info(args: argparse.Namespace) -> int:
    from interptool.data import open_dataset

    print(json.dumps(open_dataset(args.spec).summary(), indent=1))
    return 0
