"""Checks shared by every CSV / text table a data set is read from (untrusted input).

Each raises :class:`~interptool.errors.DataError` with a one-line message naming the file (and
line where there is one), what was expected and the fix.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from interptool.errors import DataError

INT64_MAX = 2**63 - 1


def show_header(header: list[str]) -> str:
    """A header for a one-line message: ``a,b,c``, escaped when a name holds a control
    character or a line break (a binary file, a quoted newline)."""
    text = ",".join(header)
    return text if text.isprintable() else ascii(text)


def read_csv_rows(path: Path) -> list[list[str]]:
    """Every record of a UTF-8 CSV (a BOM is skipped); DataError naming the file for text that
    is not UTF-8 or a record the csv module cannot parse."""
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            return list(reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the "
                        "file as UTF-8 CSV") from None
    except csv.Error as exc:
        line = reader.line_num if reader is not None else 0
        raise DataError(f"{path}, line {line}: cannot be read as CSV ({exc}); fix the "
                        "quoting of that line") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read: {exc.strerror or exc}") from None


def check_header(path: Path, header: list[str], *, named: bool = True) -> int:
    """Refuse a column named twice; return the width rows must have.

    ``named``: every column up to the last named one must have a name (tables whose columns
    are read by position, as Broden's ``index.csv``); unnamed columns at the end (a trailing
    comma) are ignored and the width excludes them. With ``named=False`` unnamed columns are
    allowed anywhere (a CSV list written by pandas starts with its unnamed index column) and
    the width is the whole header.
    """
    width = len(header)
    if named:
        while width and not header[width - 1]:
            width -= 1
    seen: dict[str, int] = {}
    for k, name in enumerate(header[:width]):
        if not name:
            if named:
                raise DataError(
                    f"{path}: header {show_header(header)}: column {k + 1} has no name; name it "
                    "or remove the column"
                )
            continue
        if name in seen:
            raise DataError(
                f"{path}: header {show_header(header)} has column {name!r} twice (columns "
                f"{seen[name] + 1} and {k + 1}); every column must appear once: rename or "
                "remove the repeated one"
            )
        seen[name] = k
    return width


def check_row_width(path: Path, line: int, row: list[str], header: list[str],
                    width: int) -> None:
    """A row must fill the ``width`` named columns; fields beyond them must be empty (a
    trailing comma), else the row does not fit the header (an unquoted comma in a name)."""
    extra = [c for c in row[width:] if c.strip()]
    if len(row) < width or extra:
        what = f"extra field(s) {', '.join(repr(c) for c in extra[:3])}; " if extra else ""
        raise DataError(
            f"{path}, line {line}: {len(row)} fields, expected {width} "
            f"({show_header(header[:width])}); {what}quote cells that hold commas and give "
            "every row one field per column"
        )


def read_names(path: Path, what: str = "class") -> list[str]:
    """Names listed one per line (``classes.txt``); blank lines are skipped, a name listed
    twice is refused naming both lines (the line order gives the label numbers)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the "
                        "file as UTF-8 with one name per line") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read: {exc.strerror or exc}") from None
    names: list[str] = []
    seen: dict[str, int] = {}
    for line, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name:
            continue
        if name in seen:
            raise DataError(
                f"{path}, line {line}: {what} {name!r} already listed on line {seen[name]}; "
                f"list every {what} once (the order of the lines gives the label numbers)"
            )
        seen[name] = line
        names.append(name)
    return names


def refuse_nul(path: Path | str | os.PathLike, line: int, column: str, value: str) -> None:
    """A file name cell holding a NUL character cannot name a file."""
    if "\x00" in value:
        raise DataError(f"{path}, line {line}, column '{column}': {value!r} holds a NUL "
                        "character; a file name cannot: fix the cell")
