"""Parse data-set spec strings and open the matching :class:`ImageDataset`."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from interptool.data._base import ImageDataset
from interptool.errors import DataError

SPEC_HELP = (
    "imagefolder:PATH[?allow_empty=1] (one sub-folder per class), csv:FILE (columns path,label), "
    "broden:PATH[?split=NAME] (Broden folder with index.csv), or "
    "builtin:concept-world?version=2&n=1000&size=64&seed=0&split=probe"
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
    * ``builtin:concept-world?version=2&n=1000&size=64&seed=0&split=probe``: the generated
      concept set (written once to ``$INTERPTOOL_DATA`` or ``~/.cache/interptool``), opened
      as Broden; ``version`` defaults to 2 (``version=1`` is the original set). The data set's
      ``spec`` is the canonical form (:func:`canonical_spec`, the version written out).

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
        from interptool.data._concept_world import make_concept_world

        merged = _concept_world_params(spec, rest)
        root = make_concept_world(None, merged["n"], merged["size"], merged["seed"],
                                  merged["split"], version=merged["version"])
        # The data set carries the canonical spec (every parameter, the version included), so
        # caches and results record what was drawn, not what the default meant that day.
        return BrodenDataset(root, spec=_concept_world_spec(merged))
    raise DataError(f"data spec {spec!r}: unknown kind {kind!r}; expected {SPEC_HELP}")


# Parameters of builtin:concept-world, in the order a canonical spec writes them.
_CONCEPT_WORLD_KEYS = {"version": "generator version, 1 or 2 (default 2)",
                       "n": "number of images", "size": "image side in px",
                       "seed": "base seed", "split": "train, eval or probe"}
# What an unversioned concept-world spec *read back from a file* means (see recorded_spec).
RECORDED_UNVERSIONED_VERSION = 1


def _concept_world_params(spec: str, rest: str) -> dict[str, Any]:
    """Validated parameters of ``builtin:concept-world?...`` (``rest`` is after the colon)."""
    from interptool.data._concept_world import DEFAULTS, validate_params

    name, _, q = rest.partition("?")
    if name != "concept-world":
        raise DataError(f"data spec {spec!r}: unknown built-in set {name!r}; available: "
                        f"{', '.join(BUILTINS)}")
    params = _query(spec, q, _CONCEPT_WORLD_KEYS) if q else {}
    merged = {**DEFAULTS, **params}
    try:
        n, size, seed, split, version = validate_params(
            merged["n"], merged["size"], merged["seed"], merged["split"], merged["version"])
    except DataError as exc:
        raise DataError(f"data spec {spec!r}: {exc}") from None
    return {"version": version, "n": n, "size": size, "seed": seed, "split": split}


def _concept_world_spec(params: dict[str, Any]) -> str:
    return "builtin:concept-world?" + "&".join(f"{k}={params[k]}" for k in _CONCEPT_WORLD_KEYS)


def canonical_spec(spec: str) -> str:
    """``spec`` as a data set opened from it records it: a concept-world spec with every
    parameter written out in a fixed order, the version included
    (``builtin:concept-world?n=200`` -> ``builtin:concept-world?version=2&n=200&size=64&seed=0&split=probe``
    while the default version is 2); any other spec is returned stripped but unchanged.

    Raises :class:`DataError` for a malformed concept-world spec.
    """
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if sep and kind.lower() == "builtin":
        return _concept_world_spec(_concept_world_params(spec, rest))
    return spec


def recorded_spec(spec: str) -> str:
    """The spec a cache or result recorded, with its concept-world version made explicit.

    Version 2 became the default of an unversioned ``builtin:concept-world`` spec after
    caches had recorded such specs meaning version 1; since then every data set opened from
    a spec records its canonical form (version written out, :func:`canonical_spec`). So an
    unversioned concept-world spec found in a file can only predate the change and means
    version 1: this returns it with ``version=1`` added (other specs, and specs that already
    name a version, unchanged), so reopening an old cache's probe set never silently draws
    version 2. Use it on every spec read back from a file, never on one a user just typed.
    """
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    if not sep or kind.lower() != "builtin":
        return spec
    name, _, q = rest.partition("?")
    try:
        keys = [k for k, _ in parse_qsl(q, keep_blank_values=True, strict_parsing=True)] \
            if q else []
    except ValueError:
        return spec  # malformed: opening it raises the usual error naming it
    if name != "concept-world" or "version" in keys:
        return spec
    version = f"version={RECORDED_UNVERSIONED_VERSION}"
    return f"{kind}:{name}?{version}&{q}" if q else f"{kind}:{name}?{version}"


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
