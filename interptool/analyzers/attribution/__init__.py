"""Attribution maps through captum, and their agreement, localisation and faithfulness scores.

``run(model, data, params, name=...)`` (or ``Attribution(method, ...).run(...)``) returns an
:class:`AttributionResult`; :class:`AttributionParams` holds the shared settings.
"""

from interptool.analyzers._lazy import lazy_exports
from interptool.analyzers.attribution._params import (
    ATTRIBUTION_METHODS,
    METHOD_PARAMS,
    AttributionOptions,
    AttributionParams,
    ScoringParams,
)

Params = AttributionParams
__getattr__, __dir__ = lazy_exports(__name__, {
    **{n: "._analyzer" for n in (
        "METHODS", "AgreementResult", "Attribution", "AttributionResult", "FaithfulnessResult",
        "H5Maps", "LocalisationResult", "RandomisationResult", "agreement",
        "class_object_masks", "faithfulness", "folder_masks", "hook_count", "localisation",
        "randomisation_check", "resize_masks", "stratified_sample")},
    "run": "._entry", "attribution_for": "._entry", "get_method": "._methods",
    "ObjectMasks": "._scoring", "display_images": "._scoring", "score_maps": "._scoring",
    "faithfulness_batch": "._scoring"})

__all__ = ["ATTRIBUTION_METHODS", "METHOD_PARAMS", "ScoringParams", "AgreementResult", "Attribution", "AttributionOptions",
           "AttributionParams", "AttributionResult", "FaithfulnessResult", "H5Maps", "METHODS",
           "LocalisationResult", "Params", "RandomisationResult", "agreement",
           "class_object_masks", "faithfulness", "folder_masks", "hook_count", "localisation",
           "randomisation_check", "resize_masks", "run", "attribution_for", "get_method",
           "ObjectMasks", "display_images", "faithfulness_batch", "score_maps", "stratified_sample"]
