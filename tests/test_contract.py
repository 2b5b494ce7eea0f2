"""The analyzer contract.

1. Parametrised over the registry (timm-style): every registered analyzer's result follows
   one protocol: it names its models, carries provenance, ``to_dict`` is strict JSON and
   ``save(directory)`` writes it back exactly (plus ``to_frame`` as CSV and the figures of
   ``plot``) under the shared file-naming rule, and its Params reject a bad value with
   ``ParamsError`` naming the field.
2. Adding an analyzer is one Params dataclass + one ``register_analyzer`` line + a section
   template: a toy analyzer registered from this file appears in the CLI help, runs as a
   generated command, is accepted (and checked) by the compare config parser, is listed in
   the ``--init`` template, runs as a resumable stage of ``run_compare`` and gets its own
   section in the rendered report. docs/extending.md walks through the same toy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from interptool.analyzers import (
    AnalysisInputs,
    AnalysisResult,
    Params,
    analyzer_specs,
    get_analyzer,
    param,
    register_analyzer,
    unregister_analyzer,
)
from interptool.common.jsonsafe import to_jsonable
from interptool.errors import ConfigError, ParamsError

EVAL = "builtin:concept-world?version=1&n=24&size=32&seed=7&split=eval"
PROBE = "builtin:concept-world?version=1&n=24&size=32&seed=7&split=probe"


# --------------------------------------------------------------------------------------------
# the toy analyzer: mean confidence (max softmax at a temperature) of each model's logits
# --------------------------------------------------------------------------------------------
@dataclass
class ConfidenceResult:
    """Mean max-softmax per model (the toy's result; follows AnalysisResult)."""

    names: tuple[str, ...]
    confidence: list[float]
    temperature: float
    provenance: dict[str, Any]

    file_stem = "confidence"

    def summary(self) -> dict[str, Any]:
        return {"temperature": self.temperature,
                "confidence": dict(zip(self.names, self.confidence))}

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"model": list(self.names), "confidence": self.confidence})

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "temperature": self.temperature,
                "confidence": self.confidence, "provenance": self.provenance}

    def plot(self):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(3, 2))
        ax.bar(list(self.names), self.confidence)
        return fig

    def save(self, directory) -> list[Path]:
        from interptool.analyzers._base import save_result_files

        return save_result_files(self, directory)


def analyze_confidence(inputs: AnalysisInputs, params: ConfidenceParams) -> ConfidenceResult:
    conf = []
    for cache in inputs.caches:
        z = np.asarray(cache.logits, dtype=np.float64) / params.temperature
        p = np.exp(z - z.max(axis=1, keepdims=True))
        conf.append(float((p.max(axis=1) / p.sum(axis=1)).mean()))
    return ConfidenceResult(tuple(inputs.names), conf, params.temperature,
                            {"caches": [str(c.path) for c in inputs.caches]})


@dataclass
class ConfidenceParams(Params):
    temperature: float = param(1.0, "softmax temperature of the confidence", gt=0)
    note: str = param("toy", "a label carried into the report")


SECTION = """{% extends "_section.html.j2" %}
{% block intro %}<p class="toy-marker">TOY SECTION at T={{ d.params.temperature }}</p>{{ super() }}{% endblock %}
"""


@pytest.fixture
def toy(tmp_path):
    """Register the toy (one line, as docs/extending.md shows) and remove it afterwards."""
    tpl = tmp_path / "toy_section.html.j2"
    tpl.write_text(SECTION)
    register_analyzer("confidence", title="Confidence", summary="mean max-softmax per model",
                      result=ConfidenceResult, analyze=analyze_confidence, needs="eval",
                      needs_layers=False, section=tpl)(ConfidenceParams)
    yield get_analyzer("confidence")
    unregister_analyzer("confidence")


def test_toy_in_cli_help_and_generated_command(toy, tmp_path, capsys):
    from interptool.cli import build_parser, main

    parser = build_parser()
    assert "mean max-softmax per model" in parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "command")
    helptext = sub.choices["confidence"].format_help()
    assert "--temperature" in helptext and "softmax temperature of the confidence" in helptext
    # the generated command runs it on two caches and saves the standard files
    a, b = _logit_caches(tmp_path)
    out = tmp_path / "conf"
    assert main(["confidence", str(a), str(b), "--out", str(out), "--names", "t,s",
                 "--temperature", "2", "--quiet"]) == 0
    doc = json.loads((out / "confidence.json").read_text())
    assert doc["names"] == ["t", "s"] and doc["temperature"] == 2.0
    # known answer: constant logits give confidence 1/K at any temperature
    assert doc["confidence"][0] == pytest.approx(1 / 4)
    # a bad value exits 2 naming the field
    assert main(["confidence", str(a), str(b), "--out", str(out), "--temperature", "-1",
                 "--quiet"]) == 2
    assert "temperature: expected a number > 0.0" in capsys.readouterr().err


def _logit_caches(tmp_path) -> tuple[Path, Path]:
    """Two tiny caches of the same images: constant logits and one-hot-ish logits (K=4)."""
    from interptool.cache import write_cache

    ids = [f"im{i}.png" for i in range(6)]
    labels = np.arange(6) % 4
    sharp = np.full((6, 4), -5.0, np.float32)
    sharp[np.arange(6), labels] = 5.0
    paths = []
    for name, logits in (("t", np.zeros((6, 4), np.float32)), ("s", sharp)):
        p = tmp_path / f"{name}.h5"
        write_cache(p, logits=logits, labels=labels, ids=ids, features={},
                    attrs={"data_fingerprint": "fp"})
        paths.append(p)
    return paths[0], paths[1]


def test_toy_in_config_parser_and_template(toy, tmp_path):
    from interptool.pipeline import parse_config
    from interptool.pipeline._config import template_text

    raw = {"data": {"eval": EVAL},
           "models": {"t": {"arch": "interptool:cw-student", "layers": ["layer4"]}},
           "analysis": {"dissection": False, "similarity": False, "attribution": False,
                        "confidence": {"temperature": 2.0}}}
    cfg = parse_config(raw, source="toy.toml")
    assert cfg.analysis.enabled() == ["confidence"]
    assert cfg.analysis.confidence.temperature == 2.0
    raw["analysis"]["confidence"] = {"temprature": 2.0}
    with pytest.raises(ConfigError, match=r"toy.toml: analysis.confidence.temprature: unknown "
                                          r"key \(did you mean 'temperature'\?\)"):
        parse_config(raw, source="toy.toml")
    raw["analysis"]["confidence"] = {"temperature": 0}
    with pytest.raises(ParamsError, match=r"toy.toml: analysis.confidence.temperature: "
                                          r"expected a number > 0.0, got 0"):
        parse_config(raw, source="toy.toml")
    text = template_text()
    assert "[analysis.confidence]" in text and "softmax temperature of the confidence" in text


def test_toy_runs_as_a_compare_stage_with_its_report_section(toy, tmp_path):
    from interptool.pipeline import parse_config, run_compare

    raw = {"data": {"eval": EVAL},
           "models": {"t": {"arch": "interptool:cw-student", "layers": ["layer4"],
                            "num_classes": 10, "image_size": 32, "role": "teacher"},
                      "s": {"arch": "interptool:cw-student", "layers": ["layer4"],
                            "num_classes": 10, "image_size": 32}},
           "analysis": {"dissection": False, "similarity": False, "attribution": False,
                        "confidence": {"temperature": 3.0}},
           "run": {"batch_size": 12, "seed": 1}}
    cfg = parse_config(raw, source="toy.toml")
    out = tmp_path / "out"
    html = run_compare(cfg, out).read_text()
    summary = json.loads((out / "summary.json").read_text())
    part = summary["confidence"]
    assert [r["names"] for r in part["results"]] == [["t", "s"]]
    # the stage's number equals the analyzer applied to the caches directly
    from interptool.cache import ActivationCache

    with ActivationCache(out / "cache" / "s_eval.h5") as c:
        z = c.logits.astype(np.float64) / 3.0
    p = np.exp(z - z.max(1, keepdims=True))
    want = float((p.max(1) / p.sum(1)).mean())
    assert part["results"][0]["summary"]["confidence"]["s"] == pytest.approx(want)
    assert (out / ".stages" / "confidence.json").is_file()
    assert 'TOY SECTION at T=3.0' in html and 'id="confidence"' in html
    assert (out / "confidence" / "t_vs_s" / "confidence.png").is_file()


# --------------------------------------------------------------------------------------------
# every registered analyzer: one result each, made on tiny caches
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two random-init students cached on a tiny eval set (logits + layer4) and probe set."""
    from interptool.cache import cache_activations
    from interptool.data import open_dataset
    from interptool.loading import load_model

    root = tmp_path_factory.mktemp("world")
    ev, pr = open_dataset(EVAL), open_dataset(PROBE)
    k = ev.num_classes
    out: dict[str, Any] = {"eval": ev, "probe": pr, "models": {}}
    for i, name in enumerate(("a", "b")):
        import torch

        torch.manual_seed(i)
        lm = load_model("interptool:cw-student", num_classes=k, image_size=(32, 32))
        out["models"][name] = lm
        out[f"{name}_eval"] = cache_activations(lm, ev, ["layer4"], root / f"{name}_eval.h5",
                                                batch_size=12)
        out[f"{name}_probe"] = cache_activations(lm, pr, ["layer4"], root / f"{name}_probe.h5",
                                                 batch_size=12)
    return out


def _make_result(name: str, w: dict[str, Any]) -> tuple[Any, tuple[str, ...]]:
    """One result of the registered analyzer ``name`` and the model names it must carry."""
    if name == "dissection":
        from interptool.analyzers.dissection import run

        return run(w["a_probe"], "layer4", w["probe"], name="a"), ("a",)
    if name == "similarity":
        from interptool.analyzers.similarity import run

        return run(w["a_eval"], w["b_eval"], names=["a", "b"], n_boot=20), ("a", "b")
    if name == "cka":
        from interptool.analyzers.cka import run

        return run(w["a_eval"], w["b_eval"], ["layer4"], names=["a", "b"]), ("a", "b")
    if name == "attribution":
        from interptool.analyzers.attribution import AttributionParams, run

        return (run(w["models"]["a"], w["eval"], AttributionParams(method="saliency"),
                    name="a", n=4, batch_size=4), ("a",))
    raise AssertionError(f"registered analyzer {name!r} has no result factory in "
                         "tests/test_contract.py: add one so the contract covers it")


BUILTIN = [s.name for s in analyzer_specs()]


def test_builtins_are_registered():
    assert BUILTIN == ["dissection", "similarity", "cka", "attribution"]


@pytest.mark.parametrize("name", BUILTIN)
def test_result_contract(name, world, tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    spec = get_analyzer(name)
    res, names = _make_result(name, world)
    assert isinstance(res, spec.result_class())
    assert isinstance(res, AnalysisResult)  # every method and attribute of the protocol
    assert tuple(res.names) == names
    assert isinstance(res.provenance, dict) and res.provenance
    json.dumps(to_jsonable(res.summary()), allow_nan=False)
    doc = to_jsonable(res.to_dict())
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    figs = res.plot()
    for f in figs if isinstance(figs, list) else [figs]:
        assert isinstance(f, Figure)
        plt.close(f)
    # save: the standard files first, inside the folder, the JSON exactly to_dict()
    paths = res.save(tmp_path / "out")
    assert paths and all(p.is_file() and (tmp_path / "out") in p.parents for p in paths)
    stem = res.file_stem
    assert [p.name for p in paths[:2]] == [f"{stem}.csv", f"{stem}.json"]
    assert json.loads(paths[1].read_text()) == doc
    frame = res.to_frame()
    back = pd.read_csv(paths[0])
    assert list(back.columns) == [str(c) for c in frame.columns] and len(back) == len(frame)


def _bad_value(f: dataclasses.Field) -> Any:
    m = f.metadata
    if m.get("choices"):
        return "no-such-choice"
    for key, delta in (("gt", 0), ("ge", -1), ("lt", 0), ("le", 1)):
        if m.get(key) is not None:
            return m[key] + delta
    return None


@pytest.mark.parametrize("name", BUILTIN)
def test_params_reject_bad_values_naming_the_field(name):
    spec = get_analyzer(name)
    spec.params()  # the defaults are valid
    checked = 0
    for f in dataclasses.fields(spec.params):
        bad = _bad_value(f)
        if bad is None:
            continue
        if isinstance(spec.params.field_default(f.name), list):
            bad = [bad]
        with pytest.raises(ParamsError) as err:
            spec.params(**{f.name: bad})
        assert err.value.field == f.name
        assert str(err.value).startswith(f"{f.name}") and "expected" in str(err.value)
        checked += 1
    assert checked, f"{name}: no checked field"
    # every field documents itself in one line
    for f in dataclasses.fields(spec.params):
        assert f.metadata.get("help") and "\n" not in f.metadata["help"], f.name


def test_attribution_method_names_match_implementations():
    from interptool.analyzers.attribution import ATTRIBUTION_METHODS, METHODS

    assert set(ATTRIBUTION_METHODS) == set(METHODS)


def test_existing_entry_points_validate_through_params():
    from interptool.analyzers.cka import cka
    from interptool.analyzers.dissection import Dissection

    with pytest.raises(ParamsError, match="iou_threshold: expected a number <= 1.0, got 2"):
        Dissection(iou_threshold=2)
    with pytest.raises(ParamsError, match="pooling: expected one of mean, flatten, got 'max'"):
        cka("a.h5", "b.h5", "l1", pooling="max")
    d = Dissection(quantile=0.01, iou_threshold=0.05)
    assert (d.quantile, d.iou_threshold) == (0.01, 0.05)
    assert d.params.quantile == 0.01 and not math.isnan(d.params.ci_level)


def test_generated_command_runs_a_builtin_analyzer(world, tmp_path):
    """`interptool cka` exists only through its registration; it equals cka() directly."""
    from interptool.analyzers.cka import cka
    from interptool.cli import main

    out = tmp_path / "cka"
    assert main(["cka", str(world["a_eval"]), str(world["b_eval"]), "--layer", "layer4",
                 "--names", "a,b", "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "cka.json").read_text())
    direct = cka(world["a_eval"], world["b_eval"], ["layer4"], names=["a", "b"])
    assert (doc["model_a"], doc["model_b"]) == ("a", "b")
    assert doc["cka"][0][0] == pytest.approx(float(direct.matrix.iloc[0, 0]), abs=1e-12)
    assert main(["cka", str(world["a_eval"]), str(world["b_eval"]), "--layer", "layer4",
                 "--out", str(out), "--pooling", "max", "--quiet"]) == 2


def test_to_jsonable_gives_strict_json():
    doc = to_jsonable({1: np.float32(0.5), "nan": float("nan"), "inf": np.inf,
                       "arr": np.arange(3), "b": np.bool_(True), "t": (np.int64(2), None),
                       "p": Path("a/b"), "dtype": np.dtype("float32")})
    assert doc == {"1": 0.5, "nan": None, "inf": None, "arr": [0, 1, 2], "b": True,
                   "t": [2, None], "p": "a/b", "dtype": "float32"}
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc


def test_same_images_check_names_the_first_difference():
    from interptool.common.alignment import ImageSet, check_same_images
    from interptool.errors import CacheError

    check_same_images(ImageSet("a", ["x", "y"], "fp"), ImageSet("b", ["x", "y"], "fp"), fix="")
    with pytest.raises(CacheError, match=r"first difference at row 1 .*'y' vs 'z'"):
        check_same_images(ImageSet("a", ["x", "y"]), ImageSet("b", ["x", "z"]), fix="",
                          error=CacheError)
    with pytest.raises(ConfigError, match="data fingerprints differ"):
        check_same_images(ImageSet("a", ["x"], "f1"), ImageSet("b", ["x"], "f2"), fix="",
                          error=ConfigError)
    # an unknown fingerprint passes only when allowed
    check_same_images(ImageSet("a", ["x"], ""), ImageSet("b", ["x"], "f2"), fix="",
                      unknown_fingerprint_ok=True)
    # and otherwise says the fingerprint is missing (not "made from a different data set")
    with pytest.raises(ConfigError, match=r"^a records no data fingerprint .* images of b\. "
                                          r"re-cache$"):
        check_same_images(ImageSet("a", ["x"], ""), ImageSet("b", ["x"], "f2"),
                          fix="re-cache", error=ConfigError)
    with pytest.raises(Exception, match="labels differ"):
        check_same_images(ImageSet("a", ["x"], labels=[1]), ImageSet("b", ["x"], labels=[2]),
                          fix="")
