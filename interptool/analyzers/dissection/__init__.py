"""Network dissection (Bau et al. 2017, NetDissect-Lite semantics): concept detectors per unit."""

from interptool.analyzers.dissection._analyzer import Dissection, DissectionResult

__all__ = ["Dissection", "DissectionResult"]
