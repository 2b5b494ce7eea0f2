"""How torch rounds float32 work on a GPU, as results record it (a resumed file must not mix
rows or maps computed two ways)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

__all__ = ["fp32_precision", "full_fp32_matmuls", "seeded_rng"]


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


@contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """CUDA float32 matmuls in full float32 inside the block, whatever the program allowed
    (``torch.set_float32_matmul_precision("high")`` is common in training code: TF32 rounds
    inputs to 10 mantissa bits, ~1e-3 relative); the setting is restored afterwards.

    Through ``torch.backends.cuda.matmul.fp32_precision``, which can be read and set whichever
    API the program used (``torch.get_float32_matmul_precision`` raises once the per-operation
    settings were used); the legacy ``allow_tf32`` switch before torch 2.9.
    """
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    before = matmul.fp32_precision if new_api else matmul.allow_tf32
    # a setting that inherits reads as its parent's value; writing that value back would pin
    # it, so a later change of torch.backends.fp32_precision would no longer reach matmuls
    inherited = new_api and before == torch.backends.fp32_precision
    if new_api:
        matmul.fp32_precision = "ieee"
    else:  # torch < 2.9
        matmul.allow_tf32 = False
    try:
        yield
    finally:
        if new_api:
            matmul.fp32_precision = "none" if inherited else before
        else:
            matmul.allow_tf32 = before


@contextmanager
def seeded_rng(seed: int, devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Draw from generators seeded with ``seed`` (the CPU's and those of the CUDA
    ``devices``), restoring every generator's state afterwards. ``torch.manual_seed`` would
    reseed every visible GPU while ``fork_rng`` restores only the listed ones."""
    cuda = [d for d in devices if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield
