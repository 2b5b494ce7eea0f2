"""Dissection parameters (the single source of their defaults, checks and help) and its
registration. Imported by the CLI at start-up: no torch here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from interptool.analyzers._base import Params, param
from interptool.analyzers._registry import register_analyzer
from interptool.analyzers.dissection._protocol import PROTOCOLS, parse_categories
from interptool.errors import ConfigError, ParamsError

__all__ = ["DissectionOptions", "DissectionParams", "MontageParams"]

#: IoU thresholds at which the compare report draws the detector-count curve.
DEFAULT_CURVE = (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2)


def _categories_problem(value: Any) -> str | None:
    """What is wrong with a ``categories`` value (empty, a name twice), or None."""
    try:
        parse_categories(value)
    except ConfigError as exc:
        # "categories='a,a': a listed twice" -> "expected each category once (a listed twice)"
        why = str(exc).partition(": ")[2]
        return why if why.startswith("expected") else f"expected each category once ({why})"
    return None


def _mask_store_problem(value: Any) -> str | None:
    """A ``mask_store`` that names something other than a folder (it is created if missing)."""
    import os

    if value is not None and not str(value).strip():
        return "expected the name of a folder (created if missing)"
    if value is not None and os.path.exists(value) and not os.path.isdir(value):
        return "expected a folder (created if missing), not a file"
    return None


@dataclass
class DissectionOptions(Params):
    """How ``interptool compare`` uses dissection (config only, not analyzer settings)."""

    layers: list[str] | None = param(
        None, "layers dissected in every model (default: each model's layers)", cli=False)
    top_units: int = param(4, "units shown with image montages per model and layer", ge=0,
                           cli=False)
    iou_thresholds: list[float] = param(
        help="IoU thresholds of the detector-count curve in the report", ge=0, le=1,
        min_items=1, cli=False, default_factory=lambda: list(DEFAULT_CURVE))
    bootstrap: int = param(1000, "bootstrap resamples of the probe images: 95% intervals of "
                           "every detector measure and paired differences (0: counts only)",
                           ge=0, cli=False)
    baseline: str | bool = param("random-init", "control: a seeded random-init copy of each "
                                 "architecture dissected on the same probe (seed: run.seed); "
                                 "\"none\" (or false) for no control",
                                 choices=("random-init", "none", False), cli=False)

    def validate(self) -> None:
        if self.baseline is False:
            self.baseline = "none"


@register_analyzer(
    "dissection", title="Network dissection",
    summary="concept detectors per unit against a Broden-format probe (NetDissect-Lite)",
    analyzer="interptool.analyzers.dissection._analyzer:Dissection",
    result="interptool.analyzers.dissection._analyzer:DissectionResult",
    analyze="interptool.analyzers.dissection._entry:analyze",
    options=DissectionOptions, needs="probe", command=False, order=10,
    template={"protocol": "netdissect-lite", "bootstrap": 1000, "baseline": "random-init"})
@dataclass
class DissectionParams(Params):
    """Settings of :class:`~interptool.analyzers.dissection.Dissection`."""

    protocol: str = param("netdissect-lite", "settings preset: netdissect-lite (five "
                          "categories, IoU 0.04) or han2023 (six incl. material, IoU 0.05)",
                          choices=tuple(PROTOCOLS))
    categories: list[str] | str | None = param(
        None, "categories to dissect against (default: the protocol's); images with no label "
        "of these take no part", metavar="CAT,CAT", check=_categories_problem)
    quantile: float | None = param(None, "top activation fraction defining a unit's threshold "
                                   "(default: the protocol's, 0.005)", gt=0, lt=1)
    iou_threshold: float | None = param(None, "a unit is a detector when its best IoU >= this "
                                        "(default: the protocol's)", ge=0, le=1)
    batch_size: int = param(64, "images per streamed block (memory does not grow with N)", ge=1)
    device: str = param("cpu", "torch device for thresholds and counting", config=False,
                        cli=False)
    workers: int | None = param(None, "DataLoader worker processes decoding the masks "
                                "(default: chosen from the cores and the device; 0: decoded "
                                "in this process)", ge=0)
    mask_store: str | None = param(
        None, "folder keeping the probe's decoded masks between runs: decoded once per probe, "
        "categories and mask files, read back by later runs (about 2 bytes per mask pixel, "
        "~12 GB for Broden; default: decoded every run)", metavar="DIR", path=True,
        check=_mask_store_problem)
    top_images: int = param(8, "probe images kept per unit for its montage", ge=0)
    category_area: str = param("overlap", "unit area per category: NetDissect-Lite's "
                               "'overlap' or 'image'", choices=("overlap", "image"))
    checksum: bool = param(True, "record the cache file's sha256 in the provenance",
                           cli=False, config=False)
    bootstrap: int = param(0, "bootstrap resamples of the probe images for intervals of the "
                           "detector counts at --ci-level (0: none)", ge=0, metavar="N")
    seed: int = param(0, "bootstrap seed (same seed and probe: the same resamples for every "
                      "model)", ge=0, config=False)
    bootstrap_block_size: int = param(1, "probe images per resampled block", ge=1)
    ci_level: float = param(0.95, "confidence level of the bootstrap intervals", gt=0, lt=1)

    def validate(self) -> None:
        # checked by the field (empty, a name twice); here only normalised
        cats = parse_categories(self.categories)
        self.categories = list(cats) if cats is not None else None  # "a,b" -> ["a", "b"]

    def check_probe(self, probe: Any, *, where: str = "") -> None:
        """Refuse categories the ``probe`` (anything with ``categories``) lacks, before any
        caching: :class:`ParamsError` naming ``categories`` (prefixed with ``where``, e.g.
        ``"run.toml: analysis.dissection"``), the probe's categories and the fix."""
        cats = parse_categories(self.categories)
        have = [str(c) for c in getattr(probe, "categories", [])]
        unknown = [c for c in cats or () if c not in have]
        if not unknown:
            return
        name = f"{where}.categories" if where else "categories"
        spec = getattr(probe, "spec", "") or type(probe).__name__
        raise ParamsError(
            f"{name}: expected categories of the probe {spec!r} ({', '.join(have)}), got "
            f"{', '.join(map(repr, unknown))}; drop them or use another probe", name)


#: ``montages`` values besides a number of units
MONTAGE_CHOICES = ("detectors", "all", "none")


def _montages_problem(value: Any) -> str | None:
    if isinstance(value, str):
        return None if value in MONTAGE_CHOICES else \
            f"expected {', '.join(MONTAGE_CHOICES)} or a number of units >= 0"
    return None if value >= 0 else "expected a number of units >= 0 (or detectors, all, none)"


@dataclass
class MontageParams(Params):
    """Which unit montages :meth:`DissectionResult.save` draws (``interptool dissect``'s
    ``--montages`` and ``--max-montages``)."""

    montages: str | int = param("detectors", "'detectors' (detector units, best first), "
                                "'all', 'none' or a number of top units",
                                check=_montages_problem, config=False)
    max_montages: int = param(64, "most montages drawn per layer", ge=0, config=False)
