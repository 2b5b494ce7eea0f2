"""Class similarity from logits: per-model matrices and teacher-student transfer metrics."""

from interptool.analyzers.similarity._analyzer import (
    MATRIX_KINDS,
    PAIR_METRICS,
    ClassSimilarity,
    SimilarityResult,
    TransferResult,
    bias_corrected_interval,
    compare_similarity,
    load_class_names,
)

__all__ = [
    "MATRIX_KINDS",
    "PAIR_METRICS",
    "ClassSimilarity",
    "SimilarityResult",
    "TransferResult",
    "bias_corrected_interval",
    "compare_similarity",
    "load_class_names",
]
