"""Vectorised NetDissect-Lite tally: intersections, label areas and per-category unit areas.

For one batch of images and every (image, unit) pair whose map exceeds the unit's threshold
somewhere, the maps are upsampled together (``resize_maps``), thresholded, and every masked
pixel's labels (all mask planes) are counted at once with ``bincount`` on ``unit * L + label``.
Counts are int64, exact, and independent of batch size and image order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from interptool.analyzers._dissection_resize import threshold_maps
from interptool.errors import DataError

# Elements of (pairs x pixels x planes) worked on at once; bounds peak memory per chunk.
_CHUNK_ELEMENTS = 1 << 23


@dataclass
class SegItem:
    """One probe image's ground truth, flattened for the tally."""

    index: int
    size: tuple[int, int]
    pixel: np.ndarray  # (D, sh*sw) int64 label numbers, all pixel categories stacked
    scalars: np.ndarray  # (S,) int64 image-level label numbers (duplicates kept)


class SegmentationSet(torch.utils.data.Dataset):
    """Torch dataset over a probe's segmentations (decoding runs in DataLoader workers)."""

    def __init__(self, probe: Any, categories: list[str]) -> None:
        self.probe = probe
        self.categories = categories

    def __len__(self) -> int:
        return len(self.probe)

    def __getitem__(self, i: int) -> SegItem:
        seg = self.probe.load_segmentation(i)
        sh, sw = (int(v) for v in seg.size)
        planes = [np.asarray(a, dtype=np.int64).reshape(-1, sh * sw)
                  for a in (seg.pixel.get(c) for c in self.categories) if a is not None and a.size]
        scal = [np.asarray(a, dtype=np.int64).reshape(-1)
                for a in (seg.image.get(c) for c in self.categories) if a is not None]
        pixel = np.concatenate(planes) if planes else np.zeros((0, sh * sw), np.int64)
        scalars = np.concatenate(scal) if scal else np.zeros(0, np.int64)
        return SegItem(int(i), (sh, sw), pixel, scalars)


def collate_list(batch: list[SegItem]) -> list[SegItem]:
    return batch


class TallyAccumulator:
    """Running NetDissect-Lite counts for one layer.

    Args:
        thresholds: (U,) float64 per-unit thresholds.
        label_category: (L,) int primary category index per label number (-1 unused).
        num_categories: number of categories.
        category_area: ``"overlap"`` (NetDissect-Lite: a unit's mask area in an image counts
            for category c when the mask touches a pixel labelled with a c label, or the
            image has an image-level c label) or ``"image"`` (when the image carries any c
            label, pixel or image-level).
    """

    def __init__(self, thresholds: np.ndarray, label_category: np.ndarray, num_categories: int,
                 device: torch.device, category_area: str = "overlap") -> None:
        self.device = device
        self.U = len(thresholds)
        self.L = len(label_category)
        self.C = int(num_categories)
        self.mode = category_area
        self.T = torch.as_tensor(thresholds, dtype=torch.float64, device=device)
        cat = np.asarray(label_category, dtype=np.int64).copy()
        # unused numbers and label 0 get a dummy category C (dropped) so lookups stay in range
        cat[cat < 0] = self.C
        cat[0] = self.C
        self.cat = torch.as_tensor(cat, device=device)
        self.intersect = torch.zeros(self.U * self.L, dtype=torch.int64, device=device)
        self.label_area = torch.zeros(self.L, dtype=torch.int64, device=device)
        self.unit_area = torch.zeros(self.U, dtype=torch.int64, device=device)
        self.unit_cat_area = torch.zeros((self.U, self.C), dtype=torch.int64, device=device)

    def _check_labels(self, items: list[SegItem]) -> None:
        for it in items:
            hi = max(int(it.pixel.max(initial=0)), int(it.scalars.max(initial=0)))
            lo = min(int(it.pixel.min(initial=0)), int(it.scalars.min(initial=0)))
            if hi >= self.L or lo < 0:
                raise DataError(
                    f"probe image {it.index}: label number {hi if hi >= self.L else lo} is "
                    f"outside label.csv's range 0..{self.L - 1}; fix the mask or add the label"
                )

    def add(self, feats: torch.Tensor, items: list[SegItem]) -> None:
        """Count one batch: ``feats`` (B, U, H, W) float32 on the device, aligned with ``items``."""
        self._check_labels(items)
        by_size: dict[tuple[int, int], list[int]] = {}
        for b, it in enumerate(items):
            by_size.setdefault(it.size, []).append(b)
        for size, rows in by_size.items():
            self._add_group(feats[rows], [items[b] for b in rows], size)

    def _add_group(self, feats: torch.Tensor, items: list[SegItem], size: tuple[int, int]) -> None:
        dev, U, L, C = self.device, self.U, self.L, self.C
        sh, sw = size
        P = sh * sw
        G = len(items)
        D = max(it.pixel.shape[0] for it in items)
        S = max(len(it.scalars) for it in items)
        pix = torch.zeros((G, max(D, 1), P), dtype=torch.int64)
        scal = torch.zeros((G, max(S, 1)), dtype=torch.int64)
        for g, it in enumerate(items):
            if it.pixel.shape[0]:
                pix[g, : it.pixel.shape[0]] = torch.from_numpy(it.pixel)
            if len(it.scalars):
                scal[g, : len(it.scalars)] = torch.from_numpy(it.scalars)
        pix, scal = pix.to(dev), scal.to(dev)

        # label areas: every labelled pixel of every plane; image-level labels cover sh*sw
        self.label_area += torch.bincount(pix.reshape(-1), minlength=L)[:L] * (
            torch.arange(L, device=dev) > 0)
        self.label_area += torch.bincount(scal.reshape(-1), minlength=L)[:L] * P * (
            torch.arange(L, device=dev) > 0)

        # categories an image carries through image-level labels (and, for "image", any label)
        scal_cat = torch.zeros((G, C + 1), dtype=torch.bool, device=dev)
        scal_cat.scatter_(1, self.cat[scal], True)
        img_cat = scal_cat.clone()
        if self.mode == "image":
            img_cat.scatter_(1, self.cat[pix.reshape(G, -1)], True)
        scal_cat, img_cat = scal_cat[:, :C], img_cat[:, :C]

        # (image, unit) pairs whose map exceeds the threshold somewhere; others give empty
        # masks (bilinear upsampling never exceeds the map's maximum), so skipping is exact
        peak = feats.flatten(2).amax(dim=2).double()
        g_idx, u_idx = torch.nonzero(peak > self.T[None, :], as_tuple=True)
        if g_idx.numel() == 0:
            return
        pix_rows = pix.permute(0, 2, 1).reshape(G * P, -1)  # row = (image, pixel): its planes
        step = max(1, _CHUNK_ELEMENTS // (P * max(D, 1)))
        for s in range(0, g_idx.numel(), step):
            gi, ui = g_idx[s : s + step], u_idx[s : s + step]
            k = gi.numel()
            # (k, P): the Pillow-bilinear upsampled maps thresholded, bit-exact
            mask = threshold_maps(feats[gi, ui], (sh, sw), self.T[ui])
            area = mask.sum(dim=1)  # int64
            self.unit_area.index_add_(0, ui, area)

            kk, pp = torch.nonzero(mask, as_tuple=True)
            labels = pix_rows.index_select(0, gi[kk] * P + pp)  # (nnz, D) labels under the mask
            keys = ui[kk][:, None] * L + labels
            self.intersect += torch.bincount(keys.reshape(-1), minlength=U * L)
            # image-level labels: the whole mask intersects them
            skeys = (ui[:, None] * L + scal[gi]).reshape(-1)
            sw_ = area[:, None].expand(-1, scal.shape[1]).reshape(-1)
            self.intersect.index_add_(0, skeys, sw_)

            if self.mode == "overlap":
                ckeys = kk[:, None] * (C + 1) + self.cat[labels]
                touched = torch.bincount(ckeys.reshape(-1), minlength=k * (C + 1))
                present = touched.reshape(k, C + 1)[:, :C] > 0
                present |= scal_cat[gi]
            else:
                present = img_cat[gi]
            self.unit_cat_area.index_add_(0, ui, area[:, None] * present)

    def counts(self) -> dict[str, np.ndarray]:
        inter = self.intersect.reshape(self.U, self.L).clone()
        inter[:, 0] = 0  # label 0 is "unlabelled"
        return {
            "intersect": inter.cpu().numpy(),
            "label_area": self.label_area.cpu().numpy(),
            "unit_area": self.unit_area.cpu().numpy(),
            "unit_cat_area": self.unit_cat_area.cpu().numpy(),
        }
