"""Loading models: architecture + weight file -> eval-mode model with its preprocessing.

Public face of the loading stage (see docs/architecture.md "Loading" and docs/loading.md)::

    from interptool.loading import load_model, list_layers
    loaded = load_model("timm:resnet18", "student.pth")       # num_classes inferred
    loaded.preprocessing.eval_transform()                      # PIL image -> tensor
    list_layers(loaded)                                        # [("layer4", (512, 7, 7)), ...]
"""

from __future__ import annotations

from interptool.loading._builder import check_model_kwargs
from interptool.loading._checkpoint import read_state_dict
from interptool.loading._layers import layer_table, list_layers
from interptool.loading._model import LoadedModel, LoadReport, load_model
from interptool.loading._preprocess import (
    ImagePixels,
    Preprocessing,
    ToNormalizedChannelsLast,
    split_normalization,
)

__all__ = [
    "ImagePixels",
    "LoadReport",
    "LoadedModel",
    "Preprocessing",
    "ToNormalizedChannelsLast",
    "check_model_kwargs",
    "layer_table",
    "list_layers",
    "load_model",
    "read_state_dict",
    "split_normalization",
]
