"""Input preprocessing of a loaded model: where the numbers come from and the transforms."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from interptool.errors import CheckpointError

# ImageNet statistics: the fallback when an architecture carries no preprocessing metadata.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
# timm's evaluation crop modes (timm.data.transforms_factory.transforms_imagenet_eval).
CROP_MODES = ("center", "squash", "border")
#: largest input side ``image_size`` may ask for (the largest timm/torchvision defaults are
#: ~800 px; a 20,000 px forward pass ran for minutes, 100,000 px failed allocating memory)
MAX_IMAGE_SIDE = 8192


@dataclass(frozen=True)
class Preprocessing:
    """How images must be turned into the tensors a model expects.

    Attributes:
        input_size: ``(C, H, W)`` of the network input; ``C == 1`` means grayscale.
        mean, std: per-channel normalisation (length ``C``), applied after scaling to [0, 1].
        interpolation: resize filter, ``"bilinear"`` or ``"bicubic"`` (others accepted).
        crop_pct: evaluation crop fraction: the shorter side is resized to ``H / crop_pct``
            before a centre crop of ``(H, W)``.
        crop_mode: ``"center"``, ``"squash"`` or ``"border"`` (see :meth:`eval_transform`).
        source: where the values came from (``"timm"``, ``"torchvision"``, ``"zoo"``,
            ``"flags"``, ``"default"``, possibly ``"timm+flags"``).
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    source: str = "default"

    def __post_init__(self) -> None:
        # Normalise lists (e.g. from JSON) to tuples so the frozen object hashes and compares.
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        c = self.input_size[0] if len(self.input_size) == 3 else -1
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise CheckpointError(
                f"preprocessing input_size must be (C, H, W) with positive values, got "
                f"{self.input_size}"
            )
        if len(self.mean) != c or len(self.std) != c:
            raise CheckpointError(
                f"preprocessing mean {self.mean} and std {self.std} must each have {c} value(s), "
                f"one per input channel of input_size {self.input_size}; pass --mean/--std "
                f"with {c} value(s)"
            )
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise CheckpointError(f"preprocessing mean {self.mean} and std {self.std} must be "
                                  "finite numbers (--mean, --std)")
        if any(s <= 0 for s in self.std):
            raise CheckpointError(f"preprocessing std must be positive (--std), got {self.std}")
        if not 0 < self.crop_pct <= 1.0 + 1e-9 and self.crop_mode == "center":
            raise CheckpointError(f"preprocessing crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.crop_mode not in CROP_MODES:
            raise CheckpointError(
                f"preprocessing crop_mode {self.crop_mode!r} is unknown; expected one of "
                f"{', '.join(CROP_MODES)}"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise CheckpointError(
                f"preprocessing interpolation {self.interpolation!r} is unknown; expected one "
                f"of {', '.join(_INTERPOLATIONS)}"
            )

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        d = asdict(self)
        for k in ("input_size", "mean", "std"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (forward compatibility)."""
        known = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        missing = {"input_size", "mean", "std"} - set(known)
        if missing:
            raise CheckpointError(
                f"preprocessing record lacks {', '.join(sorted(missing))}: got keys {sorted(d)}"
            )
        return cls(**known)

    def eval_transform(self, *, channels_last: bool = False) -> Callable:
        """PIL image -> normalised float tensor ``(C, H, W)``, exactly timm's evaluation
        transform (``timm.data.create_transform(is_training=False, ...)`` with these fields).

        ``crop_mode="center"``: the image is scaled, keeping its aspect ratio, so that it
        covers ``(H / crop_pct, W / crop_pct)`` (the shorter side for square inputs), then the
        centre ``(H, W)`` is cut out; ``"squash"``: both sides are resized to
        ``(H / crop_pct, W / crop_pct)`` (aspect ratio not kept), then centre-cropped;
        ``"border"``: the longer side is fitted to ``H / crop_pct`` keeping the aspect ratio
        and the result is centre-cropped or padded with the mean colour. Grayscale first when
        C == 1. Using timm's own transform keeps timm models bit-identical to their reference
        preprocessing (and torchvision's square centre crop is the same operation).

        ``channels_last=True`` gives the same values laid out channels-last (strides
        ``(1, W*C, C)``, see :class:`ToNormalizedChannelsLast`), for a consumer that feeds the
        model in that layout; :func:`split_normalization` batches them in that layout.
        """
        from timm.data import create_transform
        from torchvision import transforms as T

        timm_tf = create_transform(
            input_size=self.input_size,
            is_training=False,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
        )
        steps = list(getattr(timm_tf, "transforms", [timm_tf]))
        steps = [_ConvertMode("L" if self.channels == 1 else "RGB"), *steps]
        return T.Compose(_channels_last_steps(steps) if channels_last else steps)

    def probe_transform(self, *, channels_last: bool = False) -> Callable:
        """Like :meth:`eval_transform` but resize the whole image to ``(H, W)`` with no crop,
        so that segmentation masks stay aligned with pixels (network dissection)."""
        from torchvision import transforms as T

        steps = [
            _ConvertMode("L" if self.channels == 1 else "RGB"),
            T.Resize(self.image_size, interpolation=_interp(self.interpolation)),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ]
        return T.Compose(_channels_last_steps(steps) if channels_last else steps)


class ToNormalizedChannelsLast:
    """``ToTensor`` + ``Normalize`` in one step whose result is laid out channels-last.

    The values are bit-identical to the two torchvision steps (the same float operations in
    the same order: ``uint8 -> float``, ``/ 255``, ``- mean``, ``/ std``); only the strides
    differ: ``(C, H, W)`` viewed from an ``(H, W, C)`` buffer, PIL's own pixel order, so the
    step needs no transposing copy (``ToTensor``'s) and no clone (``Normalize``'s).

    A consumer that batches images can also split the step: :meth:`pixels` per image (the
    8-bit pixels, a quarter of the float bytes) and :meth:`stack` per batch, which normalises
    each image straight into its slot of a channels-last batch (no ``torch.stack`` copy;
    each image's arithmetic runs while its slot is in the CPU cache). The cache does so for
    conv models on the CPU: 1.85 ms of work per 224 px PNG probe image, decoding included,
    against 2.6 ms for the two torchvision steps, ``torch.stack`` and the batch's re-layout.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        # kept as given (floats, or timm's float32 tensors) and converted to the output's
        # dtype on each call, as Normalize does
        self.mean, self.std = mean, std

    def __call__(self, pic: Any) -> Any:
        return self.normalize(self.pixels(pic))

    def pixels(self, pic: Any) -> ImagePixels:
        """``pic``'s pixels, waiting for :meth:`normalize` (or :meth:`stack`)."""
        import numpy as np
        import torch
        from PIL import Image
        from torchvision.transforms import functional as F

        if isinstance(pic, Image.Image) and pic.mode in ("RGB", "L"):
            hwc = torch.from_numpy(np.array(pic, dtype=np.uint8, copy=True))
            return ImagePixels(hwc.unsqueeze(2) if hwc.ndim == 2 else hwc)
        return ImagePixels(F.to_tensor(pic).permute(1, 2, 0))

    def normalize(self, pixels: ImagePixels, out: Any = None) -> Any:
        """Normalised ``(C, H, W)`` values of ``pixels``, written into ``out`` (an
        ``(H, W, C)`` tensor of torch's default float dtype, e.g. a slot of a batch) or into
        a new buffer; channels-last strides either way."""
        import torch

        if out is None:
            out = torch.empty(pixels.hwc.shape, dtype=torch.get_default_dtype())
        return self._normalize_into(pixels.hwc, out, *self._stats(out.dtype))

    def stack(self, images: Sequence[Any]) -> Any:
        """A channels-last ``(N, C, H, W)`` batch: each :class:`ImagePixels` normalised into
        its slot, the same values as ``torch.stack([self(pic) for pic in images])``. A
        ``(C, H, W)`` tensor among them (final values from a data set that does not apply the
        transform) is copied into its slot as it is."""
        import torch

        def hwc_shape(item: Any) -> tuple[int, ...]:
            if isinstance(item, ImagePixels):
                return tuple(item.hwc.shape)
            return (*item.shape[1:], item.shape[0]) if item.ndim == 3 else tuple(item.shape)

        shapes = {hwc_shape(item) for item in images}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise RuntimeError(f"stack expects each image to be equal size, but got {shapes}")
        out = torch.empty((len(images), *shapes.pop()), dtype=torch.get_default_dtype())
        stats = self._stats(out.dtype)
        for slot, item in zip(out, images):
            if isinstance(item, ImagePixels):
                self._normalize_into(item.hwc, slot, *stats)
            else:
                slot.copy_(item.permute(1, 2, 0))
        return out.permute(0, 3, 1, 2)

    def _stats(self, dtype: Any) -> tuple[Any, Any]:
        import torch

        mean = torch.as_tensor(self.mean, dtype=dtype).flatten()
        std = torch.as_tensor(self.std, dtype=dtype).flatten()
        if bool((std == 0).any()):
            raise ValueError(f"std evaluated to zero after conversion to {dtype}, leading to "
                             "division by zero.")
        return mean, std

    @staticmethod
    def _normalize_into(hwc: Any, out: Any, mean: Any, std: Any) -> Any:
        import torch

        out.copy_(hwc)  # uint8 -> float is exact
        if hwc.dtype == torch.uint8:
            out.div_(255)
        # the channel is the last dimension here: mean/std broadcast along it
        return out.sub_(mean).div_(std).permute(2, 0, 1)

    def __repr__(self) -> str:
        return f"ToNormalizedChannelsLast(mean={_plain(self.mean)}, std={_plain(self.std)})"


@dataclass(frozen=True)
class ImagePixels:
    """One image's pixels before normalisation (:meth:`ToNormalizedChannelsLast.pixels`).

    ``hwc``: an ``(H, W, C)`` tensor, uint8 for 8-bit PIL images (``L``/``RGB``), else
    torchvision's ``to_tensor`` values (already scaled to [0, 1]). A type of its own, so that a
    batch knows which of its items still need normalising.
    """

    hwc: Any


def _plain(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in (values.tolist() if hasattr(values, "tolist") else values))


def split_normalization(transform: Any) -> tuple[Callable, ToNormalizedChannelsLast] | None:
    """``(per-image part, step)`` of a transform that ends in :class:`ToNormalizedChannelsLast`
    (``eval_transform(channels_last=True)``): the part gives each image's
    :class:`ImagePixels`, ``step.stack`` makes the batch. ``None`` for any other transform."""
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None)
    if not steps or not isinstance(steps[-1], ToNormalizedChannelsLast):
        return None
    step = steps[-1]
    return T.Compose([*steps[:-1], _Pixels(step)]), step


class _Pixels:
    """Picklable ``step.pixels`` (DataLoader workers pickle the transform)."""

    def __init__(self, step: ToNormalizedChannelsLast) -> None:
        self.step = step

    def __call__(self, pic: Any) -> ImagePixels:
        return self.step.pixels(pic)

    def __repr__(self) -> str:
        return f"Pixels(then {self.step!r} per batch)"


def _channels_last_steps(steps: list[Any]) -> list[Any]:
    """``steps`` with its trailing ``ToTensor`` + ``Normalize`` replaced by
    :class:`ToNormalizedChannelsLast` (the same values); unchanged when it does not end so."""
    from torchvision import transforms as T

    if len(steps) >= 2 and type(steps[-2]).__name__ in ("ToTensor", "MaybeToTensor") \
            and isinstance(steps[-1], T.Normalize) and not steps[-1].inplace:
        norm = steps[-1]
        return [*steps[:-2], ToNormalizedChannelsLast(norm.mean, norm.std)]
    return steps


class _ConvertMode:
    """Picklable ``img.convert(mode)`` (DataLoader workers pickle the transform)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def _interp_name(mode: Any) -> str:
    """torchvision InterpolationMode / timm string -> our lower-case name."""
    name = getattr(mode, "value", mode)
    name = str(name).lower()
    return name if name in _INTERPOLATIONS else "bilinear"


# ----------------------------------------------------------------------------- resolvers


def timm_preprocessing(model) -> dict[str, Any]:
    """Preprocessing fields from timm's pretrained config (metadata only, no download)."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return dict(
        input_size=tuple(cfg["input_size"]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=_interp_name(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        crop_mode=str(cfg.get("crop_mode", "center")),
        source="timm",
    )


def torchvision_preprocessing(name: str) -> dict[str, Any]:
    """Preprocessing fields from the metadata of torchvision's default (or first) weights.

    ``weights.transforms()`` only builds a transform object from stored numbers; it downloads
    nothing. Architectures without registered weights fall back to ImageNet defaults.
    """
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
        entries = list(enum)
    except Exception:  # noqa: BLE001 - no weights registered for this builder
        entries = []
    if not entries:
        return dict(
            input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
            interpolation="bilinear", crop_pct=0.875, crop_mode="center", source="default",
        )
    weights = getattr(enum, "DEFAULT", entries[0])
    t = weights.transforms()
    crop = _first(getattr(t, "crop_size", 224))
    resize = _first(getattr(t, "resize_size", None) or crop)
    return dict(
        input_size=(3, crop, crop),
        mean=tuple(getattr(t, "mean", IMAGENET_MEAN)),
        std=tuple(getattr(t, "std", IMAGENET_STD)),
        interpolation=_interp_name(getattr(t, "interpolation", "bilinear")),
        crop_pct=min(1.0, crop / resize),
        crop_mode="center",
        source="torchvision",
    )


def _first(v: Any) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def finalize_preprocessing(
    base: dict[str, Any] | None,
    in_chans: int | None,
    image_size: Sequence[int] | int | None,
    mean: Sequence[float] | float | None,
    std: Sequence[float] | float | None,
    where: str,
) -> Preprocessing:
    """Merge the architecture's defaults with user overrides and the model's channel count.

    ``where`` names the model in error messages. A single mean/std value means one channel.
    """
    if base is None and (image_size is None or mean is None or std is None):
        need = [f for f, v in (("--image-size", image_size), ("--mean", mean), ("--std", std))
                if v is None]
        raise CheckpointError(
            f"{where} carries no preprocessing metadata: give the input size and normalisation "
            f"with --image-size --mean --std (missing: {' '.join(need)}; Python: "
            f"image_size=(H, W), mean=(...), std=(...)); e.g. --image-size 224 "
            f"--mean 0.485 0.456 0.406 --std 0.229 0.224 0.225"
        )
    fields = dict(base or {})
    sources = [fields.pop("source", "default")] if base else []
    flagged = False
    if image_size is not None:
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        image_size = tuple(int(v) for v in image_size)
        if len(image_size) == 1:
            image_size = (image_size[0], image_size[0])
        if len(image_size) != 2:
            raise CheckpointError(f"image_size must be H or (H, W), got {image_size}")
        if min(image_size) < 1:
            raise CheckpointError(
                f"--image-size (image_size) must be positive pixel counts, got {image_size}"
            )
        if max(image_size) > MAX_IMAGE_SIDE:
            # a typo (2240 for 224) would otherwise allocate gigabytes in the first forward
            raise CheckpointError(
                f"--image-size (image_size) {image_size} is above {MAX_IMAGE_SIDE} px per side; "
                "image classifiers take a few hundred pixels: check the value")
        c = fields.get("input_size", (3,))[0]
        fields["input_size"] = (c, *image_size)
        flagged = True
    for name, val in (("mean", mean), ("std", std)):
        if val is not None:
            fields[name] = (float(val),) if isinstance(val, (int, float)) else tuple(val)
            flagged = True
    # channels: the model decides when known, else the length of a user-given mean/std.
    c_user = len(fields["mean"]) if mean is not None else (len(fields["std"]) if std is not None
                                                              else None)
    c = in_chans if in_chans is not None else (c_user or fields["input_size"][0])
    if c_user is not None and c_user != c:
        raise CheckpointError(
            f"{where} takes {c} input channel(s) but {c_user} mean/std value(s) were given; "
            f"give {c} value(s) to --mean and --std (one value means a grayscale model)"
        )
    for name in ("mean", "std"):
        vals = fields[name]
        if len(vals) != c:
            if len(vals) == 3 and c == 1:
                # a 3-channel default (e.g. ImageNet) for a 1-channel model: use the average.
                fields[name] = (sum(vals) / 3.0,)
                sources.append("gray")
            elif len(vals) == 1:
                fields[name] = vals * c
            else:
                raise CheckpointError(
                    f"{where}: {name} {vals} does not fit {c} input channel(s); pass --{name} "
                    f"with {c} value(s)"
                )
    fields["input_size"] = (c, *tuple(fields["input_size"])[1:])
    fields.setdefault("interpolation", "bilinear")
    fields.setdefault("crop_pct", 0.875 if base else 1.0)
    fields.setdefault("crop_mode", "center")
    if flagged:
        sources.append("flags")
    fields["source"] = "+".join(dict.fromkeys(sources)) or "flags"
    return Preprocessing(**fields)

