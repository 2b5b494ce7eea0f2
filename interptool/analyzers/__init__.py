"""Analyzers: one subpackage per analyzer, each with a ``Params`` dataclass, one entry
``run(...) -> Result`` and a result following :class:`AnalysisResult`; the registry
(:func:`analyzer_specs`, :func:`register_analyzer`) lists them for the CLI, the ``compare``
config, the pipeline and the report. See docs/extending.md to add one.

Names resolve lazily: ``from interptool.analyzers import Dissection`` imports torch, reading
the registry does not.
"""

from interptool.analyzers._base import AnalysisInputs, AnalysisResult, Params, param
from interptool.analyzers._lazy import lazy_exports
from interptool.analyzers._registry import (
    AnalyzerSpec,
    analyzer_specs,
    get_analyzer,
    register_analyzer,
    unregister_analyzer,
)
from interptool.errors import ParamsError

_LAZY = {
    **{n: ".attribution" for n in (
        "AgreementResult", "Attribution", "AttributionParams", "AttributionResult",
        "FaithfulnessResult", "LocalisationResult", "RandomisationResult", "agreement",
        "class_object_masks", "faithfulness", "folder_masks", "localisation",
        "randomisation_check", "resize_masks")},
    **{n: ".cka" for n in ("CKAParams", "CKAResult", "cka")},
    **{n: ".dissection" for n in ("Dissection", "DissectionParams", "DissectionResult")},
    **{n: ".similarity" for n in ("ClassSimilarity", "SimilarityParams", "SimilarityResult",
                                  "TransferResult", "compare_similarity")},
}
__getattr__, _dir = lazy_exports(__name__, _LAZY)

__all__ = [
    "AnalysisInputs",
    "AnalysisResult",
    "AnalyzerSpec",
    "Params",
    "ParamsError",
    "analyzer_specs",
    "get_analyzer",
    "param",
    "register_analyzer",
    "unregister_analyzer",
    *sorted(_LAZY),
]


def __dir__() -> list[str]:
    return sorted(__all__)
