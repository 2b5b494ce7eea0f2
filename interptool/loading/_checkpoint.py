"""Safe reading of weight files: formats, wrapper dicts, prefixes, teacher/student selection.

Nothing here unpickles arbitrary Python objects unless the caller passes ``trust_pickle=True``:
``torch.load`` runs with ``weights_only=True``, plus an allow-list of known-harmless classes
(``argparse.Namespace``, which torchdistill stores beside the weights).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from interptool.errors import CheckpointError

# Wrapper keys that hold the weights in training checkpoints, in order of preference:
# the trained weights first, EMA copies only when nothing else is there (select them with
# ``file.pth#state_dict_ema``).
WRAPPER_KEYS = (
    "state_dict", "model", "model_state_dict", "net", "network", "module", "params", "weights",
)
EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "model_ema_state_dict")



def _numpy_scalar_globals() -> list[Any]:
    """numpy scalars (``best_acc = np.float64(...)``) are common in training checkpoints;
    rebuilding one from its dtype and bytes runs no user code."""
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32,
                                               np.int64, np.bool_)]
        return [core.multiarray.scalar, np.dtype, *dtypes]
    except Exception:  # noqa: BLE001 - numpy layout changed: just allow fewer classes
        return []


# Classes that are harmless to reconstruct from a pickle: plain attribute bags and scalars.
SAFE_GLOBALS: list[Any] = [argparse.Namespace, *_numpy_scalar_globals()]

# Prefixes that wrappers add and that are never real module names: DistributedDataParallel /
# DataParallel (``module.``) and torch.compile (``_orig_mod.``).
_WRAP_PREFIXES = ("module.", "_orig_mod.")

_SELECT_SEP = "#"


def split_selector(checkpoint: str | os.PathLike) -> tuple[Path, str | None]:
    """``"file.pth#teacher"`` -> ``(Path("file.pth"), "teacher")``.

    A path that exists as given (even with a ``#`` in its name) is never split.
    """
    s = os.fspath(checkpoint)
    if _SELECT_SEP in s and not os.path.exists(s):
        path, sel = s.rsplit(_SELECT_SEP, 1)
        return Path(path), (sel.strip() or None)
    return Path(s), None


def detect_format(path: Path) -> str:
    """``"zip"`` (torch.save), ``"torchscript"``, ``"legacy"`` (old torch.save),
    ``"safetensors"``; raises :class:`CheckpointError` for anything else."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory; pass the weight file inside it (.pth, .pt, "
            f".bin or .safetensors)"
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); re-copy or re-save it")
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(
                f"checkpoint {path} is a truncated or corrupt torch.save archive ({exc}); "
                f"re-download or re-save it"
            ) from exc
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            verify_zip_crc(path)
            return "torchscript"
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(
                f"checkpoint {path} is a zip file but not a torch.save archive (no data.pkl)"
            )
        verify_zip_crc(path)
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "legacy"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n <= size - 8:
            return "safetensors"
        if head[8:9] == b"{":
            raise CheckpointError(
                f"checkpoint {path} looks like a truncated .safetensors file (header of {n} "
                f"bytes, file of {size}); re-download it"
            )
    kind = _describe_text(head)
    raise CheckpointError(
        f"checkpoint {path} is not a weight file ({kind}); expected a torch.save file "
        f"(.pth/.pt/.bin), a .safetensors file or a training checkpoint"
    )


def verify_zip_crc(path: Path) -> None:
    """Check the CRC-32 of every member of a zip archive (torch.save / TorchScript files).

    torch.load itself never checks them, so a flipped bit inside a tensor loads as a wrong
    weight. Members are read in 1 MiB blocks (memory stays flat; the cost is one sequential
    read of the file). A member whose recorded CRC is 0 is skipped: torch writes 0 when saving
    with ``torch.serialization.set_crc32_options(False)``, i.e. no checksum was recorded.

    Raises:
        CheckpointError: naming the first member whose bytes do not match their checksum.
    """
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.is_dir() or info.file_size == 0 or info.CRC == 0:
                    continue
                try:
                    with z.open(info) as f:
                        while f.read(1 << 20):
                            pass
                except zipfile.BadZipFile as exc:
                    raise CheckpointError(
                        f"checkpoint {path} is corrupt: member {info.filename!r} fails its "
                        f"CRC-32 check ({exc}), so some weights changed after saving (bad copy, "
                        f"disk or transfer); re-download or re-save it"
                    ) from exc
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise CheckpointError(
            f"checkpoint {path} is a truncated or corrupt torch.save archive ({exc}); "
            f"re-download or re-save it"
        ) from exc


def _describe_text(head: bytes) -> str:
    try:
        text = head.decode("utf-8").lstrip()
    except UnicodeDecodeError:
        return f"unknown binary format, starts with {head[:8]!r}"
    if text.startswith(("{", "[")):
        return "it looks like JSON text"
    return f"it looks like text: {text[:30]!r}"


def _torch_load(path: Path, fmt: str, trust_pickle: bool) -> tuple[Any, list[str]]:
    """torch.load with the safe unpickler; returns (object, names of allow-listed globals)."""
    kwargs: dict[str, Any] = dict(map_location="cpu")
    # torch.load dispatches on the name: a torch.save file called *.safetensors would be
    # handed to the safetensors reader. The format was detected from the content, so give
    # torch an open file instead of the name (mmap needs a name, so it is lost for those).
    misnamed = path.name.endswith(".safetensors")
    if fmt == "zip" and not misnamed:
        kwargs["mmap"] = True  # tensors stay on disk until copied into the model
    if trust_pickle:
        try:
            with _source(path, misnamed) as src:
                return torch.load(src, weights_only=False, **kwargs), []
        except Exception as exc:  # noqa: BLE001 - any failure means an unusable file here
            raise CheckpointError(_corrupt_message(path, exc)) from exc
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), _source(path, misnamed) as src:
            obj = torch.load(src, weights_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001
        msg = str(exc)
        if "Weights only load failed" in msg and "invalid load key" not in msg:
            bad = _unsafe_globals(path, fmt, msg)
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects ({bad}) beyond plain tensors; "
                f"unpickling them can run arbitrary code, so it is refused. If you trust the "
                f"file, pass --trust-pickle (trust_pickle=True in Python); better, re-save only "
                f"the weights once: torch.save(obj.state_dict(), 'weights.pth')"
            ) from exc
        raise CheckpointError(_corrupt_message(path, exc)) from exc
    used = []
    if fmt == "zip":
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            used = sorted(g for g in unsafe if g in {_qual(c) for c in SAFE_GLOBALS})
        except Exception:  # noqa: BLE001 - informational only
            used = []
    return obj, used


@contextlib.contextmanager
def _source(path: Path, as_file: bool) -> Iterator[Any]:
    """``path`` itself, or an open binary file when torch must not see the name."""
    if not as_file:
        yield path
        return
    with open(path, "rb") as f:
        yield f


def _qual(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _unsafe_globals(path: Path, fmt: str, msg: str) -> str:
    names: list[str] = []
    if fmt == "zip":
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001
            names = []
    if not names:
        names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", msg)
    if not names:
        return "non-tensor classes"
    shown = ", ".join(sorted(names)[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _corrupt_message(path: Path, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"checkpoint {path} could not be read, it is probably truncated or corrupt "
        f"({type(exc).__name__}: {first[:200]}); re-download or re-save it"
    )


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(_corrupt_message(path, exc)) from exc


def _load_torchscript_weights(path: Path) -> dict[str, torch.Tensor]:
    from interptool.loading._builder import load_torchscript

    module = load_torchscript(path)
    return dict(module.state_dict())


# ----------------------------------------------------------------------------- unwrapping


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _describe_keys(obj: Mapping) -> str:
    parts = []
    for k, v in list(obj.items())[:12]:
        kind = ("tensor" if isinstance(v, torch.Tensor) else "dict" if isinstance(v, Mapping)
                else type(v).__name__)
        parts.append(f"{k!r} ({kind})")
    more = f", ... {len(obj) - 12} more" if len(obj) > 12 else ""
    return ", ".join(parts) + more


def _flatten(obj: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> flat dotted keys (``{'student': {...}}`` -> ``student.x``)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[key] = v
        elif isinstance(v, torch.nn.Module):
            out.update({f"{key}.{n}": t for n, t in v.state_dict().items()})
        elif isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
    return out


def unwrap(obj: Any, path: Path, selector: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """Find the weights inside a loaded checkpoint object.

    Returns ``(flat_state_dict, info)``; ``info`` has ``source_keys`` (the wrapper path, e.g.
    ``"model"`` or ``"model/state_dict"``, ``""`` for a bare state dict), ``alternatives``
    (other weight sets seen, e.g. EMA), ``dropped`` (non-tensor entries ignored) and
    ``selector_rest`` (the part of the selector not consumed by wrapper keys, to be matched
    against key prefixes).
    """
    trail: list[str] = []
    alternatives: list[str] = []
    rest = selector.split(".") if selector else []
    while True:
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
            continue
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"checkpoint {path}{'/' + '/'.join(trail) if trail else ''} holds a "
                f"{type(obj).__name__}, not a state dict (a mapping of names to tensors)"
            )
        if rest and rest[0] in obj and not isinstance(obj[rest[0]], torch.Tensor):
            trail.append(rest.pop(0))
            obj = obj[trail[-1]]
            continue
        found = next((k for k in WRAPPER_KEYS + EMA_KEYS if k in obj and _holds_weights(obj[k])),
                     None)
        if found is None and _is_state_dict(obj):
            break
        if found is None:
            nested = {k: v for k, v in obj.items() if _holds_weights(v)}
            if not nested:
                raise CheckpointError(
                    f"checkpoint {path}{' key ' + '/'.join(trail) if trail else ''} holds no "
                    f"tensors: found {_describe_keys(obj)}; expected a state dict or a training "
                    f"checkpoint with one of {', '.join(WRAPPER_KEYS + EMA_KEYS)}"
                )
            # e.g. {'student': sd, 'teacher': sd}: flatten to prefixes, chosen later.
            obj = _flatten(nested)
            break
        alternatives += [k for k in WRAPPER_KEYS + EMA_KEYS
                         if k in obj and k != found and _holds_weights(obj[k])]
        trail.append(found)
        obj = obj[found]
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    nested = {k: v for k, v in obj.items() if isinstance(v, Mapping) and _holds_weights(v)}
    if nested:  # a state dict with sub-dicts of tensors: keep them as dotted keys
        tensors.update(_flatten(nested))
        dropped = [k for k in dropped if k not in nested]
    info = dict(
        source_keys="/".join(trail),
        alternatives=[("/".join(trail[:-1] + [a]) if trail else a) for a in alternatives],
        dropped=dropped,
        selector_rest=".".join(rest) or None,
    )
    return tensors, info


def _holds_weights(v: Any) -> bool:
    if isinstance(v, torch.nn.Module):
        return True
    if not isinstance(v, Mapping):
        return False
    return any(isinstance(x, torch.Tensor) or _holds_weights(x) for x in v.values())


def strip_wrapper_prefixes(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove ``_orig_mod.`` anywhere and a ``module.`` that every key starts with."""
    stripped: list[str] = []
    if any("_orig_mod." in k for k in sd):
        sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
        stripped.append("_orig_mod.")
    while sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        stripped.append("module.")
    return sd, stripped


def read_state_dict(
    path: str | os.PathLike,
    *,
    trust_pickle: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the weights of a file safely.

    ``path`` may end in ``#SELECTOR`` (``file.pth#teacher``, ``file.pth#state_dict_ema``): the
    selector first picks nested wrapper keys, then a key prefix (``#student`` keeps the keys
    under ``student.`` / ``student_model.`` with that prefix removed).

    Formats: ``torch.save`` files (``.pth``/``.pt``/``.bin``, zip or legacy), ``.safetensors``,
    TorchScript archives (their parameters and buffers), training checkpoints wrapping the
    weights (``state_dict``, ``model``, ``net``, EMA copies, nested). ``module.`` and
    ``_orig_mod.`` prefixes are removed.

    Returns ``(state_dict, info)``; ``info`` holds ``path``, ``format``, ``source_keys``,
    ``selector``, ``stripped_prefixes``, ``alternatives``, ``dropped``, ``allowed_globals``,
    ``trusted_pickle`` and, for safetensors, ``metadata``.

    Raises:
        CheckpointError: missing, empty, truncated or non-checkpoint file; a file needing full
            unpickling without ``trust_pickle``; a selector that matches nothing.
    """
    file, selector = split_selector(path)
    fmt = detect_format(file)
    info: dict[str, Any] = dict(path=str(file), format=fmt, selector=selector,
                                allowed_globals=[], trusted_pickle=False)
    if fmt == "safetensors":
        obj, meta = _load_safetensors(file)
        info["metadata"] = meta
    elif fmt == "torchscript":
        obj = _load_torchscript_weights(file)
    else:
        obj, used = _torch_load(file, fmt, trust_pickle)
        info["allowed_globals"] = used
        info["trusted_pickle"] = bool(trust_pickle)
    sd, uinfo = unwrap(obj, file, selector)
    info.update(uinfo)
    sd, stripped = strip_wrapper_prefixes(sd)
    info["stripped_prefixes"] = stripped
    rest = info.pop("selector_rest")
    if rest:
        sd, prefix = select_prefix(sd, rest, file)
        sd, more = strip_wrapper_prefixes(sd)
        info["stripped_prefixes"] = stripped + [prefix] + more
    if not sd:
        raise CheckpointError(f"checkpoint {file} contains no tensors")
    return sd, info


# ----------------------------------------------------------------------------- prefixes

# Components that name one network of a distillation pair inside a combined state dict.
_ROLE = re.compile(r"^(student|teacher|s_?net|t_?net|model_[st]|net_[st]|[st]_model)(_.*)?$")


def select_prefix(
    sd: dict[str, torch.Tensor], selector: str, file: Path | str
) -> tuple[dict[str, torch.Tensor], str]:
    """Keep the keys under ``selector`` and strip it; returns ``(state_dict, prefix)``.

    Tried in order: the exact dotted prefix ``selector.``; then a component starting with
    ``selector_`` (``teacher`` matches ``teacher_model.``) within the first three components.
    """
    exact = selector.rstrip(".") + "."
    sub = {k[len(exact):]: v for k, v in sd.items() if k.startswith(exact)}
    if sub:
        return sub, exact
    groups = role_groups(sd, loose=selector)
    for prefix, keys in groups.items():
        last = prefix.rstrip(".").split(".")[-1]
        if last == selector or last.startswith(selector + "_"):
            return {k[len(prefix):]: sd[k] for k in keys}, prefix
    tops = sorted({k.split(".")[0] for k in sd})
    raise CheckpointError(
        f"checkpoint {file}: selector #{selector} matches no wrapper key and no key prefix; "
        f"top-level key prefixes are {', '.join(tops[:15])}"
        + (f"; groups found: {', '.join(groups)}" if groups else "")
    )


def role_groups(sd: Mapping[str, Any], loose: str | None = None) -> dict[str, list[str]]:
    """Prefixes naming one network of a teacher/student pair -> their keys.

    ``{'student.conv.weight', 'teacher.conv.weight'}`` -> ``{'student.': [...], 'teacher.':
    [...]}``; prefixes may be nested (``model.student_model.``). Only the first three
    components are searched. ``loose`` also accepts components starting with that word.
    """
    groups: dict[str, list[str]] = {}
    for k in sd:
        parts = k.split(".")
        for i, part in enumerate(parts[:3][: len(parts) - 1]):
            low = part.lower()
            if _ROLE.match(low) or (loose and (low == loose or low.startswith(loose + "_"))):
                groups.setdefault(".".join(parts[: i + 1]) + ".", []).append(k)
                break
    return groups


def common_prefixes(sd: Mapping[str, Any], depth: int = 3) -> list[str]:
    """Leading components every key shares, longest last: ``['model.', 'model.net.']``."""
    out: list[str] = []
    keys = list(sd)
    prefix = ""
    for _ in range(depth):
        firsts = {k[len(prefix):].split(".", 1)[0] for k in keys}
        if len(firsts) != 1 or not all(k[len(prefix):].count(".") >= 1 for k in keys):
            break
        prefix += firsts.pop() + "."
        out.append(prefix)
    return out


def to_jsonable(info: dict[str, Any]) -> dict[str, Any]:
    """Make an info dict JSON-safe (metadata values are strings already)."""
    from interptool.common.jsonsafe import to_jsonable as _to_jsonable

    return _to_jsonable(info)
