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
from interptool.common.theme import model_colors, theme  # noqa: E402

_COLORS = tuple(model_colors([str(i) for i in range(10)]).values())


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
    """Grouped bars (seaborn): detectors and unique concepts per category, one panel row per
    layer, one colour per model.

    ``counts[model][layer][category] = {"detectors": int, "unique": int}``; the category
    ``"total"`` is drawn first when present.
    """
    import pandas as pd
    import seaborn as sns

    models = list(counts)
    layers = list(dict.fromkeys(lay for m in models for lay in counts[m]))
    cats = (["total"] if any("total" in counts[m][lay] for m in models for lay in counts[m])
            else []) + [c for c in categories if c != "total"]
    rows = [{"model": m, "layer": lay, "category": cat, "measure": key,
             "count": counts[m].get(lay, {}).get(cat, {}).get(key, 0)}
            for m in models for lay in layers for cat in cats
            for key in ("detectors", "unique")]
    df = pd.DataFrame(rows)
    with theme():
        fig, axes = plt.subplots(len(layers), 2, figsize=(11, 3.0 * len(layers)),
                                 squeeze=False)
        for r, layer in enumerate(layers):
            for c, (key, title) in enumerate((("detectors", "detector units"),
                                              ("unique", "unique concepts"))):
                ax = axes[r, c]
                sub = df[(df["layer"] == layer) & (df["measure"] == key)]
                sns.barplot(sub, x="category", y="count", hue="model", order=cats,
                            hue_order=models, palette=model_colors(models), ax=ax,
                            legend=(r == 0 and c == 1))
                ax.set_xlabel("")
                ax.set_ylabel(title)
                ax.set_title(f"{layer}: {title}")
                ax.tick_params(axis="x", labelrotation=30)
        fig.tight_layout()
    return fig


def detector_curve(
    thresholds: Sequence[float],
    curves: Mapping[str, Mapping[str, Sequence[int]]],
    chosen: float | None = None,
    dashed: Sequence[str] = (),
) -> Figure:
    """Detector count vs IoU threshold (seaborn lines), all models on one plot per layer.

    ``curves[model][layer]`` is aligned with ``thresholds``; models in ``dashed`` (the
    random-init controls) are drawn as dashed lines.
    """
    import pandas as pd
    import seaborn as sns

    models = list(curves)
    layers = list(dict.fromkeys(lay for m in models for lay in curves[m]))
    df = pd.DataFrame([{"model": m, "layer": lay, "IoU threshold": t, "detector units": v,
                        "kind": "control" if m in dashed else "model"}
                       for m in models for lay in curves[m]
                       for t, v in zip(thresholds, curves[m][lay])])
    with theme():
        fig, axes = plt.subplots(1, len(layers), figsize=(4.8 * len(layers), 3.4),
                                 squeeze=False)
        for j, layer in enumerate(layers):
            ax = axes[0, j]
            sns.lineplot(df[df["layer"] == layer], x="IoU threshold", y="detector units",
                         hue="model", hue_order=models, palette=model_colors(models),
                         style="kind", style_order=["model", "control"], markers=True,
                         dashes={"model": "", "control": (4, 2)}, ax=ax,
                         legend=(j == len(layers) - 1))
            if chosen is not None:
                ax.axvline(chosen, color="grey", ls="--", lw=1)
            ax.set_title(layer)
        fig.tight_layout()
    return fig


def cka_matrix(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str]) -> Figure:
    """Annotated CKA matrix, teacher layers (rows) against every student's (columns)."""
    from interptool.analyzers.cka import cka_heatmap

    return cka_heatmap(matrix, row_labels, col_labels)


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
