"""Matplotlib figures of the comparison report, drawn from plain numbers and arrays.

Every function returns a :class:`matplotlib.figure.Figure`; :func:`save_png` writes it and
closes it (figures are never shown, so the Agg backend is forced: the report must build on a
headless server).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from interptool._provenance import atomic_savefig  # noqa: E402

_COLORS = plt.get_cmap("tab10").colors


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Write ``fig`` as PNG (parents created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def detector_bars(
    counts: Mapping[str, Mapping[str, Mapping[str, Mapping[str, int]]]],
    categories: Sequence[str],
) -> Figure:
    """Grouped bars: detectors and unique concepts per category, one panel row per layer.

    ``counts[model][layer][category] = {"detectors": int, "unique": int}``; the category
    ``"total"`` is drawn first when present.
    """
    models = list(counts)
    layers = list(dict.fromkeys(lay for m in models for lay in counts[m]))
    cats = (["total"] if any("total" in counts[m][lay] for m in models for lay in counts[m])
            else []) + [c for c in categories if c != "total"]
    fig, axes = plt.subplots(len(layers), 2, figsize=(11, 2.8 * len(layers)), squeeze=False)
    x = np.arange(len(cats))
    width = 0.8 / max(len(models), 1)
    for r, layer in enumerate(layers):
        for c, (key, title) in enumerate((("detectors", "detector units"),
                                          ("unique", "unique concepts"))):
            ax = axes[r, c]
            for i, m in enumerate(models):
                vals = [counts[m].get(layer, {}).get(cat, {}).get(key, 0) for cat in cats]
                ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, label=m,
                       color=_COLORS[i % 10])
            ax.set_xticks(x, cats, rotation=30, ha="right")
            ax.set_title(f"{layer}: {title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    axes[0, 1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def detector_curve(
    thresholds: Sequence[float],
    curves: Mapping[str, Mapping[str, Sequence[int]]],
    chosen: float | None = None,
    dashed: Sequence[str] = (),
) -> Figure:
    """Detector count vs IoU threshold, all models on one plot per layer.

    ``curves[model][layer]`` is aligned with ``thresholds``; models in ``dashed`` (the
    random-init controls) are drawn as dashed grey-toned lines.
    """
    models = list(curves)
    layers = list(dict.fromkeys(lay for m in models for lay in curves[m]))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.2), squeeze=False)
    for j, layer in enumerate(layers):
        ax = axes[0, j]
        for i, m in enumerate(models):
            if layer in curves[m]:
                ax.plot(thresholds, curves[m][layer], marker="o", ms=3, label=m,
                        color=_COLORS[i % 10], ls="--" if m in dashed else "-",
                        alpha=0.7 if m in dashed else 1.0)
        if chosen is not None:
            ax.axvline(chosen, color="grey", ls="--", lw=1)
        ax.set_xlabel("IoU threshold")
        ax.set_ylabel("detector units")
        ax.set_title(layer, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def unit_montage(rows: Sequence[tuple[str, Sequence[np.ndarray]]], title: str = "") -> Figure:
    """One row per unit: a label and its top images (H, W, 3 float in [0, 1] or uint8)."""
    n_cols = max((len(imgs) for _, imgs in rows), default=1)
    fig, axes = plt.subplots(
        max(len(rows), 1), n_cols, figsize=(1.3 * n_cols + 1.2, 1.35 * max(len(rows), 1)),
        squeeze=False,
    )
    for r, (label, imgs) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c])
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def overlay_mask(image: np.ndarray, mask: np.ndarray, color=(1.0, 0.2, 0.1)) -> np.ndarray:
    """Dim the image outside ``mask`` (bool, same H, W) and tint the mask's border region."""
    img = np.asarray(image, dtype=np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    out = img * 0.35
    out[mask] = img[mask] * 0.75 + np.asarray(color, np.float32) * 0.25
    return np.clip(out, 0, 1)


def heatmaps(
    matrices: Mapping[str, np.ndarray],
    labels: Sequence[str] | None = None,
    *,
    order: Sequence[int] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str = "",
    cmap: str = "viridis",
) -> Figure:
    """Side-by-side heatmaps sharing a colour scale, rows/columns permuted by ``order``."""
    names = list(matrices)
    mats = [np.asarray(matrices[n], dtype=np.float64) for n in names]
    if order is not None:
        idx = np.asarray(order)
        mats = [m[np.ix_(idx, idx)] for m in mats]
        labels = [labels[i] for i in idx] if labels is not None else None
    lo = min(float(np.nanmin(m)) for m in mats) if vmin is None else vmin
    hi = max(float(np.nanmax(m)) for m in mats) if vmax is None else vmax
    size = 3.4
    fig, axes = plt.subplots(1, len(mats), figsize=(size * len(mats) + 0.8, size), squeeze=False)
    im = None
    k = mats[0].shape[0] if mats else 0
    for ax, name, m in zip(axes[0], names, mats):
        im = ax.imshow(m, vmin=lo, vmax=hi, cmap=cmap)
        ax.set_title(name, fontsize=10)
        if labels is not None and k <= 30:
            ax.set_xticks(range(k), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(k), labels, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def cka_matrix(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str]) -> Figure:
    """Annotated CKA matrix (values in [0, 1])."""
    m = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(0.9 * len(col_labels) + 2.5, 0.6 * len(row_labels) + 1.5))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title("linear CKA", fontsize=10)
    fig.tight_layout()
    return fig


def attribution_grid(
    images: Sequence[np.ndarray],
    maps: Mapping[str, Sequence[np.ndarray]],
    row_titles: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """Rows: images; columns: the input, then each model's map overlaid on it."""
    models = list(maps)
    n = len(images)
    fig, axes = plt.subplots(n, len(models) + 1, figsize=(1.5 * (len(models) + 1), 1.5 * n),
                             squeeze=False)
    for r in range(n):
        img = np.asarray(images[r], dtype=np.float32)
        if img.max() > 1.0:
            img = img / 255.0
        axes[r, 0].imshow(img)
        if row_titles is not None:
            axes[r, 0].set_ylabel(row_titles[r], fontsize=7, rotation=0, ha="right", va="center")
        for c, m in enumerate(models, start=1):
            a = np.asarray(maps[m][r], dtype=np.float32)
            axes[r, c].imshow(img, alpha=1.0)
            axes[r, c].imshow(a, cmap="jet", alpha=0.5, extent=(-0.5, img.shape[1] - 0.5,
                                                               img.shape[0] - 0.5, -0.5))
            if r == 0:
                axes[r, c].set_title(m, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("input", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class FigureSet:
    """The figures of one report: PNG files under ``out`` and their captions.

    ``entries`` is ``summary["figures"]``: id -> ``{"path": PNG path relative to out,
    "caption": str}``; the HTML renderer embeds them by id.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.entries: dict[str, dict[str, str]] = {}

    def add(self, key: str, fig: Figure, rel: str, caption: str) -> str:
        """Write ``fig`` to ``out/rel``, record it under ``key`` and return ``key``."""
        save_png(fig, self.out / rel)
        return self.register(key, rel, caption)

    def register(self, key: str, rel: str, caption: str) -> str:
        """Record a PNG already written under ``out/rel`` (e.g. by an analyzer's ``save``)."""
        self.entries[key] = {"path": str(rel), "caption": caption}
        return key
