"""Parse data-set spec strings and open the matching :class:`ImageDataset`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

from interptool.data._base import ImageDataset
from interptool.errors import DataError

SPEC_HELP = (
    "imagefolder:PATH[?allow_empty=1] (one sub-folder per class), csv:FILE (columns path,label), "
    "broden:PATH[?split=NAME] (Broden folder with index.csv), or "
    "builtin:concept-world?n=1000&size=64&seed=0&split=probe"
)
BUILTINS = ("concept-world",)


def _query(spec: str, text: str, allowed: dict[str, str]) -> dict[str, str]:
    """``k=v&k=v`` -> dict; DataError for malformed pairs, unknown or repeated keys."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise DataError(f"data spec {spec!r}: cannot parse the query {text!r}; write "
                        "key=value pairs joined by '&'") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k not in allowed:
            raise DataError(
                f"data spec {spec!r}: unknown parameter {k!r}; allowed: "
                + ", ".join(f"{a} ({h})" for a, h in allowed.items())
            )
        if k in out:
            raise DataError(f"data spec {spec!r}: parameter {k!r} given twice")
        out[k] = v
    return out


def open_dataset(spec: str) -> ImageDataset:
    """Open a data set from its spec string.

    * ``imagefolder:PATH``: class sub-folders (class names sorted), images inside; an empty
      class folder is an error unless ``?allow_empty=1`` keeps it as a class.
    * ``csv:FILE``: columns ``path,label``; relative paths resolve against the CSV's folder;
      labels are integers or class names (optional).
    * ``broden:PATH``: a Broden-format folder (``index.csv``, ``label.csv``, ``category.csv``,
      ``images/``); optional ``?split=train`` keeps one split of ``index.csv``.
    * ``builtin:concept-world?n=1000&size=64&seed=0&split=probe``: the generated concept set
      (written once to ``$INTERPTOOL_DATA`` or ``~/.cache/interptool``), opened as Broden.

    A bare path is accepted too: a folder with ``index.csv`` opens as Broden, any other folder
    as an image folder, a ``.csv`` file as a CSV list.
    """
    from interptool.data._broden import BrodenDataset
    from interptool.data._folder import CsvDataset, ImageFolderDataset

    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec; expected {SPEC_HELP}")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if not sep or len(kind) == 1:  # no prefix (or a Windows drive letter): infer from the path
        path = Path(spec).expanduser()
        if path.is_dir():
            if (path / "index.csv").is_file():
                _note_inferred(spec, "broden")
                return BrodenDataset(path, spec=spec)
            _note_inferred(spec, "imagefolder")
            return ImageFolderDataset(path, spec=spec)
        if path.is_file() and path.suffix.lower() == ".csv":
            _note_inferred(spec, "csv")
            return CsvDataset(path, spec=spec)
        raise DataError(f"data spec {spec!r}: no such folder or CSV file; expected {SPEC_HELP}")
    kind = kind.lower()
    if kind == "imagefolder":
        path, q = rest, ""
        # a folder whose own name holds '?' is taken as is; otherwise '?' starts the options
        if "?" in rest and not Path(rest.strip()).expanduser().exists():
            path, _, q = rest.partition("?")
        params = _query(spec, q, {"allow_empty": "1 keeps empty class folders as classes"}) \
            if q else {}
        return ImageFolderDataset(_path(spec, path), spec=spec,
                                  allow_empty=_flag(spec, "allow_empty",
                                                    params.get("allow_empty", "0")))
    if kind == "csv":
        return CsvDataset(_path(spec, rest), spec=spec)
    if kind == "broden":
        path, _, q = rest.partition("?")
        params = _query(spec, q, {"split": "keep one index.csv split",
                                  "primary": "auto, count or coverage"}) if q else {}
        return BrodenDataset(_path(spec, path), spec=spec, split=params.get("split"),
                             primary_category=params.get("primary", "auto"))
    if kind == "builtin":
        name, _, q = rest.partition("?")
        if name != "concept-world":
            raise DataError(f"data spec {spec!r}: unknown built-in set {name!r}; available: "
                            f"{', '.join(BUILTINS)}")
        from interptool.data._concept_world import DEFAULTS, make_concept_world

        params = _query(spec, q, {"n": "number of images", "size": "image side in px",
                                  "seed": "base seed", "split": "train, eval or probe",
                                  "version": "generator version, 1 (default) or 2"}) \
            if q else {}
        merged = {**DEFAULTS, **params}
        root = make_concept_world(None, merged["n"], merged["size"], merged["seed"],
                                  merged["split"], version=merged["version"])
        return BrodenDataset(root, spec=spec)
    raise DataError(f"data spec {spec!r}: unknown kind {kind!r}; expected {SPEC_HELP}")


def _flag(spec: str, key: str, value: str) -> bool:
    """``1/true/yes`` -> True, ``0/false/no`` -> False; DataError otherwise."""
    v = value.strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no", ""):
        return False
    raise DataError(f"data spec {spec!r}: parameter {key}={value!r}; expected 1 or 0")


def _path(spec: str, text: str) -> Path:
    if not text.strip():
        raise DataError(f"data spec {spec!r}: the path is empty; expected {SPEC_HELP}")
    return Path(text.strip()).expanduser()


def _note_inferred(spec: str, kind: str) -> None:
    """Say on stderr which kind a bare path was taken as: a wrong guess must not be silent."""
    from interptool._progress import warn

    warn(f"data spec {spec!r} read as {kind}:{spec} (write the prefix to choose)")
