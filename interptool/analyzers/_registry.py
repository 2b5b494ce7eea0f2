"""The analyzer registry: name -> Params, entry, Result and report section (timm-style).

Register an analyzer with one line on its ``Params`` dataclass::

    @register_analyzer("dissection", title="Network dissection", needs="probe", ...)
    @dataclass
    class DissectionParams(Params): ...

Built-in analyzers live in ``interptool/analyzers/<name>/`` and register themselves in their
``_params.py``, which :func:`analyzer_specs` imports (cheaply: no torch) the first time the
registry is read. Everything that lists analyzers is derived from here: the CLI commands and
flags, the ``compare`` config schema and ``--init`` template, the pipeline's stages and the
report's sections.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interptool.analyzers._base import Params
from interptool.errors import ConfigError

__all__ = ["AnalyzerSpec", "analyzer_specs", "get_analyzer", "register_analyzer",
           "unregister_analyzer"]

_REGISTRY: dict[str, AnalyzerSpec] = {}
_CONFIG_CLASSES: dict[str, type[Params]] = {}
_DISCOVERED = False


def _resolve(ref: Any) -> Any:
    """``"package.module:attr"`` -> the object (imported on first use); objects pass through."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class AnalyzerSpec:
    """One registered analyzer.

    ``params``: its :class:`Params` dataclass (the single source of its settings);
    ``options``: extra settings only the ``compare`` pipeline uses (a Params dataclass, or
    None); ``analyzer``/``result``: the public entry and result class (objects or
    ``"module:attr"`` strings resolved on use, so registering never imports torch);
    ``analyze``: the generic entry ``analyze(inputs: AnalysisInputs, params) -> result or
    list of results`` that the CLI command and the pipeline's generic stage call;
    ``section``: the jinja2 template of its report section (a path; default
    ``section.html.j2`` beside the registering module, else the generic section);
    ``needs``: ``"eval"`` (labelled images) or ``"probe"`` (concept masks);
    ``needs_layers`` / ``needs_model``: whether it reads cached layers / runs the model;
    ``command``: generate the ``interptool <name>`` command (False when a hand-written CLI
    module exists); ``in_compare``: part of ``interptool compare``; ``order``: position in
    listings and the report; ``template``: the values the ``compare --init`` template writes
    out (every other key is listed commented out with its default and help).
    """

    name: str
    params: type[Params]
    title: str
    summary: str
    analyzer: Any = None
    result: Any = None
    analyze: Any = None
    options: type[Params] | None = None
    section: Path | None = None
    needs: str = "eval"
    needs_layers: bool = True
    needs_model: bool = False
    command: bool = True
    in_compare: bool = True
    order: int = 100
    template: tuple[tuple[str, Any], ...] = ()

    def entry(self) -> Any:
        """The public analyzer entry (class or function)."""
        return _resolve(self.analyzer)

    def result_class(self) -> Any:
        return _resolve(self.result)

    def analyze_fn(self) -> Callable[..., Any]:
        if self.analyze is None:
            raise ConfigError(f"analyzer {self.name!r} has no generic entry (analyze=)")
        return _resolve(self.analyze)

    def section_template(self) -> Path | None:
        """The report section template, or None for the generic one."""
        return self.section if self.section is not None and self.section.is_file() else None

    def config_fields(self) -> list[Any]:
        """Fields of its ``[analysis.<name>]`` config table: options first, then params
        (an option of the same name overrides the param, e.g. a different default)."""
        opts = self.options.config_fields() if self.options is not None else []
        names = {f.name for f in opts}
        return opts + [f for f in self.params.config_fields() if f.name not in names]

    def config_class(self) -> type[Params]:
        """The dataclass of its ``[analysis.<name>]`` table (made from :meth:`config_fields`,
        checked like any Params); :meth:`params_from_config` turns one into ``params``."""
        cls = _CONFIG_CLASSES.get(self.name)
        if cls is None or cls.__spec_params__ is not self.params:  # type: ignore[attr-defined]
            fields = []
            for f in self.config_fields():
                if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                    d = dataclasses.field(default_factory=f.default_factory,
                                          metadata=f.metadata)
                else:
                    d = dataclasses.field(default=f.default, metadata=f.metadata)
                fields.append((f.name, f.type, d))
            title = "".join(p.capitalize() for p in self.name.replace("-", "_").split("_"))
            cls = dataclasses.make_dataclass(f"{title}Config", fields, bases=(Params,),
                                             namespace={"__module__": self.params.__module__})
            cls.__doc__ = f"The ``[analysis.{self.name}]`` table of a compare config."
            cls.__spec_params__ = self.params  # type: ignore[attr-defined]
            _CONFIG_CLASSES[self.name] = cls
        return cls

    def params_from_config(self, config: Any, **fixed: Any) -> Params:
        """``params`` with the values of a config object (plus ``fixed``, e.g. ``device``)."""
        names = set(self.params.field_names())
        values = {k: v for k, v in dataclasses.asdict(config).items() if k in names}
        return self.params(**{**values, **{k: v for k, v in fixed.items() if k in names}})


def register_analyzer(name: str, *, title: str, summary: str, analyzer: Any = None,
                      result: Any = None, analyze: Any = None,
                      options: type[Params] | None = None, section: str | Path | None = None,
                      needs: str = "eval", needs_layers: bool = True, needs_model: bool = False,
                      command: bool = True, in_compare: bool = True, order: int = 100,
                      template: dict[str, Any] | None = None,
                      ) -> Callable[[type[Params]], type[Params]]:
    """Class decorator registering ``name`` with its Params dataclass (see module docstring).

    Registering a name twice replaces the earlier entry only when it comes from the same
    module (a reload); otherwise it is an error naming both.
    """
    if needs not in ("eval", "probe"):
        raise ValueError(f"register_analyzer({name!r}): needs must be 'eval' or 'probe'")

    def deco(cls: type[Params]) -> type[Params]:
        if not (isinstance(cls, type) and issubclass(cls, Params)):
            raise TypeError(f"register_analyzer({name!r}) decorates a Params dataclass")
        old = _REGISTRY.get(name)
        if old is not None and old.params.__module__ != cls.__module__:
            raise ValueError(f"analyzer {name!r} is already registered by "
                             f"{old.params.__module__}")
        here = Path(sys.modules[cls.__module__].__file__ or ".").parent
        tpl = here / (section or "section.html.j2")
        _REGISTRY[name] = AnalyzerSpec(
            name=name, params=cls, title=title, summary=summary, analyzer=analyzer,
            result=result, analyze=analyze, options=options,
            section=tpl if tpl.is_file() else None, needs=needs, needs_layers=needs_layers,
            needs_model=needs_model, command=command, in_compare=in_compare, order=order,
            template=tuple((template or {}).items()))
        return cls

    return deco


def unregister_analyzer(name: str) -> None:
    """Remove ``name`` (tests that register a toy analyzer clean up with this)."""
    _REGISTRY.pop(name, None)


def _discover() -> None:
    """Import ``_params`` of every built-in analyzer subpackage (registers them)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    root = Path(__file__).parent
    for info in pkgutil.iter_modules([str(root)]):
        if info.ispkg and (root / info.name / "_params.py").is_file():
            importlib.import_module(f"interptool.analyzers.{info.name}._params")


def analyzer_specs() -> list[AnalyzerSpec]:
    """Every registered analyzer, in ``order`` (then name)."""
    _discover()
    return sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name))


def get_analyzer(name: str) -> AnalyzerSpec:
    """The spec registered as ``name``; a ConfigError listing the names otherwise."""
    _discover()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown analyzer {name!r}{hint}; registered: "
                          f"{', '.join(s.name for s in analyzer_specs())}")
    return _REGISTRY[name]
