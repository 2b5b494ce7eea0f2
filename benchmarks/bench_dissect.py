"""Benchmark: interptool's dissection tally vs a straightforward NetDissect-Lite-style loop.

Builds (or reuses) a concept-world probe, caches the layer3/layer4 features of a model on it
(default: a randomly initialised torchvision resnet18; ``--arch interptool:cw-teacher
--checkpoint interptool/weights/teacher.safetensors`` for the trained demo teacher, whose units
fire sparsely as trained nets do). The cache step is timed: it is the forward-pass cost
dissection is compared with. Then for each layer:

* runs ``Dissection`` (exact quantiles + vectorised tally) and records time and peak memory;
* runs a per-image, per-unit float64 reference loop (Pillow resize per map, ``np.bincount``
  per unit, as NetDissect-Lite's ``tally_job`` with the stale accumulator fixed) over the
  same thresholds, and checks that every count and IoU is identical.

Usage::

    python benchmarks/bench_dissect.py --n 2000 --size 64 [--ref-n 300] [--device cpu]

The reference loop is slow, so by default it runs on the first ``--ref-n`` images only and
interptool's tally is timed on the same subset for the speed ratio (and on all images). Both
sides get decoded masks; interptool's time includes flattening them (``seg_item``). Times are
wall clock and process CPU time (the CPU ratio is the one to trust on a shared, loaded
machine); each side is timed ``--repeat`` times and the fastest run kept. On CPU the tally uses
the compiled numba kernel when numba is installed (``--torch-tally``: the torch path, for a
before/after comparison in one session); numba's one-time import and cached JIT load are
timed apart, before the runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def reference_tally(feats: np.ndarray, probe, thresholds: np.ndarray, n: int,
                    segs: list | None = None) -> dict:
    """Per image, per unit; float64 accumulators; Pillow bilinear resize of each map."""
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
        seg = segs[i] if segs is not None else probe.load_segmentation(i)
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


def tally_ours(feats: np.ndarray, raw: list, thresholds: np.ndarray, probe, batch_size: int,
               device: torch.device) -> dict:
    """interptool's tally from decoded masks: flattening (``seg_item``) + ``TallyAccumulator``."""
    from interptool.analyzers.dissection._tally import TallyAccumulator, seg_item

    cats = list(probe.categories)
    acc = TallyAccumulator(thresholds, np.asarray(probe.label_category), len(cats), device)
    for s in range(0, len(raw), batch_size):
        chunk = [seg_item(i, raw[i], cats) for i in range(s, min(s + batch_size, len(raw)))]
        acc.add(torch.from_numpy(feats[s : s + len(chunk)]).to(device), chunk)
    return acc.counts()  # copies to the host, so a GPU run is finished when it returns


def timed(fn, repeat: int):
    """(result, fastest wall seconds, fastest process CPU seconds) over ``repeat`` runs."""
    best_w = best_c = float("inf")
    out = None
    for _ in range(max(1, repeat)):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best_w = min(best_w, time.perf_counter() - w0)
        best_c = min(best_c, time.process_time() - c0)
    return out, best_w, best_c


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="probe images (concept-world)")
    ap.add_argument("--size", type=int, default=64, help="image size (px)")
    ap.add_argument("--ref-n", type=int, default=300, help="images for the reference loop")
    ap.add_argument("--layers", default="layer3,layer4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", default="torchvision:resnet18")
    ap.add_argument("--checkpoint", default=None, help="weights (default: random init)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side (fastest kept)")
    ap.add_argument("--torch-tally", action="store_true",
                    help="use the torch tally path even when numba is installed (the compiled "
                         "kernel is otherwise used on CPU)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_dissect"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from interptool.analyzers.dissection import Dissection
    from interptool.analyzers.dissection import _numba as _dissection_numba
    from interptool.analyzers.dissection import _tally as _dissection_tally

    if args.torch_tally:
        _dissection_tally.USE_NUMBA = False
    t0 = time.perf_counter()
    if _dissection_tally.USE_NUMBA and args.device == "cpu" and _dissection_numba.usable():
        # one-time cost per process, reported apart: numba import + load of the kernel from
        # numba's on-disk cache (a compile, several seconds, only on the very first run)
        t_jit = _dissection_numba.warm_up() + time.perf_counter() - t0
        kernel = f"numba kernel (import + JIT load {t_jit:.2f} s, not in the timings below)"
    else:
        kernel = "torch path"
    from interptool.cache import ActivationCache, cache_activations, write_cache
    from interptool.data import open_dataset
    from interptool.loading import load_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("INTERPTOOL_DATA", str(work / "data"))
    probe = open_dataset(f"builtin:concept-world?n={args.n}&size={args.size}")
    layers = [s for s in args.layers.split(",") if s]
    tag = args.arch.split(":")[-1] + ("-trained" if args.checkpoint else "")
    cache_path = work / f"{tag}_n{args.n}_s{args.size}.h5"
    cache_path.unlink(missing_ok=True)  # time real forward passes, not a cache hit
    t0 = time.perf_counter()
    torch.manual_seed(0)
    loaded = load_model(args.arch, args.checkpoint, num_classes=10,
                        image_size=(args.size, args.size), device=args.device)
    cache_activations(loaded, probe, layers, cache_path, batch_size=args.batch_size,
                      dtype="float32", probe=True, device=args.device)
    t_cache = time.perf_counter() - t0
    print(f"machine: {os.cpu_count()} CPUs visible, torch threads {args.threads}, "
          f"device {args.device}; torch {torch.__version__}")
    print(f"probe: concept-world n={args.n} size={args.size} seg={probe.seg_size(0)} "
          f"labels={probe.num_labels}; forward+cache ({tag}): {t_cache:.1f} s; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; tally: {kernel}")

    with ActivationCache(cache_path) as cache:
        for layer in layers:
            shape = cache.features(layer).shape
            t0, c0 = time.perf_counter(), time.process_time()
            res = Dissection(batch_size=args.batch_size, device=args.device,
                             checksum=False).run(cache, layer, probe)
            t_full, c_full = time.perf_counter() - t0, time.process_time() - c0
            print(f"\n{layer} {tuple(shape)}: interptool dissection (quantiles + tally), all "
                  f"{args.n} images: {t_full:.2f} s wall ({c_full:.2f} s CPU) = {t_full / t_cache:.2f}x the forward+cache "
                  f"time; {len(res.detectors())} detectors; peak RSS so far "
                  f"{peak_rss_mb():.0f} MB")
            # reference comparison on the first ref-n images, same thresholds
            m = min(args.ref_n, args.n)
            feats = cache.features(layer)[:m].astype(np.float32)
            sub = work / f"sub_{layer}.h5"
            write_cache(sub, logits=np.zeros((m, 1)), ids=probe.ids[:m],
                        features={layer: feats},
                        attrs={"data_fingerprint": "", "data_spec": probe.spec})

            class Sub:  # the first m probe images
                def __init__(self, p, m):
                    self.__dict__.update({k: getattr(p, k) for k in (
                        "categories", "label_names", "label_category", "num_labels", "spec")})
                    self.ids, self.fingerprint, self._p, self._m = p.ids[:m], "", p, m

                def __len__(self):
                    return self._m

                def load_segmentation(self, i):
                    return self._p.load_segmentation(i)

            # time the tally alone for both, on identical thresholds and pre-decoded masks
            sp = Sub(probe, m)
            raw = [probe.load_segmentation(i) for i in range(m)]
            ours, t_ours, c_ours = timed(partial(tally_ours, feats, raw, res.thresholds, probe,
                                                 args.batch_size, torch.device(args.device)),
                                         args.repeat)
            ref, t_ref, c_ref = timed(partial(reference_tally, feats, sp, res.thresholds, m, raw),
                                      args.repeat)
            peak = feats.reshape(m, feats.shape[1], -1).max(axis=2) > res.thresholds[None]
            same_i = np.array_equal(ours["intersect"], ref["intersect"].astype(np.int64))
            same_a = np.array_equal(ours["label_area"], ref["label_area"].astype(np.int64))
            from interptool.analyzers.dissection._analyzer import _score

            iou = _score(ours, np.asarray(probe.label_category), len(probe.categories))["iou"]
            same_iou = np.array_equal(iou, ref["iou"])
            print(f"  tally on {m} images ({peak.mean():.1%} of (image, unit) pairs fire, "
                  f"{ours['unit_area'].sum() / max(peak.sum(), 1):.0f} masked px per firing "
                  f"pair): interptool {t_ours:.3f} s wall / {c_ours:.3f} s CPU, reference loop "
                  f"{t_ref:.3f} s / {c_ref:.3f} s -> {t_ref / t_ours:.1f}x faster (wall), "
                  f"{c_ref / c_ours:.1f}x (CPU); identical intersections {same_i}, label areas "
                  f"{same_a}, IoUs {same_iou}")
            if not (same_i and same_a and same_iou):
                print("  MISMATCH", file=sys.stderr)
                return 1
    print(f"\npeak RSS {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
