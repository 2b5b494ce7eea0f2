"""Decision-grade numbers in ``compare`` (issue 10): protocol recorded, detector intervals and
paired differences, random-init controls, concept tables, Holm over the findings table, and
the paper's direction stated in words. Known answers, then one small end-to-end run checked
against the analyzer called directly.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from interptool.pipeline._verdicts import (
    bc_p_value,
    mark_holm,
    p_from_interval,
    paper_directions,
    recipe_of,
)


# --------------------------------------------------------------------------------------------
# p-values and Holm
# --------------------------------------------------------------------------------------------
def test_p_from_interval_known_answer():
    # est 1.96 with a 95% interval of half-width 1.96: se = 1, z = 1.96, p = 0.05
    assert p_from_interval(1.96, 0.0, 3.92) == pytest.approx(0.05, abs=1e-4)
    assert p_from_interval(0.0, -1.0, 1.0) == pytest.approx(1.0)
    assert p_from_interval(1.0, None, 2.0) is None
    assert p_from_interval(1.0, 1.0, 1.0) is None  # no width


def test_bc_p_value_agrees_with_the_bc_interval():
    """p < 0.05 exactly when the 95% BC interval (common.stats) excludes 0, also for strongly
    biased bootstrap distributions, where the plain percentile p can disagree."""
    from interptool.common.stats import interval_from_resamples

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        centre, bias, spread = rng.normal(0, 2), rng.normal(0, 2), rng.uniform(0.3, 2)
        d = rng.normal(centre + bias, spread, size=999)
        est = centre
        iv = interval_from_resamples(d, est, method="bc")
        if iv.widened:
            continue
        p = bc_p_value(d, est)
        # skip the knife edge, where quantile interpolation decides
        if abs(p - 0.05) < 0.004:
            continue
        assert (p < 0.05) == (iv.low > 0 or iv.high < 0), (est, iv, p)
        checked += 1
    assert checked > 200
    # identical models: every resampled difference is 0 -> p = 1
    assert bc_p_value(np.zeros(500), 0.0) == 1.0
    # centred on the estimate, it is the ordinary two-sided normal-quantile p
    d = np.random.default_rng(1).normal(1.0, 1.0, size=20001)
    assert bc_p_value(d, 1.0) == pytest.approx(2 * np.mean(d < 0), rel=0.05)


def test_holm_over_the_table_hand_computed():
    rows = [
        {"measure": "a", "comparisons": [{"p_value": 0.01}, {"p_value": 0.04}]},
        {"measure": "b", "comparisons": [{"p_value": 0.03}, {"p_value": None}]},
    ]
    mark_holm(rows)
    # m = 3: sorted 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06
    c = [x for r in rows for x in r["comparisons"]]
    assert [x["p_holm"] for x in c[:3]] == [pytest.approx(0.03), pytest.approx(0.06),
                                            pytest.approx(0.06)]
    assert [x["holm"] for x in c] == [True, False, False, None]
    assert c[3]["p_holm"] is None
    assert rows[0]["holm_family"] == 3


# --------------------------------------------------------------------------------------------
# the paper's direction
# --------------------------------------------------------------------------------------------
def test_recipe_names():
    assert recipe_of("kd") == "kd" and recipe_of("resnet18_kd-seed2") == "kd"
    assert recipe_of("scratch") == "scratch" and recipe_of("LS") == "ls"
    assert recipe_of("label-smoothing") == "ls"
    assert recipe_of("kids") is None and recipe_of("teacher") is None
    assert recipe_of("kd_ls") is None  # two recipes: ambiguous


def _row(measure, comps):
    return {"measure": measure, "values": {"kd": 1, "scratch": 1, "ls": 1, "teacher": 1},
            "comparisons": comps}


def test_paper_direction_verdicts():
    from interptool.pipeline.findings import make_finding

    # KD 30 vs scratch 25: paired CI of kd - scratch [2, 8] -> agrees; scratch - ls CI
    # [-3, 4] -> cannot tell
    diffs = {("kd", "scratch"): (5, 2, 8), ("kd", "ls"): (6, 1, 9),
             ("scratch", "ls"): (1, -3, 4)}
    row = make_finding("detector units (layer4)", {"kd": 30, "scratch": 25, "ls": 24},
                       lambda a, b: diffs[(a, b)], models=["kd", "scratch", "ls"])
    out = {d["direction"]: d for d in paper_directions([row])}
    assert out["KD > scratch"]["verdict"] == "agrees"
    assert (out["KD > scratch"]["ci_low"], out["KD > scratch"]["ci_high"]) == (2, 8)
    assert "agrees with the paper" in out["KD > scratch"]["sentence"]
    assert "[2, 8]" in out["KD > scratch"]["sentence"]
    assert out["scratch > LS"]["verdict"] == "cannot tell"
    assert "cannot tell" in out["scratch > LS"]["sentence"]
    # KD below scratch with an interval excluding 0: the opposite direction, oriented kd - scratch
    diffs[("kd", "scratch")] = (-6, -9, -2)
    row = make_finding("detector fraction (layer4)", {"kd": 0.1, "scratch": 0.2, "ls": 0.1},
                       lambda a, b: diffs[(a, b)], models=["kd", "scratch", "ls"])
    d = next(x for x in paper_directions([row]) if x["direction"] == "KD > scratch")
    assert d["verdict"] == "disagrees" and d["difference"] == -6
    assert (d["ci_low"], d["ci_high"]) == (-9, -2)
    assert "opposite" in d["sentence"]
    # rows that are not detector rows are ignored
    assert paper_directions([_row("accuracy (eval)", [])]) == []


# --------------------------------------------------------------------------------------------
# random-init control
# --------------------------------------------------------------------------------------------
def test_random_init_baseline_is_deterministic_for_a_seed():
    from interptool.pipeline._dissect import random_init_model

    a = random_init_model("interptool:cw-student", 7, num_classes=10)
    torch.rand(100)  # whatever ran in between
    b = random_init_model("interptool:cw-student", 7, num_classes=10)
    c = random_init_model("interptool:cw-student", 8, num_classes=10)
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    # the caller's random stream is left as it was
    torch.manual_seed(3)
    x = torch.rand(3)
    torch.manual_seed(3)
    random_init_model("interptool:cw-student", 7, num_classes=10)
    assert torch.equal(torch.rand(3), x)


def test_concepts_gained_lost_from_stored_tables_hand_built():
    from interptool.pipeline._dissect import concepts_gained_lost

    student = [{"concept": "red", "category": "color", "units": 3},
               {"concept": "wheel", "category": "part", "units": 1}]
    teacher = [{"concept": "red", "category": "color", "units": 1},
               {"concept": "grass", "category": "texture", "units": 2}]
    got = concepts_gained_lost(student, teacher)
    assert [(r["concept"], r["status"], r["units"], r["units_teacher"]) for r in got] == [
        ("wheel", "gained", 1, 0), ("grass", "lost", 0, 2), ("red", "shared", 3, 1)]


# --------------------------------------------------------------------------------------------
# end to end: a teacher and two students with different (saved) random weights
# --------------------------------------------------------------------------------------------
CONFIG = """
[data]
probe = "builtin:concept-world?version=1&n=48&size=32&seed=4&split=probe"
[models.teacher]
arch = "interptool:cw-teacher"
checkpoint = "teacher.safetensors"
layers = ["layer4"]
image_size = 32
role = "teacher"
[models.kd]
arch = "interptool:cw-student"
checkpoint = "kd.safetensors"
layers = ["layer4"]
image_size = 32
[models.scratch]
arch = "interptool:cw-student"
checkpoint = "scratch.safetensors"
layers = ["layer4"]
image_size = 32
[analysis]
dissection = { top_units = 1, bootstrap = 200 }
similarity = false
attribution = false
[run]
batch_size = 24
seed = 9
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from safetensors.torch import save_file

    from interptool.loading._zoo import ZOO
    from interptool.pipeline import load_config, run_compare

    d = tmp_path_factory.mktemp("stats")
    for i, (name, arch) in enumerate((("teacher", "cw-teacher"), ("kd", "cw-student"),
                                      ("scratch", "cw-student"))):
        torch.manual_seed(100 + i)
        save_file(ZOO[arch](num_classes=10).state_dict(), str(d / f"{name}.safetensors"))
    (d / "c.toml").write_text(CONFIG)
    run_compare(load_config(d / "c.toml"), d / "out")
    return d


def _summary(run_dir):
    return json.loads((run_dir / "out" / "summary.json").read_text())


def test_protocol_and_control_recorded_and_stated(run_dir):
    s = _summary(run_dir)
    dis = s["dissection"]
    assert dis["protocol"]["name"] == "netdissect-lite"
    assert dis["protocol"]["categories"] == ["color", "object", "part", "texture", "scene"]
    assert dis["protocol"]["bootstrap"]["resamples"] == 200
    assert dis["protocol"]["bootstrap"]["seed"] == 9
    assert dis["settings"]["iou_threshold"] == 0.04
    assert dis["baselines"] == {
        "random-init.cw-teacher": {"name": "random-init.cw-teacher", "arch": "interptool:cw-teacher",
                                   "members": ["teacher"], "seed": 9, "layers": ["layer4"]},
        "random-init.cw-student": {"name": "random-init.cw-student", "arch": "interptool:cw-student",
                                   "members": ["kd", "scratch"], "seed": 9, "layers": ["layer4"]}}
    assert set(dis["per_model"]) == {"teacher", "kd", "scratch", "random-init.cw-teacher",
                                     "random-init.cw-student"}
    assert dis["roles"]["random-init.cw-student"] == "baseline"
    html = (run_dir / "out" / "report.html").read_text()
    i = html.index('id="dissection"')
    top = html[i:i + 2500]
    assert "Protocol netdissect-lite" in top and "IoU &gt;= 0.04" in top
    assert "200 resamples, seed 9" in top and "random weights (seed 9)" in top
    assert "Concepts gained and lost against the teacher" in html
    assert "survives Holm" in html


def test_detector_findings_carry_intervals_and_paired_differences(run_dir):
    from interptool.analyzers.dissection import Dissection
    from interptool.cache import ActivationCache
    from interptool.data import open_dataset

    s = _summary(run_dir)
    rows = {f["measure"]: f for f in s["findings"]}
    # widths differ (teacher 192 vs students 128 units): the fraction row comes first
    measures = [f["measure"] for f in s["findings"]]
    assert measures.index("detector fraction (layer4)") < measures.index(
        "detector units (layer4)")
    assert "compare the detector fraction" in rows["detector units (layer4)"]["note"]
    for key in ("detector units (layer4)", "detector fraction (layer4)",
                "unique concepts (layer4)"):
        row = rows[key]
        assert set(row["value_ci"]) == set(row["values"])  # every value has its interval
        for m, (lo, hi) in row["value_ci"].items():
            assert lo <= row["values"][m] <= hi, (key, m)
        comps = {c["comparison"]: c for c in row["comparisons"]}
        assert set(comps) == {"kd vs scratch", "kd vs teacher", "scratch vs teacher",
                              "teacher vs random-init.cw-teacher",
                              "kd vs random-init.cw-student",
                              "scratch vs random-init.cw-student"}
        for c in comps.values():
            assert c["significant"] is not None and c["ci_low"] <= c["difference"] <= c["ci_high"]
            assert c["p_value"] is not None and c["holm"] is not None
    # the paired difference equals the analyzer's own, dissected again here
    probe = open_dataset("builtin:concept-world?version=1&n=48&size=32&seed=4&split=probe")
    res = {}
    for m in ("kd", "scratch"):
        with ActivationCache(run_dir / "out" / "cache" / f"{m}_probe.h5") as c:
            res[m] = Dissection(bootstrap=200, seed=9).run(c, "layer4", probe)
    direct = res["kd"].paired_difference(res["scratch"]).set_index("measure")
    pairs = [p for p in s["dissection"]["pairs"] if (p["a"], p["b"]) == ("kd", "scratch")]
    for p in pairs:
        assert p["difference"] == pytest.approx(direct.at[p["measure"], "difference"])
        assert p["ci_low"] == pytest.approx(direct.at[p["measure"], "ci_low"])
        assert p["ci_high"] == pytest.approx(direct.at[p["measure"], "ci_high"])
    assert {p["measure"] for p in pairs} == {"detectors", "detector_fraction", "unique_concepts"}
    # values and intervals per model equal the analyzer's
    iv = res["kd"].intervals().set_index("measure")
    kd_row = rows["detector units (layer4)"]
    assert kd_row["values"]["kd"] == len(res["kd"].detectors())
    assert kd_row["value_ci"]["kd"] == [pytest.approx(iv.at["detectors", "ci_low"]),
                                        pytest.approx(iv.at["detectors", "ci_high"])]
    # concept table and gained/lost equal the analyzer's
    with ActivationCache(run_dir / "out" / "cache" / "teacher_probe.h5") as c:
        teacher = Dissection(bootstrap=0).run(c, "layer4", probe)
    want = res["kd"].concepts_gained_lost(teacher)
    got = s["dissection"]["gained_lost"]["kd"]["layer4"]
    assert [(r["concept"], r["status"], r["units"], r["units_teacher"]) for r in got] == [
        (r.concept, r.status, r.units, r.units_other) for r in want.itertuples()]
    stored = s["dissection"]["per_model"]["kd"]["layer4"]["concepts"]
    assert [r["concept"] for r in stored] == list(res["kd"].concept_table()["concept"])


def test_baseline_dissection_is_the_random_init_model(run_dir):
    """The control's numbers are those of a freshly seeded random-init model."""
    from interptool.analyzers.dissection import Dissection
    from interptool.cache import cache_activations
    from interptool.data import open_dataset
    from interptool.pipeline._dissect import random_init_model

    probe = open_dataset("builtin:concept-world?version=1&n=48&size=32&seed=4&split=probe")
    lm = random_init_model("interptool:cw-student", 9, num_classes=10, image_size=(32, 32))
    path = cache_activations(lm, probe, ["layer4"], run_dir / "base.h5", batch_size=24,
                             probe=True)
    res = Dissection().run(path, "layer4", probe)
    part = _summary(run_dir)["dissection"]["per_model"]["random-init.cw-student"]["layer4"]
    assert part["detectors"] == len(res.detectors())
    assert part["detector_fraction"] == pytest.approx(res.detector_fraction())
    assert not math.isnan(part["intervals"]["detectors"]["ci_low"])


def test_rerun_reuses_everything_and_intervals_hold_their_estimates(run_dir):
    from interptool.pipeline import load_config, run_compare

    before = _summary(run_dir)
    run_compare(load_config(run_dir / "c.toml"), run_dir / "out")
    after = _summary(run_dir)
    assert {f"dissection-{m}-layer4" for m in before["dissection"]["per_model"]} <= set(
        after["provenance"]["reused_stages"])
    assert after["findings"] == before["findings"]
    # every interval in the dissection section and findings contains its estimate
    for m, layers in after["dissection"]["per_model"].items():
        for part in layers.values():
            for name, iv in part["intervals"].items():
                assert iv["ci_low"] <= iv["estimate"] <= iv["ci_high"], (m, name)
    for p in after["dissection"]["pairs"]:
        assert p["ci_low"] <= p["difference"] <= p["ci_high"]


# --------------------------------------------------------------------------------------------
# groups of checkpoints (seeds of one recipe)
# --------------------------------------------------------------------------------------------
GROUPS = """
[models.teacher]
arch = "interptool:cw-teacher"
layers = ["layer4"]
role = "teacher"
[models.kd1]
arch = "interptool:cw-student"
layers = ["layer4"]
group = "kd"
[models.kd2]
arch = "interptool:cw-student"
layers = ["layer4"]
group = "kd"
[models.kd3]
arch = "interptool:cw-student"
layers = ["layer4"]
group = "kd"
[models.s1]
arch = "interptool:cw-student"
layers = ["layer4"]
group = "scratch"
[models.s2]
arch = "interptool:cw-student"
layers = ["layer4"]
group = "scratch"
[analysis]
dissection = false
similarity = false
attribution = false
"""


def _groups_cfg(text=GROUPS):
    import tomllib

    from interptool.pipeline import parse_config

    return parse_config(tomllib.loads(text), source="g.toml")


def test_group_key_parsed_and_checked():
    from interptool.errors import ConfigError
    from interptool.pipeline._groups import groups_of

    cfg = _groups_cfg()
    assert groups_of(cfg) == {"teacher": ["teacher"], "kd": ["kd1", "kd2", "kd3"],
                              "scratch": ["s1", "s2"]}
    with pytest.raises(ConfigError, match=r"g.toml: models.kd1.group: group names"):
        _groups_cfg(GROUPS.replace('group = "kd"', 'group = "k d"', 1))
    with pytest.raises(ConfigError, match=r"models.kd1.group: expected a string"):
        _groups_cfg(GROUPS.replace('group = "kd"', "group = 3", 1))


def test_welch_difference_hand_computed():
    from scipy.stats import t

    from interptool.pipeline._groups import welch_difference

    a, b = [0.30, 0.34, 0.35], [0.25, 0.29]
    ma, mb = np.mean(a), np.mean(b)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 2
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)  # Welch-Satterthwaite
    half = t.ppf(0.975, df) * se
    d, lo, hi, p = welch_difference(a, b)
    assert d == pytest.approx(ma - mb)
    assert (lo, hi) == (pytest.approx(ma - mb - half), pytest.approx(ma - mb + half))
    assert p == pytest.approx(2 * t.sf(abs(ma - mb) / se, df))
    # a group against one model: one-sample t of the members minus its value
    d, lo, hi, p = welch_difference(a, [0.2])
    half = t.ppf(0.975, 2) * np.std(a, ddof=1) / math.sqrt(3)
    assert (d, lo, hi) == (pytest.approx(ma - 0.2), pytest.approx(ma - 0.2 - half),
                           pytest.approx(ma - 0.2 + half))
    # two single models: no interval
    d, lo, hi, p = welch_difference([1.0], [2.0])
    assert d == -1.0 and math.isnan(lo) and math.isnan(p)
    # seeds that all agree (13, 13, 13 detectors) against one model or another such group:
    # a sample SD of 0 is not certainty, so no interval and no p (was [d, d] with p = 0)
    for other in ([27.0], [12.0, 12.0, 12.0]):
        d, lo, hi, p = welch_difference([13.0, 13.0, 13.0], other)
        assert d == 13.0 - other[0] and math.isnan(lo) and math.isnan(hi) and math.isnan(p)


def test_group_rows_means_t_intervals_and_direction():
    from scipy.stats import t

    from interptool.pipeline._groups import group_findings
    from interptool.pipeline.findings import make_finding

    cfg = _groups_cfg()
    vals = {"teacher": 40, "kd1": 30, "kd2": 34, "kd3": 35, "s1": 25, "s2": 29,
            "random-init.cw-student": 5}
    row = make_finding("detector units (layer4)", vals, teacher="teacher", models=list(cfg.models))
    (g,) = group_findings([row], cfg)
    assert g["measure"] == "detector units [groups] (layer4)"
    assert g["values"] == {"teacher": 40, "kd": pytest.approx(33.0), "scratch": pytest.approx(27.0)}
    half = t.ppf(0.975, 2) * np.std([30, 34, 35], ddof=1) / math.sqrt(3)
    assert g["value_ci"]["kd"] == [pytest.approx(33 - half), pytest.approx(33 + half)]
    assert "teacher" not in g["value_ci"]  # a single model has no interval over seeds
    assert g["group_members"]["kd"] == ["kd1", "kd2", "kd3"]
    comps = {c["comparison"]: c for c in g["comparisons"]}
    assert set(comps) == {"kd vs scratch", "kd vs teacher", "scratch vs teacher"}
    assert comps["kd vs scratch"]["better"] == "kd" and comps["kd vs scratch"]["p_value"] > 0
    # the paper's direction is read from the group row first
    d = paper_directions([row, g])[0]
    assert d["group"] and (d["a"], d["b"]) == ("kd", "scratch")
    assert d["difference"] == pytest.approx(6.0)
    # no groups in the config: no group rows
    plain = _groups_cfg(GROUPS.replace('group = "kd"\n', "").replace('group = "scratch"\n', ""))
    assert group_findings([row], plain) == []


# --------------------------------------------------------------------------------------------
# the paper's mechanism panel
# --------------------------------------------------------------------------------------------
def test_exact_spearman_known_answers():
    from interptool.pipeline._mechanism import exact_spearman

    r = exact_spearman([1, 2, 3, 4], [10, 20, 30, 40])
    assert r["rho"] == pytest.approx(1.0)
    assert r["p_value"] == pytest.approx(2 / 24)  # 4 models: never below 0.05
    # d = (1, -1, 1, -1, 0): rho = 1 - 6 * 4 / (5 * 24) = 0.8; orderings with |rho| >= 0.8:
    # identity, 4 adjacent swaps, 3 pairs of disjoint adjacent swaps, and their mirrors
    r = exact_spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert r["rho"] == pytest.approx(0.8)
    assert r["p_value"] == pytest.approx(16 / 120)
    assert math.isnan(exact_spearman([1, 2], [3, 4])["rho"])


def test_mechanism_panel_from_a_summary(tmp_path):
    from interptool.pipeline._mechanism import mechanism_section
    from interptool.report._figures import FigureSet

    fr = {"teacher": 0.30, "kd": 0.25, "scratch": 0.20, "ls": 0.10, "random-init.x": 0.05}
    ent = {"teacher": 0.9, "kd": 0.8, "scratch": 0.5, "ls": 0.2}
    summary = {
        "teacher": "teacher",
        "dissection": {"roles": {"random-init.x": "baseline"},
                       "per_model": {m: {"layer4": {"detector_fraction": v}}
                                     for m, v in fr.items()}},
        "similarity": {"temperatures": [1.0],
                       "models": {m: {"temperatures": {"1": {"entropy": v}}}
                                  for m, v in ent.items()},
                       "estimates": [{"metric": "spearman", "role": "student", "model": m,
                                      "temperature": 1.0, "value": v}
                                     for m, v in (("kd", 0.9), ("scratch", 0.7), ("ls", 0.3))]},
    }
    figs = FigureSet(tmp_path)
    mech = mechanism_section(summary, figs)
    c = {r["x"]: r for r in mech["correlations"]}
    ent_c = c["within-class entropy"]
    assert ent_c["n"] == 4 and ent_c["rho"] == pytest.approx(1.0)  # the control is left out
    assert "cannot reach p < 0.05" in ent_c["caveat"]
    assert c["similarity transfer"]["n"] == 3 and c["similarity transfer"]["rho"] == pytest.approx(1.0)
    assert c["similarity transfer"]["p_value"] == pytest.approx(2 / 6)
    assert {r["model"] for r in mech["rows"]} == {"teacher", "kd", "scratch", "ls"}
    assert (tmp_path / "mechanism.png").read_bytes()[:4] == b"\x89PNG"
    assert "rho = 1.00" in figs.entries["mechanism"]["caption"]
    assert mechanism_section({"teacher": "t", "dissection": summary["dissection"]}, figs) is None


def test_demo_summary_line_states_the_direction_in_words():
    from interptool.pipeline._verdicts import paper_summary_line
    from interptool.pipeline.findings import make_finding

    diffs = {("kd", "scratch"): (5, 2, 8), ("kd", "ls"): (6, 1, 9),
             ("scratch", "ls"): (1, -3, 4)}
    rows = [make_finding(f"detector units ({lay})", {"kd": 30, "scratch": 25, "ls": 24},
                         lambda a, b: diffs[(a, b)], models=["kd", "scratch", "ls"])
            for lay in ("layer3", "layer4")]
    line = paper_summary_line(paper_directions(rows))
    assert line.startswith("paper's direction (KD > scratch > LS in detectors, layer4): ")
    assert "kd - scratch +5 [+2, +8] (agrees)" in line
    assert "scratch - ls +1 [-3, +4] (interval includes 0: cannot tell)" in line
    assert "not assessed" in paper_summary_line([])
