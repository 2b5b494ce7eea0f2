"""Linear CKA between layers of two models cached on the same images.

``run(cache_a, cache_b, layers_a, layers_b, params, names=...)`` (or ``cka(...)``) returns a
:class:`CKAResult`; :class:`CKAParams` holds every setting.
"""

from interptool.analyzers._lazy import lazy_exports
from interptool.analyzers.cka._params import CKAParams

Params = CKAParams
__getattr__, __dir__ = lazy_exports(__name__, {
    **{n: "._analyzer" for n in ("CKAResult", "cka", "cka_heatmap", "linear_cka",
                                 "unbiased_hsic")},
    "run": "._entry", "analyze": "._entry"})

__all__ = ["CKAParams", "CKAResult", "Params", "analyze", "cka", "cka_heatmap", "linear_cka",
           "run",
           "unbiased_hsic"]
