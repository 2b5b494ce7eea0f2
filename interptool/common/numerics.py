"""How torch rounds float32 work on a GPU, as results record it (a resumed file must not mix
rows or maps computed two ways)."""

from __future__ import annotations

import torch

__all__ = ["fp32_precision"]


def _first_set(*levels: str) -> str:
    """torch's precision settings inherit from their parent where they say ``"none"``; the
    root's ``"none"`` is full float32."""
    return next((v for v in levels if v != "none"), "ieee")


def fp32_precision() -> dict[str, str]:
    """How CUDA rounds float32 convolutions and matmuls now: ``"tf32"`` or ``"ieee"`` each.

    Read through torch's per-operation settings (``torch.backends.cudnn.conv.fp32_precision``
    and ``torch.backends.cuda.matmul.fp32_precision``, each inheriting from its parents):
    once a program has used them, reading the legacy ``allow_tf32`` switches raises. Torch
    versions without them (before 2.9) are read through the legacy switches.
    """
    b = torch.backends
    try:
        root = b.fp32_precision
        conv = _first_set(b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision, root)
        matmul = _first_set(b.cuda.matmul.fp32_precision, root)
    except AttributeError:  # torch < 2.9
        conv = "tf32" if b.cudnn.allow_tf32 else "ieee"
        matmul = "tf32" if b.cuda.matmul.allow_tf32 else "ieee"
    return {"conv_fp32_precision": conv, "matmul_fp32_precision": matmul}
