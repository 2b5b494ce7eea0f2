"""The top-level public face re-exports the stage APIs (lazily) and nothing else."""

from __future__ import annotations

import subprocess
import sys

import pytest

import interptool


def test_every_public_name_resolves_to_the_stage_object():
    from interptool.analyzers import Dissection
    from interptool.cache import ActivationCache
    from interptool.loading import load_model

    for name in interptool.__all__:
        assert getattr(interptool, name) is not None, name
    assert interptool.load_model is load_model
    assert interptool.ActivationCache is ActivationCache
    assert interptool.Dissection is Dissection


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        interptool.nope  # noqa: B018


def test_import_does_not_load_torch():
    # the CLI's --help and config validation must not pay for importing torch
    code = "import sys, interptool; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# import rules (docs/architecture.md, "Import rules")
# --------------------------------------------------------------------------------------------
import ast  # noqa: E402
from pathlib import Path  # noqa: E402

PKG = Path(interptool.__file__).parent
#: position of each stage in the pipeline; a module may import its own stage and any stage
#: before it, never one after it. The shared layer (common, errors, progress, provenance, workers,
#: locks, resources) comes first and imports no stage.
STAGE_ORDER = {"common": 0, "errors": 0, "_progress": 0, "_provenance": 0, "_locks": 0,
               "_resources": 0, "_workers": 0, "loading": 1, "data": 2, "cache": 3, "analyzers": 4,
               "report": 5, "pipeline": 6, "cli": 7, "__main__": 8}
#: private imports across stages still to be removed by the owner of the importing module
PRIVATE_IMPORT_EXCEPTIONS = {
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), f))
    return out


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, top_level_only: bool = False):
    """``(lineno, module, names)`` of every ``interptool`` import in the file."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "interptool":
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "interptool":
                    yield node.lineno, a.name, []


def test_stages_import_only_earlier_stages():
    """Nothing imports "up" the pipeline (function-level imports included)."""
    bad = []
    for module, path in _modules():
        src = _stage(module)
        for line, target, names in _imports(path):
            tgt = _stage(target)
            if tgt in ("", src) or (target == "interptool" and names == ["__version__"]):
                continue
            if STAGE_ORDER.get(tgt, 99) > STAGE_ORDER.get(src, 99):
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {src} imports {target}")
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)


def _private_target(target: str, names: list[str]) -> bool:
    return any(p.startswith("_") for p in target.split(".")[2:]) or \
        any(n.startswith("_") and not n.startswith("__") for n in names)


def test_no_private_names_imported_across_stages():
    """A stage uses another stage's public names only. Inside analyzers, each analyzer
    subpackage is its own stage (the shared analyzers._base/_registry/_lazy are not)."""
    def unit(module: str) -> str:
        parts = module.split(".")
        if len(parts) > 2 and parts[1] == "analyzers" and not parts[2].startswith("_"):
            return "analyzers." + parts[2]
        return _stage(module)

    bad = []
    for module, path in _modules():
        src = unit(module)
        rel = str(path.relative_to(PKG.parent))
        for line, target, names in _imports(path):
            tgt = unit(target)
            shared = tgt == "analyzers" and src.startswith("analyzers")
            if tgt == src or shared or STAGE_ORDER.get(tgt, 99) == 0 or tgt.startswith("_"):
                continue
            if _private_target(target, names) and (rel, target) not in PRIVATE_IMPORT_EXCEPTIONS:
                bad.append(f"{rel}:{line}: from {target} import {', '.join(names)}")
    assert not bad, "private names imported across stages:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_at_module_level():
    modules = dict(_modules())
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for _, target, names in _imports(path, top_level_only=True):
            edges.add(target)
            edges |= {f"{target}.{n}" for n in names if f"{target}.{n}" in modules}
        graph[module] = {e for e in edges if e in modules and e != module}
    assert _cycles(graph) == []
    # the check finds a cycle when there is one
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_every_module_imports_first_in_a_fresh_state():
    """Each module imported on its own, with no interptool module loaded before it: an
    import cycle or a missing name shows up as an ImportError naming the module."""
    names = [m for m, _ in _modules() if not m.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for k in [k for k in sys.modules if k == 'interptool' or k.startswith('interptool.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{n}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=600)
    assert out.stdout.strip() == ""


def test_messages_honour_quiet(capsys):
    from interptool._progress import is_quiet, say, set_quiet

    try:
        set_quiet(True)
        say("hidden")
        assert is_quiet() and capsys.readouterr().err == ""
        set_quiet(False)
        say("shown")
        assert capsys.readouterr().err == "[interptool] shown\n"
    finally:
        set_quiet(False)


def test_only_the_message_channel_and_the_cli_print():
    """User messages go through interptool._progress (say/warn/progress), which honours
    --quiet; the CLI prints results. No other module calls print()."""
    bad = []
    for module, path in _modules():
        if module.startswith("interptool.cli") or module == "interptool._progress":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not bad, "print() outside the message channel:\n" + "\n".join(bad)
