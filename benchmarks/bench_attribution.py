"""Overhead of interptool's attribution adapters over the same captum call written directly.

Same model (torchvision resnet18, random init, in-place ReLUs), same images, same
parameters, one process: interptool's ``Attribution(...).run`` (deep copy of the model with
in-place off, a no-grad forward for predictions, channel reduction, numpy conversion) against
``IntegratedGradients`` / ``LayerGradCam`` called on the model by hand. Outputs are asserted
equal (allclose); the best-of-``--repeat`` wall times and the overhead ratio are printed.

    .venv/bin/python benchmarks/bench_attribution.py [--size 112] [--n 16] [--steps 8]
        [--repeat 5] [--threads 2] [--device cpu]
        [--only integrated_gradients|grad_cam|faithfulness|memory] [--faith-n 200]
        [--mem-flat ig|scores|both] [--mem-score-size 224] [--mem-faith-steps 8]

``--only memory``: peak RSS (``ru_maxrss`` of a fresh child process per case) of integrated
gradients with the default internal batching: six 224 px inputs through timm
``efficientnet_lite0`` (random init, 32 steps), and 64 vs 512 images of a small model
(``--mem-arch``, default the demo student, ``--mem-size`` px, ``--mem-steps`` steps) written
to ``attributions.h5`` (flat memory wanted).
``--mem-unbatched`` also runs the Lite0 case with everything in one captum pass (the old
default; ~16 GB, so off by default).
The flatness measurement also covers scoring: ``score_maps`` (agreement of two models' maps
and deletion + insertion faithfulness, as ``interptool attribute`` and ``compare`` score)
on 64 vs 512 images whose saliency maps (``--mem-score-size`` px, 224 by default: where
scoring memory matters) were written to ``attributions.h5`` beforehand by another child
process; the models are two tiny CNNs (the forward passes are not what is measured), the
curves use ``--mem-faith-steps`` steps and the ``--mem-faith-baseline`` baseline (``mean``:
the blur costs time, not memory). ``--mem-flat ig|scores`` runs one of the two flatness
cases only.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _best_interleaved(ref_fn, our_fn, repeat: int):
    """Best-of-``repeat`` times, the two calls alternating so that load from other processes
    on a shared machine hits both alike."""
    t_ref = t_our = float("inf")
    ref = our = None
    for _ in range(repeat):
        t, ref = _timed(ref_fn)
        t_ref = min(t_ref, t)
        t, our = _timed(our_fn)
        t_our = min(t_our, t)
    return t_ref, ref, t_our, our


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--internal-batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=["integrated_gradients", "grad_cam", "faithfulness",
                                       "memory"], help="time / measure one part only")
    ap.add_argument("--mem-arch", default="interptool:cw-student",
                    help="model of the 64-vs-512-image flatness case")
    ap.add_argument("--mem-size", type=int, default=64, help="image size of that case")
    ap.add_argument("--mem-steps", type=int, default=8, help="IG steps of that case")
    ap.add_argument("--mem-skip-lite0", action="store_true", help="flatness case only")
    ap.add_argument("--mem-unbatched", action="store_true",
                    help="also measure the Lite0 case with no internal batching (~16 GB)")
    ap.add_argument("--mem-flat", choices=["ig", "scores", "both"], default="both",
                    help="flatness cases: integrated gradients (Attribution.run), scoring "
                         "(score_maps: agreement + faithfulness), or both")
    ap.add_argument("--mem-score-size", type=int, default=224,
                    help="map (and input) size of the scoring flatness case")
    ap.add_argument("--mem-faith-steps", type=int, default=8,
                    help="deletion/insertion steps of the scoring flatness case")
    ap.add_argument("--mem-faith-baseline", default="mean", choices=["blur", "mean", "zeros"],
                    help="faithfulness baseline of the scoring flatness case")
    ap.add_argument("--faith-n", type=int, default=200,
                    help="images for the faithfulness timing (demo teacher, concept-world)")
    ap.add_argument("--faith-loop-n", type=int, default=10,
                    help="images timed with one model call per (image, step), extrapolated")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require")
    torch.set_num_threads(args.threads)
    if args.only == "faithfulness":
        return _faithfulness(args)
    if args.only == "memory":
        return _memory(args)

    import torchvision
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    from interptool.analyzers.attribution import Attribution

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval().to(args.device)
    x = torch.randn(args.n, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    x = x.to(args.device)
    y = torch.arange(args.n) % 10
    dev_y = y.to(args.device)

    def captum_ig():
        xi = x.clone().requires_grad_(True)
        a = IntegratedGradients(model).attribute(
            xi, baselines=torch.zeros_like(xi), target=dev_y, n_steps=args.steps,
            internal_batch_size=args.internal_batch_size)
        return a.detach().abs().sum(dim=1).cpu().numpy()

    def ours_ig():
        return Attribution("integrated_gradients", steps=args.steps,
                           internal_batch_size=args.internal_batch_size).run(
            model, x, labels=y, batch_size=args.n, device=args.device, keep_images=0).maps

    def captum_cam():
        xi = x.clone().requires_grad_(True)
        cam = LayerGradCam(model, model.layer4).attribute(xi, target=dev_y,
                                                          relu_attributions=True)
        up = LayerAttribution.interpolate(cam, (args.size, args.size), "bilinear")
        return up.detach()[:, 0].cpu().numpy()

    def ours_cam():
        return Attribution("grad_cam", layer="layer4").run(
            model, x, labels=y, batch_size=args.n, device=args.device, keep_images=0).maps

    print(f"model torchvision:resnet18 (random init), {args.n} images "
          f"{args.size}x{args.size}, device {args.device}, threads {torch.get_num_threads()}, "
          f"best of {args.repeat}")
    worst = 0.0
    for name, ref_fn, our_fn in (("integrated_gradients", captum_ig, ours_ig),
                                 ("grad_cam", captum_cam, ours_cam)):
        if args.only and name != args.only:
            continue
        our_fn(), ref_fn()  # warm-up
        t_ref, ref, t_our, our = _best_interleaved(ref_fn, our_fn, args.repeat)
        np.testing.assert_allclose(our, ref, rtol=1e-5, atol=1e-6)
        ratio = t_our / t_ref
        worst = max(worst, ratio)
        print(f"{name:<22s} captum {t_ref:7.3f} s   interptool {t_our:7.3f} s   "
              f"overhead {100 * (ratio - 1):+5.1f}%   outputs equal")
    return 0 if worst <= 1.10 else 1


def _faithfulness(args) -> int:
    """Deletion + insertion on ``--faith-n`` concept-world eval images with the shipped demo
    teacher: the batched implementation (all (image, step) pairs in flat batches) against
    the per-instance pattern (one model call per image and step, as in Quantus before it was
    batched) timed on ``--faith-loop-n`` images and extrapolated; curves asserted equal."""
    import os
    from pathlib import Path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from interptool._progress import set_quiet
    from interptool.analyzers.attribution import Attribution, faithfulness
    from interptool.data import open_dataset
    from interptool.loading import load_model

    set_quiet(True)
    weights = Path(__file__).resolve().parents[1] / "interptool" / "weights"
    # the demo's teacher (the reproduction study's cw2-resnet34) on its own data, 48 px
    loaded = load_model("interptool:cw2-resnet34", weights / "cw2-teacher.safetensors",
                        device=args.device)
    ds = open_dataset(f"builtin:concept-world?version=2&n={args.faith_n}&size=48&split=eval")
    tf = loaded.preprocessing.probe_transform()
    tds = ds.torch_dataset(tf)
    x = torch.stack([tds[i][0] for i in range(len(ds))])
    res = Attribution("saliency").run(loaded, ds, batch_size=50, device=args.device,
                                      keep_images=0)
    kw = dict(patch=8, steps=16, baseline="blur", device=args.device, n_boot=1000)
    t0 = time.perf_counter()
    curves = {}
    for mode in ("deletion", "insertion"):
        curves[mode] = faithfulness(loaded.model, x, res.maps, res.targets, mode=mode,
                                    batch_size=256, **kw).curves
    t_batched = time.perf_counter() - t0
    k = min(args.faith_loop_n, len(ds))
    t0 = time.perf_counter()
    for mode in ("deletion", "insertion"):
        loop = np.concatenate([
            faithfulness(loaded.model, x[i:i + 1], res.maps[i:i + 1], res.targets[i:i + 1],
                         mode=mode, batch_size=1, **{**kw, "n_boot": 0}).curves
            for i in range(k)])
        np.testing.assert_allclose(loop, curves[mode][:k], rtol=1e-4, atol=1e-6)
    t_loop = (time.perf_counter() - t0) * len(ds) / k
    print(f"faithfulness deletion+insertion, {len(ds)} images 64x64, 16 steps, 8 px patches, "
          f"blur baseline, demo teacher, device {args.device}, threads "
          f"{torch.get_num_threads()}: batched {t_batched:.2f} s "
          f"({2 * len(ds) * 17} forward passes in {2 * -(-len(ds) * 17 // 256)} model calls); "
          f"per-(image, step) loop {t_loop:.1f} s (extrapolated from {k} images); "
          f"speed-up {t_loop / t_batched:.1f}x; curves equal")
    return 0


_LITE0 = """
import json, time, warnings, torch, timm
warnings.filterwarnings("ignore")
torch.set_num_threads({threads})
from interptool._progress import set_quiet
from interptool.analyzers.attribution import Attribution
set_quiet(True)
torch.manual_seed(0)
model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
x = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(1))
y = torch.arange(6)
kw = {{}} if {internal!r} == "default" else {{"internal_batch_size": 10**9}}
t0 = time.perf_counter()
res = Attribution("integrated_gradients", steps=32, **kw).run(model, x, labels=y,
                                                              keep_images=0)
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - t0,
                               "params": res.params}}))
"""

_FLAT = """
import json, sys, time, warnings, numpy as np, torch
warnings.filterwarnings("ignore")
torch.set_num_threads({threads})
from interptool._progress import set_quiet
from interptool.analyzers.attribution import Attribution
from interptool.loading import load_model
set_quiet(True)

class Synthetic:
    # an ImageDataset stand-in that makes each image on demand (nothing of size N in memory)
    def __init__(self, n, size):
        self.n, self.size = n, size
        self.labels = np.arange(n, dtype=np.int64) % 10
        self.ids = [f"img{{i}}" for i in range(n)]
        self.spec, self.fingerprint = f"synthetic:{{n}}", f"synthetic-{{n}}"
    def __len__(self):
        return self.n
    def torch_dataset(self, transform):
        outer = self
        class D(torch.utils.data.Dataset):
            def __len__(self):
                return outer.n
            def __getitem__(self, i):
                g = torch.Generator().manual_seed(i)
                return torch.randn(3, outer.size, outer.size, generator=g), int(outer.labels[i]), i
        return D()

loaded = load_model({arch!r}, num_classes=10)
ds = Synthetic({n}, {size})
t0 = time.perf_counter()
res = Attribution("integrated_gradients", steps={steps}).run(
    loaded, ds, batch_size=16, out={out!r}, overwrite=True, keep_images=0, transform=lambda im: im)
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - t0, "n": res.n}}))
"""


# two tiny CNNs (teacher / student of the scoring case) and synthetic inputs made per row,
# the same in the child that writes the maps and the one that scores them
_TINY = """
import numpy as np, torch
from torch import nn

def tiny(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()

def images(rows, size):
    return torch.stack([torch.randn(3, size, size,
                                    generator=torch.Generator().manual_seed(int(r)))
                        for r in rows])
"""

_SCORE_MAPS = _TINY + """
import warnings
warnings.filterwarnings("ignore")
torch.set_num_threads({threads})
from interptool._progress import set_quiet
from interptool.analyzers.attribution import Attribution
set_quiet(True)
x = images(range({n}), {size})
for name, seed in (("teacher", 0), ("student", 1)):
    Attribution("saliency").run(tiny(seed), x, labels=torch.arange({n}) % 10, batch_size=64,
                                out={folder!r} + "/" + name, overwrite=True, keep_images=0)
print("RESULT {{}}")
"""

_FLAT_SCORES = _TINY + """
import json, time, warnings
warnings.filterwarnings("ignore")
torch.set_num_threads({threads})
from interptool._progress import set_quiet
from interptool.analyzers.attribution import AttributionResult, score_maps
set_quiet(True)
results = {{name: AttributionResult.load({folder!r} + "/" + name, "saliency")
            for name in ("teacher", "student")}}
assert type(results["teacher"].maps).__name__ == "H5Maps"  # lazy: read block by block
nets = {{"teacher": tiny(0), "student": tiny(1)}}
t0 = time.perf_counter()
out = score_maps(results, teacher="teacher", models=nets,
                 inputs=lambda name, rows: images(rows, {size}),
                 modes=("deletion", "insertion"), steps={steps}, baseline={baseline!r},
                 batch_size=32, seed=0, label="saliency")
print("RESULT " + json.dumps({{
    "seconds": time.perf_counter() - t0, "n": len(out["sample"]["ids"]),
    "spearman": out["agreement"]["student"]["spearman"]["mean"],
    "deletion_auc": out["faithfulness"]["student"]["deletion"]["auc"]["mean"]}}))
"""


def _child(code: str) -> tuple[float, dict]:
    """Run ``code`` in a fresh interpreter; (peak RSS MiB, its RESULT json)."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed:\n{out}")
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return usage.ru_maxrss / 1024, json.loads(line[7:])


def _memory(args) -> int:
    import os
    import tempfile

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
          f"threads {args.threads}")
    cases = ([] if args.mem_skip_lite0 else ["default"]) + (
        ["unbatched"] if args.mem_unbatched else [])
    for internal in cases:
        peak, r = _child(_LITE0.format(threads=args.threads, internal=internal))
        print(f"integrated gradients, efficientnet_lite0 (timm, random init), 6 x 224 px, "
              f"32 steps, {internal} internal batching "
              f"(internal_batch_size={r['params']['internal_batch_size']}): "
              f"peak RSS {peak / 1024:.2f} GiB, {r['seconds']:.1f} s")
    ratios = []
    if args.mem_flat in ("ig", "both"):
        peaks = {}
        with tempfile.TemporaryDirectory() as tmp:
            for n in (64, 512):
                peak, r = _child(_FLAT.format(threads=args.threads, arch=args.mem_arch, n=n,
                                              out=f"{tmp}/run{n}", size=args.mem_size,
                                              steps=args.mem_steps))
                peaks[n] = peak
                print(f"integrated gradients, {args.mem_arch} (random init), {n} images "
                      f"{args.mem_size} px, {args.mem_steps} steps, batch 16, maps to "
                      f"attributions.h5: peak RSS {peak:.0f} MiB, {r['seconds']:.1f} s")
        ratios.append(peaks[512] / peaks[64])
        print(f"integrated gradients peak RSS 512 / 64 images: {ratios[-1]:.3f} "
              "(flat: <= 1.2)")
    if args.mem_flat in ("scores", "both"):
        ratios.append(_memory_scores(args))
    return 0 if max(ratios) <= 1.2 else 1


def _memory_scores(args) -> float:
    """Peak RSS of ``score_maps`` (agreement + deletion/insertion faithfulness of two models'
    file-backed maps) at 64 vs 512 images; the maps are written by a separate child first,
    so the scoring child's peak is the scoring's alone (over the import floor)."""
    import tempfile

    size, peaks = args.mem_score_size, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (64, 512):
            folder = f"{tmp}/maps{n}"
            _child(_SCORE_MAPS.format(threads=args.threads, n=n, size=size, folder=folder))
            peak, r = _child(_FLAT_SCORES.format(
                threads=args.threads, folder=folder, size=size, steps=args.mem_faith_steps,
                baseline=args.mem_faith_baseline))
            peaks[n] = peak
            print(f"scoring (score_maps: agreement + deletion/insertion faithfulness, "
                  f"{args.mem_faith_steps} steps, {args.mem_faith_baseline} baseline, 32 rows "
                  f"per call), 2 tiny CNNs, {r['n']} images {size} px, saliency maps read "
                  f"from attributions.h5: peak RSS {peak:.0f} MiB, {r['seconds']:.1f} s")
    ratio = peaks[512] / peaks[64]
    print(f"scoring peak RSS 512 / 64 images: {ratio:.3f} (flat: <= 1.2)")
    return ratio


if __name__ == "__main__":
    raise SystemExit(main())
