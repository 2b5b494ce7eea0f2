"""Layer look-up by dotted module name, with the same "close names" help everywhere.

Used by the cache (hooks), attribution (Grad-CAM layers, randomisation) and the compare
config checks. Works on anything with ``named_modules()``; torch is not imported here.
"""

from __future__ import annotations

import difflib
from typing import Any

from interptool.errors import AnalysisError, InterptoolError

__all__ = ["layer_hint", "lookup_layer", "module_names"]


def module_names(model: Any) -> list[str]:
    """Dotted names of every sub-module (the root itself, named "", left out)."""
    return [n for n, _ in model.named_modules() if n]


def layer_hint(name: str, names: list[str]) -> str:
    """`` (did you mean a, b?)``, or the top-level modules when no name is close."""
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if close:
        return f" (did you mean {', '.join(close)}?)"
    top = [n for n in names if "." not in n]
    return f" (top-level modules: {', '.join(top[:20])})"


def lookup_layer(model: Any, name: str, *, error: type[InterptoolError] = AnalysisError,
                 where: str = "") -> Any:
    """The sub-module of ``model`` called ``name`` (dotted path); ``error`` naming close names
    otherwise. ``where`` prefixes the message (e.g. ``"c.toml: models.kd.layers: "``)."""
    modules = dict(model.named_modules())
    modules.pop("", None)  # the root itself is "the model", whose output is the logits
    if isinstance(name, str) and name in modules:
        return modules[name]
    raise error(
        f"{where}{name!r} not found: no module of {type(model).__name__} has this name"
        f"{layer_hint(str(name), list(modules))}; use dotted names such as layer4 or "
        "layer4.1.conv2 (`interptool layers --arch ...` lists them all)")
