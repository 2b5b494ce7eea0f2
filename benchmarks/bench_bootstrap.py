"""Benchmark: bootstrap of detector counts from per-block sufficient statistics.

Part 1 (default): resamples. Generates per-image sufficient statistics of resnet18 ``layer4``
dissected on Broden (512 units, 1,198 labels, 5 categories) for ``--n`` probe images: per
image about ``--labels-per-image`` labels present and ``--firing`` of the units above their
thresholds, each firing unit intersecting most of the labels present (so about
``512 * firing * labels-per-image * 0.8`` nonzero intersections per image). Times
``--resamples`` resamples (weights + weighted sums + NetDissect-Lite best-label rules) and
reports the stored statistics' size and the peak extra memory of the resampling
(``tracemalloc``), which does not grow with N: work is chunked over resamples.

Part 2 (``--tally N``): the cost of keeping the statistics during a real dissection. Writes a
concept-world probe at Broden's geometry (224 px images, 112 px masks) and a cache of random
512 x 7 x 7 maps, then times ``Dissection().run`` without and with ``bootstrap=1000``.

Part 3 (``--device cuda``): the same resamples with the weighted sums computed by torch on
that device (what ``Dissection(device="cuda", bootstrap=...)`` runs), timed against the CPU
path in the same process; the rows must be equal.

Usage::

    python benchmarks/bench_bootstrap.py --n 1000 3000 10000 [--resamples 1000] [--tally 300]
    python benchmarks/bench_bootstrap.py --n 3000 10000 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import sparse

from interptool.analyzers.dissection._bootstrap import BlockStats, resample_measures, use_compiled

U, L, C = 512, 1198, 5


def generate(n: int, labels_per_image: int, firing: float, seed: int = 0) -> BlockStats:
    """Per-image statistics with the sparsity of layer4 on Broden (random, fixed seed)."""
    rng = np.random.default_rng(seed)
    label_category = np.r_[-1, rng.integers(0, C, L - 1)]
    rows_i, cols_i, vals_i, rows_c, cols_c, vals_c, rows_l, cols_l, vals_l = ([] for _ in range(9))
    unit_rate = rng.beta(2, 2 / firing - 2, U)  # units fire at different rates, mean `firing`
    common = rng.choice(np.arange(1, L), 100, replace=False)  # labels seen in many images
    prefers = np.zeros((U, L), bool)  # each unit overlaps 3 common labels well, others little
    for u in range(U):
        prefers[u, rng.choice(common, 3, replace=False)] = True
    n_common = labels_per_image // 3
    for i in range(n):
        present = np.r_[rng.choice(common, n_common, replace=False),
                        rng.choice(np.setdiff1d(np.arange(1, L), common), labels_per_image - n_common,
                                   replace=False)]
        area = rng.integers(200, 6000, labels_per_image)
        rows_l.append(np.full(labels_per_image, i))
        cols_l.append(present)
        vals_l.append(area)
        # a unit fires mostly on images holding a label it prefers (as real detectors do)
        likes = prefers[:, present].any(axis=1)
        units = np.flatnonzero(rng.random(U) < np.where(likes, 0.9, unit_rate / 5))
        mask_area = rng.integers(500, 4000, len(units))
        hit = rng.random((len(units), labels_per_image)) < 0.8
        uu, jj = np.nonzero(hit)
        cap = np.minimum(area[jj], mask_area[uu])
        share = np.where(prefers[units[uu], present[jj]], 0.1 + 0.6 * rng.random(len(uu)),
                         0.3 * rng.random(len(uu)))
        rows_i.append(np.full(len(uu), i))
        cols_i.append(units[uu] * L + present[jj])
        vals_i.append(np.maximum(1, (cap * share).astype(np.int64)))
        cats = np.unique(label_category[present])
        rows_c.append(np.full(len(units) * len(cats), i))
        cols_c.append((units[:, None] * C + cats[None, :]).ravel())
        vals_c.append(np.repeat(mask_area, len(cats)))

    def csr(r, c, v, width):
        return sparse.csr_matrix((np.concatenate(v).astype(float),
                                  (np.concatenate(r), np.concatenate(c))), shape=(n, width))

    mats = {"intersect": csr(rows_i, cols_i, vals_i, U * L),
            "unit_cat_area": csr(rows_c, cols_c, vals_c, U * C),
            "label_area": csr(rows_l, cols_l, vals_l, L)}
    return BlockStats.build(mats, U, label_category, [f"c{k}" for k in range(C)], 1, n, "fp", "ids")


def part_device(ns: list[int], resamples: int, labels_per_image: int, firing: float,
                device: str) -> None:
    """The same resamples with the weighted sums on ``device`` (the torch path), against the
    CPU path (numba kernel or numpy) in the same process; the rows must be equal."""
    import torch

    for n in ns:
        st = generate(n, labels_per_image, firing)
        resample_measures(st, 2, 0, 0.04, device=device)  # layout copied to the device once
        resample_measures(st, 2, 0, 0.04)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        on_dev = resample_measures(st, resamples, 0, 0.04, device=device)
        t1 = time.perf_counter()
        on_cpu = resample_measures(st, resamples, 0, 0.04)
        t2 = time.perf_counter()
        same = on_dev.equals(on_cpu)
        print(f"N={n} {resamples} resamples: {device} {t1 - t0:.2f} s, CPU path {t2 - t1:.2f} s "
              f"({(t2 - t1) / max(t1 - t0, 1e-9):.1f}x), rows equal: {same}", flush=True)


def part_resamples(ns: list[int], resamples: int, labels_per_image: int, firing: float) -> None:
    print(f"{'N':>6} {'nnz(I)':>10} {'pairs':>8} {'kept':>7} {'stats MiB':>9} {'prep s':>6} "
          f"{'resample s':>10} {'peak extra MiB':>14} {'detectors 95%':>16}")
    for n in ns:
        st = generate(n, labels_per_image, firing)
        t0 = time.perf_counter()
        # once per result: per-pair bounds, pruning, layout; numba kernel load (compiled on
        # the first run ever, ~20 s, then cached on disk)
        st.evaluate(np.ones((1, st.n_blocks)), 0.04, compiled=use_compiled(st, resamples))
        prep = time.perf_counter() - t0
        tracemalloc.start()
        t0 = time.perf_counter()
        samples = resample_measures(st, resamples, 0, 0.04)
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        lo, hi = np.quantile(samples["detectors"], [0.025, 0.975])
        kept = len(st.pruned(0.04).pair_unit)  # pairs that can reach IoU 0.04
        print(f"{n:>6} {st.intersect.nnz:>10} {len(st.pair_unit):>8} {kept:>7} {st.nbytes / 2**20:>9.1f} "
              f"{prep:>6.2f} {dt:>10.2f} {peak / 2**20:>14.1f} "
              f"{f'{lo:.0f}..{hi:.0f}':>16}", flush=True)


def part_tally(n: int) -> None:
    from interptool.analyzers.dissection import Dissection
    from interptool.cache import write_cache
    from interptool.data import make_concept_world, open_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = make_concept_world(Path(tmp) / "cw", n=n, size=224, seed=0, version=1)
        probe = open_dataset(f"broden:{root}")
        rng = np.random.default_rng(0)
        feats = rng.gamma(1.0, 1.0, (len(probe), U, 7, 7)).astype(np.float32)
        path = write_cache(Path(tmp) / "c.h5", logits=np.zeros((len(probe), 2)), ids=probe.ids,
                           features={"layer4": feats},
                           attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
        for boot in (0, 1000):
            t0 = time.perf_counter()
            r = Dissection(bootstrap=boot, checksum=False, top_images=0).run(path, "layer4", probe)
            dt = time.perf_counter() - t0
            extra = (f", stats {r.block_stats.nbytes / 2**20:.1f} MiB, detectors "
                     + r.intervals().set_index("measure").loc["detectors", ["estimate", "ci_low", "ci_high"]]
                     .to_string().replace("\n", " ")) if boot else ""
            print(f"tally N={len(probe)} bootstrap={boot}: {dt:.1f} s{extra}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[3000])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--labels-per-image", type=int, default=15)
    ap.add_argument("--firing", type=float, default=0.15)
    ap.add_argument("--tally", type=int, default=0, help="also time a dissection of N images")
    ap.add_argument("--device", default=None,
                    help="also time the weighted sums on this torch device (e.g. cuda) against "
                         "the CPU path, same resamples")
    ap.add_argument("--no-prune", action="store_true",
                    help="evaluate every (unit, label) pair (worst case: no pair is pruned)")
    args = ap.parse_args(argv)
    if args.no_prune:
        BlockStats.pruned = lambda self, t: self  # type: ignore[method-assign]
    import os

    print(f"load average: {os.getloadavg()}", flush=True)
    if args.device:
        part_device(args.n, args.resamples, args.labels_per_image, args.firing, args.device)
        return 0
    part_resamples(args.n, args.resamples, args.labels_per_image, args.firing)
    if args.tally:
        part_tally(args.tally)
    return 0


if __name__ == "__main__":
    sys.exit(main())
