"""Flags shared by sub-commands that load a model or read a data set."""

from __future__ import annotations

import argparse


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default: cpu)"
    )


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--arch",
        required=required,
        help="timm:NAME, torchvision:NAME, interptool:NAME (built-in demo nets) "
        "or the path of a TorchScript file",
    )
    g.add_argument("--checkpoint", help="weight file: .pth/.pt/.bin state_dict, .safetensors, "
                   "or a training checkpoint wrapping the weights; FILE#NAME picks one weight "
                   "set inside it (e.g. #state_dict_ema, #teacher)")
    g.add_argument("--num-classes", type=int, help="default: inferred from the checkpoint")
    g.add_argument("--key-map", help="FILE.toml of regex -> replacement rules, or 'positional'")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of the checkpoint (runs code in the file!)")
    g.add_argument("--image-size", type=int, nargs="+", metavar="PX",
                   help="input size: one value (square) or H W")
    g.add_argument("--mean", type=float, nargs="+", help="normalisation mean (1 or 3 values)")
    g.add_argument("--std", type=float, nargs="+", help="normalisation std (1 or 3 values)")


def model_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for :func:`interptool.loading.load_model` from parsed flags."""
    size = args.image_size
    if size is not None:
        if len(size) > 2:
            from interptool.errors import InterptoolError

            raise InterptoolError(
                f"--image-size takes one value (square) or two (H W), got {len(size)}: "
                f"{' '.join(map(str, size))}"
            )
        size = (size[0], size[0]) if len(size) == 1 else tuple(size)
    return dict(
        checkpoint=args.checkpoint,
        num_classes=args.num_classes,
        key_map=args.key_map,
        trust_pickle=args.trust_pickle,
        image_size=size,
        mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
        device=args.device,
    )
