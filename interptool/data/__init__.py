"""Data sets: image folders, CSV lists, Broden segmentation sets and the built-in concept-world.

Public face (see docs/architecture.md "Data" and docs/data.md)::

    open_dataset(spec) -> ImageDataset
    canonical_spec(spec), recorded_spec(spec)   (concept-world version written out)
    ImageDataset, BrodenDataset, Segmentation
    make_concept_world(root, n, size, seed, split) -> Path
    check_dataset(name, path) -> CheckReport
"""

from __future__ import annotations

from interptool.data._base import ImageDataset, TorchImageDataset, collate_skip_bad
from interptool.data._broden import (
    BrodenDataset,
    Segmentation,
    decode_mask,
    encode_mask,
    read_mask_labels,
    read_mask_png,
    write_mask_png,
)
from interptool.data._check import CheckReport, check_dataset, list_manifests, load_manifest
from interptool.data._concept_world import make_concept_world
from interptool.data._folder import CsvDataset, ImageFolderDataset
from interptool.data._spec import canonical_spec, open_dataset, recorded_spec

__all__ = [
    "open_dataset",
    "canonical_spec",
    "recorded_spec",
    "ImageDataset",
    "BrodenDataset",
    "Segmentation",
    "make_concept_world",
    "check_dataset",
    "CheckReport",
    "list_manifests",
    "load_manifest",
    "ImageFolderDataset",
    "CsvDataset",
    "TorchImageDataset",
    "collate_skip_bad",
    "decode_mask",
    "encode_mask",
    "read_mask_labels",
    "read_mask_png",
    "write_mask_png",
]
