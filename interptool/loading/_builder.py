"""Building an architecture by name (timm / torchvision / built-in zoo / TorchScript file)."""

from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interptool.errors import CheckpointError, ConfigError

# Never reach the network: architecture configs of ``hf-hub:`` names would be fetched otherwise.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")
_CLASSIFIER_NAME = re.compile(r"(^|\.)(fc|classifier|head|heads|last_linear|logits)(\.|$)")


@dataclass
class ArchSpec:
    """A parsed ``--arch`` value."""

    family: str  # "timm" | "torchvision" | "interptool" | "hf" | "torchscript"
    name: str  # model name, the Hugging Face folder, or the TorchScript file path

    @property
    def display(self) -> str:
        if self.family == "torchscript":
            return Path(self.name).stem
        if self.family == "hf":
            return Path(self.name).expanduser().resolve().name or self.name
        return self.name


def parse_arch(arch: str | os.PathLike) -> ArchSpec:
    """``timm:NAME`` / ``torchvision:NAME`` / ``interptool:NAME`` / ``hf:FOLDER`` (a
    Hugging Face ``save_pretrained`` folder) / TorchScript path."""
    s = os.fspath(arch).strip()
    family, sep, name = s.partition(":")
    if sep and family in ("timm", "torchvision", "interptool", "hf") and name:
        return ArchSpec(family, name)
    path = Path(s)
    if path.is_dir() and (path / "config.json").is_file():
        raise CheckpointError(
            f"architecture {s!r} is a folder with config.json: for a Hugging Face "
            f"save_pretrained folder write --arch hf:{s}"
        )
    if path.exists() or path.suffix.lower() in TORCHSCRIPT_SUFFIXES:
        return ArchSpec("torchscript", s)
    hint = _bare_name_hint(s)
    raise CheckpointError(
        f"architecture {s!r} is not understood: expected timm:NAME, torchvision:NAME, "
        f"interptool:NAME (one of {', '.join(_zoo_names())}), hf:FOLDER (a Hugging Face "
        f"save_pretrained folder) or the path of a TorchScript file{hint}"
    )


def _zoo_names() -> list[str]:
    from interptool.loading._zoo import ZOO

    return [f"interptool:{n}" for n in ZOO]


def _bare_name_hint(name: str) -> str:
    hits = []
    try:
        import timm

        if timm.is_model(name):
            hits.append(f"timm:{name}")
    except Exception:  # noqa: BLE001
        pass
    try:
        from torchvision.models import list_models

        if name in list_models():
            hits.append(f"torchvision:{name}")
    except Exception:  # noqa: BLE001
        pass
    return f"; did you mean {' or '.join(hits)}?" if hits else ""


def _suggest(name: str, choices: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.6)
    if not close:
        return ""
    return "; close names: " + ", ".join(f"{prefix}:{c}" for c in close)


#: constructor arguments that ``model_kwargs`` may not set: interptool's own options
#: (``num_classes``: --num-classes; ``in_chans``: read from the checkpoint), and those that make
#: timm or torchvision download or read weight files outside the safe loader
_RESERVED_KWARGS = {
    "num_classes": "use --num-classes (config: num_classes), or let the checkpoint tell it",
    "in_chans": "the input channels are read from the checkpoint's first convolution",
    "pretrained": "weights come from --checkpoint (read safely), never from a download",
    "pretrained_cfg": "weights come from --checkpoint (read safely), never from a download",
    "pretrained_cfg_overlay": "weights come from --checkpoint (read safely), never from a "
                              "download",
    "checkpoint_path": "give the file as --checkpoint (read safely)",
    "cache_dir": "weights come from --checkpoint (read safely), never from a download",
    "weights": "give the weight file as --checkpoint (read safely)",
    "weights_backbone": "give the weight file as --checkpoint (read safely)",
    "progress": "nothing is downloaded",
}


def _plain_value(value: Any) -> bool:
    """JSON-like values only: they are recorded in the provenance and compared on resume."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_value(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain_value(v) for k, v in value.items())
    return False


def check_model_kwargs(model_kwargs: Mapping[str, Any] | None,
                       arch: ArchSpec | str | os.PathLike) -> dict[str, Any]:
    """``model_kwargs`` for architecture ``arch`` as a plain dict, checked: keyword names,
    JSON-like values, none of interptool's own or downloading arguments, and an architecture
    built by name (a TorchScript file or a Hugging Face folder fixes its own).

    Raises:
        ConfigError: naming the argument and why it is refused.
    """
    if model_kwargs is None:
        return {}
    spec = arch if isinstance(arch, ArchSpec) else parse_arch(arch)
    if not isinstance(model_kwargs, Mapping):
        raise ConfigError(f"model_kwargs must be a mapping of constructor arguments, e.g. "
                          f"{{'img_size': 384}}; got {type(model_kwargs).__name__}")
    out = dict(model_kwargs)
    if out and spec.family in ("torchscript", "hf"):
        fix = ("edit the folder's config.json" if spec.family == "hf"
               else "the file holds the built model")
        raise ConfigError(f"model_kwargs {sorted(out)} apply to timm, torchvision and interptool "
                          f"architectures; {spec.family} {spec.name!r} is built from its own "
                          f"description ({fix}); drop model_kwargs")
    for key, value in out.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"model_kwargs key {key!r} is not a keyword argument name")
        if key in _RESERVED_KWARGS:
            raise ConfigError(f"model_kwargs may not set {key!r}: {_RESERVED_KWARGS[key]}")
        if not _plain_value(value):
            raise ConfigError(f"model_kwargs {key}={value!r}: expected a number, string, "
                              "boolean, None, or a list/table of those")
    return out


def build(spec: ArchSpec, num_classes: int | None = None, in_chans: int | None = None,
          model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Instantiate ``spec`` with random weights (never downloads anything).

    ``num_classes``/``in_chans`` of ``None`` keep the architecture's defaults;
    ``model_kwargs`` (checked by :func:`check_model_kwargs`) go to the constructor (timm's
    ``create_model``, torchvision's ``get_model``, the built-in zoo's builders).
    """
    kwargs: dict[str, Any] = dict(check_model_kwargs(model_kwargs, spec))
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if spec.family == "timm":
        import timm

        base = spec.name.split(".")[0] if not spec.name.startswith("hf") else spec.name
        if not timm.is_model(spec.name):
            raise CheckpointError(
                f"unknown timm architecture {spec.name!r}"
                + _suggest(base, timm.list_models(), "timm")
                + " (list them with: python -c \"import timm; print(timm.list_models('*res*'))\")"
            )
        if in_chans is not None:
            kwargs["in_chans"] = int(in_chans)
        try:
            return timm.create_model(spec.name, pretrained=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - third-party constructor failure
            raise CheckpointError(
                f"timm could not build {spec.name!r} with {kwargs or 'default arguments'}: {exc}"
            ) from exc
    if spec.family == "torchvision":
        from torchvision.models import get_model, list_models

        names = list_models()
        if spec.name not in names:
            raise CheckpointError(
                f"unknown torchvision architecture {spec.name!r}"
                + _suggest(spec.name, names, "torchvision")
            )
        try:
            model = get_model(spec.name, weights=None, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"torchvision could not build {spec.name!r} with {kwargs or 'defaults'}: {exc}"
            ) from exc
        if in_chans is not None:
            _set_in_chans(model, int(in_chans), spec)
        return model
    if spec.family == "interptool":
        from interptool.loading._zoo import ZOO

        if spec.name not in ZOO:
            raise CheckpointError(
                f"unknown built-in architecture interptool:{spec.name}; available: "
                f"{', '.join(_zoo_names())}" + _suggest(spec.name, list(ZOO), "interptool")
            )
        if in_chans is not None:
            kwargs["in_chans"] = int(in_chans)
        try:
            return ZOO[spec.name](**kwargs)
        except TypeError as exc:  # an argument the builder does not take
            raise CheckpointError(
                f"interptool:{spec.name} could not be built with {kwargs}: {exc}") from exc
    if spec.family == "hf":
        from interptool.loading._hf import build_from_config, load_config

        if in_chans is not None:
            channels = int(getattr(load_config(spec.name), "num_channels", 3) or 3)
            if channels != int(in_chans):
                raise CheckpointError(
                    f"the checkpoint takes {in_chans} input channel(s) but "
                    f"{Path(spec.name) / 'config.json'} says num_channels = {channels}; "
                    f"fix num_channels there"
                )
        return build_from_config(spec.name, num_classes)
    if spec.family == "torchscript":
        return load_torchscript(Path(spec.name))
    raise CheckpointError(f"unknown architecture family {spec.family!r}")  # pragma: no cover


def load_torchscript(path: Path) -> nn.Module:
    """``torch.jit.load`` a TorchScript file (no Python unpickling is involved)."""
    if not path.exists():
        raise CheckpointError(
            f"TorchScript file {path} does not exist; --arch takes timm:NAME, torchvision:NAME, "
            f"interptool:NAME or the path of a TorchScript file"
        )
    from interptool.loading._checkpoint import verify_zip_crc

    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:
        verify_zip_crc(path)  # torch.jit.load does not check the members' CRC-32 either
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 flags TorchScript as deprecated; it is still the format users have.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path} could not be loaded as a TorchScript model ({type(exc).__name__}: {first}); "
            f"a plain weight file goes to --checkpoint together with --arch timm:NAME or "
            f"torchvision:NAME"
        ) from exc


def _set_in_chans(model: nn.Module, in_chans: int, spec: ArchSpec) -> None:
    """Replace the first convolution of a torchvision model by one taking ``in_chans``."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels == in_chans:
                return
            if mod.groups != 1:
                break
            new = nn.Conv2d(in_chans, mod.out_channels, mod.kernel_size, mod.stride,
                            mod.padding, mod.dilation, 1, mod.bias is not None, mod.padding_mode)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return
    raise CheckpointError(
        f"cannot change the input channels of torchvision:{spec.name} to {in_chans}"
    )


def classifier_key(model: nn.Module, spec: ArchSpec) -> str | None:
    """State-dict key of the classifier weight (its first dim is the number of classes)."""
    params = {n: p for n, p in model.state_dict().items()}
    if spec.family == "timm" and hasattr(model, "get_classifier"):
        try:
            clf = model.get_classifier()
        except Exception:  # noqa: BLE001
            clf = None
        if isinstance(clf, nn.Module):
            for name, mod in model.named_modules():
                if mod is clf and f"{name}.weight" in params:
                    return f"{name}.weight"
    # torchvision / zoo / fallback: the last 2-D (linear) or 1x1-conv weight whose name looks
    # like a classifier (fc, classifier.N, heads.head, head), else the last linear weight.
    candidates = [n for n, p in params.items() if n.endswith(".weight")
                  and (p.dim() == 2 or (p.dim() == 4 and p.shape[-2:] == (1, 1)))]
    named = [n for n in candidates if _CLASSIFIER_NAME.search(n)]
    if named:
        return named[-1]
    linear = [n for n in candidates if params[n].dim() == 2]
    return linear[-1] if linear else None


def first_conv_key(model: nn.Module) -> str | None:
    """State-dict key of the first convolution weight (dim 1 = input channels)."""
    for name, p in model.state_dict().items():
        if name.endswith("weight") and p.dim() == 4:
            return name
    return None


def model_in_chans(model: nn.Module) -> int | None:
    key = first_conv_key(model)
    return int(model.state_dict()[key].shape[1]) if key else None


def model_num_classes(model: nn.Module, spec: ArchSpec) -> int | None:
    key = classifier_key(model, spec)
    return int(model.state_dict()[key].shape[0]) if key else None
