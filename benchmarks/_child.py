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


def machine_line() -> str:
    """The first line both benchmarks print: cores, affinity and load."""
    return (f"machine: {os.cpu_count()} CPUs, affinity {len(os.sched_getaffinity(0))}; "
            f"load average {load_average()}")


def probe_spec(n: int, size: int = 224) -> str:
    """The generated probe both benchmarks time: concept-world at Broden1_224's geometry
    (``size`` px images, ``size // 2`` px masks). Pinned to version 1: version 2 (the default
    since it was added) has the same image and mask sizes but 12 classes instead of 10, pixel
    texture regions and 16 scenes, so its tally differs; version 1 keeps the recorded figures
    comparable (and matches ``--num-classes 10``)."""
    return f"builtin:concept-world?version=1&n={n}&size={size}"


def generate_probe(spec: str) -> bool:
    """Write the probe set to disk in a child (untimed); prints the output and returns False
    on failure."""
    gen = run_child(f"from interptool.data import open_dataset; open_dataset({spec!r})")
    if gen.returncode:
        print(gen.output)
    return gen.returncode == 0


def cache_child(arch: str, spec: str, layer: str, out: str | os.PathLike,
                dtype: str) -> ChildRun:
    """``interptool cache`` of one layer into ``out`` as a timed child (random-init weights,
    10 classes, quiet)."""
    return run_child(cli_code(["cache", "--arch", arch, "--num-classes", "10", "--data", spec,
                               "--layers", layer, "--out", str(out), "--dtype", dtype,
                               "--quiet"]))
