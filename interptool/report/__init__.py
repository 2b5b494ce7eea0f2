"""Render a comparison: ``report.html`` (self-contained), its figures and sections.

The report only renders what the pipeline (:mod:`interptool.pipeline`) computed; it never
imports the pipeline. :func:`render_html` turns a ``summary.json``-shaped dict into the page;
the section builders turn a stage's stored payload into its tables and figures;
``interptool.report.figures`` holds the figure functions and :class:`FigureSet`.
Everything but :func:`render_html` resolves lazily (matplotlib loads only when drawing).
"""

from __future__ import annotations

import importlib
from typing import Any

from interptool.report._html import render_html, report_sections

_LAZY = {
    "FigureSet": "interptool.report._figures",
    "attribution_section": "interptool.report._sections",
    "dissection_section": "interptool.report._sections",
    "generic_section": "interptool.report._sections",
    "similarity_section": "interptool.report._sections",
    "detector_fraction_panel": "interptool.report._panels",
    "mechanism_scatter": "interptool.report._panels",
}

__all__ = ["figures", "render_html", "report_sections", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name == "figures":  # the figure functions, as a module
        return importlib.import_module("interptool.report._figures")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'interptool.report' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
