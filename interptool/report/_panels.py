"""Report panels of the decision-grade comparison: detector fractions with their intervals
and the paper's mechanism (class-similarity information against detector fraction).

Plain numbers in, a matplotlib :class:`~matplotlib.figure.Figure` out (written by
:class:`~interptool.report._figures.FigureSet`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from interptool.common.theme import themed
from interptool.report._figures import _COLORS, plt

__all__ = ["detector_fraction_panel", "mechanism_scatter"]


@themed
def detector_fraction_panel(
    fractions: Mapping[str, Mapping[str, Mapping[str, Any]]],
    baselines: Sequence[str] = (),
) -> Figure:
    """Detector fraction per model, one panel per layer, with 95% bootstrap intervals.

    ``fractions[model][layer] = {"estimate", "ci_low", "ci_high"}`` (bounds may be None);
    models named in ``baselines`` (random-init controls) are drawn hollow.
    """
    models = list(fractions)
    layers = list(dict.fromkeys(lay for m in models for lay in fractions[m]))
    fig, axes = plt.subplots(1, len(layers), figsize=(max(3.5, 1.0 + 0.9 * len(models)) *
                                                       len(layers), 3.4), squeeze=False)
    for j, layer in enumerate(layers):
        ax = axes[0, j]
        for i, m in enumerate(models):
            v = fractions[m].get(layer)
            if not v:
                continue
            est = float(v["estimate"])
            lo, hi = v.get("ci_low"), v.get("ci_high")
            yerr = None
            if lo is not None and hi is not None:
                yerr = [[est - float(lo)], [float(hi) - est]]
            base = m in baselines
            ax.errorbar([i], [est], yerr=yerr, fmt="o", ms=7, capsize=4,
                        color=_COLORS[i % 10], mfc="white" if base else _COLORS[i % 10])
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=9)
        ax.set_ylabel("detector fraction (detectors / units)")
        ax.set_title(layer, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


@themed
def mechanism_scatter(points: Sequence[Mapping[str, Any]], x_keys: Sequence[tuple[str, str]],
                      y_label: str) -> Figure:
    """Labelled scatter(s): detector fraction (y) against class-similarity measures (x).

    ``points``: one dict per model with ``name``, ``y`` and the keys in ``x_keys`` (None where
    a model has no value, e.g. the teacher's transfer to itself); ``x_keys``: (key, axis label)
    per panel; every point is labelled with its model's name.
    """
    fig, axes = plt.subplots(1, len(x_keys), figsize=(4.6 * len(x_keys), 3.8), squeeze=False)
    for j, (key, label) in enumerate(x_keys):
        ax = axes[0, j]
        for i, p in enumerate(points):
            x, y = p.get(key), p.get("y")
            if x is None or y is None or not np.isfinite([x, y]).all():
                continue
            ax.scatter([x], [y], s=40, color=_COLORS[i % 10])
            ax.annotate(str(p["name"]), (x, y), xytext=(4, 4), textcoords="offset points",
                        fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
