"""Scores of attribution maps: agreement, localisation, faithfulness, randomisation check.

All scores are computed per image, then averaged, with percentile bootstrap confidence
intervals that resample images (seeded). Each function returns a result object with
``to_frame()`` (per image / per step rows), ``to_dict()`` (JSON-safe summary), ``plot()`` and
``save(dir)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from interptool.common.jsonsafe import to_jsonable
from interptool.common.numerics import seeded_rng
from interptool.errors import AnalysisError, ParamsError

# ----------------------------------------------------------------------------- helpers


def _map_source(x: Any, what: str = "maps") -> Any:
    """The (N, H, W) array-like behind an AttributionResult / H5Maps / ndarray / tensor,
    without reading lazy maps into memory."""
    if hasattr(x, "maps") and hasattr(x, "ids"):
        x = x.maps
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not hasattr(x, "shape") or not hasattr(x, "__getitem__"):
        x = np.asarray(x)
    if len(x.shape) != 3:
        raise AnalysisError(f"{what} must be (N, H, W), got shape {tuple(x.shape)}")
    return x


#: bytes of work arrays one score may hold at once. Maps, masks and inputs are read in
#: blocks of images sized from it (:func:`block_rows`: this over the bytes one image costs),
#: so a score's peak memory is the same at any number of images (issue 13). Blocks of a
#: fixed 256 images made it grow with N up to 256: agreement of 224 px maps peaked at
#: 257 MiB for 64 images and 1.1 GiB for 512.
WORK_BYTES = 32 * 2**20

# Work bytes per map pixel of one image: the arrays alive together while a block is scored
# (tracemalloc peaks over 224 px blocks, rounded up). agreement (66 measured): the float32
# read and float64 copy of both maps, their float64 ranks, the centred ranks and one product
# (Spearman), or a partition copy and masks (top-k IoU); localisation (25): the float64
# map, its positive part and its product with the mask; the patch scores of faithfulness:
# the float32 read, its float64 copy and two float32 tensors (pad, pool input).
_AGREEMENT_BYTES = 72
_LOCALISATION_BYTES = 32
_PATCH_SCORE_BYTES = 24
#: what a block costs a caller of :func:`iter_blocks` that does not say (a float64 copy and
#: a few float64 temporaries of it, as AttributionResult.to_frame makes)
_BLOCK_BYTES = 64


def block_rows(pixels: int, bytes_per_pixel: int, budget: int | None = None) -> int:
    """Images per block when each pixel of an image costs ``bytes_per_pixel`` bytes of work
    arrays: ``budget`` (default :data:`WORK_BYTES`) over the cost of one image, at least 1.
    Independent of the number of images, so memory is flat in N."""
    budget = WORK_BYTES if budget is None else int(budget)
    return max(1, budget // max(1, int(pixels) * int(bytes_per_pixel)))


def iter_blocks(x: Any, size: int | None = None, what: str = "maps", ids: Any = None,
                bytes_per_pixel: int = _BLOCK_BYTES):
    """Yield ``(start, block)`` float64 blocks of at most ``size`` maps, in order; lazy maps
    (:class:`H5Maps`) are read block by block, so memory is bounded by ``size`` maps.
    ``size=None``: as many maps as :data:`WORK_BYTES` allows at ``bytes_per_pixel`` bytes of
    work per pixel (:func:`block_rows`). A map holding NaN or inf raises AnalysisError
    naming it (scores computed from it would be meaningless numbers)."""
    src = _map_source(x, what)
    ids = getattr(x, "ids", None) if ids is None else ids
    if size is None:
        size = block_rows(math.prod(int(v) for v in src.shape[1:]), bytes_per_pixel)
    if hasattr(src, "blocks"):
        blocks = src.blocks(size)
    else:
        blocks = ((s, src[s:s + size]) for s in range(0, src.shape[0], size))
    for start, block in blocks:
        block = np.asarray(block, dtype=np.float64)
        _check_finite(block, start, what, ids, getattr(src, "path", None))
        yield start, block


def _check_finite(block: np.ndarray, start: int, what: str, ids: Any = None,
                  path: Any = None) -> None:
    bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
    if not bad.any():
        return
    row = start + int(np.flatnonzero(bad)[0])
    image = f" (image {ids[row]!r})" if ids is not None and row < len(ids) else ""
    where = f"{path}: " if path is not None else ""
    raise AnalysisError(
        f"{where}{what} row {row}{image} holds NaN or inf; expected finite attribution maps. "
        "The model or the method produced non-finite gradients (NaN weights, float16 "
        "overflow): fix the model and recompute the maps.")


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row pair of (N, P) arrays (average ranks for ties);
    NaN where a row is constant (correlation undefined)."""
    from scipy.stats import rankdata

    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    return rowwise_pearson(ra, rb)


def top_pixels(flat: np.ndarray, k: int) -> np.ndarray:
    """(N, P) bool: the ``k`` largest values of each row of ``flat``, ties broken by pixel
    order: exactly the first ``k`` entries of a stable descending sort
    (``np.argsort(-flat, axis=1, kind="stable")[:, :k]``), found in O(P) per row.

    The k-th largest value ``t`` comes from a partition; every pixel above ``t`` is in, and
    the pixels equal to ``t`` fill the remaining places in pixel order (a stable sort puts
    equal values in their original order). No (N, P) int64 sort order is made, which is
    what bounded agreement's block size before."""
    n, p = flat.shape
    k = int(min(max(k, 0), p))
    if k == 0:
        return np.zeros((n, p), bool)
    t = np.partition(flat, p - k, axis=1)[:, p - k][:, None]
    top = flat > t
    ties = flat == t
    need = k - top.sum(axis=1)  # >= 1: t itself is among the k largest
    # rows holding more pixels equal to t than places left: the first ones in pixel order
    over = np.flatnonzero(ties.sum(axis=1) > need)
    if over.size:
        first = np.cumsum(ties[over], axis=1, dtype=np.int32) <= need[over, None]
        ties[over] &= first
    top |= ties
    return top


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1), np.nan)
    return np.clip(r, -1.0, 1.0)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): NaN-ignoring mean and its bootstrap CI over images (bias-corrected
    percentile, always containing the mean; see :func:`bootstrap_interval`)."""
    iv = bootstrap_interval(values, n_boot, seed, level)
    return (iv.estimate, iv.low, iv.high)


def bootstrap_interval(values: np.ndarray, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95):
    """The NaN-ignoring mean of ``values`` with a BC percentile bootstrap interval over
    images (:func:`interptool.common.stats.interval_from_resamples`: it always contains the
    mean; ``bias`` and ``widened`` say how far the bootstrap distribution was off-centre).
    One finite value or ``n_boot <= 0``: a zero-width interval at the mean."""
    from interptool.common.stats import Interval, interval_from_resamples

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Interval(math.nan, math.nan, math.nan, level, "bc")
    mean = float(v.mean())
    if v.size == 1 or n_boot <= 0:
        return Interval(mean, mean, mean, level, "bc", 0.0, 0.0, 0)
    rng = np.random.default_rng(seed)
    # resample in blocks so memory stays bounded for large N x n_boot
    means = np.empty(n_boot)
    block = max(1, 2_000_000 // v.size)
    for s in range(0, n_boot, block):
        e = min(n_boot, s + block)
        idx = rng.integers(0, v.size, size=(e - s, v.size))
        means[s:e] = v[idx].mean(axis=1)
    return interval_from_resamples(means, mean, level=level, method="bc")


def _summary(values: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    iv = bootstrap_interval(values, n_boot, seed)
    return {"mean": iv.estimate, "ci_low": iv.low, "ci_high": iv.high, "bias": iv.bias,
            "ci_widened": bool(iv.widened),
            "n": int(np.isfinite(np.asarray(values, dtype=float)).sum())}


class _ScoreResult:
    """Shared ``save``: CSV of ``to_frame()``, JSON of ``to_dict()``, PNG of ``plot()``."""

    kind = "score"

    def to_frame(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def plot(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, dir: str | Path, *, figures: bool = True) -> list[Path]:
        """``<kind>.csv`` (``to_frame()``), ``<kind>.json`` (``to_dict()``) and, with
        ``figures``, ``<kind>.png`` (``plot()``); each written atomically."""
        from interptool._provenance import atomic_savefig, atomic_write_text

        d = Path(dir)
        d.mkdir(parents=True, exist_ok=True)
        paths = [d / f"{self.kind}.csv", d / f"{self.kind}.json"]
        atomic_write_text(paths[0], self.to_frame().to_csv(index=False))
        atomic_write_text(paths[1], json.dumps(to_jsonable(self.to_dict()), indent=2))
        if figures:
            import matplotlib.pyplot as plt

            paths.append(d / f"{self.kind}.png")
            fig = self.plot()
            atomic_savefig(fig, paths[2], dpi=110)
            plt.close(fig)
        return paths


def _hist_figure(columns: dict[str, np.ndarray], title: str):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(3 * len(columns), 2.6), squeeze=False)
    for ax, (name, v) in zip(axes[0], columns.items()):
        v = np.asarray(v, dtype=float)
        v = v[np.isfinite(v)]
        # constant values (e.g. agreement of a map with itself) get one explicit bin
        span = float(v.max() - v.min()) if v.size else 0.0
        if v.size and span > 1e-9 * max(1.0, abs(float(v.max()))):
            ax.hist(v, bins=20, color="#4477aa")
        elif v.size:
            ax.hist(v, bins=1, range=(float(v.min()) - 0.5, float(v.max()) + 0.5),
                    color="#4477aa")
        ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- agreement


@dataclass
class AgreementResult(_ScoreResult):
    """Per-image agreement of two attribution results and the bootstrap summary."""

    ids: list[str]
    spearman: np.ndarray
    cosine: np.ndarray
    topk_iou: dict[int, np.ndarray]
    summary: dict[str, dict[str, float]]
    names: tuple[str, str] = ("a", "b")
    kind = "agreement"

    def to_frame(self):
        import pandas as pd

        cols = {"id": self.ids, "spearman": self.spearman, "cosine": self.cosine}
        for k, v in self.topk_iou.items():
            cols[f"top{k}_iou"] = v
        return pd.DataFrame(cols)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({"a": self.names[0], "b": self.names[1], "n": len(self.ids),
                          **self.summary})

    def plot(self):
        cols = {"spearman": self.spearman, "cosine": self.cosine}
        cols.update({f"top{k}% IoU": v for k, v in self.topk_iou.items()})
        return _hist_figure(cols, f"agreement {self.names[0]} vs {self.names[1]}")


def _name_of(res: Any, default: str) -> str:
    info = getattr(res, "model_info", None) or {}
    base = info.get("name") or info.get("arch") or info.get("class") or default
    method = getattr(res, "method", None)
    return f"{base}:{method}" if method else str(base)


def agreement(res_a: Any, res_b: Any, ks: Sequence[int] = (5, 10, 20), n_boot: int = 1000,
              seed: int = 0, block: int | None = None) -> AgreementResult:
    """Agreement of two sets of maps of the same images (e.g. teacher vs student).

    Per image: Spearman rank correlation of the pixel values, IoU of the top-k% pixels for
    each k in ``ks`` (ties broken by pixel order, so a map agrees with itself exactly) and
    cosine similarity. Means come with percentile bootstrap CIs resampling images.
    Both results must list the same ids in the same order (AnalysisError otherwise).
    Maps are read ``block`` images at a time (bounded memory for file-backed results);
    ``None``: as many as :data:`WORK_BYTES` of work arrays allow at the map size, so the
    peak memory does not grow with the number of images. The block size never changes the
    numbers (each image is scored on its own).
    """
    a, b = _map_source(res_a, "res_a"), _map_source(res_b, "res_b")
    ids_a = list(getattr(res_a, "ids", range(a.shape[0])))
    ids_b = list(getattr(res_b, "ids", range(b.shape[0])))
    from interptool.common.alignment import ImageSet, check_same_images

    check_same_images(ImageSet("res_a", ids_a), ImageSet("res_b", ids_b),
                      fix="Run both models on the same data set with the same n.")
    if tuple(a.shape) != tuple(b.shape):
        raise AnalysisError(f"map shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}; "
                            "attribute both models at the same input size")
    for k in ks:
        if not 0 < k <= 100:
            raise AnalysisError(f"top-k percentages must be in (0, 100], got {k}")
    parts: dict[str, list[np.ndarray]] = {"spearman": [], "cosine": []}
    parts.update({f"iou{k}": [] for k in ks})
    # blocks of images sized from a byte budget: lazy (file-backed) maps are never all in
    # memory, and the work arrays of a block do not grow with the number of images
    if block is None:
        block = block_rows(math.prod(int(v) for v in a.shape[1:]), _AGREEMENT_BYTES)
    for (_, ba), (_, bb) in zip(iter_blocks(a, block, "res_a", getattr(res_a, "ids", None)),
                                iter_blocks(b, block, "res_b", getattr(res_b, "ids", None))):
        n = ba.shape[0]
        fa, fb = ba.reshape(n, -1), bb.reshape(n, -1)
        parts["spearman"].append(rowwise_spearman(fa, fb))
        na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where((na > 0) & (nb > 0), (fa * fb).sum(axis=1) /
                           np.where((na > 0) & (nb > 0), na * nb, 1), np.nan)
        parts["cosine"].append(np.clip(cos, -1.0, 1.0))
        # top k% by a stable descending order (ties broken by pixel order), without sorting
        p = fa.shape[1]
        for k in ks:
            kp = max(1, int(math.ceil(k / 100.0 * p)))
            inter = (top_pixels(fa, kp) & top_pixels(fb, kp)).sum(axis=1)
            parts[f"iou{k}"].append(inter / (2 * kp - inter))
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    spear, cos = cat["spearman"], cat["cosine"]
    ious = {int(k): cat[f"iou{k}"] for k in ks}
    summary = {"spearman": _summary(spear, n_boot, seed), "cosine": _summary(cos, n_boot, seed)}
    for k, v in ious.items():
        summary[f"top{k}_iou"] = _summary(v, n_boot, seed)
    return AgreementResult(ids=[str(i) for i in ids_a], spearman=spear, cosine=cos,
                           topk_iou=ious, summary=summary,
                           names=(_name_of(res_a, "a"), _name_of(res_b, "b")))


# ----------------------------------------------------------------------------- localisation


def resize_masks(masks: Any, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (N, h, w) boolean masks to ``size`` (H, W)."""
    m = torch.as_tensor(np.asarray(masks, dtype=bool)).float()
    if m.dim() != 3:
        raise AnalysisError(f"masks must be (N, H, W), got shape {tuple(m.shape)}")
    if tuple(m.shape[-2:]) == tuple(size):
        return m.numpy() > 0.5
    return F.interpolate(m[:, None], size=tuple(size), mode="nearest")[:, 0].numpy() > 0.5


@dataclass
class LocalisationResult(_ScoreResult):
    """Energy-based pointing game and pointing game per image, with summaries.

    ``energy``: positive attribution inside the mask / all positive attribution;
    ``hit``: 1.0 when the arg-max pixel falls in the (tolerance-dilated) mask;
    ``area``: mask area fraction (the energy a uniform map would get: chance level).
    """

    ids: list[str]
    energy: np.ndarray
    hit: np.ndarray
    area: np.ndarray
    summary: dict[str, dict[str, float]]
    tolerance: int = 0
    kind = "localisation"

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"id": self.ids, "energy": self.energy, "hit": self.hit,
                             "mask_area": self.area})

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({"n": len(self.ids), "tolerance": self.tolerance, **self.summary})

    def plot(self):
        return _hist_figure({"energy in mask": self.energy, "mask area": self.area},
                            "localisation")

    @classmethod
    def concat(cls, parts: Sequence[LocalisationResult], n_boot: int = 1000,
               seed: int = 0) -> LocalisationResult:
        """One result from results of consecutive chunks of images, with the bootstrap
        summary recomputed over all images."""
        if not parts:
            raise AnalysisError("concat needs at least one LocalisationResult")
        energy = np.concatenate([q.energy for q in parts])
        hit = np.concatenate([q.hit for q in parts])
        area = np.concatenate([q.area for q in parts])
        empty = np.isnan(hit)
        summary = {"energy": _summary(energy, n_boot, seed), "hit": _summary(hit, n_boot, seed),
                   "mask_area": _summary(np.where(empty, np.nan, area), n_boot, seed)}
        return cls(ids=[i for q in parts for i in q.ids], energy=energy, hit=hit, area=area,
                   summary=summary, tolerance=parts[0].tolerance)


def localisation(res: Any, masks: Any, *, tolerance: int = 0, n_boot: int = 1000,
                 seed: int = 0, block_size: int | None = None) -> LocalisationResult:
    """Localisation of maps against ground-truth masks (N, H, W) bool of the map size.

    Energy pointing game (Wang et al. 2020, Score-CAM): sum of positive attribution inside the
    mask over total positive attribution (NaN when the map has no positive mass or the mask is
    empty). Pointing game (Zhang et al. 2016): hit when the arg-max pixel lies in the mask
    dilated by ``tolerance`` pixels. Use :func:`resize_masks` to bring masks to the map size.
    Maps (and masks, which may be any sliceable array-like) are read ``block_size`` images at
    a time (``None``: as many as :data:`WORK_BYTES` allows at the map size, so memory is flat
    in the number of images).
    """
    maps = _map_source(res)
    m = masks if hasattr(masks, "shape") and hasattr(masks, "__getitem__") else np.asarray(
        masks)
    if len(m.shape) != 3:
        raise AnalysisError(f"masks must be (N, H, W) booleans, got shape {tuple(m.shape)}")
    if m.shape[0] != maps.shape[0]:
        raise AnalysisError(f"{m.shape[0]} masks for {maps.shape[0]} maps; give one mask per "
                            "image, in the result's order")
    if tuple(m.shape[1:]) != tuple(maps.shape[1:]):
        raise AnalysisError(
            f"mask size {tuple(m.shape[1:])} differs from the map size "
            f"{tuple(maps.shape[1:])}; resize the masks first: "
            f"resize_masks(masks, {tuple(maps.shape[1:])}) (nearest neighbour)")
    parts: dict[str, list[np.ndarray]] = {"energy": [], "hit": [], "area": [], "empty": []}
    for start, block in iter_blocks(maps, block_size, ids=getattr(res, "ids", None),
                                    bytes_per_pixel=_LOCALISATION_BYTES):
        n = block.shape[0]
        mb = np.asarray(m[start:start + n]).astype(bool)
        flat = block.reshape(n, -1)
        mf = mb.reshape(n, -1)
        pos = np.clip(flat, 0, None)
        total = pos.sum(axis=1)
        inside = (pos * mf).sum(axis=1)
        empty = ~mf.any(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            energy = np.where((total > 0) & ~empty, inside / np.where(total > 0, total, 1),
                              np.nan)
        if tolerance > 0:
            t = int(tolerance)
            dil = F.max_pool2d(torch.from_numpy(mb).float()[:, None], 2 * t + 1, stride=1,
                               padding=t)[:, 0].numpy() > 0.5
        else:
            dil = mb
        arg = flat.argmax(axis=1)
        hit = dil.reshape(n, -1)[np.arange(n), arg].astype(np.float64)
        hit[empty] = np.nan
        for k, v in (("energy", energy), ("hit", hit), ("area", mf.mean(axis=1)),
                     ("empty", empty)):
            parts[k].append(v)
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    energy, hit, area, empty = cat["energy"], cat["hit"], cat["area"], cat["empty"].astype(bool)
    summary = {"energy": _summary(energy, n_boot, seed), "hit": _summary(hit, n_boot, seed),
               "mask_area": _summary(np.where(empty, np.nan, area), n_boot, seed)}
    ids = [str(i) for i in getattr(res, "ids", range(maps.shape[0]))]
    return LocalisationResult(ids=ids, energy=energy, hit=hit, area=area, summary=summary,
                              tolerance=int(tolerance))


def class_object_masks(dataset: Any, indices: Sequence[int] | None = None,
                       size: tuple[int, int] | None = None, category: str = "object",
                       ) -> np.ndarray:
    """(N, H, W) bool masks of each image's class object from a BrodenDataset.

    The class object is the label of ``category`` whose name equals the image's class name
    (concept-world names its classes after their objects); when no label name matches, the
    union of all ``category`` masks of the image is used. Masks are resized (nearest) to
    ``size`` (e.g. the model input size) when given.
    """
    if not hasattr(dataset, "load_segmentation"):
        raise AnalysisError(f"{type(dataset).__name__} has no segmentations; class object "
                            "masks need a Broden-format data set (broden:PATH or "
                            "builtin:concept-world)")
    idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    class_names = list(getattr(dataset, "class_names", None) or [])
    label_names = np.asarray(getattr(dataset, "label_names", []), dtype=object)
    labels = np.asarray(dataset.labels)
    out = []
    for i in idx:
        seg = dataset.load_segmentation(i)
        planes = seg.pixel.get(category)
        if planes is None or len(planes) == 0:
            out.append(np.zeros(tuple(seg.size), bool))
            continue
        planes = np.asarray(planes)
        mask = None
        lab = int(labels[i]) if i < len(labels) else -1
        if 0 <= lab < len(class_names) and label_names.size:
            cname = str(class_names[lab]).lower()
            numbers = [j for j, nm in enumerate(label_names) if nm and str(nm).lower() == cname]
            if numbers:
                mask = np.isin(planes, numbers).any(axis=0)
        if mask is None:
            mask = (planes > 0).any(axis=0)
        out.append(mask)
    sizes = {o.shape for o in out}
    target = tuple(size) if size is not None else (out[0].shape if len(sizes) == 1 else None)
    if target is None:
        raise AnalysisError("segmentations have different sizes; pass size=(H, W)")
    return np.stack([resize_masks(o[None], target)[0] for o in out]) if out else np.zeros(
        (0, *target), bool)


def folder_masks(folder: str | Path, dataset: Any, indices: Sequence[int] | None = None,
                 size: tuple[int, int] | None = None) -> np.ndarray:
    """(N, H, W) bool object masks read from a folder given by the user.

    The mask of image ``ids[i]`` (its path relative to the data set root, e.g.
    ``cat/001.jpg``) is ``folder/cat/001.png`` (or the same file name with its own
    extension): a grayscale or RGB image whose non-zero pixels are the object. A mask must
    have the size of its image (AnalysisError naming both files otherwise: masks are aligned
    with the original pixels); it is then resized (nearest) to ``size`` like the probe
    transform resizes the image (whole image, no crop).
    """
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise AnalysisError(f"mask folder {root} does not exist or is not a folder; pass "
                            "--masks DIR holding one PNG per image (same relative path)")
    idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    out = []
    for i in idx:
        rel = Path(str(dataset.ids[i]))
        candidates = [root / rel.with_suffix(".png"), root / rel]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise AnalysisError(f"no mask for image {str(rel)!r}: expected "
                                f"{candidates[0]} (non-zero pixels = object)")
        try:
            with Image.open(path) as im:
                mask = np.asarray(im.convert("L")) > 0
        except Exception as exc:  # noqa: BLE001 - any decode failure: name the file
            raise AnalysisError(f"mask {path} could not be read as an image: {exc}") from exc
        img_path = dataset.image_path(i) if hasattr(dataset, "image_path") else None
        if img_path is not None:
            with Image.open(img_path) as im:
                iw, ih = im.size
            if mask.shape != (ih, iw):
                raise AnalysisError(
                    f"mask {path} is {mask.shape[1]}x{mask.shape[0]} px but image {img_path} "
                    f"is {iw}x{ih} px; masks must have their image's size (resize the mask "
                    "files, nearest neighbour)")
        out.append(mask if size is None else resize_masks(mask[None], size)[0])
    if not out:
        return np.zeros((0, *(size or (0, 0))), bool)
    if len({o.shape for o in out}) != 1:
        raise AnalysisError("masks have different sizes; pass size=(H, W)")
    return np.stack(out)


# ----------------------------------------------------------------------------- faithfulness


@dataclass
class FaithfulnessResult(_ScoreResult):
    """Deletion / insertion curves: ``curves`` (N, S+1) target probability after removing
    (adding) ``fractions`` of the patches; ``auc`` (N,) trapezoid area under each curve.

    With the random-order reference (``reference="random"``, the default):
    ``curves_random`` / ``auc_random`` the same for a seeded random patch order, ``p0`` (N,)
    the model's probability of the target on the unperturbed image, and ``normalised`` (N,)
    the score that compares models fairly (higher = more faithful, in both modes)::

        deletion:  (AUC_random - AUC_deletion)  / p0
        insertion: (AUC_insertion - AUC_random) / p0

    (docs/attribution.md explains the choice). ``summary`` has ``auc`` and ``normalised``,
    each a mean with its bootstrap interval over images.
    """

    ids: list[str]
    mode: str
    fractions: np.ndarray
    curves: np.ndarray
    auc: np.ndarray
    summary: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    curves_random: np.ndarray | None = None
    auc_random: np.ndarray | None = None
    p0: np.ndarray | None = None
    normalised: np.ndarray | None = None
    kind = "faithfulness"

    def to_frame(self):
        import pandas as pd

        cols: dict[str, Any] = {"id": self.ids, "mode": self.mode, "auc": self.auc,
                                "p_start": self.curves[:, 0], "p_end": self.curves[:, -1]}
        if self.normalised is not None:
            cols.update(p0=self.p0, auc_random=self.auc_random, normalised=self.normalised)
        return pd.DataFrame(cols)

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.curves_random is not None and len(self.ids):
            extra["mean_curve_random"] = self.curves_random.mean(axis=0)
            extra["normalisation"] = _NORMALISATION[self.mode]
        return to_jsonable({"mode": self.mode, "n": len(self.ids), "params": self.params,
                          "fractions": self.fractions,
                          "mean_curve": self.curves.mean(axis=0) if len(self.ids) else [],
                          **extra, **self.summary})

    @classmethod
    def concat(cls, parts: Sequence[FaithfulnessResult], n_boot: int = 1000,
               seed: int = 0) -> FaithfulnessResult:
        """One result from results of consecutive chunks of images (same mode and params),
        with the bootstrap summary recomputed over all images."""
        if not parts:
            raise AnalysisError("concat needs at least one FaithfulnessResult")
        first = parts[0]
        for q in parts[1:]:
            if q.mode != first.mode or q.params != first.params:
                raise AnalysisError("cannot concat faithfulness results with different "
                                    f"settings: {first.mode} {first.params} vs "
                                    f"{q.mode} {q.params}")
        auc = np.concatenate([q.auc for q in parts])

        def cat(name: str) -> np.ndarray | None:
            vals = [getattr(q, name) for q in parts]
            return None if any(v is None for v in vals) else np.concatenate(vals)

        normalised = cat("normalised")
        summary = {"auc": _summary(auc, n_boot, seed)}
        if normalised is not None:
            summary["normalised"] = _summary(normalised, n_boot, seed)
        return cls(ids=[i for q in parts for i in q.ids], mode=first.mode,
                   fractions=first.fractions, curves=np.concatenate([q.curves for q in parts]),
                   auc=auc, summary=summary, params=dict(first.params),
                   curves_random=cat("curves_random"), auc_random=cat("auc_random"),
                   p0=cat("p0"), normalised=normalised)

    def plot(self):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(3.6, 2.8))
        if len(self.ids):
            ax.plot(self.fractions, self.curves.mean(axis=0), marker=".", label="attribution")
            if self.curves_random is not None:
                ax.plot(self.fractions, self.curves_random.mean(axis=0), ls="--", color="0.5",
                        label="random order")
                ax.legend(fontsize=7)
        ax.set_xlabel(f"fraction of patches {'removed' if self.mode == 'deletion' else 'added'}")
        ax.set_ylabel("p(target)")
        ax.set_title(f"{self.mode}: AUC {self.summary['auc']['mean']:.3f}", fontsize=9)
        fig.tight_layout()
        return fig


#: random-order reference curves already computed (content-addressed key -> curves), so
#: that scoring several attribution methods of one model on the same images runs the
#: random order once: it does not depend on the maps. Least recently used dropped first
#: once the curves exceed ``_REFERENCE_CURVES_BYTES`` (8 bytes per image and step: ~60,000
#: image curves of 17 points). A bound in bytes, not entries: score_maps memoises one entry
#: per chunk of images, and chunks are small for large maps (a bound of 64 entries dropped
#: the first method's references of 512 images at 224 px before the second method came).
_REFERENCE_CURVES: OrderedDict[str, np.ndarray] = OrderedDict()
_REFERENCE_CURVES_BYTES = 8 * 2**20


def _reference_key(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                   settings: tuple) -> str:
    """sha256 of everything the random-order curves depend on: the model's weights and
    buffers, the images, the targets and the settings (mode, patch, steps, baseline, seed,
    batch size, device, the images' first row in the set, torch threads)."""
    h = hashlib.sha256(repr((type(model).__qualname__, settings,
                             torch.get_num_threads())).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    for t in (images, targets):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


#: where the seeded stream of random patch orders stands after a given image: ``(seed,
#: patches, row) -> generator state``, so that scoring images in consecutive chunks
#: (``faithfulness(..., start=row)``) continues the stream instead of drawing its first
#: ``row`` rows again. Least recently used dropped first.
_ORDER_STREAMS: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()
_ORDER_STREAMS_MAX = 16


def _random_orders(n: int, p: int, seed: int, start: int) -> torch.Tensor:
    """(n, p) seeded random patch orders of images ``start .. start + n - 1`` of a set: rows
    ``start ..`` of one stream of ``torch.rand((rows, p))`` draws (torch's CPU generator
    yields the same numbers in one draw or in consecutive ones; tested), so an image gets
    the same order whatever chunk of the set it is scored in."""
    g = torch.Generator()
    state = _ORDER_STREAMS.get((seed, p, start))
    if state is not None:
        g.set_state(state)
    else:
        g.manual_seed(seed)
        skip = start
        while skip > 0:  # rows before ``start`` (a call out of sequence): drawn in blocks
            k = min(skip, max(1, 2**20 // max(1, p)))
            torch.rand(k, p, generator=g)
            skip -= k
    perm = torch.argsort(torch.rand(n, p, generator=g), dim=1)
    _ORDER_STREAMS[(seed, p, start + n)] = g.get_state()
    _ORDER_STREAMS.move_to_end((seed, p, start + n))
    while len(_ORDER_STREAMS) > _ORDER_STREAMS_MAX:
        _ORDER_STREAMS.popitem(last=False)
    return perm


def faithfulness(
    model: nn.Module,
    images: torch.Tensor,
    maps: Any,
    targets: Any,
    *,
    mode: str = "deletion",
    patch: int = 8,
    steps: int | None = 16,
    baseline: str = "blur",
    batch_size: int = 64,
    order: str = "attribution",
    device: str = "cpu",
    ids: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    reference: str | None = "random",
    reuse_reference: bool = False,
    start: int = 0,
) -> FaithfulnessResult:
    """Deletion / insertion test (Petsiuk et al. 2018, RISE) on ``patch`` x ``patch`` patches.

    Patches are ranked by their summed attribution (``order="attribution"``, highest first)
    or at random (``order="random"``, seeded: the control). At step s of ``steps`` the top
    ``round(s / steps * P)`` patches are replaced by the ``baseline`` image (deletion, from the
    image) or copied from the image onto the baseline (insertion, from the baseline); the
    model's softmax probability of the target is recorded. AUC: trapezoid over the fraction of
    patches, in [0, 1]; deletion should be low, insertion high for a faithful map.

    ``reference="random"`` (default, with ``order="attribution"``) also runs the seeded
    random order on the same images and reports per image ``p0`` (the unperturbed image's
    target probability), ``auc_random`` and the normalised score
    ``(AUC_random - AUC_deletion) / p0`` (deletion) or ``(AUC_insertion - AUC_random) / p0``
    (insertion): 0 for a map no better than chance, higher is more faithful, and a model
    that is merely more confident does not score higher (docs/attribution.md). It doubles
    the forward passes; ``reference=None`` skips it. ``reuse_reference=True`` keeps the
    random-order curves in a small process-wide memo keyed by a sha256 of the model's
    weights and buffers, the images, the targets and the settings, and reuses them on an
    identical call: the reference does not depend on the maps, so scoring a second
    attribution method of the same model on the same images costs no second reference
    (:func:`~interptool.analyzers.attribution.score_maps` does this). Reused curves are
    the same numbers as a fresh computation.

    ``start``: the row of ``images[0]`` in the whole set when a set is scored in chunks of
    images (:func:`~interptool.analyzers.attribution.score_maps` does this to bound memory):
    image ``start + i`` gets row ``start + i`` of the seeded random orders, so the results
    do not depend on how the set was chunked (the curves of the chunks, merged with
    :meth:`FaithfulnessResult.concat`, equal one call on the whole set).

    Complexity: N * (steps + 1) perturbed forward passes, evaluated ``batch_size`` at a time
    in ceil(N * (steps + 1) / batch_size) model calls with no per-image Python loop (every
    (image, step) pair is one row of a flat batch); ranking is O(N P log P) for P patches.
    Memory: one batch of perturbed inputs plus the (N, P) rank table; the maps are read in
    blocks of :data:`WORK_BYTES`.
    """
    from interptool.analyzers.attribution._methods import make_baseline, prepare_model

    if mode not in ("deletion", "insertion"):
        raise AnalysisError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if order not in ("attribution", "random"):
        raise AnalysisError(f"order must be 'attribution' or 'random', got {order!r}")
    if baseline not in ("blur", "mean", "zeros"):
        raise AnalysisError(f"baseline must be blur, mean or zeros; got {baseline!r}")
    if reference not in ("random", None):
        raise AnalysisError(f"reference must be 'random' or None, got {reference!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise AnalysisError("images must be an (N, C, H, W) tensor of model-ready inputs")
    m = _map_source(maps)
    n, _, h, w = images.shape
    if tuple(m.shape) != (n, h, w):
        raise AnalysisError(f"maps {tuple(m.shape)} do not match images "
                            f"{tuple(images.shape)}: need ({n}, {h}, {w})")
    tgt = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
    if tgt.numel() != n:
        raise AnalysisError(f"{tgt.numel()} targets for {n} images")
    if not _is_int(start) or start < 0:
        raise AnalysisError(f"start must be an integer >= 0 (the row of images[0]), got "
                            f"{start!r}")
    if not _is_int(patch) or patch < 1:
        raise ParamsError(f"patch: expected an integer >= 1 (pixels), got {patch!r}", "patch")
    if steps is not None and (not _is_int(steps) or steps < 1):
        raise ParamsError(f"steps: expected an integer >= 1, got {steps!r}; or None for one "
                          "step per patch", "steps")
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    p = gh * gw
    steps = p if steps is None else int(min(max(1, steps), p))
    # patch scores: sum of the map over each patch (zero padding at the borders); read in
    # blocks so that file-backed maps are never all in memory (the table is only (N, P))
    score_parts = []
    for _, block in iter_blocks(m, bytes_per_pixel=_PATCH_SCORE_BYTES):
        mp = F.pad(torch.from_numpy(block).float()[:, None], (0, gw * patch - w,
                                                               0, gh * patch - h))
        score_parts.append(F.avg_pool2d(mp, patch, stride=patch)[:, 0].reshape(-1, p)
                           * (patch * patch))
    scores = torch.cat(score_parts) if score_parts else torch.zeros(0, p)
    random_perm = _random_orders(n, p, int(seed), int(start))
    perm = torch.argsort(-scores, dim=1, stable=True) if order == "attribution" else random_perm
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) / steps * p).long()
    net = prepare_model(model, device)

    def curves_of(perm: torch.Tensor, label: str) -> np.ndarray:
        rank = torch.empty_like(perm)
        rank.scatter_(1, perm, torch.arange(p).expand(n, p).contiguous())
        pairs_img = torch.arange(n).repeat_interleave(steps + 1)
        pairs_step = torch.arange(steps + 1).repeat(n)
        probs = torch.empty(n * (steps + 1), dtype=torch.float64)
        from interptool._progress import progress

        total = n * (steps + 1)
        with torch.no_grad():
            for s in progress(range(0, total, batch_size), desc=f"faithfulness {label}",
                              unit="batch"):
                e = min(total, s + batch_size)
                ii, ss = pairs_img[s:e], pairs_step[s:e]
                # the baseline depends on the image alone: made once per distinct image of
                # the batch (which holds each image at up to steps + 1 steps), not per row;
                # a blur costs ~40% of a small CNN's forward pass
                uniq, inv = torch.unique(ii, return_inverse=True)
                xu = images[uniq].to(device=device, dtype=torch.float32)
                x = xu[inv.to(xu.device)]
                base = make_baseline(xu, baseline)[inv.to(xu.device)]
                sel = (rank[ii] < counts[ss][:, None]).float().reshape(-1, 1, gh, gw)
                sel = sel.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
                sel = sel[:, :, :h, :w].to(device)
                if mode == "deletion":
                    xp = x * (1 - sel) + base * sel
                else:
                    xp = base * (1 - sel) + x * sel
                pr = torch.softmax(net(xp).float(), dim=1)
                probs[s:e] = pr.gather(1, tgt[ii].to(device)[:, None])[:, 0].double().cpu()
        return probs.reshape(n, steps + 1).numpy()

    def area(c: np.ndarray) -> np.ndarray:
        trapz = getattr(np, "trapezoid", None) or np.trapz
        return trapz(c, fractions, axis=1)

    fractions = (counts.double() / p).numpy()
    curves = curves_of(perm, mode)
    auc = area(curves)
    summary = {"auc": _summary(auc, n_boot, seed)}
    extra: dict[str, Any] = {}
    if reference == "random" and order == "attribution":
        # the random order does not depend on the maps: computed once per model, images,
        # targets and settings (e.g. shared by every attribution method scored on them)
        key: str | None = None
        try:
            if reuse_reference:
                key = _reference_key(
                    model, images, tgt, (mode, patch, steps, baseline, int(seed),
                                         int(batch_size), str(device), int(start)))
        except (RuntimeError, TypeError, ValueError):  # e.g. tensors without a byte view
            key = None
        if key is not None and key in _REFERENCE_CURVES:
            _REFERENCE_CURVES.move_to_end(key)
            curves_random = _REFERENCE_CURVES[key].copy()
        else:
            curves_random = curves_of(random_perm, f"{mode} (random order)")
            if key is not None:
                _REFERENCE_CURVES[key] = curves_random.copy()
                while (len(_REFERENCE_CURVES) > 1 and sum(
                        c.nbytes for c in _REFERENCE_CURVES.values()) > _REFERENCE_CURVES_BYTES):
                    _REFERENCE_CURVES.popitem(last=False)
        auc_random = area(curves_random)
        # the unperturbed image: nothing removed (deletion) / everything added (insertion)
        p0 = curves[:, 0] if mode == "deletion" else curves[:, -1]
        gain = auc_random - auc if mode == "deletion" else auc - auc_random
        with np.errstate(invalid="ignore", divide="ignore"):
            normalised = np.where(p0 > 0, gain / p0, np.nan)
        summary["normalised"] = _summary(normalised, n_boot, seed)
        extra = dict(curves_random=curves_random, auc_random=auc_random, p0=p0,
                     normalised=normalised)
    params = {"patch": patch, "steps": steps, "baseline": baseline, "order": order,
              "seed": seed, "patches": p, "reference": reference if extra else None}
    return FaithfulnessResult(
        ids=[str(i) for i in (ids if ids is not None else range(n))], mode=mode,
        fractions=fractions, curves=curves, auc=auc, summary=summary, params=params, **extra)


_NORMALISATION = {
    "deletion": "(AUC_random - AUC_deletion) / p0; p0 = target probability on the "
                "unperturbed image, AUC_random = the seeded random patch order",
    "insertion": "(AUC_insertion - AUC_random) / p0; p0 = target probability on the "
                 "unperturbed image, AUC_random = the seeded random patch order",
}


# ----------------------------------------------------------------------------- randomisation


@dataclass
class RandomisationResult(_ScoreResult):
    """Cascading model-parameter randomisation (Adebayo et al. 2018).

    ``rows``: one per (method, step): the layers randomised so far (top first) and the mean
    Spearman rank correlation between the trained model's maps and the randomised model's.
    ``flagged``: methods whose similarity stays above ``threshold`` after the last step
    (their maps barely depend on the weights: they fail the sanity check).
    """

    rows: list[dict[str, Any]]
    flagged: dict[str, bool]
    threshold: float
    layers: list[str]
    kind = "randomisation"

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({"threshold": self.threshold, "layers": self.layers,
                          "flagged": self.flagged, "steps": self.rows})

    def plot(self):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.2, 2.8))
        frame = self.to_frame()
        for method, g in frame.groupby("method", sort=False):
            ax.plot(g["step"], g["spearman"], marker="o", label=method)
        ax.axhline(self.threshold, color="grey", ls="--", lw=0.8)
        ax.set_xticks(range(len(self.layers) + 1))
        ax.set_xticklabels(["orig"] + self.layers, rotation=45, fontsize=7)
        ax.set_ylabel("Spearman vs trained")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def _default_layers(model: nn.Module) -> list[str]:
    """Top-level children holding parameters, output side first."""
    names = [n for n, c in model.named_children() if any(True for _ in c.parameters())]
    return names[::-1]


def _reinit(module: nn.Module, seed: int) -> None:
    devices = sorted({p.device for p in module.parameters() if p.device.type == "cuda"},
                     key=str)
    with seeded_rng(seed, devices):
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()


def randomisation_check(
    model: nn.Module,
    method: Any,
    images: torch.Tensor,
    targets: Any,
    *,
    layers_to_randomize: Sequence[str] | None = None,
    top_k: int | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    n_boot: int = 200,
    internal_batch_size: int | None = None,
    **method_params: Any,
) -> RandomisationResult:
    """Model-parameter randomisation test: do the maps change when the weights do?

    ``method``: a name, an :class:`Attribution`, or a list of them. Layers are randomised
    cumulatively from the top (``layers_to_randomize`` in that order, default: the model's
    top-level parametrised children from the output backwards, first ``top_k``); each layer is
    re-initialised with ``reset_parameters()`` on a copy (seeded from ``(seed, step)``; the
    user's model is untouched). After each step the maps of the same ``targets`` are compared
    to the trained model's by per-image Spearman correlation. A method is flagged when the
    correlation is still above ``threshold`` (strictly between -1 and 1, as the correlation
    is in [-1, 1]) after the last step. ``internal_batch_size``:
    most model rows per pass of the methods that expand inputs, as in :meth:`Attribution.run`
    (default ``batch_size``).
    """
    from interptool.analyzers.attribution import Attribution
    from interptool.analyzers.attribution._methods import (
        batch_seed,
        find_layer,
        prepare_model,
        reduce_channels,
    )
    from interptool.analyzers.attribution._params import ScoringParams

    # checked before any map is made; named as the attribute command's flags
    ScoringParams(sanity_threshold=threshold,
                  **({"sanity_top_k": top_k} if top_k is not None else {}))
    methods = list(method) if isinstance(method, (list, tuple)) else [method]
    attrs = [m if isinstance(m, Attribution) else Attribution(m, **method_params)
             for m in methods]
    base = prepare_model(model, device)
    layers = list(layers_to_randomize) if layers_to_randomize else _default_layers(base)
    if top_k is not None:
        layers = layers[: int(top_k)]
    if not layers:
        raise AnalysisError("no layers to randomise: pass layers_to_randomize=[...] names")
    for name in layers:
        find_layer(base, name)
    tgt = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tgt.numel() != len(images):
        raise AnalysisError("images must be (N, C, H, W) with one target per image")

    def maps_of(net: nn.Module, attr: Attribution) -> np.ndarray:
        out = []
        for s in range(0, len(images), batch_size):
            x = images[s:s + batch_size].to(device=device, dtype=torch.float32)
            raw = attr.attribute_batch(net, x, tgt[s:s + batch_size].to(device), start=s,
                                       rows=internal_batch_size)
            out.append(reduce_channels(raw, attr.reduce).float().cpu().numpy())
        return np.concatenate(out).reshape(len(images), -1)

    rows: list[dict[str, Any]] = []
    flagged: dict[str, bool] = {}
    for attr in attrs:
        label = attr.method
        ref = maps_of(base, attr)
        rows.append({"method": label, "step": 0, "layer": "(trained)", "spearman": 1.0,
                     "ci_low": 1.0, "ci_high": 1.0})
        # independent weights: re-initialising must never touch the user's model
        net = prepare_model(model, device, share_weights=False)
        last = 1.0
        for step, name in enumerate(layers, start=1):
            _reinit(find_layer(net, name), batch_seed(seed, step))
            sim = rowwise_spearman(ref, maps_of(net, attr))
            mean, lo, hi = bootstrap_ci(sim, n_boot, seed)
            rows.append({"method": label, "step": step, "layer": name, "spearman": mean,
                         "ci_low": lo, "ci_high": hi})
            last = mean
        flagged[label] = bool(np.isfinite(last) and last > threshold)
    return RandomisationResult(rows=rows, flagged=flagged, threshold=float(threshold),
                               layers=layers)
