"""Compare models and write the report: config, ``run_compare``, ``render_html``, ``run_demo``.

``interptool compare CONFIG --out DIR`` and ``interptool demo --out DIR`` are thin wrappers
around :func:`run_compare` and :func:`run_demo`.
"""

from __future__ import annotations

from interptool.report._config import (
    AnalysisConfig,
    AttributionConfig,
    CompareConfig,
    DataConfig,
    DissectionConfig,
    ModelConfig,
    RunConfig,
    SimilarityConfig,
    load_config,
    parse_config,
    write_template,
)
from interptool.report._html import render_html

__all__ = [
    "AnalysisConfig",
    "AttributionConfig",
    "CompareConfig",
    "DataConfig",
    "DissectionConfig",
    "ModelConfig",
    "RunConfig",
    "SimilarityConfig",
    "load_config",
    "parse_config",
    "render_html",
    "run_compare",
    "run_demo",
    "write_template",
]


def __getattr__(name: str):
    # run_compare/run_demo import torch and every analyzer: load them only when used, so
    # `interptool compare --init` and config validation stay instant.
    if name == "run_compare":
        from interptool.report._compare import run_compare

        return run_compare
    if name == "run_demo":
        from interptool.report._demo import run_demo

        return run_demo
    raise AttributeError(f"module 'interptool.report' has no attribute {name!r}")
