"""``interptool`` command line: one sub-module per sub-command, each exposing ``register``."""

from __future__ import annotations

import argparse
import importlib
import sys

from interptool.errors import InterptoolError

# Sub-command modules, in the order they appear in --help. Each defines
# ``register(subparsers)`` which adds its parser and sets ``func=<callable(args) -> int>``.
# Registered analyzers without a module here get a generated command (cli/_analyze.py).
_COMMANDS = ["layers", "cache", "data", "dissect", "similarity", "attribute", "compare", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interptool",
        description="Measure and compare the interpretability of image classifiers "
        "(teacher vs. distilled students).",
    )
    from interptool import __version__

    parser.add_argument("--version", action="version", version=f"interptool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"interptool.cli._{name}").register(sub)
    # every registered analyzer without a hand-written command gets a generated one
    from interptool.analyzers import analyzer_specs
    from interptool.cli._analyze import register_generated

    for spec in analyzer_specs():
        if spec.command and spec.name not in sub.choices:
            register_generated(sub, spec)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from interptool._progress import set_quiet

    set_quiet(getattr(args, "quiet", False))
    try:
        return int(args.func(args) or 0)
    except InterptoolError as exc:
        print(f"interptool {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; completed batches are kept and a re-run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
