"""GPU benchmark: images/s of `cache` on CUDA and the dissection analysis's share of it.

On a CUDA device it (1) generates (or reuses) ``builtin:concept-world?version=1&n=N&size=224``
(Broden1_224's geometry), (2) times a bare forward loop of the model over the already decoded
probe tensors (the floor), (3) times ``cache_activations`` (decoding, forward, HDF5 writes)
and (4) times ``Dissection(device="cuda").run`` (thresholds + tally) on that cache, decoding
the masks (twice: the first run warms CUDA up), then writing and reading a mask store, and
prints images/s for each and the analysis time as a share of the forward time (target: at
most 10 %). Exits 2 with "needs a GPU" where CUDA is not available. ``--device cpu`` runs the same
steps on the CPU (a smoke check of the script, which the test suite runs on a few images).

Usage::

    python benchmarks/gpu.py [--n 3000] [--arch torchvision:resnet18] [--layer layer4]
                             [--channels-last]

``--channels-last`` measures both loops with channels-last input (the cache's default on the
CPU; on CUDA it is off unless asked for, and whether it pays there is what this measures).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(loaded, probe, batch_size: int, device: torch.device,
                 layout: torch.memory_format = torch.contiguous_format) -> tuple[float, int]:
    """Seconds for the model alone over the probe's images, decoded, laid out and on the GPU
    first."""
    tds = probe.torch_dataset(loaded.preprocessing.probe_transform(), skip_bad=False)
    batches = []
    for s in range(0, len(tds), batch_size):
        xs = [tds[i][0] for i in range(s, min(s + batch_size, len(tds)))]
        batches.append(torch.stack(xs).to(device, non_blocking=True, memory_format=layout))
    model = loaded.model
    with torch.inference_mode():
        model(batches[0])  # warm-up (cuDNN autotune, allocations)
        _sync(device)
        t0 = time.perf_counter()
        for x in batches:
            model(x)
        _sync(device)
    return time.perf_counter() - t0, sum(len(x) for x in batches)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="probe images")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--arch", default="torchvision:resnet18")
    ap.add_argument("--layer", default="layer4")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_gpu"))
    ap.add_argument("--device", default="cuda", help="cpu: smoke check of the script")
    ap.add_argument("--channels-last", action="store_true",
                    help="feed the model channels-last input, in the bare loop and the cache "
                    "(the cache's default is channels-last on the CPU only)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: needs a GPU (torch.cuda.is_available() is False)")
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from interptool.analyzers.dissection import Dissection
    from interptool.cache import cache_activations
    from interptool.data import open_dataset
    from interptool.loading import load_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    probe = open_dataset(f"builtin:concept-world?version=1&n={args.n}&size={args.size}")
    loaded = load_model(args.arch, num_classes=10, image_size=(args.size, args.size),
                        device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"device: {name}; torch {torch.__version__}; "
          f"{os.cpu_count()} CPUs; probe {probe.spec}; {args.arch} {args.layer}; input "
          f"{'channels-last' if args.channels_last else 'default layout'}")

    t_bare, n_bare = bare_forward(loaded, probe, args.batch_size, device, layout)
    print(f"bare forward (decoded tensors already on the GPU): {n_bare / t_bare:.0f} images/s "
          f"({t_bare:.2f} s)")

    path = work / f"gpu_n{args.n}.h5"
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    cache_activations(loaded, probe, [args.layer], path, batch_size=args.batch_size,
                      dtype="float16", probe=True, device=device,
                      channels_last=True if args.channels_last else None)
    _sync(device)
    t_cache = time.perf_counter() - t0
    print(f"cache (decode + forward + write): {args.n / t_cache:.0f} images/s ({t_cache:.2f} s; "
          f"{t_cache / t_bare:.2f}x the bare forward)")

    # the first run includes CUDA context and kernel warm-up; both decode the probe's masks
    # on the CPU (3,000 images' labels exceed the per-process memo), in worker processes; the
    # third writes them to a mask store and the fourth reads them back (every dissection of
    # a study after the first on a probe), so the GPU counts without waiting for decoding
    store = work / "mask_store"
    shutil.rmtree(store, ignore_errors=True)
    for run, kwargs in enumerate(({}, {}, {"mask_store": store}, {"mask_store": store})):
        t0 = time.perf_counter()
        # a fresh probe object each run, as in a process of its own (a small probe would
        # otherwise be held decoded in this one)
        res = Dissection(device=device, batch_size=args.batch_size, checksum=False,
                         **kwargs).run(path, args.layer, open_dataset(probe.spec))
        _sync(device)
        t_an = time.perf_counter() - t0
        print(f"dissection analysis, run {run + 1} (thresholds + tally on {device.type}; "
              f"masks {res.config['segmentations']['source']}): {t_an:.2f} s, "
              f"{args.n / t_an:.0f} images/s; {100 * t_an / t_bare:.1f} % of the bare forward "
              f"time, {100 * t_an / t_cache:.1f} % of the cache time; "
              f"{len(res.detectors())} detectors; mask-decoding workers "
              f"{res.config['threads']['mask_workers']}, torch threads "
              f"{res.config['threads']['torch_threads']}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
