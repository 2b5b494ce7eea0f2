"""The analyzer contract: ``Params`` dataclasses, the ``Result`` protocol and run inputs.

Every analyzer subpackage (``interptool/analyzers/<name>/``) has

* a ``Params`` dataclass (subclass of :class:`Params`) whose fields are declared with
  :func:`param`: default, one-line help and the checks (choices, bounds) in one place. The CLI
  flags, the ``compare`` config table ``[analysis.<name>]`` and its ``--init`` template are all
  derived from it. A bad value raises :class:`~interptool.errors.ParamsError` naming the field;
* one entry ``run(...) -> Result``;
* a result class following :class:`AnalysisResult`: ``names`` (the models it describes, passed
  in), ``provenance``, ``summary()``, ``to_frame()``, ``to_dict()`` (strict JSON),
  ``plot()`` (a matplotlib Figure or a list of them) and ``save(directory)``, which follows
  the file-naming rules of :func:`save_result_files`.

The analyzer is registered with :func:`interptool.analyzers.register_analyzer`.
This module imports neither torch nor matplotlib: the CLI builds its flags from it at start-up.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from interptool.errors import ParamsError

__all__ = [
    "AnalysisInputs",
    "AnalysisResult",
    "Params",
    "ParamsError",
    "param",
    "result_file_stem",
    "save_result_files",
]

_MISSING = dataclasses.MISSING


def param(default: Any = _MISSING, help: str = "", *, choices: Sequence[Any] | None = None,
          ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, finite: bool = False, min_items: int | None = None,
          check: Callable[[Any], str | None] | None = None, cli: bool = True,
          config: bool = True, flag: str | None = None, metavar: str | None = None,
          path: bool = False, default_factory: Any = _MISSING) -> Any:
    """A ``Params`` field: its default, a one-line ``help`` and its checks.

    ``choices``: allowed values; ``ge``/``gt``/``le``/``lt``: numeric bounds and ``finite``
    (no NaN or infinity), checked on every number of a list field too; ``min_items``: the
    fewest items a list value may have (e.g. 1: never empty); ``check``: a callable given the
    whole (type-checked) value, returning None when it is fine, else what was expected
    (``"expected ..."``). These checks live on the field, so the ``compare`` config table made
    from it applies them too, naming the file and key (a ``validate()`` override does not reach
    that table). ``cli=False`` keeps the field out of command-line flags
    (e.g. a setting only the ``compare`` pipeline uses); ``config=False`` keeps it out of the
    ``compare`` config (e.g. ``device``, set once under ``[run]``). ``flag``: the CLI flag when
    it is not ``--field-name``. ``path``: a file or folder, which the ``compare`` config
    resolves against the config file's folder (as it does checkpoints). Mutable defaults
    (lists) are given as ``default_factory``.
    """
    if not help:
        raise TypeError("param(): every field needs a one-line help")
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None,
            "ge": ge, "gt": gt, "le": le, "lt": lt, "finite": finite, "min_items": min_items,
            "check": check, "cli": cli, "config": config, "flag": flag, "metavar": metavar,
            "path": path}
    if default_factory is not _MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# type checks from annotations
# --------------------------------------------------------------------------------------------
def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "none"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        args = typing.get_args(tp)
        inner = _describe(args[0]) if args else "values"
        return f"a list of {inner.removeprefix('a ').removeprefix('an ')}s"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """``(ok, value)``: ``value`` checked against the annotation ``tp`` (ints pass as floats,
    tuples as lists; bool never passes as a number)."""
    if tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    # numpy scalars (a seed from np.arange, a value read from an array) pass as Python
    # numbers and are stored as such (JSON records, comparisons)
    if tp is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else value
    if tp is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        if not args:
            return True, list(value)
        out = []
        for v in value:
            ok, v = _coerce(v, args[0])
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        return True, tuple(value)
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def _number_word(tp: Any) -> str:
    """"an integer" when the annotation holds int but not float, else "a number"."""
    text = str(tp)
    return "an integer" if "int" in text and "float" not in text else "a number"


_BOUNDS = (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
           ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<"))


def _check_item(where: str, v: Any, meta: Mapping[str, Any], word: str) -> None:
    """``choices`` and numeric bounds of one value (one item of a list field)."""
    choices = meta.get("choices")
    if choices is not None and v is not None and v not in choices:
        close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ParamsError(f"{where}: expected one of {', '.join(map(str, choices))}, got "
                          f"{v!r}{hint}", where.partition("[")[0])
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if meta.get("finite") and not math.isfinite(v):
        raise ParamsError(f"{where}: expected a finite number, got {v!r}",
                          where.partition("[")[0])
    for key, test, sign in _BOUNDS:
        bound = meta.get(key)
        if bound is not None and not test(v, bound):
            shown = int(bound) if word == "an integer" else float(bound)
            raise ParamsError(f"{where}: expected {word} {sign} {shown}, got {v!r}",
                              where.partition("[")[0])


@dataclass
class Params:
    """Base class of every analyzer's parameters (a dataclass; see :func:`param`).

    Construction validates every field (type from the annotation, ``choices``, bounds) and
    then calls :meth:`validate` for checks that involve several fields; any failure raises
    :class:`~interptool.errors.ParamsError` whose message starts with ``field=value:``.
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints.get(f.name, Any)
            ok, value = _coerce(value, tp)
            if not ok:
                raise ParamsError(f"{f.name}: expected {_describe(tp)}, got "
                                  f"{type(value).__name__} {value!r}", f.name)
            meta = f.metadata
            many = isinstance(value, list)
            least = meta.get("min_items")
            if many and least is not None and len(value) < least:
                default = type(self).field_default(f.name)
                hint = f"; e.g. {default!r} (the default)" if default else ""
                raise ParamsError(f"{f.name}: expected at least {least} "
                                  f"value{'s' if least != 1 else ''}, got {value!r}{hint}",
                                  f.name)
            for i, v in enumerate(value if many else [value]):
                where = f"{f.name}[{i}]" if many else f.name
                _check_item(where, v, meta, _number_word(tp))
            check = meta.get("check")
            expected = check(value) if check is not None else None
            if expected:
                raise ParamsError(f"{f.name}: {expected}, got {value!r}", f.name)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks across fields; subclasses raise ``self.error(field, expected)``."""

    # -- helpers --------------------------------------------------------------------------
    def error(self, name: str, expected: str, *, value: Any = _MISSING,
              fix: str = "") -> ParamsError:
        """A :class:`ParamsError` ``"name: expected ..., got value; fix"`` for field ``name``."""
        v = getattr(self, name, None) if value is _MISSING else value
        return ParamsError(f"{name}: {expected}, got {v!r}" + (f"; {fix}" if fix else ""), name)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_info(cls, name: str) -> dataclasses.Field:
        """The dataclass field ``name`` (its ``metadata`` holds help, checks and flags)."""
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f
        raise KeyError(name)

    @classmethod
    def field_default(cls, name: str) -> Any:
        f = cls.field_info(name)
        if f.default_factory is not _MISSING:  # type: ignore[misc]
            return f.default_factory()  # type: ignore[misc]
        return None if f.default is _MISSING else f.default

    @classmethod
    def config_fields(cls) -> list[dataclasses.Field]:
        """Fields that a ``compare`` config table may set."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("config", True)]

    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        """Fields that become command-line flags."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, where: str = "",
                     allowed: Sequence[str] | None = None) -> Params:
        """Build from a config table; unknown keys and bad values raise :class:`ParamsError`
        prefixed with ``where`` (e.g. ``"run.toml: analysis.dissection"``)."""
        names = list(allowed) if allowed is not None else [f.name for f in cls.config_fields()]
        prefix = f"{where}." if where else ""
        for key in mapping:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ParamsError(f"{prefix}{key}: unknown key{hint}; allowed here: "
                                  f"{', '.join(names)}", str(key))
        try:
            return cls(**dict(mapping))
        except ParamsError as exc:
            raise ParamsError(f"{prefix}{exc}", f"{prefix}{exc.field}") from None

    def to_dict(self) -> dict[str, Any]:
        """Field values as plain data (lists, numbers, strings)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> Params:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@runtime_checkable
class AnalysisResult(Protocol):
    """What every analyzer's result offers (checked by tests/test_contract.py)."""

    names: tuple[str, ...]
    provenance: dict[str, Any]

    def summary(self) -> dict[str, Any]: ...

    def to_frame(self) -> Any: ...

    def to_dict(self) -> dict[str, Any]: ...

    def plot(self) -> Any: ...

    def save(self, directory: str | os.PathLike) -> list[Path]: ...


def result_file_stem(result: Any) -> str:
    """The stem of a result's standard files: its class's ``file_stem`` attribute."""
    stem = getattr(result, "file_stem", None)
    if not stem:
        raise TypeError(f"{type(result).__name__} has no file_stem")
    return str(stem)


def save_result_files(result: Any, directory: str | os.PathLike, *,
                      figures: bool = True) -> list[Path]:
    """Write a result's standard files; every ``save(directory)`` starts with this.

    File-naming rules (the same for every analyzer): in ``directory`` (created), in this
    order, ``<stem>.csv`` holds ``to_frame()`` (no index), ``<stem>.json`` holds exactly
    ``to_dict()`` (strict JSON: NaN written as null), and the figure(s) of ``plot()`` are
    ``<stem>.png``, or ``<stem>_1.png``, ``<stem>_2.png``, ... when it returns several;
    ``<stem>`` is the result class's ``file_stem``. File names never contain model names (a
    folder per model or pair is the caller's choice). Analyzer-specific extra files (e.g.
    NetDissect-Lite's ``tally.csv``) come after these. All writes are atomic.
    """
    from interptool._provenance import atomic_write_text
    from interptool.common.jsonsafe import to_jsonable

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stem = result_file_stem(result)
    paths = []
    p = out / f"{stem}.csv"
    atomic_write_text(p, result.to_frame().to_csv(index=False))
    paths.append(p)
    p = out / f"{stem}.json"
    atomic_write_text(p, json.dumps(to_jsonable(result.to_dict()), indent=1) + "\n")
    paths.append(p)
    if figures:
        paths += save_figures(result.plot(), out, stem)
    return paths


def save_figures(figs: Any, directory: Path, stem: str) -> list[Path]:
    """Write one figure as ``<stem>.png`` or several as ``<stem>_<i>.png`` and close them."""
    import matplotlib.pyplot as plt

    from interptool._provenance import atomic_savefig

    many = isinstance(figs, (list, tuple))
    figs = list(figs) if many else [figs]
    paths = []
    for i, fig in enumerate(figs, start=1):
        p = directory / (f"{stem}_{i}.png" if many else f"{stem}.png")
        atomic_savefig(fig, p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------------------------
# inputs of a registered analyzer's generic entry (used by the CLI and the compare pipeline)
# --------------------------------------------------------------------------------------------
@dataclass
class AnalysisInputs:
    """What a registered analyzer's ``analyze(inputs, params)`` receives.

    ``names``: the models (teacher first); ``caches``: one open ``ActivationCache`` per model,
    made on the data set the analyzer declared (``needs="eval"`` or ``"probe"``);
    ``layers``: the layers of each model to analyse (``layers[i]`` for ``names[i]``);
    ``dataset``: that data set (None when only caches were given); ``models``: the loaded
    models when the analyzer declared ``needs_model`` (else None); ``device``, ``seed``.
    """

    names: list[str]
    caches: list[Any]
    layers: list[list[str]] = field(default_factory=list)
    dataset: Any = None
    models: list[Any] | None = None
    device: str = "cpu"
    seed: int = 0
