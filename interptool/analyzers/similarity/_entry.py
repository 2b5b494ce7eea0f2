"""The class-similarity analyzer's entries: ``run`` and the registry's generic ``analyze``."""

from __future__ import annotations

import os
from typing import Any

from interptool.analyzers._base import AnalysisInputs
from interptool.analyzers.similarity._analyzer import TransferResult, compare_similarity
from interptool.analyzers.similarity._params import SimilarityParams

__all__ = ["analyze", "run"]


def _num_classes(cache: Any) -> int:
    if isinstance(cache, (str, os.PathLike)):
        from interptool.cache import ActivationCache

        with ActivationCache(cache) as c:
            return int(c.logits.shape[1])
    return int(cache.logits.shape[1])


def run(teacher_cache: Any, *student_caches: Any, params: SimilarityParams | None = None,
        names: list[str] | None = None, class_names: Any = None, hierarchy: Any = None,
        **settings: Any) -> TransferResult:
    """:func:`compare_similarity` configured by ``params`` (plus ``settings`` overriding
    fields); ``names``: the models (teacher first). ``k=None`` compares the 5 nearest classes,
    or K - 1 when there are fewer."""
    p = params.replace(**settings) if params is not None else SimilarityParams(**settings)
    k = p.k if p.k is not None else max(1, min(5, _num_classes(teacher_cache) - 1))
    return compare_similarity(
        teacher_cache, *student_caches, temperature=p.temperatures, k=k, n_boot=p.n_boot,
        seed=p.seed, matrix=p.matrix, ci=p.ci, device=p.device, names=names,
        class_names=class_names, hierarchy=hierarchy)


def analyze(inputs: AnalysisInputs, params: SimilarityParams) -> TransferResult:
    """The teacher (first) against every other model of ``inputs``."""
    return run(*inputs.caches, params=params.replace(device=inputs.device, seed=inputs.seed),
               names=list(inputs.names))
