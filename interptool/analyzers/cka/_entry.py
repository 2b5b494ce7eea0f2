"""The CKA analyzer's entries: ``run`` (one pair) and the registry's generic ``analyze``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from interptool.analyzers._base import AnalysisInputs
from interptool.analyzers.cka._analyzer import CKAResult, cka
from interptool.analyzers.cka._params import CKAParams

__all__ = ["analyze", "run"]


def run(cache_a: Any, cache_b: Any, layers_a: str | Sequence[str],
        layers_b: str | Sequence[str] | None = None, params: CKAParams | None = None, *,
        names: Sequence[str] | None = None, **settings: Any) -> CKAResult:
    """:func:`cka` configured by ``params`` (plus ``settings`` overriding fields)."""
    p = params.replace(**settings) if params is not None else CKAParams(**settings)
    return cka(cache_a, cache_b, layers_a, layers_b, pooling=p.pooling, minibatch=p.minibatch,
               seed=p.seed, batch_size=p.batch_size, device=p.device, max_memory=p.max_memory,
               names=names)


def analyze(inputs: AnalysisInputs, params: CKAParams) -> list[CKAResult]:
    """The first model (the teacher) against each other model, on their listed layers."""
    params = params.replace(device=inputs.device, seed=inputs.seed)
    first = inputs.caches[0]
    return [run(first, c, inputs.layers[0], inputs.layers[i], params,
                names=[inputs.names[0], inputs.names[i]])
            for i, c in enumerate(inputs.caches) if i > 0]
