"""``interptool`` command line: one sub-module per sub-command, each exposing ``register``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from interptool.errors import ConfigError, InterptoolError

# Sub-command modules, in the order they appear in --help. Each defines
# ``register(subparsers)`` which adds its parser and sets ``func=<callable(args) -> int>``.
# Registered analyzers without a module here get a generated command (cli/_analyze.py).
_COMMANDS = ["layers", "cache", "data", "dissect", "similarity", "attribute", "compare", "demo"]


class _Parser(argparse.ArgumentParser):
    """argparse with interptool's error form: one line on stderr, exit 2 (argparse prints its
    whole usage block first; the line says where the usage is). Sub-command parsers made by
    ``add_subparsers`` are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    # every command takes --threads; `cache` defines its own (torch threads + DataLoader workers)
    for command in sub.choices.values():
        if "--threads" not in command._option_string_actions:
            command.add_argument(
                "--threads", type=int, default=None, metavar="N",
                help="most torch (and numba) threads to use (default: the cores this process "
                "may use, from its CPU affinity and cgroup quota; analyses then take only the "
                "cores idle at the time)")
    return parser


@contextmanager
def _thread_limit(args: argparse.Namespace) -> Iterator[None]:
    """Cap torch's intra-op threads (and numba's, if not yet loaded) at ``--threads``.

    Analyses choose their threads under ``torch.get_num_threads()``
    (:func:`interptool._resources.free_core_threads`), so the cap set here bounds all of
    them; ``cache`` handles its own ``--threads`` (it splits it with DataLoader workers).
    """
    threads = getattr(args, "threads", None)
    if threads is None or args.command == "cache":
        yield
        return
    if threads < 1:
        raise ConfigError(f"--threads: expected a whole number >= 1, got {threads}; "
                          "omit it to use the cores available")
    from interptool._resources import available_cpus, torch_threads

    n = min(int(threads), available_cpus())
    if "numba" not in sys.modules:
        # numba reads its thread count once, when it is first imported
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    with torch_threads(n):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a flag error already printed
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from interptool._progress import set_quiet

    set_quiet(getattr(args, "quiet", False))
    try:
        with _thread_limit(args):
            return int(args.func(args) or 0)
    except InterptoolError as exc:
        print(f"interptool {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # a path the run could not use (a file where a folder must go, a folder it may not
        # write, a full disk) that no check before named: the path and the reason, one line
        where = exc.filename if exc.filename is not None else ""
        reason = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            reason = ("a file stands where this run needs a folder (or a folder in its "
                      "path); move it away or choose another --out")
        else:
            reason += "; check the paths given (--out, the data, the cache)"
        print(f"interptool {args.command}: error: {where}{': ' if where else ''}{reason}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed batches are kept and a re-run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
