"""Broden-format segmentation data sets (``broden:PATH``), read as NetDissect-Lite reads them.

Layout (see docs/data.md)::

    ROOT/index.csv      image,split,ih,iw,sh,sw,<cat1>,<cat2>,...
    ROOT/category.csv   name,first,last,count,frequency
    ROOT/label.csv      number,name,category,frequency,coverage,syns
    ROOT/c_<cat>.csv    code,number,name,frequency,coverage        (optional, validated)
    ROOT/images/...     images and mask PNGs (label = R + 256 * G, 0 = unlabelled)
    ROOT/labels.csv     image,label   + ROOT/classes.txt            (optional class labels)

A category cell holds ``;``-separated items: mask file names (relative to ``images/``) or
decimal label numbers that apply to the whole image (e.g. scene). As in NetDissect-Lite a
cell whose items are all numbers is image-level; numbers mixed with files in one cell
become constant planes of the pixel array.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from interptool.data._base import ImageDataset
from interptool.data._table import (
    INT64_MAX,
    check_header,
    check_row_width,
    read_csv_rows,
    read_names,
    refuse_nul,
    show_header,
)
from interptool.errors import DataError

INDEX_META = ("image", "split", "ih", "iw", "sh", "sw")
_MAX_UNSAFE_LISTED = 20  # escaping paths named one by one in UnsafePathError.problems
_CAT_FIELD = re.compile(r"^([^()]+)\((\d+)\)$")
_DIGITS = re.compile(r"^\d+$")
# what reads as a number but is no label number (-3, +3, 1.5, 1e3): not taken for a file name
_NUMBER_LIKE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
# label numbers: a mask encodes R + 256 * G, so 65535 is the largest a mask can hold
MAX_LABEL = 65535
MAX_SIDE = 65535  # ih, iw, sh, sw (the largest side JPEG and WebP can store)
_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass
class Segmentation:
    """Ground truth of one image at segmentation size.

    Attributes:
        size: ``(sh, sw)``.
        pixel: category -> int64 array ``(m, sh, sw)`` of label numbers (0 = none), one plane
            per mask file (``m`` may be 0).
        image: category -> int64 array of label numbers that apply to the whole image.
    """

    size: tuple[int, int]
    pixel: dict[str, np.ndarray] = field(default_factory=dict)
    image: dict[str, np.ndarray] = field(default_factory=dict)

    def labels_present(self) -> np.ndarray:
        """Sorted unique non-zero label numbers found in any category."""
        parts = [np.unique(a) for a in self.pixel.values() if a.size]
        parts += [np.asarray(a, dtype=np.int64) for a in self.image.values()]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        u = np.unique(np.concatenate(parts))
        return u[u > 0]


def decode_mask(rgb: np.ndarray) -> np.ndarray:
    """Label numbers of a mask image array: ``R + 256 * G`` computed in int64."""
    if rgb.ndim == 2:
        return rgb.astype(np.int64)
    return rgb[..., 0].astype(np.int64) + 256 * rgb[..., 1].astype(np.int64)


def encode_mask(labels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`decode_mask`: uint8 RGB array with R = n % 256, G = n // 256, B = 0."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 65535:
        raise ValueError("mask label numbers must lie in 0..65535")
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    out[..., 0] = labels % 256
    out[..., 1] = labels // 256
    return out


def read_mask_png(path: str | os.PathLike) -> np.ndarray:
    """Read a mask PNG as int64 label numbers (``DataError`` naming the file on failure)."""
    return read_mask_labels(path).astype(np.int64)


def read_mask_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a mask PNG as label numbers in the narrowest exact integer array: int32 for RGB
    (``R + 256 * G``), the PNG's own type for one channel (uint8, uint16 or int32).

    Why not :func:`decode_mask`: a probe's masks are decoded on every dissection (Broden:
    ~300,000 files), and three int64 temporaries per file were a fifth of the decoding.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                rgb = np.asarray(im)
                labels = rgb[..., 1].astype(np.int32)
                labels <<= 8
                labels |= rgb[..., 0]
                return labels
            if im.mode in ("L", "I", "I;16", "I;16B", "I;16L"):
                return np.asarray(im)  # single channel: the value is the label number
            return decode_mask(np.asarray(im.convert("RGB")))
    except FileNotFoundError:
        raise DataError(f"mask file {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"mask file {path} cannot be decoded: {exc}") from None


def write_mask_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write label numbers (2-D int array) as a Broden mask PNG."""
    from PIL import Image

    Image.fromarray(encode_mask(labels), mode="RGB").save(path, format="PNG")


class UnsafePathError(DataError):
    """``index.csv`` names files outside the data set root (absolute paths, ``..``).

    ``problems`` lists one line per offending cell (at most 20, then a count), so that
    ``check_dataset`` can report all of them; the message names the first.
    """

    def __init__(self, problems: list[str], total: int) -> None:
        self.problems = list(problems)
        if total > len(problems):
            self.problems.append(f"... and {total - len(problems)} more paths outside the root")
        more = f" ({total - 1} more such cells)" if total > 1 else ""
        super().__init__(problems[0] + more)


def lexical_escape(item: str) -> str | None:
    """Why an ``index.csv`` path (relative to ``images/``) would leave the data set root,
    judged from the text alone; ``None`` when it stays inside.

    An absolute path (POSIX ``/x``, Windows ``C:\\x`` or ``\\\\server``) is refused, as is any
    path whose ``..`` components climb above the root once ``images/`` is prefixed
    (``../x.png`` stays inside the root, ``../../x.png`` does not).
    """
    text = item.replace("\\", "/")
    if text.startswith("/") or (text[1:2] == ":" and text[:1] in _ASCII_LETTERS):
        return "is an absolute path"
    if ".." not in text:  # the common case, checked for every cell: no way up
        return None
    depth = 1  # below ROOT/images
    for part in text.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "climbs out of the data set root with '..'"
        elif part not in ("", "."):
            depth += 1
    return None


def _within(path: str, bases: tuple[str, ...]) -> bool:
    return any(path == b or path.startswith(b + os.sep) for b in bases)


def _mode(path: str) -> int | None:
    """``st_mode`` of what ``path`` leads to, None if nothing."""
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


def _read_csv(path: Path, required: tuple[str, ...], fix: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV; DataError naming the file when missing or malformed."""
    if not path.is_file():
        raise DataError(f"{path} is missing; {fix}")
    rows = read_csv_rows(path)
    if not rows:
        raise DataError(f"{path} is empty; expected a header line {','.join(required)}")
    header = [h.strip() for h in rows[0]]
    absent = [c for c in required if c not in header]
    if absent:
        raise DataError(
            f"{path}: header {show_header(header)} lacks column(s) {', '.join(absent)}; "
            f"expected {','.join(required)}"
        )
    # columns are mapped by name: one named twice would silently lose the other
    width = check_header(path, header)
    header = header[:width]
    body = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        # a short row, or one with extra fields (an unquoted comma), shifts every column
        check_row_width(path, line, row, header, width)
        body.append((line, row))
    return header, body  # type: ignore[return-value]


def _int_cell(path: Path, line: int, column: str, value: str,
              lo: int | None = -INT64_MAX - 1, hi: int | None = INT64_MAX) -> int:
    """An integer cell within ``lo..hi`` (default: int64; ``None``: the caller checks)."""
    try:
        num = int(value)
    except ValueError:
        raise DataError(
            f"{path}, line {line}, column '{column}': {value!r} is not an integer"
        ) from None
    if (lo is not None and num < lo) or (hi is not None and num > hi):
        raise DataError(f"{path}, line {line}, column '{column}': {value} is outside "
                        f"{lo}..{hi}; fix the cell")
    return num


def _float_cell(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("nan")


class BrodenDataset(ImageDataset):
    """A Broden-format data set (``broden:PATH``); also what ``builtin:concept-world`` returns.

    Args:
        root: folder holding ``index.csv`` and ``images/``.
        spec: spec string to record (default ``broden:ROOT``).
        split: keep only rows of ``index.csv`` whose ``split`` equals this (default: all).
        primary_category: ``"auto"`` (default): NetDissect-Lite's rule when every
            ``c_<cat>.csv`` is present, else ``"count"``. ``"coverage"``: NetDissect-Lite's
            rule, the largest coverage in ``c_<cat>.csv`` (ties: later category), which needs
            every ``c_<cat>.csv``. ``"count"``: the category with the largest image count in
            ``label.csv``'s category field (ties: first listed).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        spec: str | None = None,
        *,
        split: str | None = None,
        primary_category: str = "auto",
    ) -> None:
        root = Path(root).expanduser()
        spec = spec or f"broden:{root}"
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise DataError(f"{spec}: {root} {what}; give the Broden root folder that "
                            "holds index.csv, label.csv, category.csv and images/")
        if primary_category not in ("auto", "count", "coverage"):
            raise DataError(f"primary_category={primary_category!r}; expected 'auto', 'count' "
                            "or 'coverage'")
        self.root = root
        self._read_categories(root)
        self._read_label_table(root)
        self._read_category_maps(root)
        self._set_primary(primary_category, root)
        ids = self._read_index(root, split)
        labels, class_names = self._read_class_labels(root, ids)
        super().__init__(spec, root / "images", ids, labels, class_names)

    # ------------------------------------------------------------ metadata
    def _read_categories(self, root: Path) -> None:
        path = root / "category.csv"
        header, rows = _read_csv(path, ("name",), "a Broden folder lists its categories in "
                                 "category.csv (name,first,last,count,frequency)")
        iname = header.index("name")
        cats: list[str] = []
        for line, row in rows:
            name = row[iname].strip()
            if not name:
                raise DataError(f"{path}, line {line}, column 'name': empty category name")
            if name in cats:
                raise DataError(f"{path}, line {line}: category {name!r} listed twice")
            cats.append(name)
        if not cats:
            raise DataError(f"{path}: no categories listed")
        self.categories: list[str] = cats

    def _read_label_table(self, root: Path) -> None:
        path = root / "label.csv"
        header, rows = _read_csv(path, ("number", "name", "category"),
                                 "it lists label numbers (number,name,category,frequency,"
                                 "coverage,syns)")
        col = {h: k for k, h in enumerate(header)}
        numbers, names, catcounts, freq, cov = [], [], [], [], []
        seen: dict[int, int] = {}
        for line, row in rows:
            num = _int_cell(path, line, "number", row[col["number"]].strip(), None, None)
            if num < 0:
                raise DataError(f"{path}, line {line}, column 'number': negative label {num}")
            if num > MAX_LABEL:
                raise DataError(
                    f"{path}, line {line}, column 'number': {num} is outside 0..{MAX_LABEL} "
                    "(a mask PNG encodes label numbers as R + 256 * G); renumber the labels"
                )
            if num == 0:
                continue  # 0 is "unlabelled" by definition; some copies list it as '-'
            if num in seen:
                raise DataError(f"{path}, line {line}: label number {num} already defined on "
                                f"line {seen[num]}")
            seen[num] = line
            counts: list[tuple[str, int]] = []
            text = row[col["category"]].strip()
            for part in [p for p in text.split(";") if p.strip()]:
                m = _CAT_FIELD.match(part.strip())
                if not m:
                    raise DataError(
                        f"{path}, line {line}, column 'category': {part!r} is not of the form "
                        "name(count), e.g. object(123);part(4)"
                    )
                cat = m.group(1)
                if cat not in self.categories:
                    raise DataError(
                        f"{path}, line {line}, column 'category': category {cat!r} is not in "
                        f"category.csv ({', '.join(self.categories)})"
                    )
                counts.append((cat, int(m.group(2))))
            if not counts:
                raise DataError(f"{path}, line {line}, column 'category': label {num} has no "
                                "category; expected e.g. object(123)")
            numbers.append(num)
            names.append(row[col["name"]].strip())
            catcounts.append(counts)
            freq.append(_int_cell(path, line, "frequency", row[col["frequency"]].strip())
                        if "frequency" in col and row[col["frequency"]].strip() else 0)
            cov.append(_float_cell(row[col["coverage"]]) if "coverage" in col else float("nan"))
        if not numbers:
            raise DataError(f"{path}: no labels listed")
        self.num_labels = max(numbers) + 1
        self.label_names = np.full(self.num_labels, "", dtype=object)
        for n, name in zip(numbers, names):
            self.label_names[n] = name
        self._label_counts = dict(zip(numbers, catcounts))
        self._label_rows = (numbers, names, freq, cov)

    def _read_category_maps(self, root: Path) -> None:
        """Read and validate ``c_<cat>.csv`` where present: code -> number, coverage."""
        self.category_codes: dict[str, dict[int, int]] = {}
        self._coverage: dict[str, dict[int, float]] = {}
        for cat in self.categories:
            path = root / f"c_{cat}.csv"
            if not path.is_file():
                continue
            header, rows = _read_csv(path, ("code", "number", "name"), "")
            col = {h: k for k, h in enumerate(header)}
            codes: dict[int, int] = {}
            cov: dict[int, float] = {}
            for line, row in rows:
                code = _int_cell(path, line, "code", row[col["code"]].strip())
                num = _int_cell(path, line, "number", row[col["number"]].strip())
                if code == 0 and num == 0:
                    continue
                if num <= 0 or num >= self.num_labels or not self.label_names[num]:
                    raise DataError(
                        f"{path}, line {line}, column 'number': label {num} is not defined in "
                        "label.csv; regenerate the c_*.csv files or fix label.csv"
                    )
                name = row[col["name"]].strip()
                if name and name != self.label_names[num]:
                    raise DataError(
                        f"{path}, line {line}, column 'name': {name!r} but label.csv calls "
                        f"label {num} {self.label_names[num]!r}"
                    )
                if code in codes:
                    raise DataError(f"{path}, line {line}: code {code} used twice")
                codes[code] = num
                cov[num] = _float_cell(row[col["coverage"]]) if "coverage" in col else 0.0
            self.category_codes[cat] = codes
            self._coverage[cat] = cov

    def _set_primary(self, rule: str, root: Path) -> None:
        numbers, names, freq, cov = self._label_rows
        primary: dict[int, str] = {}
        if rule == "auto":
            # The reference (NetDissect-Lite) decides by coverage; fall back to label.csv's
            # counts only for folders that lack the per-category files.
            rule = "coverage" if all(c in self._coverage for c in self.categories) else "count"
        self.primary_rule = rule
        if rule == "coverage":
            absent = [c for c in self.categories if c not in self._coverage]
            if absent:
                raise DataError(
                    f"{root}: primary_category='coverage' needs c_<cat>.csv for every category; "
                    f"missing c_{absent[0]}.csv"
                )
            for n in numbers:
                # NetDissect-Lite: max over (coverage, category index); 0 where not coded.
                best = max((self._coverage[c].get(n, 0.0), k)
                           for k, c in enumerate(self.categories))
                primary[n] = self.categories[best[1]]
        else:
            for n in numbers:
                counts = self._label_counts[n]
                top = max(c for _, c in counts)
                primary[n] = next(cat for cat, c in counts if c == top)
        self.label_category = np.full(self.num_labels, -1, dtype=np.int64)
        for n in numbers:
            self.label_category[n] = self.categories.index(primary[n])
        import pandas as pd

        self.label_table = pd.DataFrame(
            {
                "number": np.array(numbers, dtype=np.int64),
                "name": names,
                "category": [primary[n] for n in numbers],
                "frequency": np.array(freq, dtype=np.int64),
                "coverage": np.array(cov, dtype=np.float64),
            }
        ).sort_values("number", ignore_index=True)

    # --------------------------------------------------------------- index
    def _read_index(self, root: Path, split: str | None) -> list[str]:
        path = root / "index.csv"
        header, rows = _read_csv(path, INDEX_META,
                                 "a Broden folder lists its images in index.csv")
        if tuple(header[:6]) != INDEX_META:
            raise DataError(f"{path}: header starts {show_header(header[:6])}; expected "
                            f"{','.join(INDEX_META)} then one column per category")
        # (column index, category): every column after sw is named (_read_csv checks it)
        cols = list(enumerate(header[6:], start=6))
        for _, c in cols:
            if c not in self.categories:
                raise DataError(f"{path}: column {c!r} is not a category listed in "
                                f"category.csv ({', '.join(self.categories)})")
        self._index_categories = [c for _, c in cols]
        ids: list[str] = []
        self._split: list[str] = []
        self._sizes: list[tuple[int, int, int, int]] = []
        self._cells: list[dict[str, tuple]] = []
        self._lines: list[int] = []
        pixel_cats: set[str] = set()
        image_cats: set[str] = set()
        self._check_paths_lexically(path, rows, cols)
        first_line: dict[str, int] = {}
        for line, row in rows:
            if split is not None and row[1].strip() != split:
                continue
            image = row[0].strip()
            if not image:
                raise DataError(f"{path}, line {line}, column 'image': empty image name")
            refuse_nul(path, line, "image", image)
            if image in first_line:
                # labels.csv labels an image by name: one of the copies would stay unlabelled
                raise DataError(
                    f"{path}, line {line}, column 'image': {image!r} already listed on line "
                    f"{first_line[image]}; list every image once (merge its category cells "
                    "into one row)"
                )
            first_line[image] = line
            sizes = tuple(_int_cell(path, line, h, row[k].strip()) for k, h in
                          enumerate(INDEX_META[2:], start=2))
            if min(sizes) <= 0:
                raise DataError(f"{path}, line {line}: sizes ih,iw,sh,sw = {sizes} must be "
                                "positive")
            if max(sizes) > MAX_SIDE:
                raise DataError(f"{path}, line {line}: sizes ih,iw,sh,sw = {sizes}; each must "
                                f"lie in 1..{MAX_SIDE} pixels: fix the row")
            cells: dict[str, tuple] = {}
            for k, cat in cols:
                text = row[k].strip() if k < len(row) else ""
                items = [s.strip() for s in text.split(";") if s.strip()]
                if not items:
                    continue
                parsed: list[Any] = []
                for it in items:
                    if _NUMBER_LIKE.match(it) and not _DIGITS.match(it):
                        # not a file name either: read as one it would only fail (or be
                        # skipped) later as a missing mask "images/-3"
                        raise DataError(
                            f"{path}, line {line}, column '{cat}': {it!r} is not a label "
                            "number; image-level labels are label numbers 1.."
                            f"{self.num_labels - 1} from label.csv written as plain digits "
                            "(mask cells name PNG files)"
                        )
                    refuse_nul(path, line, cat, it)
                    if _DIGITS.match(it):
                        num = int(it)
                        if num >= self.num_labels or (num > 0 and not self.label_names[num]):
                            raise DataError(
                                f"{path}, line {line}, column '{cat}': label number {num} is "
                                "not defined in label.csv"
                            )
                        parsed.append(num)
                    else:
                        parsed.append(it)
                if all(isinstance(p, int) for p in parsed):
                    image_cats.add(cat)
                else:
                    pixel_cats.add(cat)
                cells[cat] = (line, tuple(parsed))
            ids.append(image)
            self._lines.append(line)
            self._split.append(row[1].strip())
            self._sizes.append(sizes)  # type: ignore[arg-type]
            self._cells.append(cells)
        if not ids:
            where = f" with split {split!r}" if split is not None else ""
            raise DataError(f"{path}: no images{where}")
        self.pixel_categories = [c for c in self.categories if c in pixel_cats]
        self.image_categories = [c for c in self.categories if c in image_cats]
        return ids

    def _check_paths_lexically(self, path: Path, rows: list,
                               cols: list[tuple[int, str]]) -> None:
        """Refuse absolute and ``..``-escaping paths in any row (every split: the file as a
        whole is untrusted). Raises :class:`UnsafePathError` naming line and column."""
        listed: list[str] = []
        total = 0
        for line, row in rows:
            cells = [("image", row[0].strip())]
            cells += [(cat, row[k]) for k, cat in cols if k < len(row)]
            for col, text in cells:
                for it in (s.strip() for s in text.split(";")):
                    if not it or (col != "image" and _DIGITS.match(it)):
                        continue
                    why = lexical_escape(it)
                    if why is None:
                        continue
                    total += 1
                    if len(listed) < _MAX_UNSAFE_LISTED:
                        listed.append(
                            f"{path}, line {line}, column '{col}': {it!r} {why}; paths in "
                            f"index.csv are relative to {self.root / 'images'} and must stay "
                            "inside the data set root: fix or remove the row"
                        )
        if listed:
            raise UnsafePathError(listed, total)

    def _real_bases(self) -> tuple[str, ...]:
        """Resolved data set root and ``images/`` (which may be a symlink to other storage)."""
        if getattr(self, "_bases", None) is None:
            self._bases = tuple(dict.fromkeys(
                os.path.realpath(p) for p in (self.root, self.root / "images")))
        return self._bases

    def _real_dir(self, folder: str) -> str:
        """``os.path.realpath(folder)``, remembered per folder: a probe set names thousands of
        files in a handful of folders, and resolving a path costs one ``lstat`` per component.
        A folder swapped for a symbolic link after its first use is not seen again."""
        cache = self.__dict__.setdefault("_real_dirs", {})
        real = cache.get(folder)
        if real is None:
            real = cache[folder] = os.path.realpath(folder)
        return real

    def resolve_escape(self, path: Path | str) -> str | None:
        """Where ``path`` really leads when that is outside the data set root (a symlink to
        elsewhere, or a folder on its way that is one), else ``None``. ``images/`` itself may
        link to other storage.

        As strict as ``os.path.realpath`` on every path, at one ``lstat`` per file: the folder
        part is resolved once per folder (:meth:`_real_dir`), the file itself is resolved only
        when it is a symbolic link. A missing file is not an escape (the caller reports it).
        """
        return self._look_up(os.fspath(path))[0]

    def _look_up(self, path: str) -> tuple[str | None, int | None]:
        """``(escape, mode)``: :meth:`resolve_escape`'s answer and the ``st_mode`` of the file
        ``path`` names after links (None: missing, or not looked at because it escapes), from
        the same ``lstat``: a mask file costs one system call for both checks."""
        folder, name = os.path.split(path)
        bases = self._real_bases()
        if name in ("", ".", ".."):  # not a file name: resolve the whole path
            real = os.path.realpath(path)
            return (None, _mode(path)) if _within(real, bases) else (real, None)
        real_folder = self._real_dir(folder)
        if not _within(real_folder, bases):
            return os.path.realpath(path), None
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return None, None
        if not stat.S_ISLNK(mode):
            return None, mode
        real = os.path.realpath(path)
        return (None, _mode(path)) if _within(real, bases) else (real, None)

    def _escape_error(self, path: Path | str, real: str, line: int, column: str) -> DataError:
        return DataError(
            f"{self.root / 'index.csv'}, line {line}, column '{column}': {path} resolves to "
            f"{real}, outside the data set root {self.root} (a symbolic link); copy the "
            "file into the data set or remove the row"
        )

    def _safe_file(self, path: Path, line: int, column: str) -> Path:
        real = self.resolve_escape(path)
        if real is not None:
            raise self._escape_error(path, real, line, column)
        return path

    def load_image(self, i: int) -> Any:
        """Decode image ``i`` as RGB; :class:`DataError` if its path (after resolving symbolic
        links) leaves the data set root or the file does not decode."""
        self._safe_file(self.image_path(i), self._lines[i], "image")
        return super().load_image(i)

    def _read_class_labels(self, root: Path, ids: list[str]) -> tuple[np.ndarray, list[str] | None]:
        path = root / "labels.csv"
        labels = np.full(len(ids), -1, dtype=np.int64)
        class_names = None
        ctxt = root / "classes.txt"
        if ctxt.is_file():
            class_names = read_names(ctxt)
        if not path.is_file():
            return labels, class_names
        header, rows = _read_csv(path, ("image", "label"), "")
        ii, il = header.index("image"), header.index("label")
        pos = {name: k for k, name in enumerate(ids)}
        seen: dict[str, int] = {}
        for line, row in rows:
            image = row[ii].strip()
            if image in seen:
                raise DataError(f"{path}, line {line}: image {image!r} already labelled on "
                                f"line {seen[image]}; give every image one label")
            seen[image] = line
            k = pos.get(image)
            if k is None:
                continue  # rows of another split
            # -1 = unlabelled; without classes.txt any class index that fits int64
            lab = _int_cell(path, line, "label", row[il].strip(), -1, INT64_MAX)
            if class_names is not None and not -1 <= lab < len(class_names):
                raise DataError(f"{path}, line {line}, column 'label': {lab} is outside "
                                f"0..{len(class_names) - 1} (classes.txt)")
            labels[k] = lab
        return labels, class_names

    # ---------------------------------------------------------------- access
    def index_line(self, i: int) -> int:
        """Line number of image ``i`` in ``index.csv`` (the header is line 1)."""
        return self._lines[i]

    def split_of(self, i: int) -> str:
        """The ``split`` column of image ``i``."""
        return self._split[i]

    def image_size(self, i: int) -> tuple[int, int]:
        """``(ih, iw)`` of image ``i`` from ``index.csv``."""
        return self._sizes[i][0], self._sizes[i][1]

    def seg_size(self, i: int) -> tuple[int, int]:
        """``(sh, sw)``: the segmentation size of image ``i`` from ``index.csv``."""
        return self._sizes[i][2], self._sizes[i][3]

    def mask_files(self, i: int) -> dict[str, list[Path]]:
        """Mask files of image ``i`` per category (absolute paths)."""
        out: dict[str, list[Path]] = {}
        for cat, (_, items) in self._cells[i].items():
            files = [self.root / "images" / it for it in items if isinstance(it, str)]
            if files:
                out[cat] = files
        return out

    def segmentation_digest(self) -> str:
        """sha256 of what decides every image's decoded segmentation besides the bytes of its
        mask files: its segmentation size and each category cell of ``index.csv`` (mask file
        names, label numbers), in image order. Stores of decoded masks key on it (with the
        files' sizes and times); it is computed once per data set object."""
        digest = self.__dict__.get("_segmentation_digest")
        if digest is None:
            import hashlib

            h = hashlib.sha256(b"interptool-segmentations/1\n")
            for (_, _, sh, sw), cells in zip(self._sizes, self._cells):
                h.update(repr((sh, sw, sorted((cat, items) for cat, (_, items)
                                               in cells.items()))).encode())
                h.update(b"\n")
            digest = self.__dict__["_segmentation_digest"] = h.hexdigest()
        return digest

    def load_segmentation(self, i: int) -> Segmentation:
        """Decode the masks and image-level labels of image ``i`` (PIL + numpy, no pixel loop)."""
        sh, sw = self.seg_size(i)
        seg = Segmentation(size=(sh, sw))
        for cat in self.pixel_categories:
            seg.pixel[cat] = np.zeros((0, sh, sw), dtype=np.int64)
        for cat in self.image_categories:
            seg.image[cat] = np.zeros(0, dtype=np.int64)
        for cat, (line, items) in self._cells[i].items():
            if all(isinstance(it, int) for it in items):
                seg.image[cat] = np.array(items, dtype=np.int64)
                continue
            # the files are read and checked before any (sh, sw) plane is allocated: a cell
            # with files but no file of size sh x sw must not allocate what index.csv claims
            masks: dict[int, np.ndarray] = {}
            for k, it in enumerate(items):
                if not isinstance(it, int):
                    masks[k] = self._read_mask(it, line, cat, (sh, sw))
            planes = np.empty((len(items), sh, sw), dtype=np.int64)
            for k, it in enumerate(items):
                # a number among files: constant plane (NetDissect-Lite)
                planes[k] = it if isinstance(it, int) else masks[k]
            seg.pixel[cat] = planes
        return seg

    def _read_mask(self, item: str, line: int, cat: str, size: tuple[int, int]) -> np.ndarray:
        """Decode one mask file of an ``index.csv`` cell and check where it leads, its size
        and its labels (int32, uint16 or uint8 label numbers: :func:`read_mask_labels`)."""
        path = os.path.join(self._images_dir, item)
        real, mode = self._look_up(path)
        if real is not None:
            raise self._escape_error(Path(path), real, line, cat)
        if mode is None or not stat.S_ISREG(mode):
            raise DataError(f"{self._mask_where(path, line, cat)} does not exist; restore it "
                            "or remove it from index.csv")
        arr = read_mask_labels(path)
        if arr.shape != size:
            raise DataError(f"{self._mask_where(path, line, cat)} is {arr.shape[0]}x"
                            f"{arr.shape[1]} but sh,sw = {size[0]},{size[1]}")
        if arr.size:
            # labels decoded from unsigned channels cannot be negative: one pass, not two
            lo = int(arr.min()) if arr.dtype.kind == "i" else 0
            hi = int(arr.max())
            if lo < 0 or hi >= self.num_labels:
                bad = lo if lo < 0 else hi
                raise DataError(
                    f"{self._mask_where(path, line, cat)} holds label number {bad}, outside "
                    f"label.csv's numbers 0..{self.num_labels - 1}; fix the mask (label = R + "
                    "256 * G) or add the label to label.csv"
                )
        return arr

    @staticmethod
    def _mask_where(path: str, line: int, cat: str) -> str:
        return f"mask file {Path(path)} (index.csv line {line}, column '{cat}')"

    @property
    def _images_dir(self) -> str:
        return os.path.join(self.root, "images")

    def category_index(self, name: str) -> int:
        """Index of a category in :attr:`categories` (DataError listing them if unknown)."""
        try:
            return self.categories.index(name)
        except ValueError:
            raise DataError(f"unknown category {name!r}; this data set has "
                            f"{', '.join(self.categories)}") from None

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out.update(
            root=str(self.root),
            categories=self.categories,
            pixel_categories=self.pixel_categories,
            image_categories=self.image_categories,
            num_labels=self.num_labels,
            labels_per_category={c: int((self.label_category == k).sum())
                                 for k, c in enumerate(self.categories)},
        )
        return out
