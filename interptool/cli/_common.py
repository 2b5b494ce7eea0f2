"""Flags shared by sub-commands that load a model or read a data set."""

from __future__ import annotations

import argparse
from typing import Any

#: seeds go to numpy, torch and Python's random module: the range all three take
MAX_SEED = 2**32 - 1


def out_folder(value: str) -> str:
    """argparse type of an output folder: a path that is not an existing file."""
    from pathlib import Path

    if not value.strip():
        raise argparse.ArgumentTypeError("empty; give the output folder (created if missing)")
    if Path(value).exists() and not Path(value).is_dir():
        raise argparse.ArgumentTypeError(
            f"{value} is a file, not a folder; give a folder (created if missing), or move "
            "the file away")
    return value


def out_file(value: str) -> str:
    """argparse type of an output file: a path that is not an existing folder."""
    from pathlib import Path

    if not value.strip() or not Path(value).name:
        raise argparse.ArgumentTypeError("empty; give the file to write, e.g. out/activations.h5")
    if Path(value).is_dir():
        raise argparse.ArgumentTypeError(
            f"{value} is a folder; give the file to write, e.g. "
            f"{Path(value) / 'activations.h5'}")
    return value


def seed_value(value: str) -> int:
    """argparse type of a seed: a whole number numpy, torch and ``random`` all accept."""
    try:
        seed = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{seed} is outside 0..{MAX_SEED}")
    return seed


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
        help="timm:NAME, torchvision:NAME, interptool:NAME (built-in demo nets), "
        "hf:FOLDER (Hugging Face save_pretrained folder) or the path of a TorchScript file",
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
    g.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", action="extend",
                   help="constructor arguments of a timm/torchvision architecture, as timm's "
                   "--model-kwargs: e.g. img_size=384 for a ViT fine-tuned at 384 px, "
                   "global_pool=avg; values are Python literals, else strings")


def parse_model_kwargs(items: list[str] | None) -> dict[str, Any] | None:
    """``["img_size=384", "global_pool=avg"]`` -> ``{"img_size": 384, "global_pool": "avg"}``.

    Values are read as Python literals (numbers, ``True``, ``None``, ``(256, 320)``, quoted
    strings), else kept as the string given, as timm's own ``--model-kwargs`` reads them.
    """
    import ast

    from interptool.errors import ConfigError

    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-kwargs {item!r}: expected KEY=VALUE (e.g. img_size=384); "
                              "a positional argument after --model-kwargs is read as one of "
                              "them: put it before the flag")
        try:
            value: Any = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = text
        out[key.strip()] = value
    return out


def load_kwargs(args: argparse.Namespace) -> dict:
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
        model_kwargs=parse_model_kwargs(getattr(args, "model_kwargs", None)),
    )


# --------------------------------------------------------------------------------------------
# flags derived from an analyzer's Params dataclass (the single source of defaults and help)
# --------------------------------------------------------------------------------------------
def _flag_type(tp: Any) -> tuple[Any, bool, bool]:
    """``(scalar type, is a list, is a bool)`` of a Params annotation."""
    import types
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)] \
        if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    if str in args and len(args) > 1:  # e.g. list[str] | str: one comma-separated value
        return str, False, False
    for a in args:
        if typing.get_origin(a) in (list, tuple):
            inner = typing.get_args(a)
            return (inner[0] if inner else str), True, False
    if bool in args and len(args) == 1:
        return bool, False, True
    for t in (int, float, str):
        if t in args:
            return t, False, False
    return str, False, False


def add_params_arguments(parser: Any, params_cls: Any, *, exclude: tuple[str, ...] = ()) -> None:
    """One flag per CLI field of ``params_cls`` (``--field-name``, or the field's ``flag``):
    type, choices and help from the field, default None so that an unset flag keeps the
    Params default (shown in the help). Read them back with :func:`params_from_args`."""
    import typing

    hints = typing.get_type_hints(params_cls)
    for f in params_cls.cli_fields():
        if f.name in exclude:
            continue
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        scalar, many, is_bool = _flag_type(hints[f.name])
        default = params_cls.field_default(f.name)
        shown = "unset" if default is None else (
            " ".join(map(str, default)) if isinstance(default, list) else default)
        help_text = meta["help"] if "default" in meta["help"] else \
            f"{meta['help']} (default: {shown})"
        help_text = help_text.replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if is_bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = scalar
            if many:
                kw["nargs"] = "+"
            # choices are checked by the Params (exit 2 with "did you mean"), shown here
            choices = [str(c) for c in meta.get("choices") or () if isinstance(c, scalar)]
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
            elif choices:
                kw["metavar"] = "{" + ",".join(choices) + "}"
        parser.add_argument(flag, **kw)


def params_from_args(args: argparse.Namespace, params_cls: Any, **fixed: Any) -> Any:
    """The Params of ``params_cls`` from parsed flags (flags not given keep their defaults);
    ``fixed``: values set by other flags (e.g. ``device=args.device``)."""
    values = {f.name: getattr(args, f.name) for f in params_cls.cli_fields()
              if getattr(args, f.name, None) is not None}
    names = set(params_cls.field_names())
    return params_cls(**{**values, **{k: v for k, v in fixed.items() if k in names}})
