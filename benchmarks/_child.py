"""End-to-end benchmark helpers (bench_dissect, bench_broden_scale): time interptool as a child.

Each measurement is one fresh ``python -c`` process, as a user meets the command: imports,
one-time loads, the work and the writes are all inside its wall time. Peak memory is the
child's own ``ru_maxrss`` (``os.wait4``), not the benchmark's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass
class ChildRun:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one child process."""

    wall: float
    cpu: float
    peak_mib: float
    returncode: int
    output: str


def run_child(code: str, env: dict[str, str] | None = None) -> ChildRun:
    """Run ``python -c code`` and measure it (stdout and stderr are captured together)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=full_env, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
                    proc.returncode, out)


def cli_code(argv: list[str], setup: str = "") -> str:
    """``python -c`` source that runs ``interptool ARGV`` after ``setup`` (for variants)."""
    return (f"import sys\n{setup}\nfrom interptool.cli import main\n"
            f"sys.exit(main({argv!r}))\n")


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())
