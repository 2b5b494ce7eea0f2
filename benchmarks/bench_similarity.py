"""Similarity bootstrap at ImageNet scale: the batched bootstrap of ``compare_similarity``
against the previous one (kept here, and only here, as the reference).

Synthetic logits with a class-similarity structure, ``--n`` images x ``--k`` classes, a teacher
and ``--students`` students; ``compare_similarity(..., n_boot=...)`` timed with and without
the bootstrap (the difference is the bootstrap's cost). The previous implementation (float64
class sums in blocks of a few resamples, exact argsort ranks, the metrics of
``Reference.compare`` per block) is run on ``--old-n-boot`` resamples and extrapolated per
resample; with the same seed its first resamples are the new run's first resamples, so their
replicates are compared value by value. Each path runs in its own child process, whose peak
RSS (``ru_maxrss``) is reported with its wall and CPU seconds.

    .venv/bin/python benchmarks/bench_similarity.py [--n 50000] [--k 1000] [--students 2]
        [--n-boot 1000] [--old-n-boot 20] [--device cpu] [--threads N]

``--threads N`` sets torch's threads and ``NUMBA_NUM_THREADS`` in the children (default: the
library's own choice). The numba kernels' compile time (an empty ``NUMBA_CACHE_DIR``) and their
load time from the on-disk cache (``cache=True``, what every later process pays) are measured
in two more children and reported separately; neither is in the bootstrap's time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def make_models(n: int, k: int, models: int):
    """Teacher and students: shared K x K confusion structure, growing noise (a student is a
    noisier copy of the teacher's similarity)."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    base = rng.normal(size=(k, k)).astype(np.float32) * 2
    y = np.arange(n) % k
    ids = [f"img{i}" for i in range(n)]
    out = []
    for m in range(models):
        r = np.random.default_rng(m + 1)
        z = base[y] + (1.0 + 0.5 * m) * r.normal(size=(n, k)).astype(np.float32)
        z[np.arange(n), y] += 6
        out.append(SimpleNamespace(logits=z, labels=y, ids=ids, data_fingerprint="bench",
                                   name=f"m{m}", path=f"m{m}.h5", attrs={}, model_info=None))
    return out


def old_bootstrap(models, n_boot: int, seed: int, k_near: int = 5, temperature: float = 1.0,
                  matrix: str = "softmax") -> dict[tuple[int, str], np.ndarray]:
    """The bootstrap of compare_similarity before the batched rewrite (reference only)."""
    from interptool.analyzers.similarity._core import (
        PerSample,
        Reference,
        SortedLabels,
        bootstrap_weights,
        normalise_rows,
        weighted_class_sums,
        weighted_counts,
    )

    labels = models[0].labels
    n, kk = models[0].logits.shape
    sl = SortedLabels.build(labels, kk)
    per = [PerSample(m.logits, sl, temperature, matrix) for m in models]
    per_resample = kk * kk * 8 * (len(models) + 12)
    block = int(max(1, min(128, (256 * 1024 * 1024) // per_resample, n_boot)))
    rng = np.random.default_rng(seed)
    out: dict[tuple[int, str], list] = {}
    done = 0
    while done < n_boot:
        b = min(block, n_boot - done)
        W = bootstrap_weights(rng, n, b)
        counts = weighted_counts(W, sl)
        valid = counts > 0
        mats = []
        for mi, ps in enumerate(per):
            sums, hs, _ = weighted_class_sums(W, ps)
            mats.append(normalise_rows(sums, counts))
            with np.errstate(invalid="ignore", divide="ignore"):
                ent = np.where(valid, hs / counts, 0.0).sum(1) / valid.sum(1)
            out.setdefault((mi, "entropy"), []).append(ent)
        ref = Reference(mats[0], valid, k_near)
        for mi, S in enumerate(mats[1:], start=1):
            for metric, v in ref.compare(S).items():
                out.setdefault((mi, metric), []).append(v)
        done += b
    return {key: np.concatenate(v) for key, v in out.items()}


def warm_kernels() -> float:
    """Seconds to make the numba kernels callable: compile, or load from the disk cache."""
    from interptool.analyzers.similarity import _core, _kernels

    t0 = time.perf_counter()
    _kernels.usable()
    k = _core.EXACT_K + 4  # rank-grid path: every kernel runs once
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2 * k, k)).astype(np.float32)
    y = np.arange(2 * k) % k
    sl = _core.SortedLabels.build(y, k)
    st = _core.StackedSamples([z, z], sl, 1.0, "softmax", np.dtype(np.float32))
    point = st.point_sums()[0, :, :k] / sl.counts[:, None]
    valid = sl.counts > 0
    grids = [_core.RankGrid(point, valid, True)] * 2
    W = np.ones((1, 2 * k))
    counts = _core.weighted_counts(W, sl)
    # the class-major path (what compare_similarity runs at this size) and the row path
    _core.class_major_metrics(W, st, counts, 3, _core._GridTables(grids),
                              np.empty((1, 2, k, k), np.uint16))
    _core.replicate_metrics(_core.stacked_class_sums(W, st), counts, 2, 3, grids)
    return time.perf_counter() - t0


def child(args) -> None:
    import torch

    from interptool._progress import set_quiet
    from interptool.analyzers.similarity import compare_similarity

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "compile":
        print("RESULT " + json.dumps({"kernels_s": warm_kernels()}))
        return
    set_quiet(True)
    models = make_models(args.n, args.k, 1 + args.students)
    result: dict = {"threads": torch.get_num_threads()}
    if args.child == "new":
        from interptool.analyzers.similarity import _kernels

        result["numba"] = _kernels.usable()
        result["kernels_load_s"] = warm_kernels()
        # imports (scipy.stats, pandas paths) and first-call costs outside the timings: the
        # bootstrap's time is the n_boot run minus the n_boot=0 run
        compare_similarity(*make_models(200, 10, 1 + args.students), n_boot=2)
        t0, c0 = time.perf_counter(), time.process_time()
        compare_similarity(*models, n_boot=0, device=args.device)
        t1, c1 = time.perf_counter(), time.process_time()
        res = compare_similarity(*models, n_boot=args.n_boot, seed=0, device=args.device)
        t2, c2 = time.perf_counter(), time.process_time()
        result.update(point_wall=t1 - t0, point_cpu=c1 - c0, total_wall=t2 - t1,
                      total_cpu=c2 - c1, boot_wall=(t2 - t1) - (t1 - t0),
                      boot_cpu=(c2 - c1) - (c1 - c0))
        names = [m.name for m in models]
        result["replicates"] = {
            f"{i}|{metric}": res.bootstrap[f"{names[i]}|1|{metric}"][:args.old_n_boot].tolist()
            for i in range(1, len(models))
            for metric in ("pearson", "spearman", "kl", "js_distance", "topk_overlap")}
        rows = res.estimates[res.estimates["metric"].isin(["spearman", "js_distance", "kl"])]
        result["intervals"] = rows[["model", "metric", "value", "ci_low", "ci_high", "bias",
                                    "ci_widened"]].to_dict(orient="records")
    else:
        t0, c0 = time.perf_counter(), time.process_time()
        reps = old_bootstrap(models, args.old_n_boot, seed=0)
        result.update(boot_wall=time.perf_counter() - t0, boot_cpu=time.process_time() - c0)
        result["replicates"] = {f"{i}|{metric}": v.tolist() for (i, metric), v in reps.items()
                                if i >= 1 and metric != "entropy"}
    print("RESULT " + json.dumps(result))


def run(args, which: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--n", str(args.n), "--k", str(args.k),
           "--students", str(args.students), "--n-boot", str(args.n_boot),
           "--old-n-boot", str(args.old_n_boot), "--device", args.device,
           "--threads", str(args.threads)]
    env = dict(os.environ if env is None else env)
    if args.threads:
        env["NUMBA_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{which} child failed:\n{out}")
    res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    res["process_wall"] = time.perf_counter() - t0
    res["peak_mib"] = usage.ru_maxrss / 1024
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--students", type=int, default=2)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--old-n-boot", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch and numba threads in the children (0: the library's default)")
    ap.add_argument("--child", choices=["new", "old", "compile"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    print(f"{args.n} x {args.k} logits, teacher + {args.students} students; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    import tempfile

    with tempfile.TemporaryDirectory() as cache_dir:
        comp = run(args, "compile", dict(os.environ, NUMBA_CACHE_DIR=cache_dir))
    print(f"numba kernels: compile {comp['kernels_s']:.1f} s (empty cache, once per install); "
          "load from the cache: see below")
    new = run(args, "new")
    # the call as a user meets it (point estimate + bootstrap), beside the bootstrap's share
    print(f"new: compare_similarity(n_boot={args.n_boot}) whole call {new['total_wall']:.1f} s "
          f"wall, {new['total_cpu']:.1f} s CPU")
    print(f"new: {args.n_boot} resamples: bootstrap {new['boot_wall']:.1f} s wall, "
          f"{new['boot_cpu']:.1f} s CPU ({new['threads']} threads, numba {new['numba']}); "
          f"point estimate {new['point_wall']:.1f} s wall, {new['point_cpu']:.1f} s CPU; "
          f"kernels loaded in {new['kernels_load_s']:.2f} s; peak RSS {new['peak_mib']:.0f} MiB; "
          f"load average now {os.getloadavg()[0]:.1f}")
    old = run(args, "old")
    per = old["boot_wall"] / args.old_n_boot
    per_cpu = old["boot_cpu"] / args.old_n_boot
    print(f"old: {args.old_n_boot} resamples {old['boot_wall']:.1f} s wall -> "
          f"{per * args.n_boot:.0f} s wall ({per_cpu * args.n_boot:.0f} s CPU) for "
          f"{args.n_boot}; peak RSS {old['peak_mib']:.0f} MiB")
    print(f"speed-up (CPU seconds per resample): {per_cpu / (new['boot_cpu'] / args.n_boot):.1f}x")
    worst = 0.0
    for key, v_old in old["replicates"].items():
        v_new = np.asarray(new["replicates"][key])
        d = np.nanmax(np.abs(v_new - np.asarray(v_old)[:v_new.size]))
        worst = max(worst, d)
        print(f"  same resamples, model {key}: max |new - old| = {d:.2e}")
    print(f"largest replicate difference (same seed, same resamples): {worst:.2e}")
    for row in new["intervals"]:
        print(f"  {row['model']:>8} {row['metric']:<12} {row['value']:.4f} "
              f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}] bias {row['bias']:+.4f}"
              f"{' (widened)' if row['ci_widened'] else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
