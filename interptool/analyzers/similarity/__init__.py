"""Class similarity from logits: per-model matrices and teacher-student transfer metrics.

``run(teacher_cache, *student_caches, params=..., names=...)`` (or ``compare_similarity``)
returns a :class:`TransferResult`; :class:`SimilarityParams` holds every setting.
"""

from interptool.analyzers._lazy import lazy_exports
from interptool.analyzers.similarity._params import SimilarityOptions, SimilarityParams

Params = SimilarityParams
__getattr__, __dir__ = lazy_exports(__name__, {
    **{n: "._analyzer" for n in ("MATRIX_KINDS", "PAIR_METRICS", "ClassSimilarity",
                                 "SimilarityResult", "TransferResult",
                                 "bias_corrected_interval", "compare_similarity",
                                 "load_class_names")},
    "run": "._entry", "analyze": "._entry", "cluster_order": "._plots"})

__all__ = ["MATRIX_KINDS", "PAIR_METRICS", "ClassSimilarity", "Params", "SimilarityOptions",
           "SimilarityParams", "SimilarityResult", "TransferResult", "analyze",
           "bias_corrected_interval", "cluster_order", "compare_similarity", "load_class_names",
           "run"]
