"""Data sets: image folders, CSV lists, Broden segmentation sets and the built-in concept-world.

Public face (see docs/architecture.md "Data" and docs/data.md)::

    open_dataset(spec) -> ImageDataset
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
    read_mask_png,
    write_mask_png,
)
from interptool.data._check import CheckReport, check_dataset, list_manifests, load_manifest
from interptool.data._concept_world import make_concept_world
from interptool.data._folder import CsvDataset, ImageFolderDataset
from interptool.data._spec import open_dataset

__all__ = [
    "open_dataset",
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
    "read_mask_png",
    "write_mask_png",
]
