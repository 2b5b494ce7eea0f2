"""The :class:`ImageDataset` base class shared by every data-set kind.

A data set is an ordered list of image files with optional integer class labels. Images are
decoded lazily (one at a time) so that memory stays bounded however large the set is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from interptool.errors import DataError

# Extensions accepted as images when a folder is scanned (lower case, with the dot).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")


# Pillow modes holding more than 8 bits per sample in one channel. ``Image.convert("RGB")``
# clips them at 255 instead of scaling, so a 16-bit photo would decode as (nearly) all white.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(im: Any, what: str = "image") -> Any:
    """Decode a ``PIL.Image`` into 8-bit RGB, scaling 16-bit samples instead of clipping them.

    16-bit grayscale (modes ``I;16``, ``I;16B``, ...) keeps the high byte (``v >> 8``, i.e.
    ``floor(v * 255 / 65535)`` up to rounding). Mode ``I`` (32-bit integers, what some
    decoders produce for 16-bit files) is read the same way when every value lies in
    0..65535; beyond that the bit depth is unknown and the image is refused. 16-bit-per-channel
    colour files are already reduced to 8 bits by Pillow's decoder (high byte), as are palette,
    CMYK and alpha images by ``convert("RGB")``.

    Raises:
        DataError: a mode ``I`` image with values outside 0..65535 (``what`` names it).
    """
    from PIL import Image

    if im.mode not in _WIDE_GRAY_MODES:
        return im.convert("RGB")
    arr = np.asarray(im)
    if im.mode == "I" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise DataError(
            f"{what} holds 32-bit integer pixels from {int(arr.min())} to {int(arr.max())}; "
            "only 8- and 16-bit images have a known range: convert it to an 8- or 16-bit "
            "PNG/TIFF first"
        )
    gray8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    return Image.fromarray(gray8).convert("RGB")


class ImageDataset:
    """An ordered set of images with optional class labels.

    Attributes:
        spec: the spec string the set was opened from.
        ids: relative path of every image (stable order; what caches store as ``/index``).
        labels: int64 array (N,), ``-1`` where an image has no label.
        class_names: class names indexed by label, or ``None`` when unknown.
    """

    def __init__(
        self,
        spec: str,
        base_dir: str | os.PathLike,
        ids: Sequence[str],
        labels: np.ndarray | Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.spec = spec
        self._base_dir = Path(base_dir)
        self.ids: list[str] = list(ids)
        if labels is None:
            labels = np.full(len(self.ids), -1, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.ids):
            raise DataError(f"{spec}: {len(self.ids)} images but {len(self.labels)} labels")
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, n={len(self)}, classes={self.num_classes})"

    @property
    def num_classes(self) -> int | None:
        """Number of classes: ``len(class_names)``, else max label + 1, else ``None``."""
        if self.class_names is not None:
            return len(self.class_names)
        if len(self.labels) and self.labels.max() >= 0:
            return int(self.labels.max()) + 1
        return None

    def image_path(self, i: int) -> Path:
        """Absolute path of image ``i``."""
        return self._base_dir / self.ids[i]

    def load_image(self, i: int) -> Any:
        """Decode image ``i`` as an RGB ``PIL.Image``; :class:`DataError` naming the file if not."""
        from PIL import Image, UnidentifiedImageError

        path = self.image_path(i)
        try:
            with Image.open(path) as im:
                # the conversion forces the full decode here, so truncated files fail now.
                return to_rgb8(im, f"image {path} (item {i} of {self.spec})")
        except FileNotFoundError:
            raise DataError(
                f"image {path} (item {i} of {self.spec}) does not exist; "
                "restore the file or remove it from the data set"
            ) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
                Image.DecompressionBombError) as exc:
            raise DataError(
                f"image {path} (item {i} of {self.spec}) cannot be decoded: {exc}; "
                "replace the file or pass skip_bad=True (--skip-bad) to leave it out"
            ) from None

    # ------------------------------------------------------------- fingerprint
    @property
    def fingerprint(self) -> str:
        """sha256 hex over ids, labels and file sizes (cheap: no pixel is read).

        It does not depend on the spec string, so two specs naming the same files match.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(b"interptool-data/1\n")
            for i, (name, label) in enumerate(zip(self.ids, self.labels.tolist())):
                try:
                    size = self.image_path(i).stat().st_size
                except OSError:
                    size = -1  # a missing file still changes the fingerprint
                h.update(json.dumps([name, label, size]).encode())
                h.update(b"\n")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # ---------------------------------------------------------------- torch
    def torch_dataset(
        self, transform: Callable[[Any], Any] | None = None, skip_bad: bool = False
    ) -> TorchImageDataset:
        """A ``torch.utils.data.Dataset`` yielding ``(tensor, label, index)``.

        With ``skip_bad`` an image that fails to decode yields ``None``; use
        :func:`collate_skip_bad` as the ``collate_fn`` to drop it from the batch.
        """
        return TorchImageDataset(self, transform, skip_bad)

    def summary(self) -> dict[str, Any]:
        """JSON-safe description (spec, size, classes, fingerprint)."""
        labelled = int((self.labels >= 0).sum())
        return {
            "spec": self.spec,
            "kind": type(self).__name__,
            "n": len(self),
            "labelled": labelled,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "fingerprint": self.fingerprint,
        }


try:  # torch is a hard dependency, but keep the import local to this class's base
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object  # type: ignore[misc,assignment]


class TorchImageDataset(_TorchDataset):  # type: ignore[misc]
    """Torch view of an :class:`ImageDataset`: items are ``(transform(image), label, index)``."""

    def __init__(
        self, dataset: ImageDataset, transform: Callable[[Any], Any] | None, skip_bad: bool
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, int, int] | None:
        try:
            image = self.dataset.load_image(i)
        except DataError:
            if self.skip_bad:
                return None
            raise
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.dataset.labels[i]), int(i)


def collate_skip_bad(batch: list[Any]) -> Any:
    """``collate_fn`` that drops ``None`` items (bad images) and collates the rest.

    Returns ``None`` when every item of the batch was bad. Which items were dropped follows
    from the indices that remain (the third element): the caller compares them with the
    indices it asked for and records the missing ones (e.g. the cache's ``skipped`` list).
    """
    from torch.utils.data import default_collate

    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)
