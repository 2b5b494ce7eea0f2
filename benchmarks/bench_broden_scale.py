"""Broden scale: time and peak memory of `cache` + `dissect` as the probe set grows.

For each ``--n`` (default 480, 3,000 and 12,000) it generates (untimed) the probe
``builtin:concept-world?version=1&n=N&size=224`` (224 px images, 112 px masks: Broden1_224's geometry),
then runs ``interptool cache`` (random-init torchvision resnet18, ``layer4``, ``--dtype``:
the CLI's default float16 features, or float32) and ``interptool dissect`` (default
settings) as fresh child processes and reports each one's wall time, CPU time and peak RSS
(``getrusage`` of the child), the cache file's size, and per-image costs. With two or more sizes it fits time = a + b N (least
squares) and prints the extrapolation to Broden's 63,305 images beside NetDissect-Lite's
memory model: it stores every activation of the layer as a float64 memmap,
N x units x H x W x 8 bytes (12.7 GB for resnet18 layer4 on Broden), while interptool's
peak memory does not grow with N.

Usage::

    python benchmarks/bench_broden_scale.py [--n 480 3000 12000] [--workdir DIR]

12,000 images take about 4x the 3,000 case (hours on a loaded 2-core machine); run it where
there is time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _child import (  # noqa: E402
    cache_child,
    cli_code,
    generate_probe,
    load_average,
    machine_line,
    probe_spec,
    run_child,
)

BRODEN_IMAGES = 63_305  # broden1_224 index.csv rows


def netdissect_lite_bytes(n: int, units: int = 512, h: int = 7, w: int = 7) -> int:
    """NetDissect-Lite's feature memmap: float64 for every activation of the layer."""
    return n * units * h * w * 8


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[480, 3000, 12000])
    ap.add_argument("--arch", default="torchvision:resnet18")
    ap.add_argument("--layer", default="layer4")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                    help="cached feature precision (the CLI's default: float16)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_broden"))
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    rows = []
    for n in args.n:
        spec = probe_spec(n)
        if not generate_probe(spec):
            return 1
        cache_path = work / f"n{n}.h5"
        cache_path.unlink(missing_ok=True)
        cache = cache_child(args.arch, spec, args.layer, cache_path, args.dtype)
        if cache.returncode:
            print(cache.output)
            return 1
        dissect = run_child(cli_code(["dissect", str(cache_path), "--layer", args.layer,
                                      "--out", str(work / f"dissect_n{n}"), "--quiet"]))
        if dissect.returncode:
            print(dissect.output)
            return 1
        size = cache_path.stat().st_size
        rows.append((n, cache, dissect, size))
        print(f"n={n}: cache {cache.wall:.1f} s wall / {cache.cpu:.1f} s CPU / peak "
              f"{cache.peak_mib:.0f} MiB; dissect {dissect.wall:.1f} s wall / {dissect.cpu:.1f} s "
              f"CPU / peak {dissect.peak_mib:.0f} MiB; cache file {size / 2**20:.0f} MiB; "
              f"per image {1000 * (cache.wall + dissect.wall) / n:.0f} ms wall, "
              f"{1000 * (cache.cpu + dissect.cpu) / n:.0f} ms CPU (load {load_average()})")
    if len(rows) >= 2:
        ns = np.array([r[0] for r in rows], dtype=float)
        for what, key in (("wall", "wall"), ("CPU", "cpu")):
            t = np.array([getattr(r[1], key) + getattr(r[2], key) for r in rows])
            b, a = np.polyfit(ns, t, 1)
            print(f"fit cache + dissect {what}: {a:.1f} s + {1000 * b:.1f} ms x N -> "
                  f"{BRODEN_IMAGES} images: {(a + b * BRODEN_IMAGES) / 3600:.2f} h")
        peak = max(max(r[1].peak_mib, r[2].peak_mib) for r in rows)
        per_image = np.mean([r[3] / r[0] for r in rows])
        print(f"peak memory over all sizes {peak:.0f} MiB (flat in N); cache file "
              f"{per_image / 1024:.1f} KiB per image -> {per_image * BRODEN_IMAGES / 2**30:.2f} GiB "
              f"at {BRODEN_IMAGES}; NetDissect-Lite's float64 memmap at {BRODEN_IMAGES}: "
              f"{netdissect_lite_bytes(BRODEN_IMAGES) / 1e9:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
