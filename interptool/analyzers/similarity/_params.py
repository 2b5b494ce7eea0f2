"""Class-similarity parameters and registration (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

from interptool.analyzers._base import Params, param
from interptool.analyzers._registry import register_analyzer

__all__ = ["SimilarityOptions", "SimilarityParams"]


@dataclass
class SimilarityOptions(Params):
    """How ``interptool compare`` uses class similarity (config only)."""

    cka: bool = param(True, "also compute linear CKA between the teacher's and each "
                      "student's layers on the eval images", cli=False)


@register_analyzer(
    "similarity", title="Class similarity",
    summary="class similarity from logits: teacher vs students, with bootstrap intervals",
    analyzer="interptool.analyzers.similarity._analyzer:compare_similarity",
    result="interptool.analyzers.similarity._analyzer:TransferResult",
    analyze="interptool.analyzers.similarity._entry:analyze",
    options=SimilarityOptions, needs="eval", needs_layers=False, command=False, order=20,
    template={"temperatures": [1, 4], "n_boot": 1000})
@dataclass
class SimilarityParams(Params):
    """Settings of :func:`~interptool.analyzers.similarity.compare_similarity`."""

    temperatures: list[float] = param(
        help="softmax temperature(s) of the class-similarity matrices", gt=0, finite=True,
        min_items=1, flag="--temperature", metavar="T", default_factory=lambda: [1.0, 4.0])
    k: int | None = param(None, "nearest classes compared per class (default 5, or K - 1 "
                          "with fewer classes)", ge=1)
    n_boot: int = param(1000, "bootstrap resamples of the images; 0 skips the intervals", ge=0)
    ci: float = param(0.95, "confidence level of the intervals", gt=0, lt=1)
    matrix: str = param("softmax", "which matrix the agreement metrics compare",
                        choices=("softmax", "dark_knowledge"))
    seed: int = param(0, "bootstrap seed", ge=0, config=False)
    device: str = param("cpu", "torch device", cli=False, config=False)
