"""The HTML renderer on a synthetic summary: self-contained, every section and number present."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from interptool.errors import InterptoolError
from interptool.report import _figures as figs
from interptool.report import render_html


def synthetic_summary(tmp_path):
    """A summary.json-shaped dict with two figures written as PNG files under tmp_path."""
    counts = {
        "teacher": {"layer4": {"total": {"detectors": 40, "unique": 12},
                               "object": {"detectors": 30, "unique": 8}}},
        "kd": {"layer4": {"total": {"detectors": 35, "unique": 10},
                          "object": {"detectors": 20, "unique": 6}}},
    }
    figs.save_png(figs.detector_bars(counts, ["object"]), tmp_path / "dissection" / "bars.png")
    figs.save_png(
        figs.heatmaps({"teacher": np.eye(3), "kd": np.full((3, 3), 0.5)}, ["a", "b", "c"],
                      order=[2, 0, 1]),
        tmp_path / "similarity" / "heat.png",
    )
    return {
        "title": "Synthetic <comparison>",
        "teacher": "teacher",
        "n_eval": 40,
        "models": [
            {"name": "teacher", "role": "teacher", "arch": "interptool:cw-teacher",
             "params": 1575202, "checkpoint": "/x/t.safetensors", "checkpoint_sha256": "ab" * 32,
             "accuracy": 0.875, "accuracy_ci": [0.74, 0.95]},
            {"name": "kd", "role": "student", "arch": "interptool:cw-student", "params": 308826,
             "checkpoint": None, "checkpoint_sha256": None, "accuracy": 0.8125,
             "accuracy_ci": None},
        ],
        "findings": [
            {"measure": "detectors (layer4)", "comparison": "kd vs teacher",
             "values": {"teacher": 40, "kd": 35}, "higher": "teacher", "difference": -5,
             "ci_low": None, "ci_high": None, "significant": None},
            {"measure": "accuracy", "comparison": "kd vs teacher",
             "values": {"teacher": 0.875, "kd": 0.8125}, "higher": "teacher",
             "difference": -0.0625, "ci_low": -0.12345, "ci_high": -0.01, "significant": True},
        ],
        "dissection": {"intro": "Units are detectors when IoU >= 0.04.",
                       "tables": [{"title": "Detectors per layer",
                                   "rows": [{"model": "teacher", "layer": "layer4",
                                             "detectors": 40, "unique": 12},
                                            {"model": "kd", "layer": "layer4",
                                             "detectors": 35, "unique": 10}]}],
                       "figures": ["dissection_bars"]},
        "similarity": {"tables": [{"title": "Transfer", "rows": [
            {"student": "kd", "metric": "spearman", "value": 0.91234, "ci_low": 0.8,
             "ci_high": 0.95}]}], "figures": ["similarity_heat"]},
        "figures": {"dissection_bars": {"path": "dissection/bars.png", "caption": "Bars <b>"},
                    "similarity_heat": {"path": "similarity/heat.png", "caption": ""}},
        "provenance": {"versions": {"interptool": "0.1.0", "torch": "2.x"},
                       "run": {"seed": 7, "device": "cpu"}, "timings": {"cache": 1.25},
                       "created": "2025-01-01T00:00:00+00:00", "command": "interptool compare c.toml"},
        "config": {"run": {"seed": 7}},
    }


def test_render_self_contained_with_every_section(tmp_path):
    summary = synthetic_summary(tmp_path)
    html = render_html(summary, tmp_path / "report.html")
    assert (tmp_path / "report.html").read_text() == html
    # every figure is embedded as a decodable PNG; nothing is fetched from elsewhere
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 2
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert not re.search(r'(src|href)="(https?:|//|file:)', html)
    assert "<script" not in html and "<link" not in html
    for anchor in ("models", "findings", "dissection", "similarity", "appendix"):
        assert f'id="{anchor}"' in html
    assert 'id="attribution"' not in html  # absent section is left out, not rendered empty
    # numbers and escaping
    assert "1,575,202" in html and "87.5%" in html and "74.0% – 95.0%" in html
    assert "0.912" in html and "-0.123" in html and "-0.062" in html  # three decimals
    assert "Synthetic &lt;comparison&gt;" in html and "Bars &lt;b&gt;" in html
    assert "abababababababab" in html and "ab" * 32 not in html  # sha shortened in the table
    assert "interptool compare c.toml" in html and "1.2" in html


def test_missing_figure_is_a_clear_error(tmp_path):
    summary = synthetic_summary(tmp_path)
    summary["figures"]["dissection_bars"]["path"] = "dissection/gone.png"
    with pytest.raises(InterptoolError, match="gone.png: cannot be read"):
        render_html(summary, tmp_path / "report.html")
