"""Figures for :class:`DissectionResult`: detectors per category, threshold curve, montages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from interptool.analyzers.dissection._resize import resize_maps
from interptool.common.theme import themed

# Montage tile edge in pixels and the colour of the mask outline.
_TILE = 112
_OUTLINE = (255, 220, 0)


@themed
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


@themed
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


def _scaled_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a probe image scaled to fit a ``_TILE`` square."""
    w0, h0 = image_size
    scale = _TILE / max(w0, h0)
    return max(1, round(h0 * scale)), max(1, round(w0 * scale))


def _outlined(imgs: np.ndarray, up: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Tiles (n, h, w, 3) uint8: the masks ``up > T`` kept, the outside dimmed, edges outlined."""
    mask = up > thresholds[:, None, None]
    pad = np.pad(mask, ((0, 0), (1, 1), (1, 1)), constant_values=False)
    inner = pad[:, :-2, 1:-1] & pad[:, 2:, 1:-1] & pad[:, 1:-1, :-2] & pad[:, 1:-1, 2:]
    out = np.where(mask[..., None], imgs, imgs * np.float32(0.35))
    out[mask & ~inner] = _OUTLINE
    return np.clip(out, 0, 255).astype(np.uint8)


def render_montages(result: Any, units: list[int]) -> Iterator[tuple[int, Any]]:
    """Yield ``(unit, PIL image)``: each unit's top probe images side by side, its mask kept,
    the rest dimmed, the mask's edge outlined, a caption above.

    One pass for all ``units``: every probe image is decoded and scaled once however many
    units show it, and all the units' maps of one image size are upsampled (Pillow-exact,
    :func:`resize_maps`) and thresholded in one batched call.
    """
    from PIL import Image, ImageDraw

    units = [int(u) for u in units]
    k = result.top_images.shape[1]
    gap, head = 2, 16
    pairs = [(u, j) for u in units for j in range(k)]
    scaled: dict[int, np.ndarray] = {}  # probe index -> float32 (h, w, 3) tile image
    for u, j in pairs:
        i = int(result.top_images[u, j])
        if i not in scaled:
            img = result.probe.load_image(i)
            h, w = _scaled_size(img.size)
            scaled[i] = np.asarray(img.convert("RGB").resize((w, h), Image.BILINEAR),
                                   dtype=np.float32)
    by_size: dict[tuple[int, int], list[int]] = {}
    for n, (u, j) in enumerate(pairs):
        by_size.setdefault(scaled[int(result.top_images[u, j])].shape[:2], []).append(n)
    tiles: list[np.ndarray | None] = [None] * len(pairs)
    for size, idx in by_size.items():
        maps = np.stack([result.top_maps[pairs[n][0], pairs[n][1]] for n in idx])
        up = resize_maps(torch.from_numpy(maps), size).double().numpy()
        imgs = np.stack([scaled[int(result.top_images[pairs[n]])] for n in idx])
        thr = np.asarray([float(result.thresholds[pairs[n][0]]) for n in idx])
        for n, tile in zip(idx, _outlined(imgs, up, thr)):
            tiles[n] = tile
    for row, u in enumerate(units):
        canvas = Image.new("RGB", (max(1, k) * (_TILE + gap), _TILE + head), (255, 255, 255))
        for j in range(k):
            tile = tiles[row * k + j]
            block = np.zeros((_TILE, _TILE, 3), dtype=np.uint8)
            block[: tile.shape[0], : tile.shape[1]] = tile
            canvas.paste(Image.fromarray(block), (j * (_TILE + gap), head))
        cat = result.categories[int(result.best_category[u])]
        label = result.label_names[int(result.best_label[u])]
        caption = (f"{result.layer} unit {u + 1}: {label} ({cat}) "
                   f"IoU {float(result.best_iou[u]):.3f}")
        ImageDraw.Draw(canvas).text((2, 2), caption, fill=(0, 0, 0))
        yield u, canvas


def unit_montage(result: Any, unit: int) -> Any:
    """The unit's top-activating probe images side by side with a caption (PIL image)."""
    return next(render_montages(result, [unit]))[1]


def montage_sheet(result: Any, units: list[int]) -> Any:
    """Several units' montages (0-based ``units``) stacked vertically in one PIL image."""
    from PIL import Image

    rows = [img for _, img in render_montages(result, units)]
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
