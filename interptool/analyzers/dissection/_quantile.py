"""Per-unit quantile thresholds over all images x positions, streamed in blocks.

``ExactQuantile`` gives exactly what ``numpy.quantile(values, 1 - q, method="linear")`` gives on
the full float64 array of one unit's activations (Hyndman & Fan type 7: the virtual index
``h = (n - 1) p`` between the order statistics ``x[floor(h)]`` and ``x[floor(h) + 1]``, blended
with numpy's ``_lerp``). Only the order statistics at and above ``floor(h)`` matter, so per
unit it keeps a running top-``m`` with ``m = n - floor(h)`` (about ``q * n + 1`` values), merged
block by block with ``torch.topk`` on the device: memory is ``units x m`` values, a
``q``-fraction of the layer, whatever the block size.

A fixed-bin histogram sketch (memory ``units x bins`` whatever ``N``) was measured and removed:
the exact state is a ``q``-fraction of the layer (about 32 MB for resnet18 layer4 on all of
Broden at q = 0.005), and the sketch's second pass made it slower (docs/benchmarks_dissect.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def linear_virtual_index(n: int, p: float) -> float:
    """numpy's virtual index for ``method="linear"``: ``(n - 1) * p``, the same float operation."""
    return (n - 1) * p


def topk_needed(n: int, p: float) -> int:
    """How many of the largest values determine the ``p`` quantile of ``n`` values."""
    if n <= 0:
        return 0
    h = linear_virtual_index(n, p)
    lo = min(max(math.floor(h), 0), n - 1)
    return n - lo


def _lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """numpy's ``_lerp``: ``a + (b - a) t``, or ``b - (b - a)(1 - t)`` when ``t >= 0.5``."""
    diff = b - a
    if t >= 0.5:
        return b - diff * (1 - t)
    return a + diff * t


class ExactQuantile:
    """Running exact ``p``-quantile per unit from streamed (units, values) blocks."""

    def __init__(self, units: int, n: int, p: float, device: torch.device | str = "cpu") -> None:
        self.units, self.n, self.p = int(units), int(n), float(p)
        self.m = topk_needed(self.n, self.p)
        self.device = torch.device(device)
        self._kept: torch.Tensor | None = None  # (units, <= m) float32, the largest so far
        self._pending: list[torch.Tensor] = []
        self._pending_width = 0
        self.seen = 0

    def add(self, values: torch.Tensor) -> None:
        """Add a block of shape (units, k) (any float dtype; kept as float32, losslessly)."""
        values = values.to(self.device, torch.float32)
        self.seen += values.shape[1]
        self._pending.append(values)
        self._pending_width += values.shape[1]
        # Merge lazily: one topk per ~m new values keeps the cost linear in the data.
        if self._pending_width >= max(self.m, 4096):
            self._merge()

    def _merge(self) -> None:
        parts = ([self._kept] if self._kept is not None else []) + self._pending
        self._pending, self._pending_width = [], 0
        if not parts:
            return
        cat = torch.cat(parts, dim=1)
        if cat.shape[1] > self.m:
            cat = torch.topk(cat, self.m, dim=1, largest=True, sorted=False).values
        self._kept = cat

    def result(self) -> np.ndarray:
        """Per-unit thresholds, float64 (units,)."""
        if self.seen != self.n:
            raise RuntimeError(f"expected {self.n} values per unit, got {self.seen}")
        self._merge()
        top = torch.sort(self._kept, dim=1, descending=True).values.cpu().numpy().astype(np.float64)
        h = linear_virtual_index(self.n, self.p)
        if h >= self.n - 1:  # numpy takes the maximum
            return top[:, 0].copy()
        if h < 0:
            return top[:, -1].copy()
        lo = math.floor(h)
        gamma = h - lo
        # ascending index lo is descending position n-1-lo = m-1; lo+1 is m-2
        a = top[:, self.m - 1]
        b = top[:, self.m - 2]
        return _lerp(a, b, gamma)

    def state_bytes(self) -> int:
        return 0 if self._kept is None else self._kept.numel() * 4
