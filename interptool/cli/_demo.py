"""``interptool demo --out DIR``: the whole comparison on the built-in concept-world default."""

from __future__ import annotations

import argparse
import sys

from interptool.cli._common import add_common_args, out_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run compare on the built-in default (concept-world, 4 shipped small models)",
        description="Generate the concept-world eval and probe sets, load the shipped teacher "
        "and three students (scratch, label smoothing, KD), run every analysis and print the "
        "path of the HTML report. No download; a few minutes on two CPU cores.",
    )
    p.add_argument("--out", "-o", default="demo_out", type=out_folder,
                   help="output folder (default demo_out)")
    p.add_argument("--n", type=int, default=None,
                   help="images per eval/probe split (default: the demo's size)")
    add_common_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from interptool.pipeline import run_demo

    report = run_demo(
        args.out, device=args.device, n=args.n, command=" ".join(["interptool", *sys.argv[1:]])
    )
    import json

    from interptool.pipeline import paper_summary_line

    # the summary line first: the last line on stdout stays the report's path
    summary = json.loads((report.parent / "summary.json").read_text())
    print(paper_summary_line(summary.get("paper_direction") or []))
    print(report)
    return 0
