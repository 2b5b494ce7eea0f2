"""Attribution maps through captum, and their agreement, localisation and faithfulness scores."""

from interptool.analyzers.attribution._analyzer import (
    METHODS,
    AgreementResult,
    Attribution,
    AttributionResult,
    FaithfulnessResult,
    H5Maps,
    LocalisationResult,
    RandomisationResult,
    agreement,
    class_object_masks,
    faithfulness,
    folder_masks,
    hook_count,
    localisation,
    randomisation_check,
    resize_masks,
)

__all__ = [
    "Attribution",
    "AttributionResult",
    "METHODS",
    "agreement",
    "AgreementResult",
    "localisation",
    "LocalisationResult",
    "class_object_masks",
    "resize_masks",
    "folder_masks",
    "faithfulness",
    "FaithfulnessResult",
    "randomisation_check",
    "RandomisationResult",
    "hook_count",
    "H5Maps",
]
