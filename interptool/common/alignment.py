""""Same images" checks: two things that must describe the same images in the same order.

Every comparison in interptool is per image (paired bootstrap, CKA, agreement of maps,
dissection of a cache against its probe set), so every stage checks alignment the same way,
with the same messages, here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from interptool.errors import AnalysisError, InterptoolError

__all__ = ["ImageSet", "check_same_images"]


@dataclass
class ImageSet:
    """What identifies the images behind a cache, a data set or a result.

    ``where``: how messages name it (a file path, ``"res_a"``); ``ids``: the image ids in
    order; ``fingerprint``: the data fingerprint (None or "" when unknown); ``labels``: class
    labels in the same order, when they must agree too.
    """

    where: str
    ids: Sequence[Any]
    fingerprint: str | None = None
    labels: Any = None


def check_same_images(first: ImageSet, other: ImageSet, *, fix: str,
                      error: type[InterptoolError] = AnalysisError,
                      unknown_fingerprint_ok: bool = False) -> None:
    """Raise ``error`` unless ``first`` and ``other`` hold the same images in the same order.

    Checked in order: the data fingerprints (skipped when either is unknown and
    ``unknown_fingerprint_ok``), the number of images, the ids (the message names the first
    differing row), and the labels when both carry them. ``fix`` ends every message.
    """
    a, b = first, other
    fa, fb = a.fingerprint or "", b.fingerprint or ""
    if fa != fb and not (unknown_fingerprint_ok and not (fa and fb)):
        if not (fa and fb):
            blank = a if not fa else b
            raise error(
                f"{blank.where} records no data fingerprint (a file made by hand or damaged), "
                f"so it cannot be shown to hold the images of "
                f"{(b if blank is a else a).where}. {fix}")
        raise error(
            f"data fingerprints differ: {a.where} has {fa[:12]}.., {b.where} has "
            f"{fb[:12]}..; they were made from a different data set. {fix}")
    ids_a, ids_b = [str(i) for i in a.ids], [str(i) for i in b.ids]
    if ids_a != ids_b:
        row = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y),
                   min(len(ids_a), len(ids_b)))
        ida = ids_a[row] if row < len(ids_a) else "(none)"
        idb = ids_b[row] if row < len(ids_b) else "(none)"
        count = (f"{b.where} has {len(ids_b)} images but {a.where} has {len(ids_a)}; "
                 if len(ids_a) != len(ids_b) else "")
        raise error(
            f"{count}image order differs between {a.where} and {b.where}: the same images in "
            f"the same order are needed, first difference at row {row} (position {row}: "
            f"{ida!r} vs {idb!r}). {fix}")
    if a.labels is not None and b.labels is not None:
        import numpy as np

        if not np.array_equal(np.asarray(a.labels), np.asarray(b.labels)):
            raise error(f"labels differ between {a.where} and {b.where} for the same images. "
                        f"{fix}")
