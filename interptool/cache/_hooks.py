"""Forward hooks that capture the outputs of named sub-modules, removed reliably.

A hooked output is copied inside the hook: a module such as ``ReLU(inplace=True)`` that runs
after the hooked module would otherwise rewrite the very tensor we kept (captum issue 156).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from interptool.common.layers import lookup_layer
from interptool.errors import CacheError

# Called as ``fn(layer_name, output_tensor)`` inside the hook; must return something that no
# longer aliases ``output_tensor`` (a copy, or values derived from it).
CaptureFn = Callable[[str, torch.Tensor], Any]


def _default_copy(name: str, out: torch.Tensor) -> torch.Tensor:
    return out.detach().clone()


def _first_tensor(name: str, out: Any) -> torch.Tensor:
    """The tensor a module returned (the first one if it returned a tuple/list)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise CacheError(
        f"layer {name!r} returned {type(out).__name__}, not a tensor; choose a layer whose "
        "output is a (N, C, H, W) or (N, T, D) tensor (see `interptool layers`)"
    )


def is_torchscript(model: nn.Module) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Map dotted layer names to sub-modules; ``CacheError`` naming close matches if absent."""
    if not layers:
        return {}
    if is_torchscript(model):
        raise CacheError(
            f"cannot hook layers {', '.join(layers)} of a TorchScript model (its graph runs "
            "without Python hooks); cache logits only by omitting --layers, or load the "
            "architecture (timm:/torchvision:/interptool:NAME) with --checkpoint instead"
        )
    found: dict[str, nn.Module] = {}
    for name in layers:
        if not isinstance(name, str) or not name:
            raise CacheError(f"layer names must be non-empty strings, got {name!r}")
        if name in found:
            raise CacheError(f"layer {name!r} is listed twice; list each layer once")
        found[name] = lookup_layer(model, name, error=CacheError)
    return found


@contextmanager
def capture_layers(
    model: nn.Module, layers: Sequence[str], fn: CaptureFn | None = None
) -> Iterator[dict[str, Any]]:
    """Capture the outputs of ``layers`` (dotted module names, any depth) during forward passes.

    Yields a dict that each forward pass fills with ``layer -> fn(layer, output)``; by default
    ``fn`` returns ``output.detach().clone()``, so later in-place operations of the model
    cannot change what was captured. The hooks are removed when the ``with`` block exits,
    also when it exits with an exception.

    Example::

        with capture_layers(model, ["layer3", "layer4.1"]) as acts:
            logits = model(x)
        acts["layer4.1"].shape  # (N, C, H, W)

    Raises:
        CacheError: a layer name is not a module of ``model`` (the message lists close
            names), or ``model`` is a TorchScript module (no Python hooks run in it).
    """
    modules = resolve_layers(model, list(layers))
    copy = fn or _default_copy
    captured: dict[str, Any] = {}
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            captured[name] = copy(name, _first_tensor(name, output))

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for h in handles:
            h.remove()
