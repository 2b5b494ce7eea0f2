"""Class-hierarchy ground truth (e.g. WordNet paths) -> semantic similarity between classes.

Accepted files (see docs/similarity.md):

* JSON object ``{class: chain}`` where ``chain`` is a list of ancestor names from the root
  down (the class itself may end it or not) or one string with ``/`` between levels.
* CSV / TSV (``.csv``, ``.tsv``, ``.txt``): one row per class, first column the class, then
  either one column holding a ``/``-separated path or one column per level from the root.
  A header row is skipped when its first cell is ``class``.

Classes are matched by name (the caches' ``class_names``) or by their integer index.
Semantic similarity is Wu-Palmer-like: ``2 * depth(LCA) / (depth(a) + depth(b))`` where a
class's depth is the length of its chain including itself (root = 1) and the LCA is the
longest common prefix of two chains; identical classes score 1, classes sharing no root 0.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from interptool.errors import AnalysisError


def _chain(value: object, cls: str, path: Path) -> list[str]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split("/") if p.strip()]
    elif isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        parts = [str(v).strip() for v in value if str(v).strip()]
    else:
        raise AnalysisError(
            f"{path}: class {cls!r} has ancestor chain {value!r}; expected a list of names "
            "from the root down or a '/'-separated string"
        )
    if not parts or parts[-1] != cls:
        parts.append(cls)
    return parts


def read_hierarchy(path: str | os.PathLike) -> dict[str, list[str]]:
    """Parse a hierarchy file into ``{class: [root, ..., class]}``."""
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"{path}: hierarchy file not found (pass a JSON or CSV/TSV file)")
    text = path.read_text(encoding="utf-8-sig")
    chains: dict[str, list[str]] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AnalysisError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise AnalysisError(
                f"{path}: expected a JSON object {{class: [root, ..., parent]}}, got "
                f"{type(data).__name__}"
            )
        for cls, value in data.items():
            chains[str(cls)] = _chain(value, str(cls), path)
    else:
        delim = "\t" if path.suffix.lower() == ".tsv" or "\t" in text.split("\n", 1)[0] else ","
        for lineno, row in enumerate(csv.reader(text.splitlines(), delimiter=delim), 1):
            row = [c.strip() for c in row]
            if not row or not any(row):
                continue
            if lineno == 1 and row[0].lower() == "class":
                continue
            cls, rest = row[0], [c for c in row[1:] if c]
            if not rest:
                raise AnalysisError(
                    f"{path}, line {lineno}: class {cls!r} has no ancestors; expected "
                    "`class,root/.../parent` or `class,root,...,parent`"
                )
            value: object = rest[0] if len(rest) == 1 else rest
            chains[cls] = _chain(value, cls, path)
    if not chains:
        raise AnalysisError(f"{path}: no classes found in the hierarchy file")
    return chains


def semantic_similarity(
    chains: dict[str, list[str]], class_names: Sequence[str], source: str = "hierarchy"
) -> np.ndarray:
    """(K, K) Wu-Palmer-like similarity of the classes, in the order of ``class_names``."""
    ordered: list[list[str]] = []
    missing = []
    for i, name in enumerate(class_names):
        c = chains.get(str(name), chains.get(str(i)))
        if c is None:
            missing.append(str(name))
        else:
            ordered.append(c)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise AnalysisError(
            f"{source}: {len(missing)} of {len(class_names)} classes have no entry ({shown}); "
            "the file must list every class by name (as in the caches' class_names) or index"
        )
    k = len(ordered)
    depth = np.array([len(c) for c in ordered], dtype=np.float64)
    # Code every prefix (root..level l) by an integer: two classes share level l exactly when
    # their codes there are equal, and sharing level l implies sharing every level above it,
    # so the LCA depth is the number of levels with equal codes (vectorised, K = 1000 is fast).
    levels = int(depth.max())
    codes = np.full((k, levels), -1, dtype=np.int64)
    ids: dict[tuple[str, ...], int] = {}
    for i, c in enumerate(ordered):
        for lv in range(len(c)):
            codes[i, lv] = ids.setdefault(tuple(c[: lv + 1]), len(ids))
    lca = np.zeros((k, k), dtype=np.float64)
    for lv in range(levels):
        col = codes[:, lv]
        lca += (col[:, None] == col[None, :]) & (col[:, None] >= 0)
    return 2.0 * lca / (depth[:, None] + depth[None, :])
