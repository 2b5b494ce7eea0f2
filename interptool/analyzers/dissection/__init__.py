"""Network dissection (Bau et al. 2017, NetDissect-Lite semantics): concept detectors per unit.

``run(cache, layer, probe, params)`` (or ``Dissection(**settings).run(...)``) returns a
:class:`DissectionResult`; :class:`DissectionParams` holds every setting.
"""

from interptool.analyzers._lazy import lazy_exports
from interptool.analyzers.dissection._params import (
    DissectionOptions,
    DissectionParams,
    MontageParams,
)

Params = DissectionParams
__getattr__, __dir__ = lazy_exports(__name__, {
    "Dissection": "._analyzer", "DissectionResult": "._analyzer", "run": "._entry",
    "analyze": "._entry"})

__all__ = ["Dissection", "DissectionOptions", "DissectionParams", "DissectionResult",
           "MontageParams", "Params", "analyze", "run"]
