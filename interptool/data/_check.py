"""Manifests of public data sets (``interptool/manifests/*.toml``) and ``check_dataset``.

Manifests are looked up, in order, in ``$INTERPTOOL_MANIFESTS`` (a folder), in
``interptool/manifests/`` (package data: shipped in the wheel, found the same way from a
checkout) and, for older checkouts, in ``data_manifests/`` beside the package.
A manifest only describes where to get a set and what a good copy looks like: nothing is ever
downloaded.

Manifest fields (all optional except ``name`` and ``format``)::

    name, title, format ("broden" | "imagefolder" | "cifar-python" | "csv"), url, license,
    image_size, segmentation_size, categories, num_classes, notes
    subfolder = "cifar-10-batches-py"  # descend into it when PATH holds it
    [[file]]  path, header (exact leading columns), header_contains, rows, min_rows,
              sha256, md5, min_bytes
    [[dir]]   path, glob, count, min_count, subdirs, min_subdirs
    [broden]  check_references = true  # every image / mask file named in index.csv exists
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interptool.errors import DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_MAX_LISTED = 20  # missing files listed one by one, then counted


def manifest_dirs() -> list[Path]:
    """Folders searched for ``NAME.toml``, in priority order."""
    import interptool

    pkg = Path(interptool.__file__).resolve().parent
    dirs = []
    env = os.environ.get("INTERPTOOL_MANIFESTS")
    if env:
        dirs.append(Path(env).expanduser())
    dirs += [pkg / "manifests", pkg.parent / "data_manifests"]
    return dirs


def list_manifests() -> dict[str, Path]:
    """Known manifest names -> file (first folder wins)."""
    found: dict[str, Path] = {}
    for d in manifest_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found.setdefault(p.stem, p)
    return found


def load_manifest(name: str | os.PathLike) -> dict[str, Any]:
    """Read a manifest by name (``broden1_224``) or path to a ``.toml`` file."""
    path = Path(name)
    if path.suffix != ".toml" or not path.is_file():
        known = list_manifests()
        key = str(name).replace("-", "_")
        if key not in known:
            raise DataError(
                f"no data manifest named {name!r}; known: {', '.join(sorted(known)) or 'none'} "
                f"(searched {', '.join(str(d) for d in manifest_dirs())})"
            )
        path = known[key]
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"manifest {path} cannot be read: {exc}") from None
    for key in ("name", "format"):
        if key not in data:
            raise DataError(f"manifest {path}: missing field {key!r}")
    data["_path"] = str(path)
    return data


@dataclass
class CheckReport:
    """Outcome of :func:`check_dataset`: what was checked and every problem found."""

    name: str
    path: str
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "ok": self.ok, "problems": self.problems,
                "checked": self.checked}

    def format(self) -> str:
        title = self.manifest.get("title", self.name)
        lines = [f"{title}: {self.path}"]
        lines += [f"  ok       {c}" for c in self.checked]
        lines += [f"  PROBLEM  {p}" for p in self.problems]
        if self.ok:
            lines.append(f"OK: {self.path} matches manifest {self.name}")
        else:
            lines.append(f"{len(self.problems)} problem(s): {self.path} does not match manifest "
                         f"{self.name}")
            if self.manifest.get("url"):
                lines.append(f"  where to get it: {self.manifest['url']}")
        return "\n".join(lines)


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_file(root: Path, spec: dict[str, Any], rep: CheckReport) -> None:
    rel = spec["path"]
    path = root / rel
    if not path.is_file():
        rep.problems.append(f"{rel}: missing (expected a file at {path})")
        return
    size = path.stat().st_size
    if "min_bytes" in spec and size < spec["min_bytes"]:
        rep.problems.append(f"{rel}: {size} bytes, expected at least {spec['min_bytes']}")
    for algo in ("sha256", "md5"):
        if algo in spec:
            got = _digest(path, algo)
            if got != spec[algo].lower():
                rep.problems.append(f"{rel}: {algo} {got}, expected {spec[algo]} (corrupt or "
                                    "a different version)")
            else:
                rep.checked.append(f"{rel}: {algo} matches")
    if any(k in spec for k in ("header", "header_contains", "rows", "min_rows")):
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = [h.strip() for h in next(reader, [])]
                n_rows = sum(1 for row in reader if row and any(c.strip() for c in row))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            rep.problems.append(f"{rel}: cannot be read as CSV ({exc})")
            return
        want = spec.get("header")
        if want is not None and header[: len(want)] != list(want):
            rep.problems.append(f"{rel}: header {','.join(header)}; expected it to start with "
                                f"{','.join(want)}")
        absent = [c for c in spec.get("header_contains", []) if c not in header]
        if absent:
            rep.problems.append(f"{rel}: header lacks column(s) {', '.join(absent)}")
        if "rows" in spec and n_rows != spec["rows"]:
            rep.problems.append(f"{rel}: {n_rows} data rows, expected {spec['rows']}")
        if "min_rows" in spec and n_rows < spec["min_rows"]:
            rep.problems.append(f"{rel}: {n_rows} data rows, expected at least "
                                f"{spec['min_rows']}")
    rep.checked.append(f"{rel}: present ({size} bytes)")


def _check_dir(root: Path, spec: dict[str, Any], rep: CheckReport) -> None:
    rel = spec.get("path", ".")
    path = root / rel
    if not path.is_dir():
        rep.problems.append(f"{rel}/: missing folder (expected {path})")
        return
    if "subdirs" in spec or "min_subdirs" in spec:
        n = sum(1 for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        if "subdirs" in spec and n != spec["subdirs"]:
            rep.problems.append(f"{rel}/: {n} sub-folders, expected {spec['subdirs']}")
        if "min_subdirs" in spec and n < spec["min_subdirs"]:
            rep.problems.append(f"{rel}/: {n} sub-folders, expected at least "
                                f"{spec['min_subdirs']}")
    before = len(rep.problems)
    if "glob" in spec:
        n = sum(1 for p in path.glob(spec["glob"]) if p.is_file())
        if "count" in spec and n != spec["count"]:
            rep.problems.append(f"{rel}/: {n} files matching {spec['glob']}, expected "
                                f"{spec['count']}")
        if "min_count" in spec and n < spec["min_count"]:
            rep.problems.append(f"{rel}/: {n} files matching {spec['glob']}, expected at least "
                                f"{spec['min_count']}")
        if len(rep.problems) == before:  # listed as "ok" only when nothing was wrong
            rep.checked.append(f"{rel}/: {n} files matching {spec['glob']}")
    elif len(rep.problems) == before:
        rep.checked.append(f"{rel}/: present")


def _check_broden(root: Path, manifest: dict[str, Any], rep: CheckReport) -> None:
    from interptool.data._broden import BrodenDataset, UnsafePathError

    try:
        ds = BrodenDataset(root)
    except UnsafePathError as exc:
        # every escaping cell is a problem of its own: a hostile index.csv may hold many
        rep.problems.extend(f"path outside the data set: {p}" for p in exc.problems)
        return
    except DataError as exc:
        rep.problems.append(f"Broden structure: {exc}")
        return
    rep.checked.append(f"Broden structure: {len(ds)} images, {ds.num_labels - 1} label numbers, "
                       f"categories {', '.join(ds.categories)}")
    want = manifest.get("categories")
    if want:
        absent = [c for c in want if c not in ds.categories]
        if absent:
            rep.problems.append(f"category.csv lacks categor(y/ies) {', '.join(absent)}")
    if not manifest.get("broden", {}).get("check_references", True):
        return
    missing: list[str] = []
    escaped: list[str] = []
    n_missing = n_escaped = 0
    images = root / "images"
    for i in range(len(ds)):
        line = ds.index_line(i)
        refs = [(ds.image_path(i), "image")]
        refs += [(p, cat) for cat, ps in ds.mask_files(i).items() for p in ps]
        for p, what in refs:
            rel = f"images/{p.relative_to(images).as_posix()}"
            real = ds.resolve_escape(p)
            if real is not None:  # a symbolic link out of the data set: never read it
                n_escaped += 1
                if len(escaped) < _MAX_LISTED:
                    escaped.append(f"path outside the data set: {rel} ({what} of index.csv line "
                                   f"{line}) resolves to {real}, outside {root}")
            elif not p.is_file():
                n_missing += 1
                if len(missing) < _MAX_LISTED:
                    missing.append(f"{rel}: missing ({what} of index.csv line {line})")
    rep.problems.extend(escaped)
    if n_escaped > len(escaped):
        rep.problems.append(f"... and {n_escaped - len(escaped)} more paths outside the data set")
    rep.problems.extend(missing)
    if n_missing > len(missing):
        rep.problems.append(f"... and {n_missing - len(missing)} more missing files under images/")
    if not n_missing and not n_escaped:
        rep.checked.append("every image and mask file named in index.csv exists inside the "
                           "data set root")


def check_dataset(name: str, path: str | os.PathLike, *, deep: bool = True) -> CheckReport:
    """Validate a local copy at ``path`` against manifest ``name``.

    Checks presence of files and folders, file counts, CSV headers and row counts, checksums
    where the manifest gives them, and for Broden sets the CSV structure and (``deep``) that
    every file named in ``index.csv`` exists. Problems are collected, not raised: see
    :attr:`CheckReport.ok`. Raises :class:`DataError` only for an unknown manifest.
    """
    manifest = load_manifest(name)
    root = Path(path).expanduser()
    rep = CheckReport(name=manifest["name"], path=str(root), manifest=manifest)
    if not root.is_dir():
        rep.problems.append(f"{root} is not a folder (give the folder holding the data set)")
        return rep
    sub = manifest.get("subfolder")
    if sub and (root / sub).is_dir():
        root = root / sub
        rep.checked.append(f"descended into {sub}/")
    for spec in manifest.get("file", []):
        _check_file(root, spec, rep)
    for spec in manifest.get("dir", []):
        _check_dir(root, spec, rep)
    if manifest["format"] == "broden" and not rep.problems:
        if deep:
            _check_broden(root, manifest, rep)
        else:
            manifest = {**manifest, "broden": {"check_references": False}}
            _check_broden(root, manifest, rep)
    return rep
