"""Benchmark: activation caching vs. a bare forward pass, and peak memory vs. data-set size.

Times ``cache_activations`` (timm resnet18, random init, layer3 + layer4 in float16) against a
bare ``model(x)`` loop over the same batches of the same synthetic images, in one process,
alternating the two so that machine noise hits both alike. Then runs the cache writer in
fresh subprocesses at two data-set sizes and prints their peak RSS: it must not grow with N.

Synthetic images are generated per item from a seeded generator (no image files, no decode),
so the numbers isolate model + hooks + HDF5 writing, and nothing is held for the whole set.

    python benchmarks/bench_cache.py                      # the recorded configuration
    python benchmarks/bench_cache.py --n 64 --size 96 --mem-sizes 64,256 --mem-px 64   # quick

``--probe N`` instead measures the whole extraction on real image files: generated Broden-style
probe images (``builtin:concept-world?version=1&n=N&size=224``, PNG files decoded and resized by the
probe transform) cached with resnet18 layer4, against a bare ``model(x)`` loop over the same
images decoded beforehand, with the same batches and the same torch threads as the cache's
forward pass (``--threads``/``--workers`` as in ``interptool cache``). The bare loop runs three
ways: ``model(x)`` as a user writes it; converting each batch to channels-last, the layout the
cache feeds convolutional models on the CPU; and over batches laid out channels-last
beforehand (the forward pass and nothing else, the absolute floor). Rounds alternate and the
median ratio against each is printed:

    python benchmarks/bench_cache.py --probe 480 --layers layer4 --threads 2
    python benchmarks/bench_cache.py --probe 480 --layers layer4 --threads 2 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import h5py  # noqa: E402
import torch  # noqa: E402

from interptool.cache import run_cache  # noqa: E402


class _Items(torch.utils.data.Dataset):
    """Item i: a seeded random normalised image, generated on demand."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g), i % 1000, i


class SyntheticDataset:
    """Has the attributes ``cache_activations`` reads from an ImageDataset."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size
        self.spec = f"synthetic:n={n}&size={size}"
        self.ids = [f"synthetic/{i:06d}" for i in range(n)]
        self.labels = torch.arange(n).remainder(1000).numpy()
        self.fingerprint = f"synthetic-{n}-{size}"

    def __len__(self) -> int:
        return self.n

    def torch_dataset(self, transform, skip_bad: bool = False) -> _Items:
        return _Items(self.n, self.size)  # already tensors: the transform is not needed


def _loaded(arch: str, size: int):
    from interptool.loading import load_model

    return load_model(arch, image_size=(size, size))


def _bare(model, loader, device) -> tuple[float, float]:
    """(wall s, process CPU s) of a bare forward over every batch."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for x, _, _ in loader:
            model(x.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def _cache(loaded, ds, layers, out: Path, batch_size: int, dtype: str, device):
    """(wall s, process CPU s) of a full cache run into a fresh file."""
    if out.exists():
        out.unlink()
    t0, c0 = time.perf_counter(), time.process_time()
    run_cache(loaded, ds, layers, out, batch_size=batch_size, dtype=dtype, device=device)
    return time.perf_counter() - t0, time.process_time() - c0


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _RssSampler(threading.Thread):
    """Highest current RSS seen while running (ru_maxrss alone also counts import peaks)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_mib()
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(0.005):
            self.peak = max(self.peak, _rss_mib())

    def stop(self) -> float:
        self._stop_evt.set()
        self.join()
        return max(self.peak, _rss_mib())


def child_memory(args: argparse.Namespace) -> None:
    """One cache run in this fresh process; print RSS figures and file size as JSON."""
    loaded = _loaded(args.arch, args.mem_px)
    ds = SyntheticDataset(args.child_n, args.mem_px)
    with torch.inference_mode():  # warm-up so allocator/kernel caches are in the baseline
        loaded.model(torch.zeros(args.batch_size, 3, args.mem_px, args.mem_px))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "mem.h5"
        before = _rss_mib()
        sampler = _RssSampler()
        sampler.start()
        secs, _ = _cache(loaded, ds, args.layers.split(","), out, args.batch_size, args.dtype,
                         torch.device(args.device))
        peak = sampler.stop()
        size = out.stat().st_size
    print(json.dumps({"n": args.child_n, "rss_before_mib": before, "rss_peak_mib": peak,
                      "ru_maxrss_mib": _peak_rss_mib(), "file_mib": size / 2**20,
                      "seconds": secs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="timm:resnet18")
    ap.add_argument("--layers", default="layer3,layer4")
    ap.add_argument("--n", type=int, default=512, help="images in the timing run")
    ap.add_argument("--size", type=int, default=224, help="input size (px) in the timing run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--repeats", type=int, default=2, help="alternating bare/cache rounds")
    ap.add_argument("--mem-sizes", default="256,1024", help="two N for the memory check")
    ap.add_argument("--mem-px", type=int, default=112, help="input size in the memory check")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--child-n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--probe", type=int, metavar="N",
                    help="time cache vs bare forward on N generated 224 px probe images")
    ap.add_argument("--threads", type=int, help="as `interptool cache --threads`")
    ap.add_argument("--workers", type=int, help="as `interptool cache --workers`")
    ap.add_argument("--channels-last", choices=["auto", "off"], default="auto",
                    help="the cache's input layout (run_cache channels_last=None / False)")
    args = ap.parse_args()
    args.channels_last = None if args.channels_last == "auto" else False
    if args.child_n:
        child_memory(args)
        return
    if args.probe:
        _probe_timing(args)
        return

    device = torch.device(args.device)
    if not args.skip_timing:
        _timing(args, device)
    if not args.skip_memory:
        _memory(args)


def _timing(args: argparse.Namespace, device: torch.device) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {device}")
    loaded = _loaded(args.arch, args.size)
    loaded.model.to(device)
    ds = SyntheticDataset(args.n, args.size)
    layers = args.layers.split(",")
    loader = torch.utils.data.DataLoader(ds.torch_dataset(None), batch_size=args.batch_size,
                                         pin_memory=device.type == "cuda")
    with torch.inference_mode():  # warm-up (allocator, oneDNN kernels)
        loaded.model(next(iter(loader))[0][:8].to(device))
    bare, cached = [], []
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "bench.h5"
        for _ in range(args.repeats):
            bare.append(_bare(loaded.model, loader, device))
            cached.append(_cache(loaded, ds, layers, out, args.batch_size, args.dtype, device))
        file_mib = out.stat().st_size / 2**20
    # min over rounds: the least disturbed run of each (2 shared cores are noisy); CPU time
    # of this process is less sensitive to other processes than wall time.
    bw, bc = min(t for t, _ in bare), min(c for _, c in bare)
    cw, cc = min(t for t, _ in cached), min(c for _, c in cached)
    print(f"timing: {args.arch} {args.size}px, N={args.n}, batch {args.batch_size}, "
          f"layers {args.layers} {args.dtype}, {args.repeats} rounds (best of each)")
    print(f"  bare forward : {bw:7.2f} s wall ({args.n / bw:6.1f} img/s), {bc:7.2f} s CPU; "
          f"wall runs {[round(t, 2) for t, _ in bare]}")
    print(f"  cache to HDF5: {cw:7.2f} s wall ({args.n / cw:6.1f} img/s), {cc:7.2f} s CPU; "
          f"wall runs {[round(t, 2) for t, _ in cached]}")
    print(f"  ratio cache/bare: wall {cw / bw:.3f}, CPU {cc / bc:.3f}  (target <= 1.15); "
          f"file {file_mib:.1f} MiB")


def _memory(args: argparse.Namespace) -> None:
    print(f"memory: peak RSS of a fresh process caching N images at {args.mem_px}px")
    for n in [int(v) for v in args.mem_sizes.split(",")]:
        cmd = [sys.executable, __file__, "--child-n", str(n), "--arch", args.arch,
               "--layers", args.layers, "--mem-px", str(args.mem_px), "--batch-size",
               str(args.batch_size), "--dtype", args.dtype, "--device", args.device]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  N={n:6d}: RSS before {r['rss_before_mib']:7.1f} MiB, peak during caching "
              f"{r['rss_peak_mib']:7.1f} MiB (+{r['rss_peak_mib'] - r['rss_before_mib']:.1f}), "
              f"ru_maxrss {r['ru_maxrss_mib']:.1f} MiB, file {r['file_mib']:.1f} MiB, "
              f"{r['seconds']:.1f} s")


def _probe_timing(args: argparse.Namespace) -> None:
    """Cache (decode + forward + write) vs bare forward over pre-decoded images, one round."""
    from interptool._resources import plan_threads, torch_threads
    from interptool.data import open_dataset

    device = torch.device(args.device)
    t0 = time.perf_counter()
    ds = open_dataset(f"builtin:concept-world?version=1&n={args.probe}&size=224&split=probe")
    gen_s = time.perf_counter() - t0
    loaded = _loaded(args.arch, 224)
    loaded.model.to(device)
    plan = plan_threads(args.threads, workers=args.workers, device_type=device.type)
    layers = args.layers.split(",")
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min), torch {torch.__version__}, "
          f"device {device}; data generated/opened in {gen_s:.1f} s")
    print(f"plan: {plan.to_dict()}", flush=True)
    # the same images, decoded beforehand (same transform, same batches)
    tf = loaded.preprocessing.probe_transform()
    t0 = time.perf_counter()
    batches = [torch.stack([tf(ds.load_image(i))
                            for i in range(s, min(s + args.batch_size, len(ds)))])
               for s in range(0, len(ds), args.batch_size)]
    dec_s = time.perf_counter() - t0
    # the same batches already in channels-last order: the forward pass alone, no re-layout
    laid_out = [x.contiguous(memory_format=torch.channels_last) for x in batches]

    def bare(layout: torch.memory_format | None) -> tuple[float, float]:
        with torch_threads(plan.torch_threads), torch.inference_mode():
            t0, c0 = time.perf_counter(), time.process_time()
            for x in batches if layout is not None else laid_out:
                loaded.model(x.to(device, non_blocking=True,
                                  memory_format=layout or torch.preserve_format))
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0, time.process_time() - c0

    def cache() -> tuple[float, float, Any, float]:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "probe.h5"
            t0, c0 = time.perf_counter(), time.process_time()
            run = run_cache(loaded, ds, layers, out, batch_size=args.batch_size,
                            dtype=args.dtype, device=device, threads=args.threads,
                            workers=args.workers, channels_last=args.channels_last)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            with h5py.File(out, "r") as f:
                numerics = f.attrs.get("numerics", "")
            return wall, cpu, run, out.stat().st_size / 2**20, numerics

    with torch_threads(plan.torch_threads), torch.inference_mode():
        for layout in (torch.contiguous_format, torch.channels_last):  # warm-up (oneDNN kernels)
            loaded.model(batches[0][:8].to(device, memory_format=layout))
    n = len(ds)
    print(f"probe timing: {args.arch} 224px, N={n}, batch {args.batch_size}, layers "
          f"{args.layers} {args.dtype}, {args.repeats} alternating rounds; decoding alone took "
          f"{dec_s:.1f} s ({n / dec_s:.1f} img/s, 1 thread)", flush=True)
    # Two references: model(x) as a user writes it (default layout), and the same loop fed
    # channels-last input, the layout the cache uses for conv models on the CPU. The second
    # is the floor for the cache's own work (decode + hooks + HDF5).
    # A third: the batches laid out channels-last beforehand, so the loop is the forward pass
    # and nothing else (no conversion at all): the absolute floor.
    plain_r: list[float] = []
    cl_r: list[float] = []
    floor_r: list[float] = []
    for r in range(args.repeats):
        pw, pc = bare(torch.contiguous_format)
        lw, lc = bare(torch.channels_last)
        fw, fc = bare(None)
        cw, cc, run, file_mib, numerics = cache()
        plain_r.append(cw / pw)
        cl_r.append(cw / lw)
        floor_r.append(cw / fw)
        print(f"  round {r + 1}: bare forward ({plan.torch_threads} torch threads, "
              f"pre-decoded) default layout {pw:6.2f} s wall ({n / pw:5.1f} img/s, {pc:6.2f} s "
              f"CPU), channels-last {lw:6.2f} s ({n / lw:5.1f} img/s, {lc:6.2f} s CPU), "
              f"laid out beforehand {fw:6.2f} s ({fc:6.2f} s CPU); cache "
              f"(decode + forward + HDF5, {plan.torch_threads} threads + "
              f"{plan.loader_workers} workers) {cw:6.2f} s wall ({n / cw:5.1f} img/s, {cc:6.2f} s "
              f"CPU); cache / bare: {cw / pw:.3f} (default layout), {cw / lw:.3f} "
              f"(channels-last), {cw / fw:.3f} (laid out beforehand); load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    print(f"  {run.summary()}; file {file_mib:.1f} MiB; numerics {numerics}")
    for name, rs in (("default-layout", plain_r), ("channels-last", cl_r),
                     ("laid-out-beforehand", floor_r)):
        print(f"  cache / bare {name} forward (wall): median {statistics.median(rs):.3f}, "
              "rounds " + ", ".join(f"{x:.3f}" for x in rs))


if __name__ == "__main__":
    main()
