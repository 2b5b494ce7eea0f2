"""Provenance recorded in every output: versions, checksums, seeds, time."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import random
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions() -> dict[str, str]:
    """Versions of interptool and the libraries whose behaviour shapes the results."""
    import importlib.metadata as md

    out: dict[str, str] = {"python": platform.python_version()}
    for name in ("interptool", "torch", "torchvision", "timm", "captum", "numpy", "scipy", "h5py"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def seed_everything(seed: int) -> int:
    """Seed python, numpy and torch RNGs; returns the seed so callers can record it."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return seed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that a crash never leaves a half-written file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def provenance(**extra: Any) -> dict[str, Any]:
    """A provenance block: versions, host and time, plus caller-supplied fields."""
    return {"versions": versions(), "created": now_iso(), "host": platform.node(), **extra}


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """``fig.savefig`` through a temporary file, so an interrupted run leaves no torn image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    fig.savefig(tmp, **kwargs)
    os.replace(tmp, path)
