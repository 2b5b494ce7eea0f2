"""``load_model``: architecture + weight file -> an eval-mode model with its preprocessing."""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interptool._provenance import sha256_file
from interptool.common.numerics import seeded_rng
from interptool.errors import CheckpointError, ConfigError
from interptool.loading._builder import (
    ArchSpec,
    build,
    check_model_kwargs,
    classifier_key,
    first_conv_key,
    model_in_chans,
    parse_arch,
)
from interptool.loading._checkpoint import (
    common_prefixes,
    read_state_dict,
    role_groups,
    split_selector,
    strip_wrapper_prefixes,
)
from interptool.loading._keymap import POSITIONAL, apply_rules, parse_key_map, positional_map
from interptool.loading._preprocess import (
    Preprocessing,
    finalize_preprocessing,
    timm_preprocessing,
    torchvision_preprocessing,
)

_MAX_LISTED = 10
# Seed of the random initialisation of a model loaded without a checkpoint.
INIT_SEED = 0


@dataclass
class LoadReport:
    """What happened to the checkpoint's keys on the way into the model.

    Attributes:
        renamed: ``(old, new)`` pairs changed by the key map (``new == ""``: dropped by a rule).
        missing: model keys the checkpoint did not provide (only when ``strict=False``).
        unexpected: checkpoint keys the model has no place for (only when ``strict=False``).
        source_keys: wrapper key path the weights came from (``"state_dict"``,
            ``"model"``, ``"model/state_dict"``; ``""`` for a bare state dict).
        mismatched: ``(key, expected shape, found shape)`` skipped when ``strict=False``.
        selected: key prefix chosen among several networks (``"student."``), else None.
        stripped_prefixes: prefixes removed from every key (``"module."``, ``"_orig_mod."``).
        format: file format (``zip``, ``legacy``, ``safetensors``, ``torchscript``).
        alternatives: other weight sets present (EMA copies, the other network of a pair).
        allowed_globals: known-harmless classes unpickled (``argparse.Namespace``).
        trusted_pickle: whether full unpickling was allowed.
        inferred: values read from the checkpoint (``num_classes``, ``in_chans``) and the key.
        notes: human-readable remarks.
    """

    renamed: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    source_keys: str | None = None
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    selected: str | None = None
    stripped_prefixes: list[str] = field(default_factory=list)
    format: str | None = None
    alternatives: list[str] = field(default_factory=list)
    allowed_globals: list[str] = field(default_factory=list)
    trusted_pickle: bool = False
    inferred: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return dict(
            renamed=[list(p) for p in self.renamed],
            missing=list(self.missing),
            unexpected=list(self.unexpected),
            source_keys=self.source_keys,
            mismatched=[[k, list(a), list(b)] for k, a, b in self.mismatched],
            selected=self.selected,
            stripped_prefixes=list(self.stripped_prefixes),
            format=self.format,
            alternatives=list(self.alternatives),
            allowed_globals=list(self.allowed_globals),
            trusted_pickle=self.trusted_pickle,
            inferred=dict(self.inferred),
            notes=list(self.notes),
        )


@dataclass
class LoadedModel:
    """A model ready for analysis: eval mode, on ``device``, with its preprocessing.

    Token layout of transformer models (read from the model, never guessed from shapes):
    ``num_prefix_tokens`` is the number of leading non-patch tokens of its token sequences
    (timm's ``num_prefix_tokens``: 1 for a ViT's class token, 2 for DeiT distilled models
    (class + distillation), 1 + 4 for ViTs with four registers; 0 for CNNs) and
    ``token_grid`` the ``(rows, cols)`` patch grid those tokens are laid out on (``None`` for
    CNNs and hierarchical models such as Swin, whose stages change the grid). A token layer
    ``(T, D)`` then holds ``T == num_prefix_tokens + rows * cols`` tokens.

    ``class_names``: label names carried by the model (Hugging Face ``id2label``), else None.
    ``checkpoint_sha256`` of an ``hf:FOLDER`` loaded without ``checkpoint`` is the checksum of
    the folder's weight file.
    """

    model: nn.Module
    arch: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    num_classes: int
    preprocessing: Preprocessing
    load_report: LoadReport
    device: str = "cpu"
    arch_sha256: str | None = None  # TorchScript file / hf:FOLDER's config.json checksum
    num_prefix_tokens: int = 0
    token_grid: tuple[int, int] | None = None
    class_names: list[str] | None = None
    #: constructor arguments the architecture was built with (``load_model(model_kwargs=)``)
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Short display name: the checkpoint's file stem (+ selector), else the arch name."""
        if self.checkpoint:
            file, sel = split_selector(self.checkpoint)
            return file.stem + (f"#{sel}" if sel else "")
        return parse_arch(self.arch).display

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe record of what was loaded (no model)."""
        return dict(
            name=self.name,
            arch=self.arch,
            arch_sha256=self.arch_sha256,
            checkpoint=self.checkpoint,
            checkpoint_sha256=self.checkpoint_sha256,
            num_classes=self.num_classes,
            in_chans=self.preprocessing.input_size[0],
            preprocessing=self.preprocessing.to_dict(),
            load_report=self.load_report.to_dict(),
            device=self.device,
            num_prefix_tokens=int(self.num_prefix_tokens),
            token_grid=list(self.token_grid) if self.token_grid is not None else None,
            class_names=list(self.class_names) if self.class_names is not None else None,
            model_kwargs=dict(self.model_kwargs),
        )


# ----------------------------------------------------------------------------- helpers


def _size_from_kwarg(value: Any, kwarg: str) -> tuple[int, int]:
    """A constructor's input-size argument (one side, or ``(H, W)``) as ``(H, W)``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return (value, value)
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return (int(value[0]), int(value[1]))
    raise ConfigError(f"model_kwargs {kwarg}={value!r}: expected a positive integer or "
                      "[H, W]")


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1)") from exc
    if dev.type not in ("cpu", "cuda"):
        # the cache's device-to-host copies and the analyses' float64 work (dissection, CKA,
        # the similarity bootstrap) are written and tested for these two (MPS has no float64)
        raise ConfigError(f"device {device!r} is not supported: interptool runs on cpu or "
                          "cuda[:N]; use --device cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _skip(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _compare(sd: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor]):
    missing = [k for k in model_sd if k not in sd and not _skip(k)]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [(k, _shape(model_sd[k]), _shape(sd[k])) for k in sd
                  if k in model_sd and _shape(sd[k]) != _shape(model_sd[k])]
    return missing, unexpected, mismatched


def _fit(sd: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor], flexible: set[str]):
    """Sort key for candidate weight sets: exact fits first, then the most matching keys."""
    missing, unexpected, mismatched = _compare(sd, model_sd)
    bad_shapes = [m for m in mismatched if m[0] not in flexible]
    exact = not missing and not unexpected and not bad_shapes
    matched = sum(1 for k in sd if k in model_sd) - len(bad_shapes)
    return exact, matched, -len(unexpected)


def _candidates(sd: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor]):
    """Ways to read ``sd`` as this model's weights: as is, one network of a pair, or with a
    prefix every key shares (e.g. Lightning's ``model.``) removed. Students come first."""
    out: list[tuple[str | None, dict[str, torch.Tensor]]] = [(None, sd)]
    groups = role_groups(sd)
    if groups and not any(k.startswith(tuple(groups)) for k in model_sd):
        def order(p: str) -> tuple[int, str]:
            last = p.rstrip(".").split(".")[-1]
            return (0 if ("student" in last or last.startswith("s_") or last.endswith("_s"))
                    else 1, p)

        for prefix in sorted(groups, key=order):
            sub = {k[len(prefix):]: sd[k] for k in groups[prefix]}
            out.append((prefix, strip_wrapper_prefixes(sub)[0]))
    for prefix in common_prefixes(sd):
        if not any(k.startswith(prefix) for k in model_sd):
            sub = strip_wrapper_prefixes({k[len(prefix):]: v for k, v in sd.items()})[0]
            out.append((prefix, sub))
    return out


def _choose(sd, model_sd, flexible, report: LoadReport):
    cands = _candidates(sd, model_sd)
    if len(cands) == 1:
        return sd
    best = max(range(len(cands)), key=lambda i: (*_fit(cands[i][1], model_sd, flexible), -i))
    prefix, chosen = cands[best]
    if prefix is not None:
        report.selected = prefix
        others = [p for p, _ in cands[1:] if p != prefix and p in role_groups(sd)]
        report.alternatives += [f"#{p.rstrip('.')}" for p in others]
        report.notes.append(
            f"used the keys under {prefix!r}"
            + (f"; also present: {', '.join(others)} (select one with CHECKPOINT#NAME)"
               if others else "")
        )
    return chosen


def _mismatch_message(
    where: str, sd, model_sd, missing, unexpected, mismatched, spec: ArchSpec,
    clf_key: str | None, num_classes_given: bool, report: LoadReport,
    size_hint: str | None = None,
) -> str:
    head = (f"checkpoint {where} does not fit {spec.family}:{spec.name}: {len(missing)} "
            f"missing, {len(unexpected)} unexpected and {len(mismatched)} wrongly shaped "
            f"key(s). First offending keys: ")
    # up to _MAX_LISTED keys, on the one line of the error: wrong shapes first, then missing
    # and unexpected keys shared
    keys = []
    room = _MAX_LISTED - min(len(mismatched), _MAX_LISTED)
    n_unexp = min(len(unexpected), max(room // 2, room - len(missing)))
    n_miss = min(len(missing), room - n_unexp)
    for k, exp, got in mismatched[:_MAX_LISTED]:
        keys.append(f"shape {k}: model expects {exp}, checkpoint has {got}")
    for k in missing[:n_miss]:
        keys.append(f"missing {k}: model expects {_shape(model_sd[k])}, not in checkpoint")
    for k in unexpected[:n_unexp]:
        keys.append(f"unexpected {k}: checkpoint has {_shape(sd[k])}, model has no such key")
    text = head + "; ".join(keys)
    if report.selected:
        text += (f" (keys were read under the prefix {report.selected!r}, the best fit "
                 f"among the networks in the file)")
    causes = [size_hint] if size_hint else []
    if missing and all(_same_module(k, clf_key) for k in missing) and not mismatched:
        causes.append(
            f"the checkpoint has no classifier ({', '.join(missing)}): a backbone-only or "
            f"feature-extractor checkpoint; load it with strict=False in Python, or add the head"
        )
    elif clf_key and any(k == clf_key and e[0] != g[0] for k, e, g in mismatched):
        # (the same number of outputs with another width is a feature-size mismatch: another
        # architecture, said below)
        exp = dict((k, e) for k, e, _ in mismatched)[clf_key][0]
        got = dict((k, g) for k, _, g in mismatched)[clf_key][0]
        causes.append(
            f"wrong num_classes: the checkpoint's classifier {clf_key} has {got} outputs, the "
            f"model {exp}"
            + ("; drop --num-classes to infer it" if num_classes_given else "")
        )
    prefixes = [p for p in common_prefixes(sd) if not any(k.startswith(p) for k in model_sd)]
    if prefixes:
        p = prefixes[0]
        causes.append(
            f"every checkpoint key starts with {p!r}, which the model lacks (removing it alone "
            f"does not make the keys fit): strip it with a key map rule (pattern = "
            f"\"^{p.replace('.', '[.]')}\", replacement = \"\") plus rules for the other names"
        )
    groups = role_groups(sd)
    if groups:
        causes.append(
            f"the checkpoint holds several networks ({', '.join(groups)}); select one with "
            f"CHECKPOINT#NAME, e.g. #{next(iter(groups)).rstrip('.')}"
        )
    found = sum(1 for k in model_sd if k in sd)
    if len(model_sd) and found < 0.5 * len(model_sd):
        sample = ", ".join(list(sd)[:3])
        causes.append(
            f"wrong architecture or foreign key names: only {found} of {len(model_sd)} model "
            f"keys occur in the checkpoint (its keys look like {sample}); check --arch, or "
            f"rename keys with --key-map FILE.toml (regex rules) or --key-map positional"
        )
    elif size_hint and len(mismatched) == 1 and not missing and not unexpected:
        pass  # only the position embedding differs: the input size, said above
    elif [m for m in mismatched if not _same_module(m[0], clf_key) or m[1][0] == m[2][0]] or (
        [k for k in missing if not _same_module(k, clf_key)] and not prefixes
    ):
        causes.append(
            "wrong architecture or variant (e.g. resnet18 vs resnet34, different widths or "
            "depth): check --arch"
        )
    if report.alternatives:
        causes.append(f"other weight sets in the file: {', '.join(report.alternatives)}")
    return text + (". Likely cause: " + "; ".join(causes) if causes else
                   ". Check --arch and --num-classes.")


#: the constructor argument that sets a ViT's input size (and so its position embedding)
SIZE_KWARG = {"timm": "img_size", "torchvision": "image_size"}


def _input_size_hint(model: nn.Module, spec: ArchSpec, mismatched: list) -> str | None:
    """When a ViT's position embedding is the only thing telling the checkpoint's input size
    apart (a DeiT fine-tuned at 384 px loaded into the 224 px architecture), the size it was
    trained at and the ``model_kwargs`` that builds the model for it."""
    import math

    kwarg = SIZE_KWARG.get(spec.family)
    for key, exp, got in mismatched:
        if kwarg is None or len(exp) != 3 or len(got) != 3 or exp[2] != got[2]:
            continue
        if spec.family == "timm" and key.endswith("pos_embed"):
            pe = getattr(model, "patch_embed", None)
            grid, patch = getattr(pe, "grid_size", None), getattr(pe, "patch_size", None)
            if not grid or not patch:
                return None
            patches, patch_side = int(grid[0]) * int(grid[1]), int(patch[0])
        elif spec.family == "torchvision" and key == "encoder.pos_embedding":
            side, patch_side = getattr(model, "image_size", None), getattr(model, "patch_size", None)
            if not isinstance(side, int) or not isinstance(patch_side, int):
                return None
            patches = (side // patch_side) ** 2
        else:
            continue
        prefix = exp[1] - patches  # class / distillation / register tokens
        n = got[1] - prefix
        root = math.isqrt(n) if n > 0 else 0
        if prefix < 0 or root * root != n:
            return None
        size = root * patch_side
        return (f"{key} holds {root}x{root} patch positions: the checkpoint was trained at "
                f"{size} px; build the model for it with --model-kwargs {kwarg}={size} "
                f"(config: model_kwargs = {{ {kwarg} = {size} }}; Python: "
                f"model_kwargs={{'{kwarg}': {size}}})")
    return None


def _same_module(key: str, other: str | None) -> bool:
    return other is not None and key.rsplit(".", 1)[0] == other.rsplit(".", 1)[0]


def _infer_sizes(sd, model, spec, key_positional) -> dict[str, tuple[str, int]]:
    """Read num_classes / in_chans from the checkpoint tensors at the model's classifier and
    first-convolution keys (``key_positional`` maps model keys to checkpoint keys)."""
    out: dict[str, tuple[str, int]] = {}
    clf = classifier_key(model, spec)
    conv = first_conv_key(model)
    lookup = key_positional or {}
    for what, key, dim in (("num_classes", clf, 0), ("in_chans", conv, 1)):
        if key is None:
            continue
        src = lookup.get(key, key)
        t = sd.get(src)
        if t is not None and t.dim() > dim:
            out[what] = (src, int(t.shape[dim]))
    return out


def _positional_lookup(sd, model_sd) -> dict[str, str]:
    src = list(sd)
    dst = list(model_sd)
    if len(src) != len(dst):
        src = [k for k in src if not _skip(k)]
        dst = [k for k in dst if not _skip(k)]
    return dict(zip(dst, src)) if len(src) == len(dst) else {}


def _torchscript_num_classes(model: nn.Module, pre: Preprocessing, where: str) -> int:
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, *pre.input_size)))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"TorchScript model {where} failed on a zero input of shape {(1, *pre.input_size)} "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"
            f"); check --image-size and the number of --mean/--std values (input channels)"
        ) from exc
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() < 1:
        raise CheckpointError(f"TorchScript model {where} does not return a logits tensor")
    return int(out.shape[-1])


# ----------------------------------------------------------------------------- load_model


def load_model(
    arch: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
    key_map: str | os.PathLike | dict | list | None = None,
    trust_pickle: bool = False,
    image_size: tuple[int, int] | int | None = None,
    mean: tuple[float, ...] | float | None = None,
    std: tuple[float, ...] | float | None = None,
    device: str = "cpu",
    strict: bool = True,
    init_seed: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> LoadedModel:
    """Build ``arch``, load ``checkpoint`` into it safely and resolve its preprocessing.

    Args:
        arch: ``timm:NAME``, ``torchvision:NAME``, ``interptool:NAME`` or a TorchScript path.
        checkpoint: weight file (``.pth``/``.pt``/``.bin``, ``.safetensors``, training
            checkpoint). ``file.pth#NAME`` selects a wrapper key (``#state_dict_ema``) or one
            network of a teacher/student pair (``#teacher``, ``#student``).
            Without one the weights are a random initialisation drawn with seed
            ``init_seed`` (default ``INIT_SEED``, 0), so repeated calls give the same model.
        num_classes: default: read from the checkpoint's classifier weight.
        key_map: TOML file / dict / list of ``(regex, replacement)`` rules applied in order to
            every key, or ``"positional"`` (match tensors in order, every shape verified).
        trust_pickle: allow full unpickling (runs code from the file); only for files you trust.
        image_size, mean, std: override the architecture's preprocessing (required for
            TorchScript). One mean/std value means a one-channel (grayscale) model.
        device: torch device for the model.
        strict: key or shape mismatches raise (default); ``False`` loads what fits and lists
            the rest in the report.
        model_kwargs: extra constructor arguments for timm / torchvision / interptool
            architectures, as timm's ``create_model(name, **kwargs)`` takes them (e.g.
            ``{"img_size": 384}`` for a ViT fine-tuned at 384 px, ``{"global_pool": "avg"}``);
            JSON-like values; recorded in ``LoadedModel.model_kwargs`` and in every cache
            made with the model. A timm ``img_size`` (torchvision ``image_size``) is also the
            input size unless ``image_size`` is given. Arguments that download weights
            (``pretrained``, ``weights``, ...) and ``num_classes`` / ``in_chans`` are refused.

    Raises:
        CheckpointError: unknown architecture, unreadable/unsafe file, keys or shapes that do
            not fit (the message lists the first offending keys and a likely cause).
    """
    spec = parse_arch(arch)
    dev = _check_device(device)
    if num_classes is not None:
        try:  # numpy integers too
            given = None if isinstance(num_classes, bool) else operator.index(num_classes)
        except TypeError:
            given = None
        if given is None or given < 1:
            raise ConfigError(f"num_classes (--num-classes) must be a whole number >= 1, got "
                              f"{num_classes!r}; omit it to read it from the checkpoint")
        num_classes = given
    model_kwargs = check_model_kwargs(model_kwargs, spec)
    size_kwarg = model_kwargs.get(SIZE_KWARG.get(spec.family, ""))
    if image_size is None and size_kwarg is not None:
        # the model is built for this input size: feed it that size (timm's data config
        # still describes the pretrained default)
        image_size = _size_from_kwarg(size_kwarg, SIZE_KWARG[spec.family])
    rules = parse_key_map(key_map)
    report = LoadReport()
    sd: dict[str, torch.Tensor] | None = None
    file: Path | None = None
    if checkpoint is not None:
        file, selector = split_selector(checkpoint)
        sd, info = read_state_dict(checkpoint, trust_pickle=trust_pickle)
        report.source_keys = info["source_keys"]
        report.format = info["format"]
        report.stripped_prefixes = list(info["stripped_prefixes"])
        report.alternatives = [f"#{a}" for a in info["alternatives"]]
        report.allowed_globals = list(info["allowed_globals"])
        report.trusted_pickle = bool(info["trusted_pickle"])
        if selector:
            report.selected = selector
        if info["dropped"]:
            report.notes.append(f"ignored non-tensor entries: {', '.join(info['dropped'][:10])}")
        if rules not in (None, POSITIONAL):
            sd, report.renamed = apply_rules(sd, rules)

    where = str(file) if file else "(none)"
    hf_weights: Path | None = None
    if spec.family == "hf" and sd is None:
        # the folder's own weights, through transformers (safetensors / vetted .bin)
        from interptool.loading._hf import hf_preprocessing, load_pretrained

        model, hinfo = load_pretrained(spec.name, num_classes=num_classes, strict=strict)
        hf_weights = hinfo["weights"]
        report.format = hinfo["format"]
        report.source_keys = ""
        report.missing, report.unexpected = hinfo["missing"], hinfo["unexpected"]
        report.mismatched = hinfo["mismatched"]
        report.notes += hinfo["notes"]
        base = hf_preprocessing(spec.name, model.config)
        in_chans = model_in_chans(model)
    elif spec.family == "torchscript":
        model = build(spec)
        base = None
        in_chans = model_in_chans(model)
    else:
        if sd is None:
            # No weight file: a random initialisation, drawn from a fixed seed so that the
            # same command gives the same model (reproducible caches, resumable runs, cache
            # hits); the caller's global RNG state is left untouched.
            seed = INIT_SEED if init_seed is None else int(init_seed)
            with seeded_rng(seed):  # the CPU's generator only (GPUs' left alone)
                model = build(spec, num_classes, model_kwargs=model_kwargs)
            report.notes.append(f"no checkpoint: random initialisation with seed {seed}")
        else:
            model = build(spec, num_classes, model_kwargs=model_kwargs)
        in_chans = model_in_chans(model)
        if spec.family == "timm":
            base = timm_preprocessing(model)
        elif spec.family == "torchvision":
            base = torchvision_preprocessing(spec.name)
        elif spec.family == "hf":
            from interptool.loading._hf import hf_preprocessing

            base = hf_preprocessing(spec.name, model.config)
        else:
            from interptool.loading._zoo import ZOO_PREPROCESSING

            base = dict(ZOO_PREPROCESSING[spec.name], source="zoo")

    if sd is not None and spec.family != "torchscript":
        model_sd = model.state_dict()
        clf = classifier_key(model, spec)
        conv = first_conv_key(model)
        flexible = {k for k in (clf if num_classes is None else None, conv) if k}
        if rules == POSITIONAL:
            lookup = _positional_lookup(sd, model_sd)
        else:
            lookup = None
            if not report.selected:
                sd = _choose(sd, model_sd, flexible, report)
        sizes = _infer_sizes(sd, model, spec, lookup)
        new_nc = num_classes
        new_ic = None
        if num_classes is None and "num_classes" in sizes:
            key, n = sizes["num_classes"]
            if n < 1:
                raise CheckpointError(f"checkpoint {where}: the classifier {key} has {n} "
                                      "outputs; a classifier's weight has one row per class")
            report.inferred["num_classes"] = n
            report.inferred["num_classes_from"] = key
            if n != int(model_sd[clf].shape[0]):
                new_nc = n
        if "in_chans" in sizes:
            key, c = sizes["in_chans"]
            if c != in_chans:
                report.inferred["in_chans"] = c
                report.inferred["in_chans_from"] = key
                new_ic = c
        if new_nc != num_classes or new_ic is not None:
            model = build(spec, new_nc, new_ic, model_kwargs=model_kwargs)
            in_chans = model_in_chans(model)
            if spec.family == "timm":
                # the data config does not depend on the head, but on pretrained cfg only;
                # re-resolving keeps it exact if a model adapts it to in_chans.
                base = timm_preprocessing(model)

    if sd is not None:
        model_sd = model.state_dict()
        if rules == POSITIONAL:
            sd, report.renamed = positional_map(sd, model_sd, check_shapes=strict)
        missing, unexpected, mismatched = _compare(sd, model_sd)
        if strict and (missing or unexpected or mismatched):
            raise CheckpointError(_mismatch_message(
                where, sd, model_sd, missing, unexpected, mismatched, spec,
                classifier_key(model, spec) if spec.family != "torchscript" else None,
                num_classes is not None, report,
                size_hint=None if size_kwarg is not None else _input_size_hint(
                    model, spec, mismatched),
            ))
        bad = {k for k, _, _ in mismatched}
        to_load = {k: v for k, v in sd.items() if k in model_sd and k not in bad}
        try:
            model.load_state_dict(to_load, strict=False)
        except RuntimeError as exc:  # pragma: no cover - shapes were verified above
            raise CheckpointError(f"checkpoint {where} failed to load: {exc}") from exc
        report.missing, report.unexpected, report.mismatched = missing, unexpected, mismatched

    pre = finalize_preprocessing(
        base, in_chans, image_size, mean, std,
        where=f"{spec.family}:{spec.name}" if spec.family != "torchscript" else spec.name,
    )
    model.eval()
    if spec.family == "torchscript":
        n = _torchscript_num_classes(model, pre, spec.name)
        if num_classes is not None and num_classes != n:
            raise CheckpointError(
                f"TorchScript model {spec.name} outputs {n} classes but num_classes={num_classes}"
                f" was given; drop --num-classes"
            )
        num_classes = n
    else:
        num_classes = _num_outputs(model, spec, num_classes)
    model.to(dev)
    n_prefix, grid = token_layout(model, spec, pre.image_size)
    names = None
    arch_sha = sha256_file(spec.name) if spec.family == "torchscript" else None
    if spec.family == "hf":
        from interptool.loading._hf import class_names

        names = class_names(model.config)
        arch_sha = sha256_file(Path(spec.name).expanduser() / "config.json")
    weights_file = file if file is not None else hf_weights
    return LoadedModel(
        model=model,
        arch=os.fspath(arch),
        checkpoint=os.fspath(checkpoint) if checkpoint is not None else None,
        checkpoint_sha256=sha256_file(weights_file) if weights_file is not None else None,
        num_classes=int(num_classes),
        preprocessing=pre,
        load_report=report,
        device=str(dev),
        arch_sha256=arch_sha,
        num_prefix_tokens=n_prefix,
        token_grid=grid,
        class_names=names,
        model_kwargs=model_kwargs,
    )


def token_layout(
    model: nn.Module, spec: ArchSpec, image_size: tuple[int, int]
) -> tuple[int, tuple[int, int] | None]:
    """``(num_prefix_tokens, token_grid)`` read from the model (see :class:`LoadedModel`).

    timm: the model's own ``num_prefix_tokens`` (class, distillation and register tokens) and
    its patch embedding's grid (recomputed for ``image_size`` when the model accepts dynamic
    sizes); torchvision ViTs: one class token and ``image_size // patch_size``; Hugging Face:
    counted from the embeddings module; everything else (CNNs, TorchScript): ``(0, None)``.
    """
    if spec.family == "hf":
        from interptool.loading._hf import token_layout as hf_layout

        return hf_layout(model, image_size)
    if spec.family == "timm":
        n = getattr(model, "num_prefix_tokens", None)
        pe = getattr(model, "patch_embed", None)
        if n is None or pe is None or getattr(pe, "grid_size", None) is None:
            return 0, None  # no token sequence (CNN), or a hierarchical model (Swin)
        if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
            grid = pe.dynamic_feat_size(tuple(image_size))
        else:
            grid = pe.grid_size
        return int(n), (int(grid[0]), int(grid[1]))
    if spec.family == "torchvision":
        patch = getattr(model, "patch_size", None)
        if isinstance(getattr(model, "class_token", None), torch.Tensor) and patch:
            return 1, (image_size[0] // int(patch), image_size[1] // int(patch))
        return 0, None
    return 0, None


def _num_outputs(model: nn.Module, spec: ArchSpec, given: int | None) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    key = classifier_key(model, spec)
    if key is not None:
        return int(model.state_dict()[key].shape[0])
    if given is not None:
        return int(given)
    raise CheckpointError(f"cannot tell the number of classes of {spec.family}:{spec.name}; "
                          f"pass --num-classes")  # pragma: no cover
