"""``interptool cache``: run a model over a data set and cache logits and layer features."""

from __future__ import annotations

import argparse
from typing import Any

from interptool.cli._common import (
    add_common_args,
    add_model_args,
    load_kwargs,
    out_file,
    seed_value,
)

_EPILOG = """\
examples:
  interptool cache --arch timm:resnet18 --checkpoint student.pth --data imagefolder:val/ \\
      --layers layer3,layer4 --out student.h5
  interptool cache --arch model.torchscript --data csv:val.csv --out logits.h5

  torchrun --nproc_per_node=4 -m interptool cache --arch timm:resnet18 --device cuda \
      --data broden:/data/broden1_224 --layers layer4 --out probe.h5   # 4 GPUs, one file

An interrupted run (Ctrl-C, a crash, a killed job, a full disk) leaves an incomplete file that
readers refuse; running the same command again resumes it. Running it on a finished cache with
the same model, data and settings does nothing (cache hit). Two runs never write one file at
once: the second stops (exit 2) naming the first. See docs/cache-format.md and docs/scaling.md.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cache",
        help="cache logits and layer activations of a model over a data set (HDF5)",
        description="Run a model over a data set and write logits, labels and the outputs "
        "of named layers to a resumable HDF5 activation cache.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    g = p.add_argument_group("cache")
    g.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="imagefolder:PATH, csv:FILE, broden:PATH or builtin:concept-world?n=..&size=..",
    )
    g.add_argument(
        "--layers",
        default="",
        help="comma-separated dotted module names (e.g. layer3,layer4); default: logits and "
        "labels only (all a TorchScript model can give). `interptool layers` lists the names",
    )
    g.add_argument("--out", required=True, type=out_file, help="output .h5 file")
    g.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="feature precision (default float16; logits and maxima are float32)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes decoding images (default: chosen from "
                   "the cores available and the device: on the CPU none below 3 cores, about "
                   "one core in six above; on CUDA every core but 1 (2 from 8 cores up))")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="cores to use in total: torch threads + DataLoader workers (default: "
                   "all this process may use, from its CPU affinity and cgroup quota; under "
                   "torchrun, an equal share per local process)")
    g.add_argument("--compression", choices=["none", "gzip", "lzf"], default="none")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing cache made with other settings (never one that "
                   "another interptool process is writing)")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip images that fail to decode (listed in the file) instead of stopping")
    g.add_argument("--probe", choices=["auto", "yes", "no"], default="auto",
                   help="resize without crop (probe) or the eval crop; auto: probe for Broden data")
    g.add_argument("--seed", type=seed_value, default=0)
    add_common_args(p)
    p.set_defaults(func=run)


def _load_model(args: argparse.Namespace) -> Any:
    from interptool.loading import load_model

    return load_model(args.arch, **load_kwargs(args))


def _open_dataset(spec: str) -> Any:
    from interptool.data import open_dataset

    return open_dataset(spec)


def run(args: argparse.Namespace) -> int:
    from interptool.cache import run_cache, use_rank_gpu
    from interptool.errors import ConfigError

    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    args.device = use_rank_gpu(args.device)  # under torchrun: this rank's GPU, not GPU 0
    loaded = _load_model(args)
    dataset = _open_dataset(args.data)
    result = run_cache(
        loaded,
        dataset,
        layers,
        args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        dtype=args.dtype,
        compression=None if args.compression == "none" else args.compression,
        overwrite=args.overwrite,
        skip_bad=args.skip_bad,
        probe={"auto": None, "yes": True, "no": False}[args.probe],
        seed=args.seed,
        device=args.device,
    )
    from interptool.cache import rank_info

    if rank_info()[0] == 0:  # under torchrun, one process reports for all
        print(result.path)
        print(result.summary())
    return 0
