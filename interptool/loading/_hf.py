"""Hugging Face ``transformers`` image classifiers from a local ``save_pretrained`` folder.

``--arch hf:PATH`` where PATH holds ``config.json``, the weights (``model.safetensors`` or
``pytorch_model.bin``, possibly sharded with an ``*.index.json``) and, usually,
``preprocessor_config.json``. Nothing is downloaded (``local_files_only``), no pickle is run
(safetensors, or ``.bin`` files vetted by interptool's own safe reader first), and the model
is wrapped so that ``forward(x)`` returns the logits tensor and the module names are those of
the Hugging Face model itself (``vit.layers.11``, ``classifier``), hookable like any module.

``transformers`` is an optional dependency: ``pip install 'interptool[hf]'``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interptool.common.numerics import seeded_rng
from interptool.errors import CheckpointError

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
# Weight files in transformers' order of preference; safetensors first (no pickle at all).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# PIL resample codes stored by image processors -> our interpolation names.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")
# ConvNext-style processors crop only below this size (transformers' ConvNextImageProcessor).
_CONVNEXT_CROP_BELOW = 384


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise CheckpointError(
            "--arch hf:PATH needs the optional dependency transformers; install it with "
            "pip install 'interptool[hf]' (or pip install 'transformers>=4.40')"
        ) from exc
    return transformers


class HFClassifier(nn.Module):
    """A Hugging Face image classifier whose ``forward(x)`` returns ``outputs.logits``.

    The wrapped model's children are registered as this module's children under their own
    names, so ``named_modules()`` / ``state_dict()`` keys equal those of the Hugging Face model
    (``vit.layers.0``, ``classifier.weight``) and forward hooks on them fire. The Hugging Face
    model itself is kept outside the module tree (it would otherwise double every name).

    Attributes:
        config: the model's ``transformers`` config.
        num_classes: ``config.num_labels``.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_hf", hf_model)  # not a registered sub-module, see above
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        for name, p in hf_model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in hf_model.named_buffers(recurse=False):
            persistent = name not in getattr(hf_model, "_non_persistent_buffers_set", set())
            self.register_buffer(name, b, persistent=persistent)
        self.config = hf_model.config
        self.num_classes = int(hf_model.config.num_labels)
        self.train(hf_model.training)

    @property
    def hf_model(self) -> nn.Module:
        """The wrapped ``transformers`` model (shares every parameter with this module)."""
        return self._hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` normalised images -> ``(N, num_classes)`` logits."""
        return self._hf(pixel_values=x, return_dict=True).logits

    def train(self, mode: bool = True) -> HFClassifier:
        super().train(mode)
        self._hf.training = mode  # the children follow via super(); the top module too
        return self

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        # tensors owned by the top-level HF module itself: keep both registrations in step
        for name in list(self._hf._parameters):
            self._hf._parameters[name] = self._parameters[name]
        for name in list(self._hf._buffers):
            self._hf._buffers[name] = self._buffers[name]
        return self


def _folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"--arch hf:{path}: {folder} is not a folder; give the folder written by "
            f"save_pretrained (config.json, model.safetensors, preprocessor_config.json)"
        )
    if not (folder / CONFIG).is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise CheckpointError(
            f"--arch hf:{path}: {folder / CONFIG} is missing (the folder holds {present}); "
            f"give the folder written by save_pretrained"
        )
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON ({exc}); re-save the folder") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def weight_file(folder: Path) -> Path | None:
    """The folder's weight file (or shard index) that transformers would load, if any."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def load_config(path: str | Path, num_classes: int | None = None):
    """``AutoConfig`` of the folder (``num_labels`` replaced when ``num_classes`` is given)."""
    folder = _folder(path)
    _read_json(folder / CONFIG)  # a readable, one-object JSON file: clearer errors first
    transformers = _transformers()
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_labels"] = int(num_classes)
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                       **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/OSError/KeyError
        raise CheckpointError(
            f"{folder / CONFIG} is not a config transformers {transformers.__version__} can "
            f"read ({type(exc).__name__}: {_first_line(exc)}); upgrade transformers or re-save"
        ) from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _head_class(config):
    """The image-classification class for ``config`` (CheckpointError when there is none)."""
    transformers = _transformers()
    try:
        return transformers.AutoModelForImageClassification._model_mapping[type(config)]
    except (KeyError, AttributeError, ValueError):
        raise CheckpointError(
            f"model_type {getattr(config, 'model_type', '?')!r} of the config has no "
            f"image-classification head in transformers {transformers.__version__} "
            f"(AutoModelForImageClassification); only image classifiers can be loaded"
        ) from None


def build_from_config(path: str | Path, num_classes: int | None = None) -> HFClassifier:
    """Random-initialised classifier of the folder's architecture (weights come later)."""
    config = load_config(path, num_classes)
    cls = _head_class(config)
    try:
        model = cls(config)
    except Exception as exc:  # noqa: BLE001 - third-party constructor failure
        raise CheckpointError(
            f"transformers could not build {cls.__name__} from {Path(path) / CONFIG}: "
            f"{_first_line(exc)}"
        ) from exc
    return HFClassifier(model.float().eval())


def _dtype_kwarg(transformers) -> str:
    """transformers 5 renamed ``torch_dtype`` to ``dtype`` (4.56 accepts both)."""
    major, minor = (int(v) for v in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_pretrained(
    path: str | Path, *, num_classes: int | None = None, strict: bool = True
) -> tuple[HFClassifier, dict[str, Any]]:
    """Load the folder's model with its own weights.

    Returns ``(model, info)``; ``info`` has ``weights`` (the file), ``format``
    (``safetensors``/``zip``/``legacy``), ``missing``, ``unexpected``, ``mismatched`` and
    ``notes``.

    Raises:
        CheckpointError: no weight file; a ``.bin`` needing full unpickling; ``num_classes``
            that contradicts config.json; with ``strict``, keys the file lacks or does not
            fit (transformers would silently initialise those at random).
    """
    folder = _folder(path)
    config = load_config(folder)
    _head_class(config)
    if num_classes is not None and int(num_classes) != int(config.num_labels):
        raise CheckpointError(
            f"{folder / CONFIG} has {config.num_labels} classes (id2label) but "
            f"num_classes={num_classes} was given; drop --num-classes"
        )
    weights = weight_file(folder)
    if weights is None:
        raise CheckpointError(
            f"--arch hf:{path}: no weights in {folder} (expected one of "
            f"{', '.join(WEIGHT_FILES)}); re-run save_pretrained, or pass a weight file with "
            f"--checkpoint"
        )
    use_safetensors = weights.name.startswith("model.safetensors")
    fmt = "safetensors"
    if not use_safetensors:
        # transformers unpickles .bin files with weights_only=True; interptool's own reader
        # vets every shard first, so an unsafe pickle is refused with the usual message.
        from interptool.loading._checkpoint import read_state_dict

        shards = [weights]
        if weights.name.endswith(".index.json"):
            index = _read_json(weights).get("weight_map", {})
            shards = [folder / s for s in sorted(set(index.values()))]
        for k, shard in enumerate(shards):
            _, shard_info = read_state_dict(shard)  # also verifies the zip CRCs
            if k == 0:
                fmt = shard_info["format"]
    transformers = _transformers()
    kwargs = {_dtype_kwarg(transformers): torch.float32}
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with seeded_rng(0):  # keys the file lacks (strict=False) get a fixed init
            model, loading = transformers.AutoModelForImageClassification.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=use_safetensors,
                output_loading_info=True, **kwargs,
            )
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files, unknown layouts
        raise CheckpointError(
            f"transformers could not load {weights} ({type(exc).__name__}: {_first_line(exc)}); "
            f"re-download or re-save the folder"
        ) from exc
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    missing = sorted(loading.get("missing_keys", []))
    unexpected = sorted(loading.get("unexpected_keys", []))
    mismatched = [(str(m[0]), tuple(m[2]), tuple(m[1])) if len(m) == 3 else (str(m), (), ())
                  for m in loading.get("mismatched_keys", [])]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append(f"{len(mismatched)} wrongly shaped (e.g. {mismatched[0][0]})")
        raise CheckpointError(
            f"weights {weights} do not fit the model of {folder / CONFIG}: {'; '.join(parts)} "
            f"key(s); transformers would initialise the missing ones at random. Check that "
            f"the folder holds a complete classifier, or load it with strict=False"
        )
    info = dict(weights=weights, format=fmt, missing=missing, unexpected=unexpected,
                mismatched=mismatched,
                notes=[f"weights from {weights.name} via transformers {transformers.__version__}"])
    return HFClassifier(model.float().eval()), info


def class_names(config) -> list[str] | None:
    """Class names from ``id2label`` in label order; ``None`` for transformers' placeholder
    names (``LABEL_0``, ``LABEL_1``, ...), which carry no information."""
    id2label = getattr(config, "id2label", None) or {}
    n = int(getattr(config, "num_labels", len(id2label)))
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(n)]
    if not names or all(_DEFAULT_LABEL.match(s) for s in names):
        return None
    return names


def _pair(v: Any, what: str, where: Path) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return int(v[0]), int(v[1])
    if isinstance(v, dict) and "height" in v and "width" in v:
        return int(v["height"]), int(v["width"])
    raise CheckpointError(
        f"{where}: {what} = {v!r} is not understood; expected an int or "
        f"{{\"height\": H, \"width\": W}}; pass --image-size instead"
    )


def _pct(crop: int, scaled: int) -> float:
    """crop_pct whose ``floor(crop / crop_pct)`` is exactly ``scaled`` (timm's formula)."""
    pct = crop / scaled
    if math.floor(crop / pct) != scaled:
        pct = crop / (scaled + 0.5)
    return min(pct, 1.0)


def hf_preprocessing(path: str | Path, config=None) -> dict[str, Any] | None:
    """Preprocessing fields from the folder's ``preprocessor_config.json`` (``None`` when the
    folder has none: then --image-size/--mean/--std are required).

    Mapping onto :class:`~interptool.loading.Preprocessing`:

    * ``size = {"height", "width"}`` (or an int) without a crop: both sides resized to it
      (``crop_mode="squash"``, ``crop_pct=1``); with ``do_center_crop`` and ``crop_size``: the
      resize is ``size`` and the crop ``crop_size`` (``squash``, ``crop_pct = crop / size``).
    * ``size = {"shortest_edge": S}``: the shorter side to S then a centre crop of
      ``crop_size`` (``crop_mode="center"``); without a crop size the crop is S x S.
      ConvNext-style processors (a ``crop_pct`` field): below 384 px the shorter side goes to
      ``S / crop_pct`` and the centre S x S is kept, from 384 px the image is resized to S x S.
    * ``resample`` (PIL code) -> interpolation; ``image_mean``/``image_std`` as given, rescaled
      when ``rescale_factor`` is not 1/255 (or ``do_rescale`` is false) so that the result on
      [0, 1] tensors is the same; ``do_normalize = false`` -> mean 0, std 1.
    """
    folder = Path(path).expanduser()
    where = folder / PREPROCESSOR
    if not where.is_file():
        return None
    pp = _read_json(where)
    if config is None:
        config = load_config(folder)
    channels = int(getattr(config, "num_channels", 3) or 3)
    size = pp.get("size")
    crop = pp.get("crop_size") if pp.get("do_center_crop", "crop_size" in pp) else None
    if not pp.get("do_resize", True) or size is None:
        side = getattr(config, "image_size", None)
        hw = _pair(crop if crop is not None else side, "crop_size/image_size", where) \
            if (crop is not None or side is not None) else None
        if hw is None:
            return None
        h, w, mode, pct = hw[0], hw[1], "squash", 1.0
    elif isinstance(size, dict) and "shortest_edge" in size:
        s = int(size["shortest_edge"])
        if "crop_pct" in pp and crop is None:  # ConvNextImageProcessor's rule
            if s < _CONVNEXT_CROP_BELOW:
                h = w = s
                mode, pct = "center", float(pp["crop_pct"] or 1.0)
            else:
                h = w = s
                mode, pct = "squash", 1.0
        else:
            h, w = _pair(crop, "crop_size", where) if crop is not None else (s, s)
            mode, pct = "center", _pct(min(h, w), s)
    else:
        rh, rw = _pair(size, "size", where)
        h, w = _pair(crop, "crop_size", where) if crop is not None else (rh, rw)
        mode, pct = "squash", _pct(h, rh)
    do_rescale = bool(pp.get("do_rescale", True))
    factor = float(pp.get("rescale_factor", 1 / 255)) if do_rescale else 1.0
    scale = 255.0 * factor  # our tensors are x / 255; the processor feeds x * factor
    if pp.get("do_normalize", True):
        if "image_mean" not in pp or "image_std" not in pp:
            raise CheckpointError(
                f"{where} normalises (do_normalize) but lacks image_mean/image_std; pass "
                f"--mean and --std"
            )
        mean = [float(v) for v in _seq(pp["image_mean"], channels)]
        std = [float(v) for v in _seq(pp["image_std"], channels)]
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    resample = pp.get("resample", 2)
    interp = _RESAMPLE.get(int(resample), "bilinear") if isinstance(resample, int) else "bilinear"
    return dict(
        input_size=(channels, int(h), int(w)),
        mean=tuple(m / scale for m in mean),
        std=tuple(s / scale for s in std),
        interpolation=interp,
        crop_pct=float(pct),
        crop_mode=mode,
        source="hf",
    )


def _seq(v: Any, n: int) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def token_layout(model: nn.Module, image_size: tuple[int, int]) -> tuple[int, tuple[int, int] | None]:
    """``(number of leading tokens, patch grid)`` of a wrapped Hugging Face model.

    Leading tokens are counted from the embeddings module: ``cls_token``,
    ``distillation_token`` (DeiT), ``register_tokens`` / ``config.num_register_tokens``
    (DINOv2 with registers). The grid is ``image_size // patch_size`` for models that embed
    patches into a token sequence; ``(0, None)`` for convolutional models.
    """
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None)
    emb = None
    for name, mod in model.named_modules():
        if name.endswith("embeddings") and any(hasattr(mod, a) for a in (
                "cls_token", "distillation_token", "patch_embeddings", "register_tokens")):
            emb = mod
            break
    if emb is None or patch is None:
        return 0, None
    n = int(getattr(emb, "cls_token", None) is not None)
    n += int(getattr(emb, "distillation_token", None) is not None)
    reg = getattr(emb, "register_tokens", None)
    if isinstance(reg, torch.Tensor):
        n += int(reg.shape[1]) if reg.dim() == 3 else int(reg.shape[0])
    else:
        n += int(getattr(config, "num_register_tokens", 0) or 0)
    if n == 0:
        return 0, None  # convolutional stems (ConvNext) and hierarchical models (Swin)
    ph, pw = _pair(patch, "patch_size", Path("config.json"))
    return n, (image_size[0] // ph, image_size[1] // pw)
