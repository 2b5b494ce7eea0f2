"""``interptool layers``: list a model's layers with their output shapes."""

from __future__ import annotations

import argparse
import json

from interptool.cli._common import add_common_args, add_model_args, load_kwargs


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "layers",
        help="list a model's layers (dotted names, types, output shapes)",
        description="Load a model (same flags as every other command) and list its modules "
        "with the output shape of each, from one forward pass on a zero image. The names are "
        "what --layers takes elsewhere (e.g. layer4).",
    )
    add_model_args(p)
    p.add_argument("--depth", type=int, default=None, metavar="N",
                   help="only names with at most N dotted parts (1: top-level modules)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (model record + layers) instead of a table")
    add_common_args(p)
    p.set_defaults(func=run)


def _fmt_shape(shape) -> str:
    return "?" if shape is None else str(tuple(shape))


def run(args: argparse.Namespace) -> int:
    from interptool.errors import ConfigError
    from interptool.loading import layer_table, load_model

    if args.depth is not None and args.depth < 1:
        raise ConfigError(f"--depth must be at least 1, got {args.depth}")
    loaded = load_model(args.arch, **load_kwargs(args))
    rows = layer_table(loaded)
    if args.depth is not None:
        rows = [r for r in rows if r[0].count(".") < args.depth]
    if args.json:
        print(json.dumps(
            dict(model=loaded.to_dict(),
                 layers=[dict(name=n, type=t, shape=list(s) if s is not None else None)
                         for n, t, s in rows]),
            indent=2,
        ))
        return 0
    table = [("name", "type", "output shape")] + [
        (n or "(output)", t, _fmt_shape(s)) for n, t, s in rows
    ]
    w0 = max(len(r[0]) for r in table)
    w1 = max(len(r[1]) for r in table)
    pre = loaded.preprocessing
    print(f"# {loaded.arch}  checkpoint={loaded.checkpoint or '-'}  classes={loaded.num_classes}"
          f"  input={tuple(pre.input_size)}")
    for line in _load_notes(loaded):
        print(line)
    for n, t, s in table:
        print(f"{n:<{w0}}  {t:<{w1}}  {s}")
    if any(s is None for _, _, s in rows):
        print("# ?: TorchScript sub-modules cannot be hooked; only logits can be cached "
              "(omit --layers)")
    return 0


def _load_notes(loaded) -> list[str]:
    """Comment lines saying how the checkpoint was read (wrapper key, prefixes, renames)."""
    rep = loaded.load_report
    notes = []
    if rep.source_keys:
        notes.append(f"weights from key {rep.source_keys!r}")
    if rep.selected:
        notes.append(f"keys under {rep.selected!r}")
    if rep.stripped_prefixes:
        notes.append(f"stripped prefix(es) {', '.join(map(repr, rep.stripped_prefixes))}")
    if rep.renamed:
        shown = ", ".join(f"{a} -> {b or '(dropped)'}" for a, b in rep.renamed[:3])
        more = f", ... {len(rep.renamed) - 3} more" if len(rep.renamed) > 3 else ""
        notes.append(f"key map renamed {len(rep.renamed)} key(s): {shown}{more}")
    if rep.inferred.get("num_classes") is not None:
        notes.append(f"num_classes {rep.inferred['num_classes']} read from "
                     f"{rep.inferred.get('num_classes_from')}")
    if rep.alternatives:
        notes.append(f"also in the file: {', '.join(rep.alternatives)} (select with "
                     f"CHECKPOINT#NAME)")
    out = [f"# load: {'; '.join(notes)}"] if notes else []
    if rep.renamed or rep.missing or rep.unexpected:
        out.append("# the full lists of renamed / missing / unexpected keys: --json "
                   "(model.load_report)")
    return out
