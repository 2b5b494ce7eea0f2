"""Figures for :class:`DissectionResult`: detectors per category, threshold curve, montages."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from interptool.analyzers.dissection._resize import resize_maps

# Montage tile edge in pixels and the colour of the mask outline.
_TILE = 112
_OUTLINE = (255, 220, 0)


def plot_by_category(result: Any, ax: Any = None) -> Any:
    """Bar chart: number of detector units per best category."""
    import matplotlib.pyplot as plt

    counts = result.by_category()
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(counts) + 2), 3.2))
    else:
        fig = ax.figure
    bars = ax.bar(list(counts), list(counts.values()), color="#4c72b0")
    ax.bar_label(bars)
    ax.set_ylabel("detector units")
    total = sum(counts.values())
    ax.set_title(f"{result.layer}: {total} detectors of {result.units} units "
                 f"(IoU >= {result.iou_threshold:g}), {result.unique_concepts()} concepts")
    ax.margins(y=0.15)
    return fig


def plot_curve(result: Any, ax: Any = None) -> Any:
    """Detectors and unique concepts against the IoU threshold (0.01 .. 0.20)."""
    import matplotlib.pyplot as plt

    curve = result.thresholds_curve()
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
    else:
        fig = ax.figure
    t = [c["iou_threshold"] for c in curve]
    ax.plot(t, [c["detectors"] for c in curve], marker="o", label="detector units")
    ax.plot(t, [c["unique_concepts"] for c in curve], marker="s", label="unique concepts")
    ax.axvline(result.iou_threshold, color="grey", ls="--", lw=1)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("count")
    ax.set_title(f"{result.layer}: detectors vs IoU threshold")
    ax.legend()
    return fig


def _tile(image: Any, fmap: np.ndarray, threshold: float) -> np.ndarray:
    """One image at tile size with the unit's thresholded mask: outside dimmed, edge outlined."""
    from PIL import Image

    w0, h0 = image.size
    scale = _TILE / max(w0, h0)
    size = (max(1, round(h0 * scale)), max(1, round(w0 * scale)))
    img = np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR),
                     dtype=np.float32)
    up = resize_maps(torch.from_numpy(fmap[None]), size)[0].double().numpy()
    mask = up > threshold
    edge = mask & ~(np.pad(mask, 1, constant_values=False)[:-2, 1:-1]
                    & np.pad(mask, 1, constant_values=False)[2:, 1:-1]
                    & np.pad(mask, 1, constant_values=False)[1:-1, :-2]
                    & np.pad(mask, 1, constant_values=False)[1:-1, 2:])
    out = np.where(mask[..., None], img, img * 0.35)
    out[edge] = _OUTLINE
    tile = np.zeros((_TILE, _TILE, 3), dtype=np.uint8)
    tile[: size[0], : size[1]] = np.clip(out, 0, 255).astype(np.uint8)
    return tile


def unit_montage(result: Any, unit: int) -> Any:
    """The unit's top-activating probe images side by side with a caption (PIL image)."""
    from PIL import Image, ImageDraw

    k = result.top_images.shape[1]
    gap, head = 2, 16
    canvas = Image.new("RGB", (max(1, k) * (_TILE + gap), _TILE + head), (255, 255, 255))
    for j in range(k):
        img = result.probe.load_image(int(result.top_images[unit, j]))
        tile = _tile(img, result.top_maps[unit, j], float(result.thresholds[unit]))
        canvas.paste(Image.fromarray(tile), (j * (_TILE + gap), head))
    cat = result.categories[int(result.best_category[unit])]
    label = result.label_names[int(result.best_label[unit])]
    caption = (f"{result.layer} unit {unit + 1}: {label} ({cat}) "
               f"IoU {float(result.best_iou[unit]):.3f}")
    ImageDraw.Draw(canvas).text((2, 2), caption, fill=(0, 0, 0))
    return canvas


def montage_sheet(result: Any, units: list[int]) -> Any:
    """Several units' montages (0-based ``units``) stacked vertically in one PIL image."""
    from PIL import Image

    rows = [unit_montage(result, int(u)) for u in units]
    if not rows:
        return Image.new("RGB", (1, 1), (255, 255, 255))
    gap = 4
    sheet = Image.new("RGB", (max(r.width for r in rows),
                              sum(r.height for r in rows) + gap * (len(rows) - 1)),
                      (255, 255, 255))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + gap
    return sheet
