"""Image folders (``imagefolder:PATH``) and CSV lists (``csv:FILE``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from interptool.data._base import IMAGE_EXTENSIONS, ImageDataset
from interptool.data._table import (
    INT64_MAX,
    check_header,
    check_row_width,
    read_csv_rows,
    read_names,
    refuse_nul,
)
from interptool.errors import DataError

# a whole number written as a decimal (1.0: pandas writes an integer column with empty cells
# so) is that integer; any other decimal (1.5, 1e3) is never numbered as a class name unless
# classes.txt lists it
_INTEGRAL = re.compile(r"^([+-]?\d+)\.0*$")
_DECIMAL = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _images_under(folder: Path) -> list[Path]:
    """Every image below ``folder`` (recursive), sorted by relative path for a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


class ImageFolderDataset(ImageDataset):
    """``imagefolder:PATH``: one sub-folder per class (class names sorted), images inside.

    A folder holding images directly and no class sub-folders is read as an unlabelled set.

    A class folder without images is an error, as in torchvision: skipping it would shift
    the label of every later class by one and silently mis-score a model trained with it.
    ``allow_empty=True`` (spec ``imagefolder:PATH?allow_empty=1``) keeps it as a class with
    no images, so every class keeps its index (its position among the sorted folder names).
    """

    def __init__(
        self, root: str | os.PathLike, spec: str | None = None, *, allow_empty: bool = False
    ) -> None:
        root = Path(root).expanduser()
        spec = spec or f"imagefolder:{root}"
        if not root.is_dir():
            if root.exists():
                raise DataError(
                    f"{spec}: {root} is a file, not a folder; give a folder with one "
                    "sub-folder per class (imagefolder:PATH), or csv:FILE for a CSV list"
                )
            raise DataError(
                f"{spec}: folder {root} does not exist; give a folder with one sub-folder "
                "per class (imagefolder:PATH)"
            )
        class_dirs = sorted(
            d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        loose = sorted(p for p in root.iterdir() if _is_image(p))
        ids: list[str] = []
        labels: list[int] = []
        class_names: list[str] | None = None
        if class_dirs:
            if loose:
                raise DataError(
                    f"{spec}: {root} holds both class sub-folders and loose images "
                    f"(e.g. {loose[0].name}); move the loose images into a class folder or "
                    "list the images in a CSV (csv:FILE)"
                )
            class_names = []
            empty: list[Path] = []
            for d in class_dirs:
                images = _images_under(d)
                if not images:
                    empty.append(d)
                    if not allow_empty:
                        continue
                label = len(class_names)
                class_names.append(d.name)
                for p in images:
                    ids.append(p.relative_to(root).as_posix())
                    labels.append(label)
            if empty and not allow_empty:
                more = (f" (also empty: {', '.join(d.name for d in empty[1:6])}"
                        f"{', ...' if len(empty) > 6 else ''})" if len(empty) > 1 else "")
                raise DataError(
                    f"{spec}: class folder {empty[0]} holds no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}){more}, so the classes after it would shift "
                    "down by one label; add its images, remove the folder, or keep it as an "
                    "empty class with imagefolder:PATH?allow_empty=1 (allow_empty=True)"
                )
        else:
            ids = [p.relative_to(root).as_posix() for p in _images_under(root)]
            labels = [-1] * len(ids)
        if not ids:
            raise DataError(
                f"{spec}: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}; "
                "expected ROOT/<class>/<image> files"
            )
        super().__init__(spec, root, ids, np.array(labels, dtype=np.int64), class_names)
        self.root = root
        self.allow_empty = allow_empty


class CsvDataset(ImageDataset):
    """``csv:FILE``: columns ``path`` (or ``image``) and optional ``label``.

    Relative paths resolve against the CSV's folder (or its ``images/`` sub-folder when the
    files are only found there, as in Broden-style lists). A label may be an integer or a class
    name; names are numbered in sorted order unless a ``classes.txt`` (one name per line)
    beside the CSV fixes the order. An empty label cell means unlabelled (``-1``).
    """

    def __init__(self, file: str | os.PathLike, spec: str | None = None) -> None:
        file = Path(file).expanduser()
        spec = spec or f"csv:{file}"
        if not file.is_file():
            if file.is_dir():
                raise DataError(f"{spec}: {file} is a folder, not a CSV file; give csv:FILE "
                                "with columns path,label (or imagefolder:FOLDER)")
            raise DataError(f"{spec}: CSV file {file} does not exist; give csv:FILE with "
                            "columns path,label")
        base = file.parent
        records = read_csv_rows(file)
        if not records:
            raise DataError(f"{file}: the CSV is empty; expected a header line 'path,label'")
        header = [h.strip() for h in records[0]]
        # `image` is accepted for `path`: Broden-style lists (and concept-world's
        # labels.csv) name the column so.
        path_col = "path" if "path" in header else "image" if "image" in header else None
        if path_col is None:
            raise DataError(
                f"{file}: header {header} has no 'path' column; expected columns "
                "'path' (or 'image') and optionally 'label'"
            )
        # columns are found by name: one named twice (two `label` columns) would silently
        # use one of them; unnamed columns (pandas' index) are ignored
        width = check_header(file, header, named=False)
        ip = header.index(path_col)
        il = header.index("label") if "label" in header else None
        paths: list[str] = []
        raw: list[str] = []
        lines: list[int] = []
        for row_no, row in enumerate(records[1:], start=2):
            if not row or all(not c.strip() for c in row):
                continue
            check_row_width(file, row_no, row, header, width)
            p = row[ip].strip()
            if not p:
                raise DataError(f"{file}, line {row_no}, column '{path_col}': empty path")
            refuse_nul(file, row_no, path_col, p)
            paths.append(p)
            raw.append(row[il].strip() if il is not None else "")
            lines.append(row_no)
        if not paths:
            raise DataError(f"{file}: no rows after the header; list one image per line")

        classes_txt = base / "classes.txt"
        fixed = read_names(classes_txt) if classes_txt.is_file() else None
        labels, class_names = _parse_labels(raw, lines, fixed, file)

        # Broden-style lists (concept-world's labels.csv) give image names relative to the
        # images/ folder beside the CSV: resolve against it when the paths are found there only.
        if (
            (base / "images").is_dir()
            and not (base / paths[0]).exists()
            and (base / "images" / paths[0]).exists()
        ):
            base = base / "images"

        # ids are paths relative to the CSV folder when possible, so that an imagefolder spec
        # and a CSV placed in the same root give the same ids (and fingerprint).
        ids = []
        for p in paths:
            pp = Path(p)
            if pp.is_absolute():
                try:
                    p = pp.relative_to(base).as_posix()
                except ValueError:
                    p = pp.as_posix()
            ids.append(p)
        super().__init__(spec, base, ids, labels, class_names)
        self.file = file


def _parse_labels(
    raw: list[str], lines: list[int], fixed: list[str] | None, file: Path
) -> tuple[np.ndarray, list[str] | None]:
    """Turn label cells into ints: integers stay, names are numbered; '' -> -1.

    ``lines[k]`` is the line of cell ``k`` in ``file``. A column holds integer class indices
    or class names, never both (one name among integers would renumber every label); a
    decimal number (``1.0``) is a class name only when ``classes.txt`` lists it.
    """
    ctxt = file.parent / "classes.txt"
    present = [(k, r) for k, r in enumerate(raw) if r != ""]
    if not present:
        return np.full(len(raw), -1, dtype=np.int64), fixed
    listed = set(fixed) if fixed is not None else set()
    if fixed is not None and all(r in listed for _, r in present) and not all(
            _is_int(r) for _, r in present):
        # every cell names a class of classes.txt, some not as a number ('007', 'cat'):
        # names, whatever they look like
        return _numbered(raw, present, fixed, lines, file)
    # pandas writes an integer column with empty cells as floats (1.0, 0.0): whole numbers
    # written so are those integers (a class listed under that name keeps it)
    present = [(k, _INTEGRAL.sub(r"\1", r) if r not in listed else r) for k, r in present]
    k0, r0 = present[0]
    first_int = _is_int(r0)
    for k, r in present:
        if _is_int(r) != first_int:
            kind, other = ("an integer", "the class name") if not first_int else \
                ("a class name", "the integer label")
            raise DataError(
                f"{file}, line {lines[k]}, column 'label': {r!r} is {kind} but line "
                f"{lines[k0]} has {other} {r0!r}; a label column holds integer class "
                "indices or class names, not both: write every label the same way"
            )
    index = {n: k for k, n in enumerate(fixed)} if fixed is not None else {}
    if first_int:
        values = [int(r) for _, r in present]
        lo, hi = min(values), max(values)
        limit = len(fixed) - 1 if fixed is not None else INT64_MAX
        if lo < -1 or hi > limit:  # name the first offending cell
            j = next(j for j, v in enumerate(values) if v < -1 or v > limit)
            k, v = present[j][0], values[j]
            if v < -1:
                raise DataError(f"{file}, line {lines[k]}, column 'label': negative label "
                                f"{v}; labels are 0..K-1 (empty = unlabelled)")
            if fixed is not None:
                raise DataError(f"{file}, line {lines[k]}, column 'label': label {v} but "
                                f"classes.txt lists only {len(fixed)} classes")
            raise DataError(f"{file}, line {lines[k]}, column 'label': {v} is outside "
                            f"-1..{INT64_MAX}; labels are class indices 0..K-1 (empty or "
                            "-1 = unlabelled)")
        if fixed is not None and any(_is_int(n) for n in fixed):
            # classes.txt names a class like an integer: each integer label must mean the
            # same read as an index or as a name
            for (k, r), v in zip(present, values):
                if index.get(r, v) != v:
                    raise DataError(
                        f"{file}, line {lines[k]}, column 'label': {r!r} is class index {v} "
                        f"but also the name of class {index[r]} in {ctxt}; the label is "
                        "ambiguous: rename the classes in classes.txt"
                    )
        labels = np.full(len(raw), -1, dtype=np.int64)
        labels[[k for k, _ in present]] = values
        return labels, fixed
    if fixed is None:
        for k, r in present:
            if _DECIMAL.match(r):
                raise DataError(
                    f"{file}, line {lines[k]}, column 'label': {r!r} is a number but not an "
                    "integer; labels are integer class indices 0..K-1 or class names (a "
                    f"class named so must be listed in {ctxt})"
                )
    names = fixed if fixed is not None else sorted({r for _, r in present})
    return _numbered(raw, present, names, lines, file)


def _numbered(raw: list[str], present: list[tuple[int, str]], names: list[str],
              lines: list[int], file: Path) -> tuple[np.ndarray, list[str]]:
    """Labels of class-name cells: each name's position in ``names``; '' -> -1."""
    index = {n: k for k, n in enumerate(names)}
    for k, r in present:
        if r not in index:
            raise DataError(
                f"{file}, line {lines[k]}, column 'label': {r!r} is not a class in "
                f"{file.parent / 'classes.txt'}; add it there or fix the label"
            )
    out = np.full(len(raw), -1, dtype=np.int64)
    out[[k for k, _ in present]] = [index[r] for _, r in present]
    return out, list(names)


def _is_int(s: str) -> bool:
    """Whether ``int(s)`` parses (fast paths for plain digits and plain words)."""
    t = s[1:] if s[:1] in ("+", "-") else s
    if t.isascii() and t.isdigit():
        return True
    if t[:1].isalpha():  # int() accepts no letter first
        return False
    try:
        int(s)
    except ValueError:
        return False
    return True
