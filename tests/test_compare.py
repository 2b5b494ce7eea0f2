"""The HTML renderer on a synthetic summary: self-contained, every section and number present."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from interptool.errors import InterptoolError
from interptool.report import _figures as figs
from interptool.report import render_html


def synthetic_summary(tmp_path):
    """A summary.json-shaped dict with two figures written as PNG files under tmp_path."""
    counts = {
        "teacher": {"layer4": {"total": {"detectors": 40, "unique": 12},
                               "object": {"detectors": 30, "unique": 8}}},
        "kd": {"layer4": {"total": {"detectors": 35, "unique": 10},
                          "object": {"detectors": 20, "unique": 6}}},
    }
    figs.save_png(figs.detector_bars(counts, ["object"]), tmp_path / "dissection" / "bars.png")
    figs.save_png(figs.cka_matrix(np.eye(2), ["teacher.l3", "teacher.l4"], ["kd.l3", "kd.l4"]),
                  tmp_path / "similarity" / "heat.png")
    return {
        "title": "Synthetic <comparison>",
        "teacher": "teacher",
        "n_eval": 40,
        "models": [
            {"name": "teacher", "role": "teacher", "arch": "interptool:cw-teacher",
             "params": 1575202, "checkpoint": "/x/t.safetensors", "checkpoint_sha256": "ab" * 32,
             "accuracy": 0.875, "accuracy_ci": [0.74, 0.95]},
            {"name": "kd", "role": "student", "arch": "interptool:cw-student", "params": 308826,
             "checkpoint": None, "checkpoint_sha256": None, "accuracy": 0.8125,
             "accuracy_ci": None},
        ],
        "findings": [
            {"measure": "detectors (layer4)", "direction": "higher",
             "values": {"teacher": 40, "kd": 35}, "ranking": ["teacher", "kd"],
             "best": "teacher", "note": "count; no CI",
             "comparisons": [{"a": "kd", "b": "teacher", "comparison": "kd vs teacher",
                              "better": "teacher", "difference": 5, "ci_low": None,
                              "ci_high": None, "significant": None}]},
            {"measure": "accuracy", "direction": "higher",
             "values": {"teacher": 0.875, "kd": 0.8125}, "ranking": ["teacher", "kd"],
             "best": "teacher", "note": "",
             "comparisons": [{"a": "kd", "b": "teacher", "comparison": "kd vs teacher",
                              "better": "teacher", "difference": 0.0625, "ci_low": 0.01,
                              "ci_high": 0.12345, "significant": True}]},
            {"measure": "deletion AUC", "direction": "lower",
             "values": {"teacher": 0.3, "kd": 0.2}, "ranking": ["kd", "teacher"],
             "best": "kd", "note": "",
             "comparisons": [{"a": "kd", "b": "teacher", "comparison": "kd vs teacher",
                              "better": "kd", "difference": -0.0625, "ci_low": -0.12345,
                              "ci_high": -0.01, "significant": True}]},
        ],
        "dissection": {"intro": "Units are detectors when IoU >= 0.04.",
                       "tables": [{"title": "Detectors per layer",
                                   "rows": [{"model": "teacher", "layer": "layer4",
                                             "detectors": 40, "unique": 12},
                                            {"model": "kd", "layer": "layer4",
                                             "detectors": 35, "unique": 10}]}],
                       "figures": ["dissection_bars"]},
        "similarity": {"tables": [{"title": "Transfer", "rows": [
            {"student": "kd", "metric": "spearman", "value": 0.91234, "ci_low": 0.8,
             "ci_high": 0.95}]}], "figures": ["similarity_heat"]},
        "figures": {"dissection_bars": {"path": "dissection/bars.png", "caption": "Bars <b>"},
                    "similarity_heat": {"path": "similarity/heat.png", "caption": ""}},
        "provenance": {"versions": {"interptool": "0.1.0", "torch": "2.x"},
                       "run": {"seed": 7, "device": "cpu"}, "timings": {"cache": 1.25},
                       "created": "2025-01-01T00:00:00+00:00", "command": "interptool compare c.toml"},
        "config": {"run": {"seed": 7}},
    }


def test_render_self_contained_with_every_section(tmp_path):
    summary = synthetic_summary(tmp_path)
    html = render_html(summary, tmp_path / "report.html")
    assert (tmp_path / "report.html").read_text() == html
    # every figure is embedded as a decodable PNG; nothing is fetched from elsewhere
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 2
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert not re.search(r'(src|href)="(https?:|//|file:)', html)
    assert "<script" not in html and "<link" not in html
    for anchor in ("models", "findings", "dissection", "similarity", "appendix"):
        assert f'id="{anchor}"' in html
    assert 'id="attribution"' not in html  # absent section is left out, not rendered empty
    # numbers and escaping
    assert "1,575,202" in html and "87.5%" in html and "74.0% – 95.0%" in html
    assert "0.912" in html and "-0.123" in html and "-0.062" in html  # three decimals
    assert "Synthetic &lt;comparison&gt;" in html and "Bars &lt;b&gt;" in html
    assert "abababababababab" in html and "ab" * 32 not in html  # sha shortened in the table
    assert "interptool compare c.toml" in html and "1.2" in html


def test_missing_figure_is_a_clear_error(tmp_path):
    summary = synthetic_summary(tmp_path)
    summary["figures"]["dissection_bars"]["path"] = "dissection/gone.png"
    with pytest.raises(InterptoolError, match="gone.png: cannot be read"):
        render_html(summary, tmp_path / "report.html")


# --------------------------------------------------------------------------------------------
# run_compare on two tiny random-weight models (n=40 images at 32 px)
# --------------------------------------------------------------------------------------------
SMALL = """
[data]
eval = "builtin:concept-world?version=1&n=40&size=32&seed=3&split=eval"
probe = "builtin:concept-world?version=1&n=40&size=32&seed=3&split=probe"
[models.big]
arch = "interptool:cw-student"
layers = ["layer3", "layer4"]
image_size = 32
role = "teacher"
[models.small]
arch = "interptool:cw-student"
layers = ["layer3", "layer4"]
image_size = 32
[analysis]
dissection = { top_units = 2 }
similarity = { temperatures = [1, 4], n_boot = 100 }
attribution = { methods = ["grad_cam"], n_images = 4 }
[run]
batch_size = 20
seed = 5
"""

_RUN: dict = {}


def small_compare(tmp_dir):
    """Run compare once per process: first interrupted in the similarity stage, then resumed.

    Returns (out_dir, record) where record holds what the interrupted run left behind.
    """
    if "out" in _RUN:
        return _RUN["out"], _RUN["record"]
    from interptool.analyzers import similarity as sim_mod
    from interptool.pipeline import load_config, run_compare

    (tmp_dir / "c.toml").write_text(SMALL)
    cfg = load_config(tmp_dir / "c.toml")
    out = tmp_dir / "out"
    real = sim_mod.compare_similarity

    def boom(*a, **k):
        raise RuntimeError("simulated crash after the cache and dissection stages")

    sim_mod.compare_similarity = boom
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_compare(cfg, out)
    finally:
        sim_mod.compare_similarity = real
    caches = sorted((out / "cache").glob("*.h5"))
    record = {
        "caches": {p.name: p.stat().st_mtime_ns for p in caches},
        "markers": sorted(p.name for p in (out / ".stages").glob("*.json")),
        "report_after_crash": (out / "report.html").exists(),
    }
    # The resumed run must not redo dissection: make any call to it fail.
    from interptool.analyzers import dissection as dis_mod

    real_run = dis_mod.Dissection.run

    def no_dissection(*a, **k):
        raise AssertionError("dissection recomputed although its stage was done")

    dis_mod.Dissection.run = no_dissection
    try:
        run_compare(cfg, out, config_text=SMALL)
    finally:
        dis_mod.Dissection.run = real_run
    _RUN["out"], _RUN["record"] = out, record
    _RUN["cfg"] = cfg
    return out, record


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    return small_compare(tmp_path_factory.mktemp("compare"))


def test_interrupted_run_resumes_without_recomputing(compared):
    out, record = compared
    assert not record["report_after_crash"]
    # the random-init control of the shared architecture is cached on the probe too
    assert sorted(record["caches"]) == ["big_eval.h5", "big_probe.h5",
                                        "random-init.cw-student_probe.h5", "small_eval.h5",
                                        "small_probe.h5"]
    assert {f"dissection-{m}-{lay}.json" for m in ("big", "small")
            for lay in ("layer3", "layer4")} <= set(record["markers"])
    assert "similarity.json" not in record["markers"]
    # caches untouched by the resumed run (same files, same modification times)
    now = {p.name: p.stat().st_mtime_ns for p in (out / "cache").glob("*.h5")}
    assert now == record["caches"]
    assert (out / "report.html").exists() and (out / "summary.json").exists()
    # the resumed run reused every dissection done before the crash, and says so
    reused = json.loads((out / "summary.json").read_text())["provenance"]["reused_stages"]
    assert {f"dissection-{m}-{lay}" for m in ("big", "small")
            for lay in ("layer3", "layer4")} <= set(reused)
    assert "similarity" not in reused
    assert "Reused from an earlier run" in (out / "report.html").read_text()
    for rel in ("dissection/big/layer4/tally.csv", "similarity/transfer.csv",
                "attribution/grad_cam/big/attributions.h5", "similarity/cka.png"):
        assert (out / rel).exists(), rel


def test_summary_numbers_equal_direct_analyzer_results(compared):
    import json

    from interptool.analyzers.cka import cka
    from interptool.analyzers.dissection import Dissection
    from interptool.analyzers.similarity import compare_similarity
    from interptool.cache import ActivationCache
    from interptool.data import open_dataset

    out, _ = compared
    s = json.loads((out / "summary.json").read_text())
    probe = open_dataset("builtin:concept-world?version=1&n=40&size=32&seed=3&split=probe")
    # dissection: counts per layer and category, and the IoU-threshold curve
    with ActivationCache(out / "cache" / "small_probe.h5") as c:
        res = Dissection(quantile=0.005, iou_threshold=0.04).run(c, "layer4", probe)
    part = s["dissection"]["per_model"]["small"]["layer4"]
    assert part["detectors"] == len(res.detectors())
    assert part["unique_concepts"] == res.unique_concepts()
    for cat, n in res.by_category().items():
        assert part["by_category"][cat]["detectors"] == n
    thr = s["dissection"]["settings"]["iou_thresholds"]
    assert part["curve"] == [len(res.detectors(t)) for t in thr]
    # accuracy: recomputed from the cached logits by hand
    with ActivationCache(out / "cache" / "small_eval.h5") as c:
        acc = float((c.logits.argmax(1) == c.labels).mean())
        big = ActivationCache(out / "cache" / "big_eval.h5")
        direct = compare_similarity(big, c, temperature=[1, 4], n_boot=100, seed=5, k=5)
        ck = cka(big, c, ["layer3", "layer4"], ["layer3", "layer4"])
        big.close()
    models = {m["name"]: m for m in s["models"]}
    assert models["small"]["accuracy"] == pytest.approx(acc)
    # similarity: the transfer estimate and its CI
    est = direct.to_frame()
    row = est[(est["metric"] == "spearman") & (est["temperature"] == 4.0)
              & (est["role"] == "student")].iloc[0]
    got = [r for r in s["similarity"]["estimates"] if r["metric"] == "spearman"
           and r["temperature"] == 4.0 and r["role"] == "student"][0]
    assert got["value"] == pytest.approx(row["value"])
    assert got["ci_low"] == pytest.approx(row["ci_low"])
    # CKA matrix
    np.testing.assert_allclose(np.asarray(s["similarity"]["cka"]["matrix"]),
                               ck.matrix.to_numpy(), rtol=1e-6)
    # every figure named in the summary exists and the findings rank by value
    for f in s["figures"].values():
        assert (out / f["path"]).exists()
    acc_row = next(f for f in s["findings"] if f["measure"] == "accuracy (eval)")
    vals = acc_row["values"]
    assert acc_row["direction"] == "higher"
    assert acc_row["ranking"][0] == max(vals, key=vals.get)
    for c in acc_row["comparisons"]:
        assert c["better"] in (max((c["a"], c["b"]), key=vals.get), "tie")
    dele = [f for f in s["findings"] if "deletion AUC" in f["measure"]]
    assert dele and all(f["direction"] == "lower" for f in dele)
    for f in dele:  # lower is better: the ranking and every comparison honour it
        assert f["ranking"][0] == min(f["values"], key=f["values"].get)
        for c in f["comparisons"]:
            va, vb = f["values"][c["a"]], f["values"][c["b"]]
            assert c["better"] == ("tie" if va == vb else (c["a"] if va < vb else c["b"]))
            assert c["difference"] <= 0
    html = (out / "report.html").read_text()
    assert f"{100 * acc:.1f}%" in html
    # [run] workers unset: chosen per cache, said so (not "None")
    assert s["provenance"]["run"]["workers"] is None
    assert "auto (per cache: its threads attribute)" in html and ">None<" not in html


def test_findings_honour_each_measures_direction():
    """Known answers: KD beats scratch on a higher-is-better measure and on a
    lower-is-better one; ``better`` names it and the difference / CI are better - other."""
    from interptool.pipeline.findings import finding_pairs
    from interptool.pipeline.findings import make_finding as _finding

    assert finding_pairs(["teacher", "kd", "scratch", "ls"], "teacher") == [
        ("kd", "scratch"), ("kd", "ls"), ("scratch", "ls"),
        ("kd", "teacher"), ("scratch", "teacher"), ("ls", "teacher")]
    # diff(a, b) returns mean(a - b) with its CI, like paired_difference
    vals = {"teacher": 0.30, "kd": 0.10, "scratch": 0.25}
    cis = {("kd", "scratch"): (-0.15, -0.20, -0.10), ("kd", "teacher"): (-0.20, -0.30, 0.05),
           ("scratch", "teacher"): (-0.05, -0.10, 0.01)}
    row = _finding("deletion AUC", vals, lambda a, b: cis[(a, b)], higher_is_better=False,
                   teacher="teacher")
    assert row["direction"] == "lower" and row["ranking"] == ["kd", "scratch", "teacher"]
    assert row["best"] == "kd"
    c = {x["comparison"]: x for x in row["comparisons"]}
    assert list(c) == ["kd vs scratch", "kd vs teacher", "scratch vs teacher"]
    ks = c["kd vs scratch"]
    assert ks["better"] == "kd"  # the LOWER value wins here
    assert ks["difference"] == pytest.approx(-0.15)
    assert (ks["ci_low"], ks["ci_high"]) == (pytest.approx(-0.20), pytest.approx(-0.10))
    assert ks["significant"] is True
    assert c["kd vs teacher"]["significant"] is False  # CI [-0.30, 0.05] contains 0
    # the same numbers on a higher-is-better measure: scratch beats kd, signs flip to positive
    row = _finding("accuracy", vals, lambda a, b: cis[(a, b)], teacher="teacher")
    ks = {x["comparison"]: x for x in row["comparisons"]}["kd vs scratch"]
    assert row["ranking"] == ["teacher", "scratch", "kd"]
    assert ks["better"] == "scratch" and ks["difference"] == pytest.approx(0.15)
    assert (ks["ci_low"], ks["ci_high"]) == (pytest.approx(0.10), pytest.approx(0.20))
    # counts without a CI: difference from the values, significance unknown; ties are ties
    row = _finding("detectors", {"kd": 12, "scratch": 12, "ls": 9}, teacher=None)
    c = {x["comparison"]: x for x in row["comparisons"]}
    assert c["kd vs scratch"]["better"] == "tie" and row["best"] == "tie"
    assert c["kd vs ls"]["better"] == "kd" and c["kd vs ls"]["difference"] == 3
    assert c["kd vs ls"]["significant"] is None


def test_bad_layer_or_weights_named_by_config_field_before_any_work(tmp_path):
    from safetensors.torch import save_file

    from interptool.loading._zoo import ZOO
    from interptool.pipeline import load_config, run_compare

    # a layer typo: a ConfigError naming models.small.layers, before any cache is written
    (tmp_path / "c.toml").write_text(SMALL.replace('layers = ["layer3", "layer4"]\nimage_size = 32\n[analysis]',
                                                    'layers = ["layer3", "layer5"]\nimage_size = 32\n[analysis]'))
    with pytest.raises(InterptoolError) as err:
        run_compare(load_config(tmp_path / "c.toml"), tmp_path / "out")
    msg = str(err.value)
    assert "c.toml: models.small.layers: 'layer5'" in msg and "did you mean" in msg
    assert not (tmp_path / "out" / "cache").exists() or not any((tmp_path / "out" / "cache").iterdir())

    # teacher weights given to a student architecture: the error names the model's table
    save_file(ZOO["cw-teacher"](num_classes=10).state_dict(), str(tmp_path / "t.safetensors"))
    cfg = SMALL.replace('[models.small]\narch = "interptool:cw-student"',
                        '[models.small]\narch = "interptool:cw-student"\ncheckpoint = "t.safetensors"')
    (tmp_path / "d.toml").write_text(cfg)
    with pytest.raises(InterptoolError) as err:
        run_compare(load_config(tmp_path / "d.toml"), tmp_path / "out2")
    assert "d.toml: models.small (arch 'interptool:cw-student'" in str(err.value)
