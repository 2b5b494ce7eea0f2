"""The dissection analyzer's entries: ``run`` (one layer) and ``analyze`` (the registry's
generic form, every model and layer of an :class:`~interptool.analyzers.AnalysisInputs`)."""

from __future__ import annotations

from typing import Any

from interptool.analyzers._base import AnalysisInputs
from interptool.analyzers.dissection._analyzer import Dissection, DissectionResult
from interptool.analyzers.dissection._params import DissectionParams

__all__ = ["analyze", "run"]


def run(cache: Any, layer: str, probe: Any = None, params: DissectionParams | None = None, *,
        name: str | None = None, **settings: Any) -> DissectionResult:
    """Dissect ``layer`` of ``cache`` against ``probe`` with ``params`` (plus ``settings``
    overriding fields, e.g. ``iou_threshold=0.05``); ``name`` names the model."""
    params = params.replace(**settings) if params is not None else DissectionParams(**settings)
    return Dissection.from_params(params).run(cache, layer, probe, name=name)


def analyze(inputs: AnalysisInputs, params: DissectionParams) -> list[DissectionResult]:
    """One result per model and layer, in ``inputs`` order."""
    params = params.replace(device=inputs.device)
    return [run(cache, layer, inputs.dataset, params, name=name)
            for name, cache, layers in zip(inputs.names, inputs.caches, inputs.layers)
            for layer in layers]
