"""Compare models: the ``compare`` config, the stages that run every analyzer (resumably),
the findings, and the demo. Rendering is :mod:`interptool.report`'s job.

``interptool compare CONFIG --out DIR`` and ``interptool demo --out DIR`` are thin wrappers
around :func:`run_compare` and :func:`run_demo`.
"""

from __future__ import annotations

from typing import Any

from interptool.pipeline._config import (
    AnalysisConfig,
    AttributionConfig,
    CompareConfig,
    DataConfig,
    DissectionConfig,
    ModelConfig,
    RunConfig,
    SimilarityConfig,
    analysis_names,
    load_config,
    parse_config,
    write_template,
)

__all__ = [
    "AnalysisConfig",
    "AttributionConfig",
    "CompareConfig",
    "DataConfig",
    "DissectionConfig",
    "ModelConfig",
    "RunConfig",
    "SimilarityConfig",
    "analysis_names",
    "load_config",
    "paper_summary_line",
    "parse_config",
    "run_compare",
    "run_demo",
    "write_template",
]


def __getattr__(name: str) -> Any:
    # run_compare/run_demo import numpy, the report and (when run) torch and every analyzer:
    # load them only when used, so `interptool compare --init` and validation stay instant.
    if name == "run_compare":
        from interptool.pipeline._runner import run_compare

        return run_compare
    if name == "run_demo":
        from interptool.pipeline._demo import run_demo

        return run_demo
    if name == "paper_summary_line":
        from interptool.pipeline._verdicts import paper_summary_line

        return paper_summary_line
    raise AttributeError(f"module 'interptool.pipeline' has no attribute {name!r}")
