"""Attribution parameters and registration (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

from interptool.analyzers._base import Params, param
from interptool.analyzers._registry import register_analyzer

__all__ = ["ATTRIBUTION_METHODS", "AttributionOptions", "AttributionParams"]

#: Method names (``interptool.analyzers.attribution.METHODS`` holds their implementations;
#: tests/test_contract.py checks that the two lists agree).
ATTRIBUTION_METHODS = ("grad_cam", "integrated_gradients", "saliency", "input_x_gradient",
                       "smoothgrad", "guided_backprop", "occlusion")
REDUCTIONS = ("abs_sum", "sum", "l2", "max_abs")


@dataclass
class AttributionOptions(Params):
    """How ``interptool compare`` uses attribution (config only)."""

    methods: list[str] = param(help="attribution methods compared across models",
                               choices=ATTRIBUTION_METHODS, cli=False,
                               default_factory=lambda: ["grad_cam", "integrated_gradients"])
    n_images: int = param(32, "eval images attributed per model", ge=1, cli=False)
    faithfulness: bool = param(True, "score maps by deletion/insertion of the most attributed "
                               "pixels", cli=False)


@register_analyzer(
    "attribution", title="Attribution",
    summary="attribution maps (captum) and their agreement, localisation and faithfulness",
    analyzer="interptool.analyzers.attribution._analyzer:Attribution",
    result="interptool.analyzers.attribution._analyzer:AttributionResult",
    options=AttributionOptions, needs="eval", needs_layers=False, needs_model=True,
    command=False, order=40,
    template={"methods": ["grad_cam", "integrated_gradients"], "n_images": 16})
@dataclass
class AttributionParams(Params):
    """Settings of :class:`~interptool.analyzers.attribution.Attribution` shared by methods."""

    method: str = param("integrated_gradients", "attribution method",
                        choices=ATTRIBUTION_METHODS, config=False)
    reduce: str = param("abs_sum", "how channels are reduced to one map", choices=REDUCTIONS,
                        config=False)
    layer: str | None = param(None, "Grad-CAM layer (default: each model's last listed layer)")
    n_steps: int = param(32, "integrated-gradients steps", ge=1)
    # issue 10: the first n rows of an image folder are one or two classes only
    sample: str = param("stratified", "how the images are chosen when there are more than "
                        "n: stratified (seeded, equal shares per class) or first (rows 0..n-1)",
                        choices=("stratified", "first"))
    seed: int = param(0, "seed of the stratified image sample (compare: the run's seed)",
                      ge=0, config=False)
    # issue 13: one bound for every pass that runs the model on many rows per image, set
    # by `attribute --internal-batch-size` and `[analysis.attribution] internal_batch_size`
    internal_batch_size: int | None = param(
        None, "most model rows per forward/backward pass of integrated gradients, SmoothGrad, "
        "occlusion and the faithfulness curves (default: derived from the batch size, see "
        "docs/attribution.md)", ge=1)
