"""Analyzers: each reads an activation cache (attribution also needs the model) and returns a
result object with ``to_frame()``, ``to_dict()``, ``plot()`` and ``save(dir)``."""

from interptool.analyzers.attribution import (
    AgreementResult,
    Attribution,
    AttributionResult,
    FaithfulnessResult,
    LocalisationResult,
    RandomisationResult,
    agreement,
    class_object_masks,
    faithfulness,
    folder_masks,
    localisation,
    randomisation_check,
    resize_masks,
)
from interptool.analyzers.cka import CKAResult, cka
from interptool.analyzers.dissection import Dissection, DissectionResult
from interptool.analyzers.similarity import (
    ClassSimilarity,
    SimilarityResult,
    TransferResult,
    compare_similarity,
)

__all__ = [
    "AgreementResult",
    "Attribution",
    "AttributionResult",
    "FaithfulnessResult",
    "LocalisationResult",
    "RandomisationResult",
    "agreement",
    "class_object_masks",
    "faithfulness",
    "folder_masks",
    "localisation",
    "randomisation_check",
    "resize_masks",
    "CKAResult",
    "ClassSimilarity",
    "Dissection",
    "DissectionResult",
    "SimilarityResult",
    "TransferResult",
    "cka",
    "compare_similarity",
]
