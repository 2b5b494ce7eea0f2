"""Render a comparison: ``report.html`` (self-contained), its figures and sections.

The report only renders what the pipeline (:mod:`interptool.pipeline`) computed; it never
imports the pipeline. :func:`render_html` turns a ``summary.json``-shaped dict into the page.
"""

from __future__ import annotations

from interptool.report._html import render_html

__all__ = ["render_html"]
