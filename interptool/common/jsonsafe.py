"""JSON coercion: the one function that turns analysis outputs into strict JSON values."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["to_jsonable"]


def to_jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays, tuples and paths turned into plain JSON types.

    Mappings become dicts with string keys; lists, tuples and arrays become lists; numpy
    integers and booleans become ``int``/``bool``; floats that are NaN or infinite become
    ``None`` (strict JSON has no NaN: a missing number reads as null, never as a string);
    paths become strings; any other object becomes its ``str``.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    return str(obj)  # anything else (a dtype, an enum): its text, never a failed dump
