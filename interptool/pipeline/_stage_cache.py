"""Resumable stage markers: ``DIR/.stages/<stage>.json`` = ``{"key": ..., "payload": ...}``.

A stage's key is the sha256 of everything it depends on (settings, the identity of the caches
it reads: checkpoint hash, data fingerprint, creation time). A re-run whose key matches loads
the stored payload instead of recomputing it, so an interrupted run redoes only unfinished
work; a torn or foreign marker is simply redone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interptool._provenance import atomic_write_text
from interptool.common.jsonsafe import to_jsonable

__all__ = ["StageCache", "cache_identity", "stage_key"]


def stage_key(inputs: Any) -> str:
    """sha256 of the JSON form of ``inputs`` (keys sorted, so dict order does not matter)."""
    text = json.dumps(to_jsonable(inputs), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_identity(path: Path) -> dict[str, Any]:
    """What a stage reading the activation cache at ``path`` depends on."""
    from interptool.cache import ActivationCache

    with ActivationCache(path) as c:
        a = c.attrs
        st = path.stat()
        # size and modification time: a cache changed after a stage read it (re-created,
        # resumed, edited by hand) is read again; a cache hit leaves both as they were
        return {"file": path.name, "created": a.get("created"), "n": c.n,
                "checkpoint_sha256": a.get("checkpoint_sha256"),
                "data_fingerprint": c.data_fingerprint, "layers": c.layers,
                "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class StageCache:
    """Done markers of one output folder; :attr:`reused` lists the stages taken from disk."""

    def __init__(self, out: Path) -> None:
        self.dir = Path(out) / ".stages"
        self.reused: list[str] = []  # stages taken from an earlier run (their time is not here)

    def get(self, name: str, key: str) -> Any | None:
        """The stored payload of stage ``name`` if its key is ``key``, else None."""
        p = self.dir / f"{name}.json"
        if not p.is_file():
            return None  # absent (or a folder in its place: put() names that)
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):  # a torn marker is simply redone
            return None
        if not isinstance(d, dict):  # not a marker this code wrote: redone
            return None
        return d.get("payload") if d.get("key") == key else None

    def put(self, name: str, key: str, payload: Any) -> Any:
        """Store ``payload`` (made JSON-safe, which is also what is returned)."""
        payload = to_jsonable(payload)
        target = self.dir / f"{name}.json"
        if target.is_dir():  # the rename over it would fail naming a temporary file
            from interptool.errors import ConfigError

            raise ConfigError(f"{target} is a folder where compare keeps the record of its "
                              f"{name!r} stage; remove that folder and run again")
        atomic_write_text(target, json.dumps({"key": key, "payload": payload}))
        return payload

    def run(self, name: str, inputs: Any, fn: Callable[[], Any]) -> tuple[Any, bool]:
        """``(payload, reused)``: the stored payload when ``inputs`` match, else ``fn()``."""
        key = stage_key(inputs)
        got = self.get(name, key)
        if got is not None:
            self.reused.append(name)
            return got, True
        return self.put(name, key, fn()), False
