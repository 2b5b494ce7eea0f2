"""The ``interptool compare`` configuration: TOML schema, validation and the ``--init`` template.

Every field is checked before any work starts, so a typo in the last line of a config never
costs an hour of caching. Errors are :class:`~interptool.errors.ConfigError` whose message
starts with ``<file>: <dotted.field>:`` and says what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from interptool.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

# Data-set spec schemes whose remainder is a path (relative paths resolve against the config).
_PATH_SCHEMES = ("imagefolder", "broden", "csv")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------
# dataclasses
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Data-set specs (see :func:`interptool.data.open_dataset`) with paths made absolute."""

    eval: str | None = None
    probe: str | None = None


@dataclass
class ModelConfig:
    """One model: the keyword arguments of :func:`interptool.loading.load_model` plus layers."""

    name: str
    arch: str
    checkpoint: str | None = None
    layers: list[str] = field(default_factory=list)
    role: str = "student"
    num_classes: int | None = None
    key_map: str | dict | None = None
    trust_pickle: bool = False
    image_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # seeds of one training recipe share a group; findings also compare group means
    group: str | None = None
    # Grad-CAM layer of this model (default: analysis.attribution.layer, else its last layer)
    attribution_layer: str | None = None
    # constructor arguments of the architecture (load_model(model_kwargs=)), e.g. img_size
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def load_kwargs(self, device: str = "cpu") -> dict[str, Any]:
        """Keyword arguments for ``load_model(self.arch, **kwargs)``."""
        return dict(
            checkpoint=self.checkpoint,
            num_classes=self.num_classes,
            key_map=self.key_map,
            trust_pickle=self.trust_pickle,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            device=device,
            model_kwargs=dict(self.model_kwargs) or None,
        )


def _compare_specs() -> list[Any]:
    from interptool.analyzers import analyzer_specs

    return [s for s in analyzer_specs() if s.in_compare]


def analysis_names() -> list[str]:
    """The analyses a compare config may set: every registered analyzer in ``compare``."""
    return [s.name for s in _compare_specs()]


def analysis_config_class(name: str) -> type:
    """The dataclass of the ``[analysis.<name>]`` table, derived from the analyzer's Params
    and compare options (:meth:`interptool.analyzers.AnalyzerSpec.config_class`)."""
    from interptool.analyzers import get_analyzer

    return get_analyzer(name).config_class()


def __getattr__(name: str) -> Any:
    # DissectionConfig, SimilarityConfig, AttributionConfig, ...: derived classes, by name
    for spec in _compare_specs():
        cls = spec.config_class()
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class AnalysisConfig:
    """The ``[analysis]`` section: one settings object per registered analysis (or None when
    switched off), in registry order; ``cfg.analysis.dissection`` reads one.

    ``AnalysisConfig(dissection=DissectionConfig(top_units=4), attribution=None)``: tables not
    given keep their defaults.
    """

    def __init__(self, **tables: Any) -> None:
        names = analysis_names()
        for key in tables:
            if key not in names:
                raise ConfigError(f"analysis: unknown analysis {key!r}{_suggest(key, names)}; "
                                  f"choose from {', '.join(names)}")
        self.__dict__["_tables"] = {
            n: tables[n] if n in tables else analysis_config_class(n)() for n in names}

    def __getattr__(self, name: str) -> Any:
        tables = self.__dict__.get("_tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(f"AnalysisConfig has no analysis {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._tables:
            raise AttributeError(f"AnalysisConfig has no analysis {name!r}")
        self._tables[name] = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnalysisConfig) and self._tables == other._tables

    def __repr__(self) -> str:
        return f"AnalysisConfig({', '.join(f'{k}={v!r}' for k, v in self._tables.items())})"

    def names(self) -> list[str]:
        """Every analysis, enabled or not, in registry order."""
        return list(self._tables)

    def enabled(self) -> list[str]:
        return [name for name, t in self._tables.items() if t is not None]

    def to_dict(self) -> dict[str, Any]:
        return {n: (asdict(t) if t is not None else None) for n, t in self._tables.items()}


@dataclass
class RunConfig:
    device: str = "cpu"
    batch_size: int = 64
    seed: int = 0
    # DataLoader workers of the cache stage; None chooses from the cores and the device
    # (interptool._resources.plan_threads), as `interptool cache` does without --workers
    workers: int | None = None


@dataclass
class CompareConfig:
    """A validated ``interptool compare`` configuration.

    ``models`` keeps the file's order; :attr:`teacher` is the model with ``role = "teacher"``
    or, when none has one, the first model.
    """

    data: DataConfig
    models: dict[str, ModelConfig]
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: str = "<dict>"  # the file it came from, for messages and the report

    @property
    def teacher(self) -> ModelConfig:
        for m in self.models.values():
            if m.role == "teacher":
                return m
        return next(iter(self.models.values()))

    @property
    def students(self) -> list[ModelConfig]:
        t = self.teacher.name
        return [m for m in self.models.values() if m.name != t]

    def only(self, analyses: list[str]) -> CompareConfig:
        """A copy with every analysis not in ``analyses`` switched off."""
        names = self.analysis.names()
        for a in analyses:
            if a not in names:
                raise ConfigError(
                    f"--only: unknown analysis {a!r}{_suggest(a, names)}; "
                    f"choose from {', '.join(names)}"
                )
        analysis = AnalysisConfig(
            **{a: (getattr(self.analysis, a) if a in analyses else None) for a in names}
        )
        return CompareConfig(self.data, self.models, analysis, self.run, self.source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (paths as strings) for summary.json and the report appendix."""
        return {"data": asdict(self.data),
                "models": {k: asdict(v) for k, v in self.models.items()},
                "analysis": self.analysis.to_dict(), "run": asdict(self.run),
                "source": self.source}


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Ctx:
    """Formats errors as ``<file>: <field>: <message>`` and resolves relative paths."""

    def __init__(self, source: str, base: Path) -> None:
        self.source = source
        self.base = base

    def error(self, fld: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {fld}: {msg}")

    def check_keys(self, table: Mapping, fld: str, allowed) -> None:
        for key in table:
            if key not in allowed:
                where = f"{fld}.{key}" if fld else key
                raise self.error(
                    where,
                    f"unknown key{_suggest(key, allowed)}; allowed here: {', '.join(allowed)}",
                )

    def table(self, value: Any, fld: str) -> dict:
        if not isinstance(value, Mapping):
            raise self.error(fld, f"expected a table, got {type(value).__name__} {value!r}")
        return dict(value)

    def path(self, value: str, fld: str, *, must_exist: bool = True, kind: str = "file") -> str:
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = self.base / p
        p = p.resolve()
        if must_exist and not p.exists():
            raise self.error(
                fld, f"{kind} not found: {p} (paths are relative to the config's folder)"
            )
        return str(p)


def _typed(ctx: _Ctx, value: Any, fld: str, types: tuple[type, ...], what: str) -> Any:
    # bool is an int subclass in Python; a number field must not accept `true`.
    if isinstance(value, bool) and bool not in types:
        raise ctx.error(fld, f"expected {what}, got {value!r}")
    if not isinstance(value, types):
        raise ctx.error(fld, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


def _str(ctx, v, fld):
    return _typed(ctx, v, fld, (str,), "a string")


def _bool(ctx, v, fld):
    return _typed(ctx, v, fld, (bool,), "true or false")


def _int(ctx, v, fld, lo: int | None = None):
    v = _typed(ctx, v, fld, (int,), "an integer")
    if lo is not None and v < lo:
        raise ctx.error(fld, f"expected an integer >= {lo}, got {v}")
    return v


def _float(ctx, v, fld, lo: float | None = None, hi: float | None = None, open_lo=False):
    v = float(_typed(ctx, v, fld, (int, float), "a number"))
    if lo is not None and (v < lo or (open_lo and v == lo)):
        raise ctx.error(fld, f"expected a number {'>' if open_lo else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ctx.error(fld, f"expected a number <= {hi}, got {v}")
    return v


def _list(ctx, v, fld, item, *, min_len: int = 1):
    if not isinstance(v, list):
        raise ctx.error(fld, f"expected a list, got {type(v).__name__} {v!r}")
    if len(v) < min_len:
        raise ctx.error(fld, f"expected at least {min_len} item(s), got an empty list")
    return [item(ctx, x, f"{fld}[{i}]") for i, x in enumerate(v)]


def _data_spec(ctx: _Ctx, value: Any, fld: str) -> str:
    spec = _str(ctx, value, fld)
    scheme, sep, rest = spec.partition(":")
    if not sep:
        raise ctx.error(
            fld,
            f"expected a data-set spec such as 'imagefolder:PATH', 'broden:PATH', 'csv:FILE' or "
            f"'builtin:concept-world?...', got {spec!r}",
        )
    if scheme in _PATH_SCHEMES:
        kind = "file" if scheme == "csv" else "folder"
        return f"{scheme}:{ctx.path(rest, fld, kind=kind)}"
    if scheme == "builtin":
        return spec
    raise ctx.error(
        fld,
        f"unknown data-set scheme {scheme!r}{_suggest(scheme, (*_PATH_SCHEMES, 'builtin'))}; "
        f"use one of {', '.join((*_PATH_SCHEMES, 'builtin'))}",
    )


def _arch(ctx: _Ctx, value: Any, fld: str) -> str:
    arch = _str(ctx, value, fld)
    scheme, sep, rest = arch.partition(":")
    if sep and scheme in ("timm", "torchvision", "interptool"):
        if not rest:
            raise ctx.error(fld, f"missing model name after {scheme!r}:, e.g. '{scheme}:resnet18'")
        return arch
    if sep and scheme == "hf":
        # a save_pretrained folder: relative to the config's folder, like checkpoints
        if not rest:
            raise ctx.error(fld, "missing folder after 'hf:', e.g. 'hf:models/vit-student'")
        return f"hf:{ctx.path(rest, fld, kind='folder')}"
    if Path(arch).suffix in (".pt", ".pth", ".ts", ".torchscript"):
        return ctx.path(arch, fld)
    raise ctx.error(
        fld,
        f"expected 'timm:NAME', 'torchvision:NAME', 'interptool:NAME', 'hf:FOLDER' (a Hugging "
        f"Face save_pretrained folder) or the path of a TorchScript file (.pt/.pth/.ts), "
        f"got {arch!r}",
    )


_MODEL_KEYS = (
    "arch",
    "checkpoint",
    "layers",
    "role",
    "num_classes",
    "key_map",
    "trust_pickle",
    "image_size",
    "mean",
    "std",
    "group",
    "attribution_layer",
    "model_kwargs",
)


def _model(ctx: _Ctx, name: str, table: Any) -> ModelConfig:
    fld = f"models.{name}"
    table = ctx.table(table, fld)
    if not _NAME_RE.match(name):
        raise ctx.error(
            fld, "model names are used as file names: use letters, digits, '_', '-' or '.'"
        )
    ctx.check_keys(table, fld, _MODEL_KEYS)
    if "arch" not in table:
        raise ctx.error(f"{fld}.arch", "missing; e.g. arch = \"timm:resnet18\"")
    m = ModelConfig(name=name, arch=_arch(ctx, table["arch"], f"{fld}.arch"))
    if "checkpoint" in table:
        m.checkpoint = ctx.path(_str(ctx, table["checkpoint"], f"{fld}.checkpoint"),
                                f"{fld}.checkpoint")
    torchscript = Path(m.arch).suffix in (".pt", ".pth", ".ts", ".torchscript")
    if "layers" not in table and torchscript:
        table["layers"] = []  # logits only: the analyses that need layers say so at load
    if "layers" not in table:
        raise ctx.error(
            f"{fld}.layers",
            "missing; list the layers to analyse, e.g. layers = [\"layer3\", \"layer4\"] "
            "(`interptool layers --arch ...` lists them)",
        )
    m.layers = _list(ctx, table["layers"], f"{fld}.layers", _str,
                     min_len=0 if torchscript else 1)
    if len(set(m.layers)) != len(m.layers):
        raise ctx.error(f"{fld}.layers", f"duplicate layer names in {m.layers}")
    if "group" in table:
        m.group = _str(ctx, table["group"], f"{fld}.group")
        if not _NAME_RE.match(m.group):
            raise ctx.error(f"{fld}.group", "group names are used as labels and file names: "
                            "use letters, digits, '_', '-' or '.'")
    if "attribution_layer" in table:
        m.attribution_layer = _str(ctx, table["attribution_layer"], f"{fld}.attribution_layer")
    if "role" in table:
        role = _str(ctx, table["role"], f"{fld}.role")
        if role not in ("teacher", "student"):
            raise ctx.error(f"{fld}.role", f"expected 'teacher' or 'student', got {role!r}")
        m.role = role
    if "num_classes" in table:
        m.num_classes = _int(ctx, table["num_classes"], f"{fld}.num_classes", lo=1)
    if "key_map" in table:
        km = table["key_map"]
        if isinstance(km, Mapping):
            m.key_map = {str(k): _str(ctx, v, f"{fld}.key_map.{k}") for k, v in km.items()}
        else:
            km = _str(ctx, km, f"{fld}.key_map")
            m.key_map = km if km == "positional" else ctx.path(km, f"{fld}.key_map")
    if "trust_pickle" in table:
        m.trust_pickle = _bool(ctx, table["trust_pickle"], f"{fld}.trust_pickle")
    if "model_kwargs" in table:
        from interptool.loading import check_model_kwargs

        kwargs = ctx.table(table["model_kwargs"], f"{fld}.model_kwargs")
        try:
            m.model_kwargs = check_model_kwargs(kwargs, m.arch)
        except ConfigError as exc:
            raise ctx.error(f"{fld}.model_kwargs", str(exc)) from None
    if "image_size" in table:
        v = table["image_size"]
        if isinstance(v, list):
            size = _list(ctx, v, f"{fld}.image_size", lambda c, x, f: _int(c, x, f, lo=1))
            if len(size) != 2:
                raise ctx.error(f"{fld}.image_size", f"expected one integer or [H, W], got {v}")
            m.image_size = (size[0], size[1])
        else:
            s = _int(ctx, v, f"{fld}.image_size", lo=1)
            m.image_size = (s, s)
    for key in ("mean", "std"):
        if key in table:
            vals = _list(ctx, table[key], f"{fld}.{key}", lambda c, x, f: _float(c, x, f))
            if len(vals) not in (1, 3):
                raise ctx.error(f"{fld}.{key}", f"expected 1 or 3 numbers, got {len(vals)}")
            if key == "std" and any(v <= 0 for v in vals):
                raise ctx.error(f"{fld}.std", f"every value must be > 0, got {vals}")
            setattr(m, key, tuple(vals))
    return m


def _analysis(ctx: _Ctx, table: Any) -> AnalysisConfig:
    """``[analysis]``: one table per registered analysis, checked by its config class."""
    table = ctx.table(table, "analysis")
    names = analysis_names()
    ctx.check_keys(table, "analysis", names)
    out = AnalysisConfig()
    for name in names:
        if name not in table:
            continue
        v = table[name]
        if v is False:  # `dissection = false` switches an analysis off
            setattr(out, name, None)
            continue
        if v is True:
            continue
        fld = f"analysis.{name}"
        sub = ctx.table(v, fld)
        enabled = _bool(ctx, sub.pop("enabled", True), f"{fld}.enabled")
        cls = analysis_config_class(name)
        for f in cls.config_fields():  # paths are relative to the config's folder
            # (an empty name stays empty: the field's own check refuses it)
            if f.metadata.get("path") and isinstance(sub.get(f.name), str) \
                    and sub[f.name].strip():
                sub[f.name] = ctx.path(sub[f.name], f"{fld}.{f.name}", must_exist=False)
        cfg = cls.from_mapping(sub, where=f"{ctx.source}: {fld}")
        setattr(out, name, cfg if enabled else None)
    return out


def _run(ctx: _Ctx, table: Any) -> RunConfig:
    table = ctx.table(table, "run")
    r = RunConfig()
    ctx.check_keys(table, "run", tuple(vars(r)))
    if "device" in table:
        dev = _str(ctx, table["device"], "run.device")
        if not re.match(r"^(cpu|cuda(:\d+)?)$", dev):
            raise ctx.error("run.device", f"expected 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
        r.device = dev
    if "batch_size" in table:
        r.batch_size = _int(ctx, table["batch_size"], "run.batch_size", lo=1)
    if "seed" in table:
        r.seed = _int(ctx, table["seed"], "run.seed", lo=0)
    if "workers" in table:  # absent or "auto": None, chosen per cache (TOML has no null)
        w = table["workers"]
        if isinstance(w, str) and w != "auto":
            raise ctx.error("run.workers", f'expected an integer >= 0 or "auto", got {w!r}')
        r.workers = None if w == "auto" else _int(ctx, w, "run.workers", lo=0)
    return r


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------
def parse_config(raw: Mapping[str, Any], *, source: str = "<dict>",
                 base_dir: str | Path | None = None) -> CompareConfig:
    """Validate an already-parsed TOML mapping; relative paths resolve against ``base_dir``."""
    ctx = _Ctx(source, Path(base_dir or ".").resolve())
    ctx.check_keys(raw, "", ("data", "models", "analysis", "run"))
    if "models" not in raw:
        raise ctx.error("models", "missing; add at least one [models.NAME] table")
    models_t = ctx.table(raw["models"], "models")
    if not models_t:
        raise ctx.error("models", "no models; add at least one [models.NAME] table")
    models = {name: _model(ctx, name, t) for name, t in models_t.items()}
    teachers = [m.name for m in models.values() if m.role == "teacher"]
    if len(teachers) > 1:
        raise ctx.error(
            "models",
            f"{len(teachers)} models have role = \"teacher\" ({', '.join(teachers)}); "
            "exactly one may (without any, the first model is the teacher)",
        )
    data_t = ctx.table(raw.get("data", {}), "data")
    ctx.check_keys(data_t, "data", ("eval", "probe"))
    data = DataConfig(
        eval=_data_spec(ctx, data_t["eval"], "data.eval") if "eval" in data_t else None,
        probe=_data_spec(ctx, data_t["probe"], "data.probe") if "probe" in data_t else None,
    )
    analysis = _analysis(ctx, raw.get("analysis", {}))
    run = _run(ctx, raw.get("run", {}))
    # Each analysis needs its data set (declared at registration); say so before caching.
    from interptool.analyzers import get_analyzer

    for name in analysis.enabled():
        needs = get_analyzer(name).needs
        if needs == "probe" and data.probe is None:
            raise ctx.error(
                "data.probe",
                f"missing; {name} needs concept-annotated images (e.g. probe = "
                f"\"broden:/data/broden1_224\"), or set analysis.{name} = false",
            )
        if needs == "eval" and data.eval is None:
            raise ctx.error(
                "data.eval",
                f"missing; {name} needs labelled images (e.g. eval = "
                f"\"imagefolder:/data/val\"), or set analysis.{name} = false",
            )
    if analysis.dissection is not None and analysis.dissection.layers:
        for lay in analysis.dissection.layers:
            for m in models.values():
                if lay not in m.layers:
                    raise ctx.error(
                        "analysis.dissection.layers",
                        f"layer {lay!r} is not in models.{m.name}.layers {m.layers}; "
                        "dissected layers must be listed for every model",
                    )
    return CompareConfig(data=data, models=models, analysis=analysis, run=run, source=source)


def load_config(path: str | Path) -> CompareConfig:
    """Read and validate a compare config (TOML). Raises :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: config file not found; create a template with "
            f"`interptool compare --init {path}`"
        )
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name}: not a UTF-8 text file") from None
    return parse_config(raw, source=path.name, base_dir=path.resolve().parent)


_TEMPLATE_HEAD = '''\
# interptool compare configuration. Validate and run with:
#   interptool compare THIS_FILE --out results/
# Relative paths are relative to the folder of this file.

[data]
# Labelled images: accuracy, class similarity (logits), CKA and attribution.
# Specs: "imagefolder:PATH" (class sub-folders), "csv:FILE" (path,label columns),
#        "builtin:concept-world?version=2&n=500&size=48&seed=0&split=eval" (generated, no
#        download; version 2, 12 classes, is the default; version=1 is the original 10-class set).
# version=1 here: interptool:cw-teacher / cw-student below are 10-class version 1 nets.
eval = "builtin:concept-world?version=1&n=200&size=64&seed=0&split=eval"
# Concept-annotated images in Broden format for network dissection
# (e.g. "broden:/data/broden1_224").
probe = "builtin:concept-world?version=1&n=200&size=64&seed=0&split=probe"

# One table per model. The model with role = "teacher" (or else the first) is the reference.
[models.teacher]
arch = "interptool:cw-teacher"   # timm:NAME, torchvision:NAME, interptool:NAME, hf:FOLDER or a TorchScript file
# checkpoint = "ckpt/teacher.pth" # .pth/.pt/.bin/.safetensors; omit for random weights
layers = ["layer3", "layer4"]    # `interptool layers --arch ...` lists the names
role = "teacher"
# num_classes = 10               # default: inferred from the checkpoint
# key_map = "positional"         # or a TOML file of regex -> replacement rules for foreign names
# trust_pickle = false           # true runs code inside the checkpoint: only for files you trust
# image_size = 64                # or [H, W]; default from the architecture
# model_kwargs = { img_size = 384 }  # constructor arguments (timm create_model / torchvision)
# mean = [0.5, 0.5, 0.5]
# std = [0.25, 0.25, 0.25]

[models.student]
arch = "interptool:cw-student"
layers = ["layer3", "layer4"]

'''

_TEMPLATE_RUN = '''\
[run]
device = "cpu"      # cpu, cuda, cuda:1
batch_size = 64
seed = 0
# workers = 4       # DataLoader processes decoding images (0: a thread of the main process);
                    # unset or "auto": chosen from the cores and the device, as
                    # `interptool cache` does
'''




def _toml(value: Any) -> str:
    """A TOML literal for a default value (None has none: the caller comments it out)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def analysis_template() -> str:
    """The ``[analysis]`` part of the template, from the registry: per analysis its summary,
    the example values it registered, then every other key commented out with its default
    and one-line help (the Params dataclasses are the single source of both)."""
    from interptool.analyzers import get_analyzer

    lines = ["[analysis]",
             "# One table per analysis; switch one off with `enabled = false` in its table",
             "# (or `NAME = false` under [analysis]). Commented keys show their defaults."]
    for name in analysis_names():
        spec = get_analyzer(name)
        shown = dict(spec.template)
        lines += ["", f"[analysis.{name}]", f"# {spec.title}: {spec.summary}"]
        for f in spec.config_fields():
            default = spec.config_class().field_default(f.name)
            if f.name in shown:
                entry = f"{f.name} = {_toml(shown[f.name])}"
            elif default is None:
                entry = f"# {f.name} = (unset)"
            else:
                entry = f"# {f.name} = {_toml(default)}"
            lines.append(f"{entry:<34} # {f.metadata['help']}")
    return "\n".join(lines) + "\n"


def analysis_toml(analysis: AnalysisConfig) -> list[str]:
    """``[analysis]`` lines that reproduce ``analysis``: per analysis an inline table of the
    values that differ from their defaults (``true`` when none do, ``false`` when off)."""
    lines = ["[analysis]"]
    for name in analysis.names():
        cfg = getattr(analysis, name)
        if cfg is None:
            lines.append(f"{name} = false")
            continue
        changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                   if getattr(cfg, f.name) != cfg.field_default(f.name)}
        if not changed:
            lines.append(f"{name} = true")
            continue
        items = ", ".join(f"{k} = {_toml(v)}" for k, v in changed.items() if v is not None)
        lines.append(f"{name} = {{ {items} }}")
    return lines


def template_text() -> str:
    """The commented ``compare --init`` template (head, analyses from the registry, run)."""
    return _TEMPLATE_HEAD + analysis_template() + "\n" + _TEMPLATE_RUN


def write_template(path: str | Path) -> Path:
    """Write the commented config template (refuses to overwrite an existing file)."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path}: already exists; choose another name or delete it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template_text())
    return path
