"""``interptool compare CONFIG --out DIR``: every analysis on every model, one HTML report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from interptool.cli._common import add_common_args, out_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare a teacher with its students: dissection, class similarity, attribution",
        description="Run every configured analysis on every model of CONFIG and write "
        "DIR/report.html and DIR/summary.json. Re-running resumes: caches and finished "
        "stages are reused. `--init PATH` writes a commented config template.",
    )
    p.add_argument("config", nargs="?", help="TOML config (see docs/user-guide.md)")
    p.add_argument("--out", "-o", type=out_folder, help="output folder (created)")
    p.add_argument(
        "--init",
        nargs="?",
        const="interptool.toml",
        metavar="PATH",
        help="write a commented config template to PATH (default interptool.toml) and exit",
    )
    from interptool.pipeline import analysis_names

    p.add_argument(
        "--only",
        help="comma-separated subset of the configured analyses: "
        + ",".join(analysis_names()),
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace caches under DIR/cache made with other settings (default: keep them and "
        "write a new file beside them); never needed to resume an interrupted run",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader worker processes decoding images in the cache stage, as `interptool "
        "cache --workers` (default: the config's [run] workers, else chosen from the cores "
        "available and the device)",
    )
    add_common_args(p)
    # --device default is None here so that the config's [run] device applies unless given.
    p.set_defaults(func=_run, device=None)


def _run(args: argparse.Namespace) -> int:
    from interptool.errors import ConfigError
    from interptool.pipeline import load_config, write_template

    if args.init:
        path = write_template(args.init)
        print(f"wrote {path}; edit it, then run: interptool compare {path} --out results/")
        return 0
    if not args.config:
        raise ConfigError("compare: give a CONFIG file (or --init PATH to write a template)")
    if not args.out:
        raise ConfigError("compare: --out DIR is required (where the report and caches go)")
    if args.workers is not None and args.workers < 0:  # the same check as `cache --workers`
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    cfg = load_config(args.config)
    if args.workers is not None:
        cfg.run.workers = args.workers
    if args.only:
        cfg = cfg.only([a.strip() for a in args.only.split(",") if a.strip()])
    if args.device:
        cfg.run.device = args.device
    from interptool.pipeline import run_compare

    report = run_compare(
        cfg,
        args.out,
        config_text=Path(args.config).read_text(),
        command=" ".join(["interptool", *sys.argv[1:]]),
        overwrite=args.overwrite,
    )
    print(report)
    return 0
