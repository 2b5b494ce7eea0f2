"""CKA parameters and registration (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

from interptool.analyzers._base import Params, param
from interptool.analyzers._registry import register_analyzer

__all__ = ["CKAParams"]


@register_analyzer(
    "cka", title="Linear CKA",
    summary="linear CKA between the layers of a teacher and each student (same images)",
    analyzer="interptool.analyzers.cka._analyzer:cka",
    result="interptool.analyzers.cka._analyzer:CKAResult",
    analyze="interptool.analyzers.cka._entry:analyze",
    needs="eval", in_compare=False, order=30)
@dataclass
class CKAParams(Params):
    """Settings of :func:`~interptool.analyzers.cka.cka`."""

    pooling: str = param("mean", "'mean' over positions (N, C) or 'flatten' (N, C*H*W)",
                         choices=("mean", "flatten"))
    minibatch: int | None = param(None, "unbiased minibatch CKA with this many images per "
                                  "batch (>= 4; default: exact full-batch)", metavar="M")
    batch_size: int = param(256, "images read from the cache per block", ge=1)
    max_memory: int = param(2 * 1024**3, "bytes the exact computation may hold", ge=1)
    seed: int = param(0, "minibatch permutation seed", ge=0, config=False)
    device: str = param("cpu", "torch device", cli=False, config=False)

    def validate(self) -> None:
        if self.minibatch is not None and self.minibatch < 4:
            raise self.error("minibatch", "the unbiased HSIC estimator needs at least 4 "
                             "images per minibatch", fix="use e.g. 256, or None for the exact "
                             "full-batch CKA")
