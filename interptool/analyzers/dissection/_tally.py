"""Vectorised NetDissect-Lite tally: intersections, label areas and per-category unit areas.

For one batch of images, the (image, unit) pairs whose map exceeds the unit's threshold
somewhere go through :func:`iter_masked_pixels`, which upsamples (Pillow-bilinear, bit-exact)
only the tiles of each map that can exceed the threshold and yields the masked pixels in
bounded chunks. Every masked pixel's labels (all mask planes, stored pixel-major so one row
gather reads them) are counted at once with ``bincount`` on ``unit * L + label``. Counts are
int64, exact, and independent of batch size and image order. This is the only tally path,
on CPU and CUDA (the alternatives measured and removed: docs/benchmarks_dissect.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from interptool.analyzers.dissection._resize import _take, iter_masked_pixels
from interptool.errors import DataError

# Upsampled pixels evaluated per chunk (float64 work arrays of 4 MiB); bounds peak memory
# whatever the number of images or units, and keeps the work in cache.
_CHUNK_PIXELS = 1 << 19
# With a pair hook, (pairs x labels) int64 counts per slice of pairs (32 MiB): pairs are
# counted in slices small enough for this, whatever the number of labels (Broden: 1,198).
_PAIR_LABEL_ENTRIES = 1 << 22

#: ``hook(name, items, image, cols, values)``: one group's contribution to one of the sums
#: (``"intersect"``: cols ``unit * L + label``; ``"unit_cat_area"``: ``unit * C + category``;
#: ``"label_area"``: ``label``), split by image: ``image`` (int64 array) indexes ``items``.
#: Values are positive int64 counts; entries may repeat (their sum is the contribution).
PairHook = Callable[[str, list, np.ndarray, np.ndarray, np.ndarray], None]


@dataclass
class SegItem:
    """One probe image's ground truth, flattened for the tally."""

    index: int
    size: tuple[int, int]
    pixel: np.ndarray  # (sh*sw, D) int32 label numbers, pixel-major: row = one pixel's planes
    scalars: np.ndarray  # (S,) int64 image-level label numbers (duplicates kept)
    label_counts: np.ndarray  # (max label + 1,) int64 pixels per label over all planes
    lo: int  # smallest label number (pixel planes and image-level)
    hi: int  # largest label number


def seg_item(index: int, seg: Any, categories: list[str]) -> SegItem:
    """Flatten one decoded segmentation (``probe.load_segmentation``) into a :class:`SegItem`."""
    sh, sw = (int(v) for v in seg.size)
    planes = [np.asarray(a).reshape(-1, sh * sw)
              for a in (seg.pixel.get(c) for c in categories) if a is not None and a.size]
    scal = [np.asarray(a, dtype=np.int64).reshape(-1)
            for a in (seg.image.get(c) for c in categories) if a is not None]
    pixel = np.empty((sh * sw, sum(len(a) for a in planes)), dtype=np.int32)
    counts = np.zeros(1, np.int64)
    lo, d = 0, 0
    for a in planes:  # pixel-major layout, one plane (column) at a time: ~2.5x faster
        for row in a:  # than copying the transposed 2-D block at once
            pixel[:, d] = row
            d += 1
        try:  # label areas; bincount also gives the largest label and rejects negatives
            c = np.bincount(a.reshape(-1))
        except ValueError:
            lo = min(lo, int(a.min()))
            continue
        if len(c) > len(counts):
            c[: len(counts)] += counts
            counts = c
        else:
            counts[: len(c)] += c
    scalars = np.concatenate(scal) if scal else np.zeros(0, np.int64)
    lo = min(lo, int(scalars.min(initial=0)))
    hi = max(len(counts) - 1, int(scalars.max(initial=0)),
             int(pixel.max(initial=0)) if lo < 0 else 0)
    return SegItem(int(index), (sh, sw), pixel, scalars, counts.astype(np.int64), lo, hi)


class SegmentationSet(torch.utils.data.Dataset):
    """Torch dataset over a probe's segmentations (decoding runs in DataLoader workers)."""

    def __init__(self, probe: Any, categories: list[str]) -> None:
        self.probe = probe
        self.categories = categories

    def __len__(self) -> int:
        return len(self.probe)

    def __getitem__(self, i: int) -> SegItem:
        return seg_item(i, self.probe.load_segmentation(i), self.categories)


@dataclass
class PackedSegItems:
    """A batch of :class:`SegItem` as a DataLoader worker hands it over: every item's pixel
    table in one int32 tensor in shared memory, the small arrays as they are.

    Why: a worker's batch is pickled through a pipe, and the pixel tables are nearly all of
    it (64 probe images at 112 px with 5 mask planes: 16 MB). A tensor crosses through shared
    memory instead. Measured on 2 cores, 3,000 concept-world probe images, one worker:
    4.2-4.8 s to receive every batch against 5.6-5.7 s pickled. The receiver copies the
    tables out at once (:meth:`unpack`, 1-2 ms per batch), so shared memory and its file
    descriptors are held only by the batches in flight (two per worker): a memoised probe
    (up to 256 MiB of tables) would otherwise fill a container's 64 MiB ``/dev/shm`` and hold
    a descriptor per batch. Where ``/dev/shm`` has no room even for one batch, the batch is
    pickled as before.
    """

    items: list[SegItem]  # pixel tables emptied (the shapes below say how to cut `pixels`)
    shapes: list[tuple[int, ...]]
    pixels: torch.Tensor | None  # 1-D int32, the tables one after the other (None: pickled)

    @classmethod
    def pack(cls, batch: list[SegItem]) -> PackedSegItems:
        """DataLoader ``collate_fn`` in the worker."""
        total = sum(it.pixel.size for it in batch)
        try:
            # allocated in shared memory at once: handing it over then copies nothing more
            pixels = torch.empty(total, dtype=torch.int32).share_memory_()
        except RuntimeError:  # no room in /dev/shm: the items go pickled, whole
            return cls(list(batch), [], None)
        flat = pixels.numpy()
        shapes, items, at = [], [], 0
        for it in batch:
            n = it.pixel.size
            flat[at : at + n] = it.pixel.reshape(-1)
            at += n
            shapes.append(it.pixel.shape)
            items.append(replace(it, pixel=_NO_PIXELS))
        return cls(items, shapes, pixels)

    def unpack(self) -> list[SegItem]:
        """The items again, their pixel tables views of one private copy of the batch's
        tables (the shared memory goes with this object)."""
        if self.pixels is None:
            return self.items
        flat = self.pixels.numpy().copy()
        out, at = [], 0
        for it, shape in zip(self.items, self.shapes):
            n = int(np.prod(shape))
            out.append(replace(it, pixel=flat[at : at + n].reshape(shape)))
            at += n
        return out


_NO_PIXELS = np.zeros((0, 0), dtype=np.int32)



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
        hook: optional :data:`PairHook` called from the counting pass with each group's
            contributions split by image (the bootstrap's per-block statistics come from it,
            so keeping them costs no second tally). The totals are the same with or without.
    """

    def __init__(self, thresholds: np.ndarray, label_category: np.ndarray, num_categories: int,
                 device: torch.device, category_area: str = "overlap",
                 hook: PairHook | None = None) -> None:
        self.hook = hook
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
            if it.hi >= self.L or it.lo < 0:
                raise DataError(
                    f"probe image {it.index}: label number {it.hi if it.hi >= self.L else it.lo}"
                    f" is outside label.csv's range 0..{self.L - 1}; fix the mask or add the "
                    "label"
                )

    def add(self, feats: torch.Tensor, items: list[SegItem]) -> None:
        """Count one batch: ``feats`` (B, U, H, W) float32 on the device, aligned with ``items``."""
        self._check_labels(items)
        by_size: dict[tuple[int, int], list[int]] = {}
        for b, it in enumerate(items):
            by_size.setdefault(it.size, []).append(b)
        for size, rows in by_size.items():
            group = feats if len(rows) == len(items) else feats[rows]
            self._add_group(group, [items[b] for b in rows], size)

    def _add_group(self, feats: torch.Tensor, items: list[SegItem], size: tuple[int, int]) -> None:
        dev, L, C = self.device, self.L, self.C
        sh, sw = size
        P = sh * sw
        G = len(items)

        # label areas: every labelled pixel of every plane; image-level labels cover sh*sw
        area = np.zeros(L, dtype=np.int64)
        for it in items:
            area[: len(it.label_counts)] += it.label_counts
            np.add.at(area, it.scalars, P)
        area[0] = 0
        self.label_area += torch.from_numpy(area).to(dev)
        if self.hook is not None:
            self._hook_label_areas(items, P)

        S = max(len(it.scalars) for it in items)
        scal = torch.zeros((G, max(S, 1)), dtype=torch.int64)
        for g, it in enumerate(items):
            if len(it.scalars):
                scal[g, : len(it.scalars)] = torch.from_numpy(it.scalars)
        scal = scal.to(dev)

        # (image, unit) pairs whose map exceeds the threshold somewhere; others give empty
        # masks (bilinear upsampling never exceeds the map's maximum), so skipping is exact
        peak = feats.flatten(2).amax(dim=2)
        g_idx, u_idx = torch.nonzero(peak > self.T[None, :], as_tuple=True)
        k = g_idx.numel()
        if k == 0:
            return
        maps = _take(feats.reshape(G * self.U, *feats.shape[2:]), g_idx * self.U + u_idx)

        # labels pixel-major (G*P, D): a masked pixel's planes are one row
        D = max(it.pixel.shape[1] for it in items)
        if all(it.pixel.shape[1] == D for it in items):
            pix = torch.from_numpy(np.concatenate([it.pixel for it in items]))
        else:
            pix = torch.zeros((G * P, D), dtype=torch.int32)
            for g, it in enumerate(items):
                pix[g * P : (g + 1) * P, : it.pixel.shape[1]] = torch.from_numpy(it.pixel)
        pix = pix.to(dev)  # int32: half the memory traffic of int64 in the gathers below
        if max(self.U * L, 1) >= 2**31:
            pix = pix.long()

        # categories an image carries through image-level labels (and, for "image", any label)
        scal_cat = torch.zeros((G, C + 1), dtype=torch.bool, device=dev)
        scal_cat.scatter_(1, _take(self.cat, scal), True)
        img_cat = scal_cat.clone()
        if self.mode == "image" and D:
            img_cat.scatter_(1, _take(self.cat, pix.reshape(G, -1).long()), True)
        scal_cat, img_cat = scal_cat[:, :C], img_cat[:, :C]

        key_base = u_idx * L
        pair_area = torch.zeros(k, dtype=torch.int64, device=dev)
        if self.hook is None:
            touched = self._count(maps, size, u_idx, g_idx, pix, pair_area)
        else:  # per-pair label counts, in slices of pairs that bound their memory
            step = max(1, _PAIR_LABEL_ENTRIES // max(L, 1))
            touched = torch.cat([
                self._count(maps[s : s + step], size, u_idx[s : s + step],
                            g_idx[s : s + step], pix, pair_area[s : s + step], items=items)
                for s in range(0, k, step)])
        self.unit_area.index_add_(0, u_idx, pair_area)
        # image-level labels: the whole mask intersects them
        skeys = (key_base[:, None] + _take(scal, g_idx)).reshape(-1)
        svals = pair_area[:, None].expand(-1, scal.shape[1]).reshape(-1)
        self.intersect.index_add_(0, skeys, svals)
        if self.mode == "overlap":
            present = touched > 0
            present |= _take(scal_cat, g_idx)
        else:
            present = _take(img_cat, g_idx)
        cat_area = pair_area[:, None] * present
        self.unit_cat_area.index_add_(0, u_idx, cat_area)
        if self.hook is not None:
            # label 0 (padding of the image-level labels, "unlabelled") is never scored
            ok = (_take(scal, g_idx).reshape(-1) > 0) & (svals > 0)
            self._emit("intersect", items, g_idx.repeat_interleave(scal.shape[1])[ok],
                       skeys[ok], svals[ok])
            pi, ci = torch.nonzero(cat_area, as_tuple=True)
            self._emit("unit_cat_area", items, _take(g_idx, pi), _take(u_idx, pi) * C + ci,
                       cat_area[pi, ci])

    def _emit(self, name: str, items: list[SegItem], image: torch.Tensor, cols: torch.Tensor,
              vals: torch.Tensor) -> None:
        assert self.hook is not None
        if image.numel():
            self.hook(name, items, image.cpu().numpy(), cols.cpu().numpy().astype(np.int64),
                      vals.cpu().numpy().astype(np.int64))

    def _hook_label_areas(self, items: list[SegItem], P: int) -> None:
        """Each image's label areas (pixel planes, and ``P`` per image-level label)."""
        assert self.hook is not None
        parts = []
        for g, it in enumerate(items):
            a = np.zeros(max(len(it.label_counts), int(it.scalars.max(initial=0)) + 1), np.int64)
            a[: len(it.label_counts)] += it.label_counts
            np.add.at(a, it.scalars, P)
            a[0] = 0
            lab = np.flatnonzero(a)
            parts.append((np.full(len(lab), g, np.int64), lab, a[lab]))
        if parts:
            self.hook("label_area", items, *(np.concatenate(x) for x in zip(*parts)))

    def _count(self, maps: torch.Tensor, size: tuple[int, int], u_idx: torch.Tensor,
               g_idx: torch.Tensor, pix: torch.Tensor, pair_area: torch.Tensor, *,
               items: list[SegItem] | None = None) -> torch.Tensor:
        """Label counts straight into ``unit * L + label``; adds the pairs' mask areas into
        ``pair_area`` and returns the (k, C) count of touched labels per category (overlap
        mode). With a hook (``items`` given), the labels are counted per pair instead
        (``pair * L + label``, k x L entries), added to the totals and passed to the hook
        split by image: the same counts, in the same pass."""
        dev, L, C = self.device, self.L, self.C
        k, D = u_idx.numel(), pix.shape[1]
        sh, sw = size
        per_pair = items is not None and self.hook is not None
        touched = torch.zeros(k * (C + 1), dtype=torch.int64, device=dev)
        # int32 keys when they fit (they do for any real probe): less memory traffic
        kdt = torch.int32 if max(self.U * L, k * (C + 1), k * L) < 2**31 else torch.int64
        key32 = (u_idx * L).to(kdt)
        cat32 = self.cat.to(kdt)
        pair_labels = torch.zeros(k * L if per_pair and D else 0, dtype=torch.int64, device=dev)
        for pp, rows in iter_masked_pixels(maps, (sh, sw), _take(self.T, u_idx), _CHUNK_PIXELS,
                                           offsets=g_idx * (sh * sw)):
            if pp.numel() == 0:
                continue
            pair_area += torch.bincount(pp, minlength=k)
            if D == 0:
                continue
            labels = _take(pix, rows)  # (n, D) labels under the mask, rows = image * P + pixel
            if per_pair:
                pair_labels += torch.bincount(
                    (pp.to(kdt)[:, None] * L + labels).reshape(-1), minlength=k * L)
            else:
                self.intersect += torch.bincount(
                    (_take(key32, pp)[:, None] + labels).reshape(-1), minlength=self.U * L)
            if self.mode == "overlap":
                touched += torch.bincount(
                    (pp.to(kdt)[:, None] * (C + 1) + _take(cat32, labels)).reshape(-1),
                    minlength=k * (C + 1))
        if per_pair and pair_labels.numel():
            nz = torch.nonzero(pair_labels, as_tuple=True)[0]
            pi, lab = nz // L, nz % L
            keys, vals = _take(u_idx, pi) * L + lab, pair_labels[nz]
            self.intersect.index_add_(0, keys, vals)
            ok = lab > 0  # label 0 ("unlabelled") is never scored
            assert items is not None
            self._emit("intersect", items, _take(g_idx, pi)[ok], keys[ok], vals[ok])
        return touched.reshape(k, C + 1)[:, :C]

    def counts(self) -> dict[str, np.ndarray]:
        inter = self.intersect.reshape(self.U, self.L).clone()
        inter[:, 0] = 0  # label 0 is "unlabelled"
        return {
            "intersect": inter.cpu().numpy(),
            "label_area": self.label_area.cpu().numpy(),
            "unit_area": self.unit_area.cpu().numpy(),
            "unit_cat_area": self.unit_cat_area.cpu().numpy(),
        }
