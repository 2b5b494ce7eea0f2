"""Attribution methods: one small class per method, each a thin adapter over a captum call.

Nothing here re-implements an attribution algorithm. Each adapter only (1) validates its
parameters, (2) builds the captum object on a *prepared copy* of the model, (3) makes the
call with the parameters the user gave, and (4) brings the output to input resolution
(``grad_cam``). Channel reduction to a 2-D map is done by :func:`reduce_channels`.

Why a prepared copy: in-place activations (``nn.ReLU(inplace=True)`` and friends) break
gradient hooks and input gradients in several captum versions (captum issue 156; and in every
version when the first op of the model is in-place on the input leaf). We never touch the
user's model: :func:`prepare_model` deep-copies it and turns ``inplace`` off everywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from interptool.analyzers._base import Params
from interptool.analyzers.attribution._params import (
    GradCamParams,
    InputXGradientParams,
    IntegratedGradientsParams,
    OcclusionParams,
    SaliencyParams,
    SmoothGradParams,
)
from interptool.common.numerics import seeded_rng
from interptool.errors import AnalysisError, ParamsError

# How a (N, C, H, W) attribution becomes a (N, H, W) map.
REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "abs_sum": lambda a: a.abs().sum(dim=1),
    "sum": lambda a: a.sum(dim=1),
    "l2": lambda a: a.pow(2).sum(dim=1).sqrt(),
    "max_abs": lambda a: a.abs().amax(dim=1),
}


def reduce_channels(raw: torch.Tensor, how: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W). One-channel inputs are squeezed without any reduction."""
    if raw.shape[1] == 1:
        return raw[:, 0]
    return REDUCTIONS[how](raw)


def prepare_model(model: nn.Module, device: str | torch.device,
                  share_weights: bool = True) -> nn.Module:
    """A copy of ``model`` in eval mode on ``device`` with every ``inplace`` flag off.

    The user's module is left exactly as it was (flags, hooks, device, train/eval mode).
    With ``share_weights`` (and the weights already on ``device``) only the module objects
    are copied and the parameter/buffer tensors are shared: fast, and no second copy of a
    large model in memory. Pass ``share_weights=False`` to get independent weights (needed
    before re-initialising layers, as the randomisation check does).
    """
    dev = torch.device(device)
    tensors = list(model.parameters()) + list(model.buffers())
    on_device = all(_same_device(t.device, dev) for t in tensors)
    memo: dict[int, Any] = {}
    if share_weights and on_device:
        memo = {id(t): t for t in tensors}
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as exc:  # e.g. modules holding non-copyable handles
        raise AnalysisError(
            f"could not copy the model ({type(model).__name__}: {exc}); attribution works "
            "on a copy so that in-place activations can be switched off safely. Make the "
            "model copyable (copy.deepcopy) or pass a plain nn.Module."
        ) from exc
    for module in copied.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
        # hooks the user registered stay on the user's model only
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks"):
            hooks = getattr(module, attr, None)
            if hooks:
                hooks.clear()
    if not (share_weights and on_device):
        copied = copied.to(dev)
    return copied.eval()


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        want = b.index if b.index is not None else torch.cuda.current_device()
        return (a.index if a.index is not None else torch.cuda.current_device()) == want
    return True


def hook_count(model: nn.Module) -> int:
    """Number of forward, forward-pre and backward hooks registered on any module of ``model``."""
    total = 0
    for module in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks"):
            total += len(getattr(module, attr, {}) or {})
    return total


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called ``name`` (dotted path); AnalysisError listing close names if absent."""
    from interptool.common.layers import lookup_layer

    return lookup_layer(model, name)


def _pair(v: Any, what: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    raise AnalysisError(f"{what} must be an int or a pair of ints, got {v!r}")


def make_baseline(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Reference input: ``zeros`` (the normalised mean colour), per-image channel ``mean``, or
    a Gaussian ``blur`` of the image (sigma = max(H, W) / 16, kernel 4 sigma + 1, odd)."""
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    if kind == "blur":
        from torchvision.transforms.functional import gaussian_blur

        sigma = max(x.shape[-2:]) / 16.0
        k = int(4 * sigma) | 1  # odd
        k = min(k, (min(x.shape[-2:]) - 1) | 1) if min(x.shape[-2:]) > 2 else 1
        return gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])
    raise AnalysisError(f"baseline must be one of zeros, mean, blur; got {kind!r}")


def _in_parts(fn: Callable[[torch.Tensor, Any], torch.Tensor], x: torch.Tensor, target: Any,
              size: int | None) -> torch.Tensor:
    """``fn(x, target)`` on consecutive parts of at most ``size`` inputs, concatenated.

    captum bounds the rows of a pass by splitting the steps / noise samples / windows of
    the whole batch, never the images: a pass always holds at least one row per input
    (IntegratedGradients warns and raises ``internal_batch_size`` to the number of inputs).
    Splitting the inputs first lets a bound below the batch's image count hold. Each part is
    a fresh leaf (captum differentiates with respect to it); every method split here
    attributes each input on its own, so the maps are those of one call."""
    n = x.shape[0]
    if size is None or size >= n:
        return fn(x, target)
    # one target per input (a tensor or list of length n, as captum takes them) is cut with
    # the inputs; one target for all (an int, a 0-d tensor) goes to every part
    per_row = (isinstance(target, torch.Tensor) and target.ndim > 0
               or isinstance(target, list)) and len(target) == n
    parts = []
    for s in range(0, n, int(size)):
        part = x[s:s + size].detach().requires_grad_(x.requires_grad)
        parts.append(fn(part, target[s:s + size] if per_row else target).detach())
    return torch.cat(parts)


class AttributionMethod:
    """Base adapter. Subclasses set ``name`` and ``params_class`` (a :class:`Params`
    dataclass in ``_params.py``: the settings' defaults, checks and help, from which
    ``defaults`` is derived) and implement :meth:`attribute`. A subclass without
    ``params_class`` may set ``defaults`` (unchecked) instead."""

    name: ClassVar[str] = ""
    params_class: ClassVar[type[Params] | None] = None
    defaults: ClassVar[dict[str, Any]] = {}
    # methods whose output is already one channel (no channel reduction)
    single_channel: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    #: the method runs the model on many rows per input (steps, noise samples, occlusion
    #: windows); ``attribute(..., rows=R)`` bounds the rows of one forward/backward pass
    expands: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        pc = cls.__dict__.get("params_class")
        if pc is not None:
            cls.defaults = {f.name: pc.field_default(f.name) for f in dataclasses.fields(pc)}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise AnalysisError(
                f"unknown parameter(s) {', '.join(unknown)} for method {self.name!r}; "
                f"valid: {', '.join(sorted(self.defaults)) or '(none)'}"
            )
        if self.params_class is None:
            self.params: dict[str, Any] = {**self.defaults, **params}
        else:
            try:
                checked = self.params_class(**params)
            except ParamsError as exc:
                raise ParamsError(f"{self.name}: {exc}{self._fix(exc.field)}",
                                  exc.field) from None
            self.params = {f.name: getattr(checked, f.name)
                           for f in dataclasses.fields(checked)}
        self.validate()

    def _fix(self, name: str) -> str:
        """``"; --flag (name=): help (default ...)"``: how to set field ``name`` right."""
        if self.params_class is None or name not in self.defaults:
            return ""
        meta = self.params_class.field_info(name).metadata
        how = (f"--{name.replace('_', '-')} ({name}=)" if meta.get("cli", True)
               else f"{name}=")
        return f"; {how}: {meta['help']} (default {self.defaults[name]!r})"

    def validate(self) -> None:  # pragma: no cover - overridden where needed
        """Checks beyond the Params fields (raise :class:`ParamsError` naming the setting)."""

    #: whether :meth:`check_model` / :meth:`check_input` use the model (Attribution.check
    #: then prepares its private copy of it); False: the input shape alone
    check_runs_model: ClassVar[bool] = False

    def check_model(self, model: nn.Module) -> None:
        """Raise AnalysisError when the model cannot serve this method (e.g. missing layer)."""

    def check_input(self, model: nn.Module, input_shape: tuple[int, ...], device: Any,
                    arch: str | None = None) -> None:
        """Raise :class:`ParamsError` when a setting cannot work on inputs of
        ``input_shape`` (C, H, W) with the prepared ``model`` (e.g. a Grad-CAM layer without
        spatial maps, an occlusion window larger than the image), before anything is
        attributed or written. ``arch``: the model's architecture, for the message."""

    def attribute(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, seed: int = 0,
        rows: int | None = None,
    ) -> torch.Tensor:
        """Attribution of ``target`` (N,) for inputs ``x`` (N, C, H, W) -> (N, C', H, W).

        ``rows``: most model rows per forward/backward pass for methods that expand inputs
        (:attr:`expands`), below the number of inputs too (the batch is then attributed in
        parts of at most ``rows`` inputs); None runs captum's default (everything at once).
        A method's own explicit setting (``internal_batch_size``, ``nt_samples_batch_size``,
        ``perturbations_per_eval``) wins over ``rows``.
        """
        raise NotImplementedError

    def effective_params(self, rows: int | None, n: int) -> dict[str, Any]:
        """The parameters a call on ``n`` inputs with ``rows`` actually uses (recorded)."""
        return dict(self.params)


class SaliencyMethod(AttributionMethod):
    """captum ``Saliency`` (absolute input gradient, captum's default ``abs=True``)."""

    name = "saliency"
    params_class = SaliencyParams

    def attribute(self, model, x, target, *, seed=0, rows=None):
        from captum.attr import Saliency

        return Saliency(model).attribute(x, target=target, abs=bool(self.params["abs"]))


class InputXGradientMethod(AttributionMethod):
    """captum ``InputXGradient``."""

    name = "input_x_gradient"
    params_class = InputXGradientParams

    def attribute(self, model, x, target, *, seed=0, rows=None):
        from captum.attr import InputXGradient

        return InputXGradient(model).attribute(x, target=target)


class IntegratedGradientsMethod(AttributionMethod):
    """captum ``IntegratedGradients`` with ``steps`` (n_steps), ``baseline`` (zeros|mean|blur),
    ``internal_batch_size`` (memory bound: inputs per forward pass) and ``ig_method``."""

    name = "integrated_gradients"
    params_class = IntegratedGradientsParams
    expands = True

    def effective_params(self, rows, n):
        # the bound every pass keeps: batches of more inputs are attributed in parts
        return {**self.params, "internal_batch_size": _ig_rows(self.params, rows)}

    def attribute(self, model, x, target, *, seed=0, rows=None):
        from captum.attr import IntegratedGradients

        ibs = _ig_rows(self.params, rows)

        def run(xp: torch.Tensor, tp: Any) -> torch.Tensor:
            # a part of <= ibs inputs: captum runs ibs // len(xp) (>= 1) steps of each per
            # pass, so at most ibs rows; with ibs < steps the steps of one input are split
            return IntegratedGradients(model).attribute(
                xp,
                baselines=make_baseline(xp, self.params["baseline"]),
                target=tp,
                n_steps=self.params["steps"],
                method=self.params["ig_method"],
                internal_batch_size=ibs,
            )

        return _in_parts(run, x, target, ibs)


def _ig_rows(params: dict[str, Any], rows: int | None) -> int | None:
    """Most rows per pass of integrated gradients: the explicit ``internal_batch_size``, else
    ``rows`` (None: captum's default, every step of every input in one pass). The value
    captum gets, for parts of at most that many inputs (:func:`_in_parts`)."""
    ibs = params.get("internal_batch_size") or rows
    return None if ibs is None else int(ibs)


class SmoothGradMethod(AttributionMethod):
    """captum ``NoiseTunnel`` over ``Saliency`` (``base="saliency"``) or
    ``IntegratedGradients`` (``base="integrated_gradients"``; uses ``steps``/``baseline``).

    ``stdevs`` is captum's absolute noise standard deviation in (normalised) input units.
    The noise is seeded per batch from ``(seed, batch start)`` so that resumed runs and
    re-runs are identical.
    """

    name = "smoothgrad"
    params_class = SmoothGradParams
    stochastic = True
    expands = True

    def _plan(self, rows: int | None, n: int) -> tuple[int | None, int | None, int]:
        """``(bound, noise samples per pass, inputs per part)`` for ``n`` inputs.

        The bound is the IG base's explicit ``internal_batch_size``, else ``rows`` (None: no
        bound, captum's defaults). Without an explicit ``nt_samples_batch_size`` a part holds
        at most ``R`` inputs and each pass ``R // inputs`` noisy copies of each, ``R`` the
        smaller of ``rows`` and the bound, so a pass has at most ``bound`` rows (a noisy copy
        of one input is one row, or one input of the IG base, which runs its steps within
        the bound). Where the bound held before (``R`` >= inputs) the noise per pass is the
        same as then. An explicit ``nt_samples_batch_size`` wins: parts of ``bound // it``
        inputs (at least one)."""
        explicit_ibs = (self.params["internal_batch_size"]
                        if self.params["base"] == "integrated_gradients" else None)
        bound = explicit_ibs or rows
        k = self.params["nt_samples_batch_size"]
        if bound is None:
            return None, (None if k is None else int(k)), int(n)
        bound = int(bound)
        if k is not None:
            return bound, int(k), max(1, min(int(n), bound // int(k)))
        per_pass = bound if rows is None else min(bound, int(rows))
        part = max(1, min(int(n), per_pass))
        return bound, int(min(self.params["nt_samples"], max(1, per_pass // part))), part

    def effective_params(self, rows, n):
        bound, k, part = self._plan(rows, n)
        out = {**self.params, "nt_samples_batch_size": k}
        if self.params["base"] == "integrated_gradients":
            # what captum runs: never fewer rows than the noisy inputs of one pass
            out["internal_batch_size"] = (None if bound is None
                                          else max(bound, part * (k or 1)))
        if part < n:
            # The parts draw their noise in turn from the batch's seeded stream, so the maps
            # depend on the split: recorded (only when there is one, so that runs with whole
            # batches keep their earlier settings and stored maps) so that a stored result
            # made with another split is not resumed or reused as if it were the same.
            out["images_per_part"] = int(part)
        return out

    def attribute(self, model, x, target, *, seed=0, rows=None):
        from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

        _, _, part = self._plan(rows, x.shape[0])
        # the whole batch's settings for every part (a smaller last part included), so that
        # what captum receives is what effective_params records
        p = self.effective_params(rows, x.shape[0])

        def run(xp: torch.Tensor, tp: Any) -> torch.Tensor:
            kwargs: dict[str, Any] = {}
            if p["base"] == "saliency":
                inner = Saliency(model)
            else:
                inner = IntegratedGradients(model)
                kwargs = dict(baselines=make_baseline(xp, p["baseline"]), n_steps=p["steps"],
                              internal_batch_size=p["internal_batch_size"])
            return NoiseTunnel(inner).attribute(
                xp, nt_type=p["nt_type"], nt_samples=p["nt_samples"],
                nt_samples_batch_size=p["nt_samples_batch_size"], stdevs=p["stdevs"],
                target=tp, **kwargs,
            )

        # one seeded stream for the whole batch: the parts draw their noise in turn
        with seeded_rng(seed, [x.device]):
            return _in_parts(run, x, target, part)


class GuidedBackpropMethod(AttributionMethod):
    """captum ``GuidedBackprop`` (needs ReLUs as ``nn.ReLU`` modules, as captum documents)."""

    name = "guided_backprop"
    params_class = InputXGradientParams

    def attribute(self, model, x, target, *, seed=0, rows=None):
        import warnings

        from captum.attr import GuidedBackprop

        with warnings.catch_warnings():
            # captum warns on every call that it sets (and removes) ReLU hooks.
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            return GuidedBackprop(model).attribute(x, target=target)


class GradCamMethod(AttributionMethod):
    """captum ``LayerGradCam`` on ``layer`` with ``relu_attributions=True``, upsampled to the
    input size with ``LayerAttribution.interpolate`` (``interpolate_mode``, default bilinear).

    Token layers (transformer blocks, output (N, T, D)): the leading tokens (class,
    distillation, registers: ``prefix_tokens``, default the model's ``num_prefix_tokens``)
    are dropped and the rest is reshaped to the patch grid (``grid``, default the model's
    ``patch_embed.grid_size``, else square) as a (N, D, gh, gw) map, which is what captum
    then attributes: the D features are the channels, the patches the positions. This is
    done by a view module wrapped around the layer in the private copy of the model (the
    user's model is untouched); the values flowing on are unchanged.
    """

    name = "grad_cam"
    params_class = GradCamParams
    single_channel = True
    check_runs_model = True

    def validate(self) -> None:
        if not self.params["layer"]:
            raise ParamsError(
                "grad_cam needs a layer: Attribution('grad_cam', layer='layer4') or "
                "--layer layer4 (see `interptool layers` for the names)", "layer"
            )

    def check_model(self, model: nn.Module) -> None:
        find_layer(model, self.params["layer"])

    def check_input(self, model, input_shape, device, arch=None):
        """The layer's output on one zero image must be a map: (N, C, H, W), or (N, T, D)
        tokens (reshaped to the patch grid); anything else (a classifier's (N, K), a pooled
        vector) is refused naming the layer, its output shape and layers that fit."""
        name = self.params["layer"]
        layer = find_layer(model, name)
        shapes = _output_shapes(model, {name: layer}, input_shape, device)
        if _is_map(shapes.get(name)):
            return
        # which layers fit: every module's output on the same zero image
        named = {n: m for n, m in model.named_modules() if n}
        every = _output_shapes(model, named, input_shape, device)
        # suggested: layers with more than one position (a pooled (N, C, 1, 1) map fits but
        # gives a constant map)
        fits = [n for n, shp in every.items() if _is_map(shp) and _positions(shp) > 1]
        stages = [n for n in fits if any(True for _ in named[n].children())] or fits
        depth = min((n.count(".") for n in stages), default=0)
        hint = [n for n in stages if n.count(".") == depth][-3:]
        got = (f"outputs {_shape_text(shapes[name])}, not a spatial map"
               if shapes.get(name) is not None
               else "gives no tensor output" if name in shapes
               else "is never run by the model's forward pass")
        arch_flag = f"--arch {arch}" if arch else "--arch ..."
        raise ParamsError(
            f"grad_cam layer {name!r} {got}; Grad-CAM needs a layer whose "
            "output is (N, C, H, W) (a convolutional stage) or (N, T, D) tokens (a "
            f"transformer block){', e.g. ' + ', '.join(hint) if hint else ''}; set --layer "
            f"(layer=) to one (`interptool layers {arch_flag}` lists every layer's output "
            "shape)", "layer")

    def attribute(self, model, x, target, *, seed=0, rows=None):
        from captum.attr import LayerAttribution, LayerGradCam

        # explicit settings, else what the LoadedModel says (set by Attribution.run), else
        # the timm attributes of the model itself
        loaded_prefix, loaded_grid = getattr(self, "loaded_layout", (None, None))
        prefix = self.params["prefix_tokens"]
        grid = self.params["grid"] or loaded_grid
        view = _grid_view(model, self.params["layer"],
                          loaded_prefix if prefix is None else prefix, grid)
        cam = LayerGradCam(model, view.grid).attribute(x, target=target,
                                                       relu_attributions=True)
        if cam.dim() != 4:
            raise AnalysisError(
                f"grad_cam layer {self.params['layer']!r} gives {tuple(cam.shape)} maps; it "
                "needs a convolutional (N, C, H, W) or token (N, T, D) output. Pick a conv "
                "stage such as layer4 or a transformer block such as blocks.11."
            )
        if view.saw_tokens and not bool(cam.detach().abs().amax() > 0):
            # A ViT whose head reads the class (or distillation) token: the last block's patch
            # tokens never reach the output, so their gradient, and every map, is exactly 0.
            raise AnalysisError(
                f"grad_cam layer {self.params['layer']!r}: every map of the batch is zero: "
                "this block's patch tokens do not reach the model's output (its head reads "
                "the class/distillation token after this block). Pick an earlier block, e.g. "
                "the one before it, or set attribution_layer to it")
        return LayerAttribution.interpolate(
            cam, tuple(x.shape[-2:]), interpolate_mode=self.params["interpolate_mode"]
        )


class _Grid(nn.Module):
    """Identity: the module captum hooks, seeing the layer's output as (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _GridView(nn.Module):
    """Wraps a layer of the private model copy so that its output passes through ``grid``
    as a (N, C, H, W) map: conv outputs as they are; token outputs (N, T, D) without their
    ``prefix`` leading tokens, reshaped to (N, D, gh, gw) and back (values unchanged)."""

    def __init__(self, layer: nn.Module, name: str, prefix: int | None,
                 grid: tuple[int, int] | None) -> None:
        super().__init__()
        self.layer, self.name, self.prefix, self.grid_size = layer, name, prefix, grid
        self.grid = _Grid()
        self.saw_tokens = False  # set once a token (N, T, D) output passed through

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.layer(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.dim() != 3:
            return self.grid(out) if isinstance(out, torch.Tensor) and out.dim() == 4 else out
        self.saw_tokens = True
        n, t, d = out.shape
        p, (gh, gw) = self._layout(t)
        g = self.grid(out[:, p:].transpose(1, 2).reshape(n, d, gh, gw))
        return torch.cat([out[:, :p], g.reshape(n, d, gh * gw).transpose(1, 2)], dim=1)

    def _layout(self, t: int) -> tuple[int, tuple[int, int]]:
        if self.prefix is not None and self.grid_size is not None:
            p, (gh, gw) = self.prefix, self.grid_size
        elif self.prefix is not None:
            p = self.prefix
            side = math.isqrt(max(t - p, 0))
            gh = gw = side
        else:  # no recorded count: the only p <= 8 leaving a square grid (else refuse)
            fits = [q for q in range(min(t, 9)) if math.isqrt(t - q) ** 2 == t - q]
            if self.grid_size is not None:
                fits = [q for q in range(min(t, 9)) if t - q == self.grid_size[0] * self.grid_size[1]]
            if len(fits) != 1:
                raise AnalysisError(
                    f"grad_cam layer {self.name!r}: {t} tokens; cannot tell how many are "
                    "leading (class / distillation / register) tokens. Pass "
                    "prefix_tokens=... (and grid=(h, w) for a non-square grid)")
            p = fits[0]
            if self.grid_size is not None:
                gh, gw = self.grid_size
            else:
                gh = gw = math.isqrt(t - p)
        if gh * gw != t - p:
            raise AnalysisError(
                f"grad_cam layer {self.name!r}: {t} tokens with {p} leading ones leave "
                f"{t - p} patch tokens, which do not fill a {gh} x {gw} grid; pass "
                "prefix_tokens=... and grid=(h, w)")
        return p, (gh, gw)


def _grid_view(model: nn.Module, name: str, prefix: int | None,
               grid: tuple[int, int] | None) -> _GridView:
    """The :class:`_GridView` around layer ``name`` of the (private) ``model``, installed on
    first use. Leading tokens / grid default to timm's ``num_prefix_tokens`` and
    ``patch_embed.grid_size`` of the model."""
    layer = find_layer(model, name)
    if isinstance(layer, _GridView):
        return layer
    if prefix is None:
        prefix = getattr(model, "num_prefix_tokens", None)
        prefix = int(prefix) if isinstance(prefix, int) else None
    if grid is None:
        size = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2:
            grid = (int(size[0]), int(size[1]))
    view = _GridView(layer, name, prefix, grid)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, view)
    return view


class OcclusionMethod(AttributionMethod):
    """captum ``Occlusion`` with a square ``window`` and ``stride`` (pixels, all channels
    occluded together), occluding with ``baseline`` (zeros|mean|blur);
    ``perturbations_per_eval`` (windows per forward pass; default: as many as ``rows``
    allows) bounds memory."""

    name = "occlusion"
    params_class = OcclusionParams
    expands = True

    def check_input(self, model, input_shape, device, arch=None):
        """captum's rules, checked before anything runs: the window fits in the image, and
        the stride is at most the window along each side (captum asserts it; pixels between
        windows would never be occluded)."""
        h, w = int(input_shape[-2]), int(input_shape[-1])
        window = _pair(self.params["window"], "window")
        stride = _pair(self.params["stride"], "stride")
        if window[0] > h or window[1] > w:
            raise ParamsError(
                f"occlusion: window: expected at most the input size {h}x{w} px, got "
                f"{self.params['window']!r}; use a smaller --window (window=)", "window")
        for win, step in zip(window, stride):
            if step > win:
                raise ParamsError(
                    f"occlusion: stride: expected at most the window "
                    f"({self.params['window']!r} px; else "
                    f"pixels between windows are never occluded), got "
                    f"{self.params['stride']!r}; use --stride <= --window (stride=)", "stride")

    def _plan(self, rows: int | None, n: int) -> tuple[int, int]:
        """``(windows per pass, inputs per part)`` for ``n`` inputs: parts of at most
        ``rows`` inputs, each pass ``rows // inputs`` occluded copies of each (at most
        ``rows`` rows). An explicit ``perturbations_per_eval`` wins: parts of
        ``rows // it`` inputs (at least one). No ``rows``: captum's 16 windows per pass on
        the whole batch, as before."""
        ppe = self.params["perturbations_per_eval"]
        if rows is None:
            return (16 if ppe is None else int(ppe)), int(n)
        if ppe is not None:
            return int(ppe), max(1, min(int(n), int(rows) // int(ppe)))
        part = max(1, min(int(n), int(rows)))
        return max(1, int(rows) // part), part

    def _per_eval(self, rows: int | None, n: int) -> int:
        return self._plan(rows, n)[0]

    def effective_params(self, rows, n):
        return {**self.params, "perturbations_per_eval": self._per_eval(rows, n)}

    def attribute(self, model, x, target, *, seed=0, rows=None):
        from captum.attr import Occlusion

        c = x.shape[1]
        wh, ww = _pair(self.params["window"], "window")
        sh, sw = _pair(self.params["stride"], "stride")
        if wh > x.shape[2] or ww > x.shape[3]:
            raise AnalysisError(
                f"occlusion window {(wh, ww)} is larger than the input {tuple(x.shape[2:])}; "
                "use a smaller --window"
            )
        per_eval, part = self._plan(rows, x.shape[0])

        def run(xp: torch.Tensor, tp: Any) -> torch.Tensor:
            return Occlusion(model).attribute(
                xp,
                sliding_window_shapes=(c, wh, ww),
                strides=(c, sh, sw),
                baselines=make_baseline(xp, self.params["baseline"]),
                target=tp,
                perturbations_per_eval=per_eval,
            )

        return _in_parts(run, x, target, part)


def _output_shapes(model: nn.Module, modules: dict[str, nn.Module],
                   input_shape: tuple[int, ...], device: Any) -> dict[str, tuple | None]:
    """The output shape of each of ``modules`` (name -> module of ``model``) on one zero image
    of ``input_shape``, in the order they finish (None: not a tensor); modules the forward pass
    never runs are absent. Hooks are removed before returning."""
    shapes: dict[str, tuple | None] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if name not in shapes:
                shapes[name] = (tuple(output.shape) if isinstance(output, torch.Tensor)
                                else None)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
    return shapes


def _is_map(shape: tuple | None) -> bool:
    """A (N, C, H, W) map or (N, T, D) tokens: what Grad-CAM can attribute."""
    return shape is not None and len(shape) in (3, 4)


def _positions(shape: tuple) -> int:
    """Spatial positions of a map: H * W of (N, C, H, W), T of (N, T, D) tokens."""
    return math.prod(shape[2:]) if len(shape) == 4 else int(shape[1])


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join(["N", *map(str, shape[1:])]) + ")"


METHODS: dict[str, type[AttributionMethod]] = {
    cls.name: cls
    for cls in (SaliencyMethod, InputXGradientMethod, IntegratedGradientsMethod,
                SmoothGradMethod, GuidedBackpropMethod, GradCamMethod, OcclusionMethod)
}


def get_method(name: str, params: dict[str, Any]) -> AttributionMethod:
    """Instantiate the adapter for ``name``; AnalysisError listing the valid names."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise AnalysisError(
            f"unknown attribution method {name!r}.{hint} Valid methods: "
            f"{', '.join(METHODS)}"
        )
    return METHODS[name](**params)


def batch_seed(seed: int, start: int) -> int:
    """Seed for the batch starting at row ``start`` (independent of how the run was split)."""
    return int(np.random.SeedSequence([int(seed), int(start)]).generate_state(1)[0])
