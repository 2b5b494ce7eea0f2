"""Benchmark: `interptool cache` + `interptool dissect` end to end, as a user meets them.

Default mode (end to end): for each ``--n`` it generates (or reuses) the probe
``builtin:concept-world?version=1&n=N&size=224`` (Broden1_224's geometry: 224 px images, 112 px masks),
runs ``interptool cache`` (random-init torchvision resnet18, ``--layers layer4``, float32) and
then ``interptool dissect`` on that cache, each as a fresh child process; it prints the
process wall time, CPU time and peak RSS of each, and their sum. ``--variant`` runs the
dissect step under other settings (e.g. ``threads1`` or ``no-figures``) for paired
comparisons; ``--repeat`` interleaves the variants and keeps the fastest run of each.

``--check-reference M``: also compares the tally on the first M images with a per-image,
per-unit float64 loop written here (Pillow resize per map, ``np.bincount`` per unit, as
NetDissect-Lite's ``tally_job`` with the stale accumulator fixed), and exits 1 unless every
intersection, label area and IoU is identical.

Usage::

    python benchmarks/bench_dissect.py --n 480 3000 [--variant default threads1] \
        [--repeat 2] [--check-reference 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
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

# dissect variants: (python set-up run before the CLI, extra CLI arguments)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("", []),
    # one torch thread, as the issue-13 "1 thread" baseline
    "threads1": ("import torch; torch.set_num_threads(1)", []),
    "no-figures": ("", ["--no-figures"]),
    # masks decoded in the analysis process (the default before mask workers were chosen)
    "workers0": ("", ["--workers", "0"]),
    "workers0-no-figures": ("", ["--workers", "0", "--no-figures"]),
    # masks read from a store in --workdir (written by the first run of the variant)
    "mask-store-no-figures": ("", ["--mask-store", "{store}", "--no-figures"]),
}


def reference_tally(feats: np.ndarray, probe, thresholds: np.ndarray, n: int) -> dict:
    """Per image, per unit; float64 accumulators; Pillow bilinear resize of each map."""
    from PIL import Image

    units = feats.shape[1]
    L, C = probe.num_labels, len(probe.categories)
    labelcat = np.zeros((L, C))
    for lab in range(1, L):
        if probe.label_category[lab] >= 0:
            labelcat[lab, probe.label_category[lab]] = 1
    both = np.zeros((units, L))
    labels = np.zeros(L)
    ucat = np.zeros((units, C))
    for i in range(n):
        seg = probe.load_segmentation(i)
        sh, sw = seg.size
        scalars = [int(s) for c in probe.categories for s in seg.image.get(c, [])]
        planes = [p for c in probe.categories for p in seg.pixel.get(c, [])]
        pixels = np.stack(planes) if planes else None
        for s in scalars:
            labels[s] += sh * sw
        if pixels is not None:
            t = np.bincount(pixels.ravel(), minlength=L)
            t[0] = 0
            labels += t
        for u in range(units):
            fm = feats[i, u]
            if fm.max() <= thresholds[u]:
                continue
            mask = np.asarray(Image.fromarray(fm.astype(np.float32), mode="F").resize(
                (sw, sh), Image.BILINEAR))
            idx = np.argwhere(mask > thresholds[u])
            tally_cat = np.zeros(C)
            if pixels is not None:
                bt = np.bincount(pixels[:, idx[:, 0], idx[:, 1]].ravel(), minlength=L)
                bt[0] = 0
                tally_cat = bt @ labelcat
                both[u] += bt
            for s in scalars:
                tally_cat = tally_cat + labelcat[s]
                both[u, s] += len(idx)
            ucat[u] += len(idx) * (tally_cat > 0)
    iou = both / (ucat @ labelcat.T + labels[None] - both + 1e-10)
    iou[:, probe.label_category < 0] = 0
    iou[:, 0] = 0
    return {"iou": iou, "intersect": both, "label_area": labels}


def check_reference(cache_path: Path, layer: str, spec: str, m: int) -> bool:
    """interptool's tally on the first ``m`` images against :func:`reference_tally`."""
    import torch

    from interptool.analyzers.dissection._analyzer import _score
    from interptool.analyzers.dissection._tally import TallyAccumulator, seg_item
    from interptool.cache import ActivationCache
    from interptool.data import open_dataset

    probe = open_dataset(spec)
    with ActivationCache(cache_path) as cache:
        from interptool.analyzers.dissection import Dissection

        res = Dissection(checksum=False).run(cache, layer, probe)
        feats = np.asarray(cache.features(layer)[:m], dtype=np.float32)
    cats = list(probe.categories)
    t0 = time.process_time()
    acc = TallyAccumulator(res.thresholds, np.asarray(probe.label_category), len(cats),
                           torch.device("cpu"))
    for s in range(0, m, 64):
        items = [seg_item(i, probe.load_segmentation(i), cats) for i in range(s, min(s + 64, m))]
        acc.add(torch.from_numpy(feats[s : s + len(items)]), items)
    ours = acc.counts()
    c_ours = time.process_time() - t0
    t0 = time.process_time()
    ref = reference_tally(feats, probe, res.thresholds, m)
    c_ref = time.process_time() - t0
    iou = _score(ours, np.asarray(probe.label_category), len(cats))["iou"]
    same = (np.array_equal(ours["intersect"], ref["intersect"].astype(np.int64))
            and np.array_equal(ours["label_area"], ref["label_area"].astype(np.int64))
            and np.array_equal(iou, ref["iou"]))
    print(f"  reference check, {layer}, first {m} images: tally {c_ours:.2f} s CPU (with mask "
          f"decoding), reference loop {c_ref:.2f} s CPU; identical counts and IoUs: {same}")
    return same


ANALYSIS_CODE = """
import resource, sys, time
{setup}
import torch
from interptool.analyzers.dissection import Dissection
from interptool.cache import ActivationCache
with ActivationCache({cache!r}) as cache:
    d = Dissection(checksum=False{kwargs})
    def cpu():  # this process and its reaped children (mask workers)
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + ch.ru_utime + ch.ru_stime
    w0, c0 = time.perf_counter(), cpu()
    res = d.run(cache, {layer!r})
    w, c = time.perf_counter() - w0, cpu() - c0
threads = (res.config.get("threads") or {{}}).get("torch_threads")
print(f"RESULT {{w:.3f}} {{c:.3f}} {{threads}}")
"""

# in-process analysis settings: python run before Dissection.run
ANALYSIS_SETTINGS = {
    "default": "",  # threads chosen by the analysis (free cores now, see _threads.py)
    "threads1": "import torch; torch.set_num_threads(1)",
    # two threads whatever the load (torch's own default on 2 cores, the old behaviour)
    "threads2": "import torch; torch.set_num_threads(2)\n"
                "import interptool.analyzers.dissection._analyzer as a\n"
                "a.analysis_threads = lambda workers=0: {'torch_threads': 2}",
    # masks decoded in this process (the default before mask workers were chosen)
    "workers0": "import interptool.analyzers.dissection._analyzer as a\n"
                "a.mask_workers = lambda *args, **kwargs: 0",
    # masks read back from a mask store written by an earlier (untimed) run
    "mask-store": "",
}
# Dissection arguments per setting ({store}: the mask store folder in --workdir)
ANALYSIS_KWARGS = {"mask-store": ", mask_store={store!r}"}


def analysis_times(cache_path: Path, layer: str, settings: list[str], repeat: int,
                   store: Path) -> None:
    """Time ``Dissection.run`` alone (in a fresh process per run), interleaved settings; a
    setting reading the mask store gets it written first, untimed."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in settings}

    def code(name: str) -> str:
        kwargs = ANALYSIS_KWARGS.get(name, "").format(store=str(store))
        return ANALYSIS_CODE.format(setup=ANALYSIS_SETTINGS[name], cache=str(cache_path),
                                    layer=layer, kwargs=kwargs)

    def result(name: str) -> list[str]:
        """Run the setting in a fresh process: its wall time, CPU time and torch threads."""
        run = run_child(code(name))
        line = [ln for ln in run.output.splitlines() if ln.startswith("RESULT")]
        if run.returncode or not line:
            print(run.output)
            raise SystemExit(1)
        return line[0].split()[1:]

    for name in settings:
        if name in ANALYSIS_KWARGS:
            print(f"  analysis [{name}], first run (decodes and writes the store): "
                  f"{float(result(name)[0]):.2f} s wall")
    for _ in range(repeat):
        for name in settings:
            w, c, threads = result(name)
            times[name].append((float(w), float(c)))
            print(f"  analysis [{name}] (threads used: {threads}): {float(w):.2f} s wall, "
                  f"{float(c):.2f} s CPU (load {load_average()})")
    for name, ts in times.items():
        ws = sorted(w for w, _ in ts)
        print(f"  analysis [{name}]: median {ws[len(ws) // 2]:.2f} s wall, min {ws[0]:.2f} s, "
              f"max {ws[-1]:.2f} s over {len(ws)} runs")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[480, 3000], help="probe images")
    ap.add_argument("--size", type=int, default=224, help="image side (masks: half)")
    ap.add_argument("--arch", default="torchvision:resnet18")
    ap.add_argument("--layer", default="layer4")
    ap.add_argument("--variant", nargs="*", default=["default"], choices=sorted(VARIANTS),
                    help="dissect settings to time (none: only the cache and --analysis)")
    ap.add_argument("--repeat", type=int, default=1, help="dissect runs per variant (fastest)")
    ap.add_argument("--analysis", nargs="+", choices=sorted(ANALYSIS_SETTINGS),
                    help="also time Dissection.run alone under these thread settings")
    ap.add_argument("--busy-core", action="store_true",
                    help="keep one core busy (python -c 'while 1: pass') during the dissect "
                         "and analysis runs, as on a shared machine")
    ap.add_argument("--check-reference", type=int, default=0, metavar="M",
                    help="also check the tally against a reference loop on M images")
    ap.add_argument("--import-floor", action="store_true",
                    help="also time a child that only imports what dissect cannot do without "
                         "(torch, pandas, h5py, PIL), to tell interptool's own overhead from "
                         "theirs on a loaded machine")
    ap.add_argument("--reuse-cache", action="store_true",
                    help="reuse a cache left in --workdir by an earlier run (not timed)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_dissect"))
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    ok = True
    for n in args.n:
        spec = probe_spec(n, args.size)
        if not generate_probe(spec):
            return 1
        cache_path = work / f"n{n}_s{args.size}.h5"
        if args.reuse_cache and cache_path.is_file():
            print(f"\nn={n}: reusing {cache_path} (cache step not timed)")
            cache = None
        else:
            cache_path.unlink(missing_ok=True)
            cache = time_cache(args, n, spec, cache_path)
            if cache is None:
                return 1
        busy = (subprocess.Popen([sys.executable, "-c", "while 1: pass"])
                if args.busy_core else None)
        try:
            if args.analysis:
                analysis_times(cache_path, args.layer, args.analysis, max(1, args.repeat),
                               work / "mask_store")
            best = dissect_runs(args, n, cache_path)
            if args.import_floor:
                import_floor()
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        if best is None:
            return 1
        for name, run in best.items():
            if cache is not None:
                print(f"  cache + dissect [{name}], fastest: {cache.wall + run.wall:.1f} s "
                      f"wall, {cache.cpu + run.cpu:.1f} s CPU, peak "
                      f"{max(cache.peak_mib, run.peak_mib):.0f} MiB")
        if args.check_reference:
            ok &= check_reference(cache_path, args.layer, spec, min(args.check_reference, n))
    return 0 if ok else 1


FLOOR_IMPORTS = "import torch, pandas, h5py, PIL.Image"


def import_floor() -> None:
    """A child importing only the libraries the dissect process needs: the part of its
    overhead interptool cannot remove (CPU time grows with the machine's load)."""
    run = run_child(FLOOR_IMPORTS)
    print(f"  import floor ({FLOOR_IMPORTS}): {run.wall:.2f} s wall, {run.cpu:.2f} s CPU "
          f"(load {load_average()})")


def time_cache(args: argparse.Namespace, n: int, spec: str, cache_path: Path):
    """``interptool cache`` of the probe into ``cache_path``, timed (None on failure)."""
    cache = cache_child(args.arch, spec, args.layer, cache_path, "float32")
    if cache.returncode:
        print(cache.output)
        return None
    print(f"\nn={n} ({spec}), {args.arch} {args.layer}: cache "
          f"{cache.wall:.1f} s wall, {cache.cpu:.1f} s CPU, peak {cache.peak_mib:.0f} MiB "
          f"(load {load_average()})")
    return cache


def dissect_runs(args: argparse.Namespace, n: int, cache_path: Path) -> dict | None:
    """``interptool dissect`` per variant, ``--repeat`` times interleaved; the fastest of each."""
    best: dict[str, object] = {}
    for _ in range(max(1, args.repeat)):
        for name in args.variant:
            setup, extra = VARIANTS[name]
            out = Path(args.workdir) / f"dissect_n{n}_{name}"
            extra = [a.format(store=Path(args.workdir) / "mask_store") for a in extra]
            run = run_child(cli_code(["dissect", str(cache_path), "--layer", args.layer,
                                      "--out", str(out), "--quiet", *extra], setup))
            if run.returncode:
                print(run.output)
                return None
            print(f"  dissect [{name}]: {run.wall:.2f} s wall, {run.cpu:.2f} s CPU, peak "
                  f"{run.peak_mib:.0f} MiB (load {load_average()})")
            if name not in best or run.wall < best[name].wall:
                best[name] = run
    return best

if __name__ == "__main__":
    sys.exit(main())
