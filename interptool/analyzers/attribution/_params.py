"""Attribution parameters and registration (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from interptool.analyzers._base import Params, param
from interptool.analyzers._registry import register_analyzer

__all__ = ["ATTRIBUTION_METHODS", "METHOD_PARAMS", "AttributionOptions", "AttributionParams",
           "GradCamParams", "InputXGradientParams", "IntegratedGradientsParams",
           "OcclusionParams", "SaliencyParams", "ScoringParams", "SmoothGradParams"]

#: Method names (``interptool.analyzers.attribution.METHODS`` holds their implementations;
#: tests/test_contract.py checks that the two lists agree).
ATTRIBUTION_METHODS = ("grad_cam", "integrated_gradients", "saliency", "input_x_gradient",
                       "smoothgrad", "guided_backprop", "occlusion")
REDUCTIONS = ("abs_sum", "sum", "l2", "max_abs")
#: reference inputs of integrated gradients / occlusion (see ``_methods.make_baseline``)
BASELINES = ("zeros", "mean", "blur")


def _no_repeats(value: Any) -> str | None:
    repeated = sorted({v for v in value if list(value).count(v) > 1}, key=str)
    return f"expected each method once ({', '.join(repeated)} repeated)" if repeated else None


@dataclass
class AttributionOptions(Params):
    """How ``interptool compare`` uses attribution (config only)."""

    methods: list[str] = param(help="attribution methods compared across models",
                               choices=ATTRIBUTION_METHODS, min_items=1, check=_no_repeats,
                               cli=False,
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


# --------------------------------------------------------------------------------------------
# settings of each attribution method (``Attribution(method, **settings)``, the ``attribute``
# command's --steps, --baseline, --layer, --nt-samples, --stdevs, --window, --stride, --seed):
# each method's adapter (``_methods.METHODS``) checks its keyword arguments with these, so a
# bad value is one line naming the setting before any model runs. ``cli=False``: no flag of
# the ``attribute`` command sets it (a Python keyword only).
# --------------------------------------------------------------------------------------------
IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
              "riemann_trapezoid")
NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")
INTERPOLATE_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")


def _pair_problem(value: Any) -> str | None:
    """An int, or a pair of ints (height, width); the numbers are checked by the bounds."""
    if isinstance(value, list) and len(value) != 2:
        return "expected an integer or a pair of integers (height, width)"
    return None


@dataclass
class SaliencyParams(Params):
    """``saliency``: captum ``Saliency``."""

    abs: bool = param(True, "absolute value of the input gradient (captum's default)",
                      cli=False)


@dataclass
class InputXGradientParams(Params):
    """``input_x_gradient``: captum ``InputXGradient`` (no settings)."""


@dataclass
class IntegratedGradientsParams(Params):
    """``integrated_gradients``: captum ``IntegratedGradients``."""

    steps: int = param(32, "integration steps (captum n_steps)", ge=1)
    baseline: str = param("zeros", "reference input: zeros, mean or blur", choices=BASELINES)
    internal_batch_size: int | None = param(
        None, "most model rows per forward/backward pass (unset: from the batch size)", ge=1)
    ig_method: str = param("gausslegendre", "captum's approximation method",
                           choices=IG_METHODS, cli=False)


@dataclass
class SmoothGradParams(Params):
    """``smoothgrad``: captum ``NoiseTunnel`` over saliency or integrated gradients."""

    nt_samples: int = param(10, "noisy samples per image", ge=1)
    stdevs: float = param(0.15, "noise standard deviation in normalised input units, > 0",
                          gt=0, finite=True)
    nt_type: str = param("smoothgrad", "how the noisy maps are combined", choices=NT_TYPES,
                         cli=False)
    base: str = param("saliency", "the method smoothed: saliency or integrated_gradients",
                      choices=("saliency", "integrated_gradients"), cli=False)
    nt_samples_batch_size: int | None = param(
        None, "noisy samples per pass (unset: from the batch size)", ge=1, cli=False)
    seed: int = param(0, "seed of the noise (per batch, from the batch's first row)", ge=0)
    steps: int = param(16, "integration steps when base is integrated_gradients", ge=1)
    baseline: str = param("zeros", "integrated-gradients reference input: zeros, mean or blur",
                          choices=BASELINES)
    internal_batch_size: int | None = param(
        None, "most model rows per forward/backward pass (unset: from the batch size)", ge=1)


@dataclass
class GradCamParams(Params):
    """``grad_cam``: captum ``LayerGradCam`` on ``layer``, upsampled to the input size."""

    layer: str | None = param(None, "the layer whose (N, C, H, W) or token (N, T, D) output "
                              "is attributed, e.g. layer4 (see `interptool layers`)")
    interpolate_mode: str = param("bilinear", "upsampling of the map to the input size",
                                  choices=INTERPOLATE_MODES, cli=False)
    prefix_tokens: int | None = param(None, "leading (class / register) tokens of a token "
                                      "layer (unset: the model's)", ge=0, cli=False)
    grid: int | list[int] | None = param(None, "patch grid (height, width) of a token layer "
                                         "(unset: the model's, else square)", ge=1,
                                         check=_pair_problem, cli=False)

    def validate(self) -> None:
        if isinstance(self.grid, int):
            self.grid = (self.grid, self.grid)
        elif self.grid is not None:
            self.grid = tuple(self.grid)


@dataclass
class OcclusionParams(Params):
    """``occlusion``: captum ``Occlusion`` with a square (or (h, w)) window and stride."""

    window: int | list[int] = param(8, "occluded square's side in pixels (or height, width),"
                                    " at most the input size", ge=1, check=_pair_problem)
    stride: int | list[int] = param(4, "step between windows in pixels (or height, width), at"
                                    " most the window", ge=1, check=_pair_problem)
    baseline: str = param("zeros", "what occluded pixels become: zeros, mean or blur",
                          choices=BASELINES)
    perturbations_per_eval: int | None = param(
        None, "windows per forward pass (unset: from the batch size)", ge=1, cli=False)

    def validate(self) -> None:
        # a pair stays a tuple (as given before these checks existed: recorded as such)
        for name in ("window", "stride"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))


#: each method's settings (the keys of ``METHODS[name].defaults``)
METHOD_PARAMS: dict[str, type[Params]] = {
    "saliency": SaliencyParams, "input_x_gradient": InputXGradientParams,
    "integrated_gradients": IntegratedGradientsParams, "smoothgrad": SmoothGradParams,
    "guided_backprop": InputXGradientParams, "grad_cam": GradCamParams,
    "occlusion": OcclusionParams}


@dataclass
class ScoringParams(Params):
    """How ``interptool attribute`` scores its maps: deletion/insertion faithfulness
    (:func:`faithfulness`, :func:`score_maps`) and the model-randomisation sanity check
    (:func:`randomisation_check`). Field names are the command's flags (``--sanity-threshold``
    is ``sanity_threshold``); checked up front so that a bad value costs no attribution run."""

    patch: int = param(8, "faithfulness patch side in pixels", ge=1)
    faithfulness_steps: int = param(16, "deletion/insertion steps (0 skips faithfulness)",
                                    ge=0)
    faithfulness_baseline: str = param("blur", "what deleted patches become / insertion "
                                       "starts from", choices=("blur", "mean", "zeros"))
    sanity_n: int = param(8, "images of the model-randomisation sanity check (0 skips it)",
                          ge=0)
    sanity_top_k: int = param(3, "top-level layers re-initialised, output side first", ge=1)
    sanity_threshold: float = param(
        0.5, "flag a method whose maps keep a Spearman correlation above this with the "
        "trained model's after randomisation: a correlation, strictly between -1 and 1",
        gt=-1, lt=1, finite=True)
