"""One look for every figure interptool draws (analyzers' ``plot()`` and the report).

``with theme():`` applies seaborn's whitegrid style, a paper context sized so that tick
labels stay readable at the size the report shows figures (PNG at 90-100 dpi, shown at
natural size), and the colour-blind-safe palette; :func:`model_colors` gives each model the
same colour in every figure of a report. seaborn and matplotlib are imported on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["PALETTE", "TICK_SIZE", "model_colors", "theme", "themed"]

PALETTE = "colorblind"
#: smallest font size (points) of tick labels; 9 pt at 90 dpi is about 11 px on screen
TICK_SIZE = 9


@contextmanager
def theme() -> Iterator[None]:
    """Seaborn style, context and palette for the figures drawn inside the block."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # figures are written, never shown
    import matplotlib.pyplot as plt
    import seaborn as sns

    rc = {"xtick.labelsize": TICK_SIZE, "ytick.labelsize": TICK_SIZE,
          "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
          "figure.dpi": 100}
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", rc=rc), \
            sns.color_palette(PALETTE), plt.rc_context(rc):
        yield


def model_colors(names: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per model name, in the order given (the palette cycles after 10)."""
    import seaborn as sns

    pal = sns.color_palette(PALETTE, 10)
    return {n: pal[i % len(pal)] for i, n in enumerate(names)}


def themed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: draw ``fn``'s figure inside :func:`theme`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with theme():
            return fn(*args, **kwargs)

    return wrapper
