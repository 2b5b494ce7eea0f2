"""Render ``report.html`` from a ``summary.json``-shaped dict.

The page is self-contained: figures are embedded as base64 PNG ``data:`` URIs, the CSS is
inline and there is no script and no external asset, so the file opens offline, can be mailed
and archived, and shows the same thing in ten years.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from interptool.analyzers import analyzer_specs
from interptool.errors import InterptoolError

_TEMPLATE_DIR = Path(__file__).parent / "templates"


def _fmt(value: Any, digits: int = 3) -> str:
    """Numbers for people: ints as is, floats to ``digits`` significant decimals, None as '-'."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.1f}%"


def _ci(row: Mapping[str, Any], key: str = "value") -> str:
    """``value [lo, hi]`` when the row carries a confidence interval."""
    v = _fmt(row.get(key))
    lo, hi = row.get("ci_low"), row.get("ci_high")
    if lo is None or hi is None:
        return v
    return f"{v} [{_fmt(lo)}, {_fmt(hi)}]"


def _data_uri(src: str | os.PathLike | bytes, base_dir: Path | None) -> str:
    if isinstance(src, bytes):
        data = src
    else:
        p = Path(src)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise InterptoolError(
                f"report figure {p}: cannot be read ({exc.strerror}); re-run the compare "
                "stage that writes it"
            ) from None
    if not data.startswith(b"\x89PNG"):
        raise InterptoolError(f"report figure {src!r}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        # the report's own templates, and each analyzer's section template as "<name>/<file>"
        loader=jinja2.ChoiceLoader([
            jinja2.FileSystemLoader(str(_TEMPLATE_DIR)),
            jinja2.PrefixLoader({spec.name: jinja2.FileSystemLoader(str(spec.section.parent))
                                 for spec in analyzer_specs() if spec.section_template()}),
        ]),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        # Chainable: a summary without an optional block (e.g. no timings) still renders.
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt
    env.filters["pct"] = _pct
    env.filters["ci"] = _ci
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    return env


def _figures(summary: Mapping[str, Any], base_dir: Path | None) -> dict[str, dict[str, str]]:
    """``summary["figures"]``: id -> {"path": PNG path relative to the output dir, "caption"}."""
    out: dict[str, dict[str, str]] = {}
    for key, fig in (summary.get("figures") or {}).items():
        if isinstance(fig, (str, bytes, os.PathLike)):
            fig = {"path": fig}
        out[key] = {"uri": _data_uri(fig["path"], base_dir), "caption": fig.get("caption", "")}
    return out


def report_sections(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """The analysis sections of the page, in registry order: every registered analyzer with a
    part in ``summary``; ``{"name", "title", "template"}`` where the template is the one the
    analyzer registered (``<name>/section.html.j2``) or the generic ``_section.html.j2``."""
    out = []
    for spec in analyzer_specs():
        if summary.get(spec.name):
            tpl = spec.section_template()
            out.append({"name": spec.name, "title": spec.title,
                        "template": f"{spec.name}/{tpl.name}" if tpl else "_section.html.j2"})
    return out


def render_html(
    summary: Mapping[str, Any],
    path: str | os.PathLike | None = None,
    *,
    base_dir: str | os.PathLike | None = None,
) -> str:
    """Render the comparison report and return the HTML text (also written to ``path``).

    ``summary`` has the shape of ``summary.json`` (see docs/user-guide.md, "Outputs"); every
    registered analyzer with a part in it gets its section (:func:`report_sections`); the
    others are left out of the page.
    Figure paths in ``summary["figures"]`` are read relative to ``base_dir`` (default: the
    folder of ``path``) and embedded.
    """
    if base_dir is None and path is not None:
        base_dir = Path(path).parent
    base = Path(base_dir) if base_dir is not None else None
    figures = _figures(summary, base)
    section_list = report_sections(summary)
    html = (
        _env()
        .get_template("report.html.j2")
        .render(s=summary, fig=figures, section_list=section_list,
                config_text=summary.get("config_text"))
    )
    if path is not None:
        from interptool._provenance import atomic_write_text

        atomic_write_text(path, html)
    return html
