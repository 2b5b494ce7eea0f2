"""Layer listing: dotted module names and output shapes from one forward pass on zeros."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from interptool.errors import CheckpointError


def _forward_error(loaded, size: tuple[int, ...], exc: Exception) -> CheckpointError:
    """A forward pass on zeros failed: almost always an input size or channel count that the
    architecture does not accept (e.g. a ViT built for 224 px given --image-size 100)."""
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else ""
    arch = getattr(loaded, "arch", type(loaded).__name__)
    return CheckpointError(
        f"model {arch} failed on a zero input of shape {(1, *size)} ({type(exc).__name__}: "
        f"{first}); check --image-size (some architectures, e.g. ViTs, accept only their "
        f"native size) and the number of --mean/--std values (input channels)"
    )


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        for o in out.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _example_size(loaded, example_size: Sequence[int] | None) -> tuple[int, ...]:
    if example_size is None:
        if not hasattr(loaded, "preprocessing"):
            raise TypeError("list_layers on a bare nn.Module needs example_size=(C, H, W)")
        return tuple(loaded.preprocessing.input_size)
    size = tuple(int(v) for v in example_size)
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) == 2:
        c = loaded.preprocessing.input_size[0] if hasattr(loaded, "preprocessing") else 3
        size = (c, *size)
    return size


def layer_table(
    loaded, example_size: Sequence[int] | None = None
) -> list[tuple[str, str, tuple[int, ...] | None]]:
    """``(name, module type, output shape without batch dim)`` for every named sub-module.

    Modules that never ran in the forward pass are left out. TorchScript modules cannot be
    hooked: their sub-modules are listed with shape ``None`` and only the model output
    (name ``""``) has a shape.

    Raises:
        CheckpointError: the forward pass on zeros fails (input size or channels that the
            architecture does not accept); the hooks are removed first.
    """
    model: nn.Module = loaded.model if hasattr(loaded, "model") else loaded
    size = _example_size(loaded, example_size)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device(getattr(loaded, "device", "cpu"))
    x = torch.zeros((1, *size), device=device)
    modules = [(n, m) for n, m in model.named_modules() if n]
    shapes: dict[str, tuple[int, ...] | None] = {}
    if isinstance(model, torch.jit.ScriptModule):
        try:
            with torch.no_grad():
                out = _first_tensor(model(x))
        except Exception as exc:  # noqa: BLE001 - TorchScript raises its own error types
            raise _forward_error(loaded, size, exc) from exc
        rows = [("", type(model).__name__, tuple(out.shape[1:]) if out is not None else None)]
        rows += [(n, getattr(m, "original_name", type(m).__name__), None) for n, m in modules]
        return rows

    def make_hook(name: str):
        def hook(_mod, _inp, out):
            # record the first call: a module reused within a block (torchvision's ReLU)
            # produces the same shape each time anyway.
            if name not in shapes:
                t = _first_tensor(out)
                shapes[name] = tuple(t.shape[1:]) if t is not None else None

        return hook

    handles = []
    was_training = model.training
    try:
        for name, mod in modules:
            handles.append(mod.register_forward_hook(make_hook(name)))
        model.eval()
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError, AssertionError, TypeError, IndexError) as exc:
        # the user's size / channel flags, not a bug of ours: say so without a traceback
        raise _forward_error(loaded, size, exc) from exc
    finally:
        # hooks must never outlive this call, even when the forward pass raises.
        for h in handles:
            h.remove()
        model.train(was_training)
    return [(n, type(m).__name__, shapes[n]) for n, m in modules if n in shapes]


def list_layers(
    loaded, example_size: Sequence[int] | None = None
) -> list[tuple[str, tuple[int, ...] | None]]:
    """Dotted module names and output shapes (batch dimension dropped).

    Args:
        loaded: a :class:`~interptool.loading.LoadedModel` (or a bare ``nn.Module`` with
            ``example_size`` given).
        example_size: ``(C, H, W)`` or ``(H, W)`` of the zero input; default: the model's
            preprocessing input size.

    Returns:
        ``[(name, shape), ...]`` in module registration order, e.g. ``("layer4", (512, 7, 7))``
        for torchvision's resnet18 at 224 px. Modules that did not run are left out.
    """
    return [(n, s) for n, _t, s in layer_table(loaded, example_size)]
