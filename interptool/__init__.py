"""interptool: how interpretable is a classifier, and how does a distilled student compare?

Pipeline: loading -> data -> cache -> analyzers -> report -> pipeline -> cli (see
docs/architecture.md; the pipeline runs the analyzers and calls the report to render).
The most used names are available from the top level::

    import interptool as it
    loaded = it.load_model("timm:resnet18", "student.pth")
    probe = it.open_dataset("builtin:concept-world?version=2&n=500&size=64")
    it.cache_activations(loaded, probe, ["layer4"], "student_probe.h5")
    res = it.Dissection(iou_threshold=0.05).run("student_probe.h5", "layer4", probe)

They are imported lazily, so ``import interptool`` (and the CLI's start-up) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_model": "interptool.loading",
    "list_layers": "interptool.loading",
    "LoadedModel": "interptool.loading",
    "open_dataset": "interptool.data",
    "make_concept_world": "interptool.data",
    "cache_activations": "interptool.cache",
    "ActivationCache": "interptool.cache",
    "write_cache": "interptool.cache",
    "Dissection": "interptool.analyzers",
    "ClassSimilarity": "interptool.analyzers",
    "compare_similarity": "interptool.analyzers",
    "cka": "interptool.analyzers",
    "Attribution": "interptool.analyzers",
    "agreement": "interptool.analyzers",
    "localisation": "interptool.analyzers",
    "faithfulness": "interptool.analyzers",
    "randomisation_check": "interptool.analyzers",
    "run_compare": "interptool.pipeline",
    "run_demo": "interptool.pipeline",
    "InterptoolError": "interptool.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'interptool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
