"""Every analysis's settings checked against every model before any caching starts.

Run right after the models load (cheap) and before the first image is cached (hours):

* a TorchScript model has no hookable layers: it may take part in the logits-only analyses
  (accuracy, class similarity; CKA leaves it out and says so); dissection and Grad-CAM need
  layers, and the error names the config field and the way out (``analysis.<name> = false``
  or ``--only similarity``);
* every dissected layer exists in every model (``analysis.dissection.layers``);
* attribution maps are compared pixel by pixel, so every model must take the same input size;
* the Grad-CAM layer of each model (``models.NAME.attribution_layer``, else
  ``analysis.attribution.layer``, else the model's last listed layer) exists and Grad-CAM
  really runs on it: one image-sized zero input through the attribution method itself, so a
  token layer is accepted exactly when the method supports it and refused with its own reason.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from interptool.errors import ConfigError, InterptoolError
from interptool.pipeline._context import RunContext

__all__ = ["gradcam_layer", "is_torchscript", "validate_analyses"]


def is_torchscript(loaded: Any) -> bool:
    """True for a model loaded from a TorchScript file (no hookable sub-modules)."""
    import torch

    return isinstance(getattr(loaded, "model", loaded), torch.jit.ScriptModule)


def gradcam_layer(run: RunContext, name: str) -> tuple[str | None, str]:
    """``(layer, field)``: the Grad-CAM layer of model ``name`` and the config field it came
    from (for messages); ``(None, field)`` when none is set and the model lists no layers."""
    m = run.cfg.models[name]
    a = run.cfg.analysis.attribution
    if getattr(m, "attribution_layer", None):
        return m.attribution_layer, f"models.{name}.attribution_layer"
    if a is not None and getattr(a, "layer", None):
        return a.layer, "analysis.attribution.layer"
    if m.layers:
        return m.layers[-1], f"models.{name}.layers (last)"
    return None, f"models.{name}.attribution_layer"


def _missing(source: str, fld: str, layer: str, modules: list[str], arch: str) -> ConfigError:
    close = difflib.get_close_matches(layer, modules, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"{source}: {fld}: {layer!r} is not a module of {arch}{hint}; "
                       f"`interptool layers --arch {arch}` lists them")


def _try_gradcam(run: RunContext, name: str, layer: str) -> None:
    """Grad-CAM on one zero image of the model's input size (raises what the method raises)."""
    import torch

    from interptool.analyzers.attribution import Attribution

    lm = run.loaded[name]
    x = torch.zeros((1, *lm.preprocessing.input_size))
    Attribution("grad_cam", layer=layer).run(lm, x, n=1, batch_size=1, target=0,
                                             device=run.device)


def validate_analyses(run: RunContext) -> None:
    """Raise a :class:`ConfigError` naming the config field for the first setting that cannot
    work with some model (module docstring). Called after loading, before any caching."""
    cfg = run.cfg
    src = cfg.source
    an = cfg.analysis
    d, a = an.dissection, an.attribution
    if a is not None and len(cfg.models) > 1:
        sizes = {n: tuple(run.loaded[n].preprocessing.input_size[1:]) for n in cfg.models}
        if len(set(sizes.values())) > 1:
            first = next(iter(sizes))
            other = next(n for n in sizes if sizes[n] != sizes[first])
            h, w = sizes[first]
            raise ConfigError(
                f"{src}: models.{other}.image_size: attribution compares maps pixel by pixel "
                f"across models, but {other} takes {sizes[other][0]}x{sizes[other][1]} "
                f"images and {first} {h}x{w}; set image_size = [{h}, {w}] for {other} (or "
                "the same size for every model), or set analysis.attribution = false")
    for name, m in cfg.models.items():
        lm = run.loaded[name]
        if is_torchscript(lm):
            why = []
            if d is not None:
                why.append(("dissection", "analysis.dissection = false"))
            if a is not None and "grad_cam" in a.methods:
                why.append(("Grad-CAM", "drop grad_cam from analysis.attribution.methods"))
            if why:
                what, fix = why[0]
                raise ConfigError(
                    f"{src}: models.{name}: {Path(m.arch).name} is a TorchScript model, which "
                    f"has no hookable layers, and {what} needs them; set {fix} (or run "
                    f"`interptool compare {src} --only similarity`): TorchScript models take "
                    "part in accuracy and class similarity, which need only logits")
            continue
        modules = [k for k, _ in lm.model.named_modules() if k]
        if d is not None:
            for layer in run.dissect_layers(name):
                if layer not in modules:
                    fld = ("analysis.dissection.layers" if getattr(d, "layers", None)
                           else f"models.{name}.layers")
                    raise _missing(src, fld, layer, modules, m.arch)
        if a is not None and "grad_cam" in a.methods:
            layer, fld = gradcam_layer(run, name)
            if layer is None:
                raise ConfigError(
                    f"{src}: {fld}: missing; Grad-CAM needs a layer of {name} (e.g. its last "
                    "convolutional stage), or drop grad_cam from analysis.attribution.methods")
            if layer not in modules:
                raise _missing(src, fld, layer, modules, m.arch)
            try:
                _try_gradcam(run, name, layer)
            except Exception as exc:  # noqa: BLE001 - any failure of the dry run is the answer
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                if not isinstance(exc, InterptoolError):
                    why = f"{type(exc).__name__}: {why}"
                raise ConfigError(
                    f"{src}: {fld}: Grad-CAM cannot use {layer!r} of {name}: {why} (set "
                    f"models.{name}.attribution_layer to a usable layer)") from None
