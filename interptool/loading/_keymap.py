"""Key maps: rename checkpoint keys to the model's names (regex rules or positional)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from interptool.errors import CheckpointError, ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

POSITIONAL = "positional"

KeyMapSpec = str | os.PathLike | Mapping[str, str] | Sequence[Sequence[str]] | None


def parse_key_map(spec: KeyMapSpec) -> list[tuple[re.Pattern, str]] | str | None:
    """``None`` -> None; ``"positional"`` -> ``"positional"``; a TOML path, a dict
    ``{pattern: replacement}`` or a list of ``(pattern, replacement)`` -> compiled rules.

    TOML layout::

        [[rules]]
        pattern = "^backbone\\."
        replacement = ""
    """
    if spec is None:
        return None
    if isinstance(spec, str) and spec.strip().lower() == POSITIONAL:
        return POSITIONAL
    where = "key map"
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        where = f"key map {path}"
        if not path.is_file():
            raise ConfigError(
                f"key map {path} does not exist; pass a TOML file of [[rules]] pattern/"
                f"replacement entries, or 'positional'"
            )
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"key map {path} is not valid TOML: {exc}") from exc
        rules = data.get("rules")
        if not isinstance(rules, list) or not rules:
            raise ConfigError(
                f"key map {path} has no [[rules]] array; expected entries like "
                '[[rules]] pattern = "^backbone\\\\." replacement = "" (one table per rule, '
                "see docs/loading.md)"
            )
        pairs = []
        for i, r in enumerate(rules, 1):
            if not isinstance(r, dict) or "pattern" not in r:
                raise ConfigError(f"{where}: rule {i} lacks 'pattern' (got {r!r})")
            pairs.append((r["pattern"], r.get("replacement", "")))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        pairs = [tuple(p) for p in spec]
    out = []
    for i, pair in enumerate(pairs, 1):
        if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise ConfigError(f"{where}: rule {i} must be (pattern, replacement) strings, "
                              f"got {pair!r}")
        pat, rep = pair
        try:
            out.append((re.compile(pat), rep))
        except re.error as exc:
            raise ConfigError(f"{where}: rule {i} pattern {pat!r} is not a valid regex: "
                              f"{exc}") from exc
    return out


def apply_rules(
    sd: Mapping[str, torch.Tensor], rules: list[tuple[re.Pattern, str]]
) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Apply every rule in order to every key; returns ``(new_sd, renamed pairs)``.

    A replacement of ``""`` for a whole key drops it (useful for ``num_batches_tracked``
    or auxiliary heads). Two keys renamed onto one name is an error.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    renamed: list[tuple[str, str]] = []
    for key, val in sd.items():
        new = key
        for pat, rep in rules:
            try:
                new = pat.sub(rep, new)
            except (re.error, IndexError) as exc:
                raise ConfigError(f"key map rule {pat.pattern!r} -> {rep!r} failed on key "
                                  f"{key!r}: {exc}") from exc
        if not new:
            renamed.append((key, ""))
            continue
        if new in origin:
            raise CheckpointError(
                f"key map renames both {origin[new]!r} and {key!r} to {new!r}; make the rules "
                f"more specific"
            )
        origin[new] = key
        out[new] = val
        if new != key:
            renamed.append((key, new))
    return out, renamed


def _skippable(key: str) -> bool:
    # BatchNorm counters: absent from some exporters, and harmless to leave at their default.
    return key.endswith("num_batches_tracked")


def positional_map(
    sd: Mapping[str, torch.Tensor],
    model_sd: Mapping[str, torch.Tensor],
    *,
    check_shapes: bool = True,
    ignore: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Match checkpoint tensors to model parameters+buffers by position.

    Both sides are taken in order (``num_batches_tracked`` counters are skipped when only one
    side has them). Every shape must agree (except keys in ``ignore``); the first mismatch
    raises a :class:`CheckpointError` naming both keys and shapes.
    """
    src = list(sd.items())
    dst = list(model_sd.items())
    if len(src) != len(dst):
        src = [(k, v) for k, v in src if not _skippable(k)]
        dst = [(k, v) for k, v in dst if not _skippable(k)]
    if len(src) != len(dst):
        raise CheckpointError(
            f"positional key map: the checkpoint has {len(src)} tensors but the model has "
            f"{len(dst)} parameters and buffers; positional matching needs the same "
            f"architecture (use a TOML key map of regex rules instead)"
        )
    out: dict[str, torch.Tensor] = {}
    renamed: list[tuple[str, str]] = []
    for i, ((k_src, v), (k_dst, ref)) in enumerate(zip(src, dst)):
        if check_shapes and k_dst not in ignore and tuple(v.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"positional key map: tensor #{i} {k_src!r} has shape {tuple(v.shape)} but "
                f"the model's #{i} {k_dst!r} expects {tuple(ref.shape)}; the checkpoint is "
                f"not the same architecture, or its tensors are stored in another order"
            )
        out[k_dst] = v
        if k_src != k_dst:
            renamed.append((k_src, k_dst))
    return out, renamed
