"""The attribution analyzer's entry: ``run`` one method on one model."""

from __future__ import annotations

from typing import Any

from interptool.analyzers.attribution._analyzer import Attribution, AttributionResult
from interptool.analyzers.attribution._params import AttributionParams

__all__ = ["attribution_for", "run"]


def attribution_for(params: AttributionParams, default_layer: str | None = None) -> Attribution:
    """The :class:`Attribution` of ``params.method`` with the settings it uses (Grad-CAM's
    layer, default ``default_layer``; integrated gradients' steps)."""
    extra: dict[str, Any] = {}
    if params.method == "grad_cam":
        extra["layer"] = params.layer or default_layer
    elif params.method == "integrated_gradients":
        extra["steps"] = params.n_steps
    return Attribution(params.method, reduce=params.reduce, **extra)


def run(model: Any, data: Any, params: AttributionParams | None = None, *,
        name: str | None = None, **run_kwargs: Any) -> AttributionResult:
    """Attribute ``data`` with ``model`` (a LoadedModel or nn.Module) under ``params``;
    ``run_kwargs`` go to :meth:`Attribution.run` (``n``, ``batch_size``, ``out``, ...); the
    image sample is ``params.sample`` seeded by ``params.seed`` and the internal batch
    ``params.internal_batch_size`` unless given there."""
    params = params if params is not None else AttributionParams()
    run_kwargs.setdefault("sample", params.sample)
    run_kwargs.setdefault("sample_seed", params.seed)
    run_kwargs.setdefault("internal_batch_size", params.internal_batch_size)
    result = attribution_for(params).run(model, data, **run_kwargs)
    model_name = name or getattr(model, "name", None) or result.model_info.get("name")
    result.names = (str(model_name),) if model_name else ()
    return result
