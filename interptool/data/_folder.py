"""Image folders (``imagefolder:PATH``) and CSV lists (``csv:FILE``)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from interptool.data._base import IMAGE_EXTENSIONS, ImageDataset
from interptool.errors import DataError


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
            raise DataError(f"{spec}: CSV file {file} does not exist; give csv:FILE with "
                            "columns path,label")
        base = file.parent
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{file}: the CSV is empty; expected a header line 'path,label'")
            header = [h.strip() for h in header]
            # `image` is accepted for `path`: Broden-style lists (and concept-world's
            # labels.csv) name the column so.
            path_col = "path" if "path" in header else "image" if "image" in header else None
            if path_col is None:
                raise DataError(
                    f"{file}: header {header} has no 'path' column; expected columns "
                    "'path' (or 'image') and optionally 'label'"
                )
            ip = header.index(path_col)
            il = header.index("label") if "label" in header else None
            paths: list[str] = []
            raw: list[str] = []
            for row_no, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) < len(header):
                    raise DataError(
                        f"{file}, line {row_no}: {len(row)} fields, expected {len(header)} "
                        f"({','.join(header)})"
                    )
                p = row[ip].strip()
                if not p:
                    raise DataError(f"{file}, line {row_no}, column '{path_col}': empty path")
                paths.append(p)
                raw.append(row[il].strip() if il is not None else "")
        if not paths:
            raise DataError(f"{file}: no rows after the header; list one image per line")

        classes_txt = base / "classes.txt"
        fixed = None
        if classes_txt.is_file():
            fixed = [ln.strip() for ln in classes_txt.read_text().splitlines() if ln.strip()]
        labels, class_names = _parse_labels(raw, fixed, file)

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
    raw: list[str], fixed: list[str] | None, file: Path
) -> tuple[np.ndarray, list[str] | None]:
    """Turn label cells into ints: integers stay, names are numbered; '' -> -1."""
    present = [r for r in raw if r != ""]
    all_int = all(_is_int(r) for r in present)
    if all_int:
        labels = np.array([int(r) if r != "" else -1 for r in raw], dtype=np.int64)
        if (labels < -1).any():
            row = int(np.argmax(labels < -1)) + 2
            raise DataError(f"{file}, line {row}, column 'label': negative label "
                            f"{labels[row - 2]}; labels are 0..K-1 (empty = unlabelled)")
        if fixed is not None and len(labels) and labels.max() >= len(fixed):
            raise DataError(f"{file}: label {labels.max()} but classes.txt lists only "
                            f"{len(fixed)} classes")
        return labels, fixed
    names = fixed if fixed is not None else sorted(set(present))
    index = {n: k for k, n in enumerate(names)}
    out = np.full(len(raw), -1, dtype=np.int64)
    for k, r in enumerate(raw):
        if r == "":
            continue
        if r in index:
            out[k] = index[r]
        elif _is_int(r) and fixed is not None and 0 <= int(r) < len(fixed):
            out[k] = int(r)
        else:
            raise DataError(
                f"{file}, line {k + 2}, column 'label': {r!r} is not a class in "
                f"{file.parent / 'classes.txt'}; add it there or fix the label"
            )
    return out, list(names)


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True
