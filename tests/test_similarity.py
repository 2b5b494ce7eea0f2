"""Class similarity from logits and teacher-student transfer: known answers computed here,
independently of the implementation (explicit loops, hand-written softmax)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from interptool.analyzers.similarity import ClassSimilarity, compare_similarity
from interptool.analyzers.similarity._core import pair_metrics
from interptool.analyzers.similarity._hierarchy import read_hierarchy, semantic_similarity
from interptool.analyzers.similarity._plots import block_average, cluster_order
from interptool.cache import write_cache
from interptool.errors import AnalysisError


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def softmax_row(z):
    e = [math.exp(v) for v in z]
    s = sum(e)
    return [v / s for v in e]


def entropy_row(p):
    return -sum(v * math.log(v) for v in p if v > 0)


def mem(logits, labels, name="m", fp="fp", ids=None):
    """An in-memory stand-in for an ActivationCache (compare_similarity reads attributes)."""
    n = len(labels)
    return SimpleNamespace(
        logits=np.asarray(logits, np.float32), labels=np.asarray(labels, np.int64),
        ids=list(ids) if ids is not None else [f"img{i}" for i in range(n)],
        data_fingerprint=fp, name=name, path=f"{name}.h5", attrs={}, model_info=None,
    )


def structured(n, k, seed, noise=1.0, structure_seed=None, perm=None):
    """Logits with a class-similarity structure (a random K x K 'confusion' pattern)."""
    rng = np.random.default_rng(seed)
    srng = np.random.default_rng(seed if structure_seed is None else structure_seed)
    base = srng.normal(size=(k, k)) * 2.0
    if perm is not None:
        base = base[np.ix_(perm, perm)]
    labels = np.arange(n) % k
    z = base[labels] + noise * rng.normal(size=(n, k))
    z[np.arange(n), labels] += 4.0
    return z, labels


# three classes: 0 and 1 confused with each other, 2 isolated
Z3 = np.array([
    [3.0, 2.5, -1.0],   # class 0
    [2.0, 2.2, -2.0],   # class 0 (predicted 1: wrong)
    [2.4, 3.0, -1.5],   # class 1
    [1.0, 2.0, -0.5],   # class 1
    [-1.0, -0.5, 4.0],  # class 2
    [-2.0, -1.0, 3.0],  # class 2
])
Y3 = np.array([0, 0, 1, 1, 2, 2])


def test_known_answer_matrices_and_entropies(tmp_path):
    path = write_cache(tmp_path / "m.h5", logits=Z3, labels=Y3,
                       attrs={"extra": {"class_names": ["cat", "dog", "car"]}})
    res = ClassSimilarity(temperature=[1.0, 2.0]).run(path)
    assert res.class_names == ["cat", "dog", "car"]
    for T in (1.0, 2.0):
        S = np.zeros((3, 3))
        Sdk = np.zeros((3, 3))
        H = np.zeros(3)
        Hq = np.zeros(3)
        for z, y in zip(Z3.tolist(), Y3.tolist()):
            p = softmax_row([v / T for v in z])
            q = [0.0 if j == y else p[j] / (1 - p[y]) for j in range(3)]
            S[y] += np.array(p) / 2
            Sdk[y] += np.array(q) / 2
            H[y] += entropy_row(p) / 2
            Hq[y] += entropy_row(q) / 2
        np.testing.assert_allclose(res.matrices[T], S, atol=1e-6)
        np.testing.assert_allclose(res.dark_knowledge[T], Sdk, atol=1e-6)
        np.testing.assert_allclose(res.entropy[T], H, atol=1e-6)
        np.testing.assert_allclose(res.nontarget_entropy[T], Hq, atol=1e-6)
        assert res.entropy_overall[T] == pytest.approx(H.mean(), abs=1e-6)
        frame = res.to_frame()
        np.testing.assert_allclose(frame[f"entropy_norm_T{T:g}"], H / math.log(3), atol=1e-6)
        np.testing.assert_allclose(frame[f"nontarget_entropy_norm_T{T:g}"], Hq / math.log(2),
                                   atol=1e-6)
    S1 = res.matrices[1.0]
    assert S1[0, 1] > 5 * S1[0, 2] and S1[1, 0] > 5 * S1[1, 2]  # 0 <-> 1 confused
    assert S1[2, 2] > 0.9  # 2 isolated
    np.testing.assert_allclose(S1.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(res.dark_knowledge[1.0]), 0.0)
    # higher temperature -> flatter distributions -> larger entropy
    assert (res.entropy[2.0] > res.entropy[1.0]).all()
    # cosine of class-mean logits
    means = np.stack([Z3[Y3 == c].mean(0) for c in range(3)])
    cos = means @ means.T / np.outer(np.linalg.norm(means, axis=1), np.linalg.norm(means, axis=1))
    np.testing.assert_allclose(res.cosine, cos, atol=1e-6)
    assert res.accuracy == pytest.approx(5 / 6)
    np.testing.assert_allclose(res.class_accuracy, [0.5, 1.0, 1.0])
    assert res.empty_classes == []


def test_empty_class_reported_not_dropped(tmp_path):
    z = np.concatenate([Z3, np.zeros((6, 1))], axis=1)  # K = 4, class 3 has no images
    res = ClassSimilarity().run(mem(z, Y3))
    assert res.empty_classes == [3]
    assert np.isnan(res.matrices[1.0][3]).all() and np.isnan(res.entropy[1.0][3])
    assert np.isfinite(res.matrices[1.0][:3]).all()
    frame = res.to_frame()
    assert len(frame) == 4 and frame.loc[3, "n"] == 0
    assert math.isfinite(res.entropy_overall[1.0])
    d = res.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON: NaN became null
    assert d["empty_classes"] == [3] and d["matrices"]["1"][3] == [None] * 4
    assert {p.name for p in res.save(tmp_path)} >= {"m_classes.csv", "m_T1_softmax.csv",
                                                    "m_T1_heatmap.png", "m_similarity.json"}


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(AnalysisError, match="positive"):
        ClassSimilarity(temperature=0).run(mem(Z3, Y3))
    with pytest.raises(AnalysisError, match="labels go up to 5"):
        ClassSimilarity().run(mem(Z3, [0, 1, 2, 5, 0, 1]))
    with pytest.raises(AnalysisError, match="no labelled images"):
        ClassSimilarity().run(mem(Z3, [-1] * 6))
    bad = Z3.copy()
    bad[1, 1] = np.nan
    with pytest.raises(AnalysisError, match="NaN"):
        ClassSimilarity().run(mem(bad, Y3))


# ------------------------------------------------------------------------------------------
# agreement metrics: hand computations
# ------------------------------------------------------------------------------------------
def test_pair_metrics_known_values():
    St = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.05, 0.15, 0.8]])
    Ss = np.array([[0.5, 0.1, 0.4], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8]])
    m = pair_metrics(St[None], Ss[None], np.ones((1, 3), bool), k=1)
    kl = np.mean([sum(p * math.log(p / q) for p, q in zip(a, b)) for a, b in zip(St, Ss)])
    assert m["kl"][0] == pytest.approx(kl, rel=1e-12)

    def js(a, b):
        mm = [(x + y) / 2 for x, y in zip(a, b)]
        d = 0.5 * sum(x * math.log2(x / z) for x, z in zip(a, mm)) + 0.5 * sum(
            y * math.log2(y / z) for y, z in zip(b, mm))
        return math.sqrt(d)

    assert m["js_distance"][0] == pytest.approx(np.mean([js(a, b) for a, b in zip(St, Ss)]))
    off = ~np.eye(3, dtype=bool)
    assert m["pearson"][0] == pytest.approx(np.corrcoef(St[off], Ss[off])[0, 1])
    from scipy.stats import spearmanr

    assert m["spearman"][0] == pytest.approx(spearmanr(St[off], Ss[off]).statistic)
    # nearest other class: teacher (1, 0, 1); student (2, 0, 0) -> overlap (0, 1, 0)
    assert m["topk_overlap"][0] == pytest.approx(1 / 3)
    same = pair_metrics(St[None], St[None], np.ones((1, 3), bool), k=2)
    assert same["kl"][0] == 0.0 and same["js_distance"][0] == 0.0
    assert same["topk_overlap"][0] == 1.0 and same["pearson"][0] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------
# teacher vs students
# ------------------------------------------------------------------------------------------
def test_identical_student_scores_perfectly():
    z, y = structured(600, 12, seed=1)
    res = compare_similarity(mem(z, y, "teacher"), mem(z, y, "copy"), k=3, n_boot=50,
                             temperature=[1, 4])
    for T in (1.0, 4.0):
        for metric, want in (("pearson", 1.0), ("spearman", 1.0), ("kl", 0.0),
                             ("js_distance", 0.0), ("topk_overlap", 1.0)):
            row = res.value("copy", metric, T)
            assert row["value"] == pytest.approx(want, abs=1e-9), metric
            assert row["ci_low"] == pytest.approx(want, abs=1e-9)
            assert row["ci_high"] == pytest.approx(want, abs=1e-9)
    assert res.value("copy", "top1_agreement")["value"] == 1.0
    assert res.value("copy", "accuracy")["value"] == res.value("teacher", "accuracy")["value"]


def test_permuted_student_scores_low():
    k = 20
    z, y = structured(2000, k, seed=2)
    perm = np.random.default_rng(5).permutation(k)
    zp, _ = structured(2000, k, seed=3, structure_seed=2, perm=perm)
    zc, _ = structured(2000, k, seed=3, structure_seed=2)  # same structure, new noise
    res = compare_similarity(mem(z, y, "t"), mem(zp, y, "perm"), mem(zc, y, "close"),
                             k=3, n_boot=0)
    assert res.value("close", "spearman")["value"] > 0.9
    assert res.value("close", "topk_overlap")["value"] > 0.8
    assert abs(res.value("perm", "spearman")["value"]) < 0.3
    assert res.value("perm", "topk_overlap")["value"] < 0.35
    assert res.value("perm", "kl")["value"] > 5 * res.value("close", "kl")["value"]


def test_bootstrap_matches_explicit_resample():
    """A bootstrap replicate (weights) equals the statistic recomputed on the resampled set."""
    z, y = structured(300, 6, seed=4)
    zs, _ = structured(300, 6, seed=7, structure_seed=4, noise=2.0)
    res = compare_similarity(mem(z, y, "t"), mem(zs, y, "s"), k=2, n_boot=3, seed=11,
                             temperature=2.0)
    rng = np.random.default_rng(11)
    for r in range(3):
        idx = rng.integers(0, 300, size=300)
        direct = compare_similarity(mem(z[idx], y[idx], "t"), mem(zs[idx], y[idx], "s"),
                                    k=2, n_boot=0, temperature=2.0)
        for metric in ("pearson", "spearman", "kl", "js_distance", "topk_overlap", "entropy"):
            assert res.bootstrap[f"s|2|{metric}"][r] == pytest.approx(
                direct.value("s", metric)["value"], rel=1e-9, abs=1e-12), metric
        assert res.bootstrap["s||top1_agreement"][r] == pytest.approx(
            direct.value("s", "top1_agreement")["value"])


def test_ci_width_shrinks_with_n():
    widths = []
    for n in (300, 4800):
        z, y = structured(n, 8, seed=8)
        zs, _ = structured(n, 8, seed=9, structure_seed=8, noise=2.0)
        row = compare_similarity(mem(z, y, "t"), mem(zs, y, "s"), k=2, n_boot=200,
                                 seed=0).value("s", "kl")
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
        widths.append(row["ci_high"] - row["ci_low"])
    assert widths[1] < 0.5 * widths[0]  # ~ 1/sqrt(16) = 0.25 expected


def test_student_difference_ci_excludes_zero_when_one_is_closer():
    k = 10
    z, y = structured(1500, k, seed=12)
    kd = z + 0.5 * np.random.default_rng(13).normal(size=z.shape)
    scratch, _ = structured(1500, k, seed=14, structure_seed=99)
    res = compare_similarity(mem(z, y, "teacher"), mem(kd, y, "kd"), mem(scratch, y, "scratch"),
                             k=3, n_boot=200, seed=1)
    diff = res.value("kd - scratch", "spearman")
    assert diff["role"] == "difference"
    assert diff["ci_low"] > 0
    assert res.value("kd - scratch", "kl")["ci_high"] < 0
    # paired: the difference replicates are replicate-wise differences
    np.testing.assert_allclose(res.bootstrap["kd - scratch|1|spearman"],
                               res.bootstrap["kd|1|spearman"] - res.bootstrap["scratch|1|spearman"])
    frame = res.to_frame()
    assert set(frame.columns) >= {"model", "metric", "temperature", "value", "ci_low", "ci_high"}
    assert set(frame["role"]) == {"teacher", "student", "difference"}


def test_mismatched_inputs_raise_naming_both_files():
    z, y = structured(60, 4, seed=0)
    t = mem(z, y, "teacher")
    with pytest.raises(AnalysisError, match=r"teacher\.h5.*other\.h5|other\.h5.*teacher\.h5"):
        compare_similarity(t, mem(z, y, "other", fp="different"), n_boot=0)
    with pytest.raises(AnalysisError, match="image order differs"):
        compare_similarity(t, mem(z, y, "other", ids=[f"img{i}" for i in range(59, -1, -1)]),
                           n_boot=0)
    with pytest.raises(AnalysisError, match="label spaces differ.*K = 4.*K = 5"):
        compare_similarity(t, mem(np.c_[z, z[:, :1]], y, "other"), n_boot=0)
    with pytest.raises(AnalysisError, match="has 50 images but the teacher cache teacher.h5 has 60"):
        compare_similarity(t, mem(z[:50], y[:50], "other"), n_boot=0)
    with pytest.raises(AnalysisError, match="between 1 and K - 1 = 3"):
        compare_similarity(t, mem(z, y, "s"), k=4, n_boot=0)


# ------------------------------------------------------------------------------------------
# class hierarchy
# ------------------------------------------------------------------------------------------
def test_hierarchy_semantic_similarity_and_spearman(tmp_path):
    names = ["cat", "dog", "car", "bus"]
    (tmp_path / "h.json").write_text(json.dumps({
        "cat": ["entity", "animal", "mammal"], "dog": "entity/animal/mammal/dog",
        "car": ["entity", "vehicle"], "bus": ["entity", "vehicle", "bus"]}))
    (tmp_path / "h.csv").write_text(
        "class,path\ncat,entity/animal/mammal\ndog,entity/animal/mammal\n"
        "car,entity/vehicle\nbus,entity/vehicle\n")
    sem = semantic_similarity(read_hierarchy(tmp_path / "h.json"), names)
    np.testing.assert_allclose(sem, semantic_similarity(read_hierarchy(tmp_path / "h.csv"), names))
    # depths: cat, dog 4; car, bus 3. LCA(cat, dog) = mammal (3); LCA(cat, car) = entity (1)
    assert sem[0, 1] == pytest.approx(2 * 3 / 8)
    assert sem[0, 2] == pytest.approx(2 * 1 / 7)
    assert sem[2, 3] == pytest.approx(2 * 2 / 6)
    np.testing.assert_allclose(np.diag(sem), 1.0)
    # a model confusing cat<->dog and car<->bus agrees with the hierarchy
    rng = np.random.default_rng(0)
    y = np.arange(400) % 4
    base = np.array([[0, 2, -2, -2], [2, 0, -2, -2], [-2, -2, 0, 1.5], [-2, -2, 1.5, 0.0]])
    z = base[y] + 0.3 * rng.normal(size=(400, 4))
    z[np.arange(400), y] += 3
    t = mem(z, y, "t")
    t.attrs = {"class_names": names}
    s = mem(z[:, [0, 2, 1, 3]], y, "s")
    res = compare_similarity(t, s, k=1, n_boot=20, hierarchy=tmp_path / "h.json")
    assert res.value("t", "hierarchy_spearman")["value"] > 0.8
    assert res.value("s", "hierarchy_spearman")["value"] < res.value("t", "hierarchy_spearman")["value"]
    (tmp_path / "bad.json").write_text(json.dumps({"cat": ["entity"]}))
    with pytest.raises(AnalysisError, match="3 of 4 classes have no entry"):
        compare_similarity(t, s, n_boot=0, k=1, hierarchy=tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------
# scale
# ------------------------------------------------------------------------------------------
def test_thousand_classes_readable(tmp_path):
    # speed at this scale is measured in benchmarks/bench_similarity.py, not asserted here
    rng = np.random.default_rng(0)
    n, k = 5000, 1000
    y = np.arange(n) % k
    z = rng.normal(size=(n, k)).astype(np.float32)
    z[np.arange(n), y] += 5
    res = ClassSimilarity().run(mem(z, y))
    np.testing.assert_allclose(res.matrices[1.0].sum(1), 1.0, atol=1e-9)
    order = cluster_order(res.matrices[1.0])
    assert sorted(order.tolist()) == list(range(k))
    blocks, bs = block_average(res.matrices[1.0], order)
    assert blocks.shape == (100, 100) and bs == 10
    i = order[:10]
    assert blocks[0, 0] == pytest.approx(res.matrices[1.0][np.ix_(i, i)].mean())
    fig = res.plot()
    assert fig.axes[0].images[0].get_array().shape == (100, 100)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
@pytest.fixture
def cli_main(monkeypatch):
    """interptool.cli.main restricted to this sub-command (others are built in parallel)."""
    import interptool.cli as cli

    monkeypatch.setattr(cli, "_COMMANDS", ["similarity"])
    return cli.main


def test_cli_writes_outputs_and_rejects_mismatch(tmp_path, cli_main, capsys):
    z, y = structured(240, 6, seed=3)
    kd = z + 0.3 * np.random.default_rng(1).normal(size=z.shape)
    sc, _ = structured(240, 6, seed=5, structure_seed=50)
    feats = np.random.default_rng(2).normal(size=(240, 4, 2, 2)).astype(np.float32)
    attrs = {"data_fingerprint": "abc", "model": {"name": "resnet34"}}
    t = write_cache(tmp_path / "t.h5", logits=z, labels=y, features={"layer4": feats}, attrs=attrs)
    s1 = write_cache(tmp_path / "kd.h5", logits=kd, labels=y, features={"layer4": feats * 2},
                     attrs={**attrs, "model": {"name": "kd"}})
    s2 = write_cache(tmp_path / "sc.h5", logits=sc, labels=y, features={"layer4": -feats},
                     attrs={**attrs, "model": {"name": "scratch"}})
    out = tmp_path / "out"
    rc = cli_main(["similarity", str(t), str(s1), str(s2), "--out", str(out), "--temperature",
                   "1", "4", "--k", "2", "--n-boot", "30", "--quiet", "--hash-caches"])
    assert rc == 0
    summary = json.loads((out / "similarity.json").read_text())
    assert summary["teacher"] == "resnet34" and summary["students"] == ["kd", "scratch"]
    assert summary["inputs"][0]["data_fingerprint"] == "abc" and len(summary["inputs"][0]["sha256"]) == 64
    assert summary["settings"]["seed"] == 0 and "versions" in summary["provenance"]
    rows = {(r["model"], r["metric"], r["temperature"]): r for r in summary["estimates"]}
    assert rows[("kd", "spearman", 4.0)]["ci_low"] is not None
    assert ("kd - scratch", "kl", 1.0) in rows
    assert summary["cka"][0]["cka"][0][0] == pytest.approx(1.0, abs=1e-10)  # scaled copy
    for name in ("nearest_classes.csv", "transfer.csv", "heatmaps_T1.png", "scatter_T4.png",
                 "matrices/kd_T4_softmax.csv", "cka_resnet34_vs_kd/cka.png"):
        assert (out / name).is_file(), name
    nearest = (out / "nearest_classes.csv").read_text().splitlines()
    assert len(nearest) == 7 and "kd (T=1)" in nearest[0]

    bad = write_cache(tmp_path / "bad.h5", logits=z, labels=y,
                      attrs={"data_fingerprint": "zzz"})
    capsys.readouterr()
    rc = cli_main(["similarity", str(t), str(bad), "--out", str(tmp_path / "o2"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error:" in err and "bad.h5" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------
# review additions: ranks, dark-knowledge comparison, empty classes in the bootstrap,
# determinism, figures, class names, CLI error paths
# ------------------------------------------------------------------------------------------
def test_ranks_match_scipy_with_ties_and_masked_entries():
    from scipy.stats import rankdata

    from interptool.analyzers.similarity._core import _average_ranks, _masked_ranks

    rng = np.random.default_rng(3)
    x = rng.integers(0, 20, size=500).astype(float)  # many ties
    np.testing.assert_array_equal(_average_ranks(x), rankdata(x))
    y = rng.normal(size=500)  # no ties: the fast path
    np.testing.assert_array_equal(_average_ranks(y), rankdata(y))
    # masked entries (+inf) rank after all valid ones and leave the valid ranks untouched
    m = rng.random((2, 500)) > 0.3
    r = _masked_ranks(np.stack([x, y]), m)
    for row, v, mm in zip(r, (x, y), m):
        np.testing.assert_array_equal(row[mm], rankdata(v[mm]))
        assert (row[~mm] > mm.sum()).all()


def test_dark_knowledge_comparison_matches_hand_computation():
    z, y = structured(400, 5, seed=21)
    zs, _ = structured(400, 5, seed=22, structure_seed=21, noise=1.5)
    res = compare_similarity(mem(z, y, "t"), mem(zs, y, "s"), k=2, n_boot=0,
                             matrix="dark_knowledge", temperature=3.0)
    A = ClassSimilarity(temperature=3.0).run(mem(z, y)).dark_knowledge[3.0]
    B = ClassSimilarity(temperature=3.0).run(mem(zs, y)).dark_knowledge[3.0]
    # KL over the off-diagonal support only (the diagonal of S_dk is 0 in both)
    kl = np.mean([sum(A[i, j] * math.log(A[i, j] / B[i, j]) for j in range(5) if j != i)
                  for i in range(5)])
    assert res.value("s", "kl", 3.0)["value"] == pytest.approx(kl, rel=1e-9)
    off = ~np.eye(5, dtype=bool)
    assert res.value("s", "pearson", 3.0)["value"] == pytest.approx(
        np.corrcoef(A[off], B[off])[0, 1], rel=1e-9)
    assert res.to_dict()["settings"]["matrix"] == "dark_knowledge"


def test_empty_class_in_comparison_and_bootstrap():
    z, y = structured(300, 6, seed=30)
    y = y.copy()
    y[y == 4] = 5  # class 4 has no images
    zs = z + 0.5 * np.random.default_rng(31).normal(size=z.shape)
    res = compare_similarity(mem(z, y, "t"), mem(zs, y, "s"), k=2, n_boot=40)
    assert res.similarity["t"].empty_classes == [4]
    assert res.to_dict()["empty_classes"] == [4]
    # the empty row is left out of every average: the point estimate equals the one computed
    # from the five non-empty rows by hand
    St, Ss = res.similarity["t"].matrices[1.0], res.similarity["s"].matrices[1.0]
    rows = [0, 1, 2, 3, 5]
    kl = np.mean([np.sum(St[i] * np.log(St[i] / Ss[i])) for i in rows])
    assert res.value("s", "kl")["value"] == pytest.approx(kl, rel=1e-9)
    for metric in ("pearson", "spearman", "kl", "js_distance", "topk_overlap", "entropy"):
        row = res.value("s", metric)
        assert np.isfinite([row["value"], row["ci_low"], row["ci_high"]]).all(), metric
    assert res.nearest_frame().loc[4, "t"] == ""


def test_seeded_bootstrap_is_deterministic():
    z, y = structured(200, 5, seed=40)
    zs = z + np.random.default_rng(41).normal(size=z.shape)
    run = lambda seed: compare_similarity(mem(z, y, "t"), mem(zs, y, "s"), k=2,  # noqa: E731
                                          n_boot=30, seed=seed)
    a, b, c = run(5), run(5), run(6)
    for key in a.bootstrap:
        np.testing.assert_array_equal(a.bootstrap[key], b.bootstrap[key])
    assert not np.array_equal(a.bootstrap["s|1|kl"], c.bootstrap["s|1|kl"])
    assert a.to_dict()["settings"]["seed"] == 5


def test_nearest_frame_known_answer():
    # teacher: class i is confused most with i + 1, then i + 2 (mod 4); student reversed
    k = 4
    y = np.arange(400) % k
    base = np.zeros((k, k))
    for i in range(k):
        base[i, (i + 1) % k], base[i, (i + 2) % k] = 2.0, 1.0
    rev = np.zeros((k, k))
    for i in range(k):
        rev[i, (i - 1) % k], rev[i, (i - 2) % k] = 2.0, 1.0
    t = mem(base[y] + 4 * np.eye(k)[y], y, "t")
    t.attrs = {"class_names": ["a", "b", "c", "d"]}
    s = mem(rev[y] + 4 * np.eye(k)[y], y, "s")
    res = compare_similarity(t, s, k=2, n_boot=0)
    nf = res.nearest_frame()
    assert list(nf["t"]) == ["b; c", "c; d", "d; a", "a; b"]
    assert list(nf["s"]) == ["d; c", "a; d", "b; a", "c; b"]
    # the 2 nearest sets share exactly one class (i + 2) -> overlap 1/2
    assert res.value("s", "topk_overlap")["value"] == pytest.approx(0.5)


def test_heatmaps_share_teacher_order_and_colour_scale():
    k = 12
    z, y = structured(1200, k, seed=50)
    perm = np.random.default_rng(51).permutation(k)
    zs, _ = structured(1200, k, seed=52, structure_seed=50, perm=perm)
    res = compare_similarity(mem(z, y, "t"), mem(zs, y, "s"), k=2, n_boot=0)
    heat, scatter = res.plot()
    order = cluster_order(res.similarity["t"].matrices[1.0])
    ims = [ax.images[0] for ax in heat.axes if ax.images]
    assert len(ims) == 2
    for im, m in zip(ims, ("t", "s")):
        want = res.similarity[m].matrices[1.0].copy()
        np.fill_diagonal(want, np.nan)
        np.testing.assert_allclose(np.ma.filled(im.get_array(), np.nan),
                                   want[np.ix_(order, order)], equal_nan=True)
    assert ims[0].get_clim() == ims[1].get_clim()
    labels = [t.get_text() for t in heat.axes[0].get_xticklabels()]
    assert labels == [str(i) for i in order]
    import matplotlib.pyplot as plt

    plt.close(heat)
    plt.close(scatter)


def test_class_names_argument_and_file(tmp_path):
    z, y = structured(120, 3, seed=60)
    (tmp_path / "names.txt").write_text("cat\n\ndog\ncar\n")
    res = compare_similarity(mem(z, y, "t"), mem(z, y, "s"), k=1, n_boot=0,
                             class_names=tmp_path / "names.txt")
    assert res.similarity["t"].class_names == ["cat", "dog", "car"]
    assert list(res.nearest_frame()["class_name"]) == ["cat", "dog", "car"]
    one = ClassSimilarity(class_names=["x", "y", "z"]).run(mem(z, y))
    assert one.class_names == ["x", "y", "z"]
    with pytest.raises(AnalysisError, match="2 class names but the models have K = 3"):
        ClassSimilarity(class_names=["x", "y"]).run(mem(z, y))
    with pytest.raises(AnalysisError, match="class-names file not found"):
        compare_similarity(mem(z, y, "t"), mem(z, y, "s"), k=1, n_boot=0,
                           class_names=tmp_path / "nope.txt")


@pytest.mark.parametrize("case", ["labels", "order", "classes"])
def test_cli_mismatches_exit_2_with_one_line(tmp_path, cli_main, capsys, case):
    z, y = structured(60, 4, seed=70)
    attrs = {"data_fingerprint": "abc"}
    t = write_cache(tmp_path / "t.h5", logits=z, labels=y, attrs=attrs)
    if case == "labels":
        other = write_cache(tmp_path / "o.h5", logits=z, labels=(y + 1) % 4, attrs=attrs)
        want = "labels differ"
    elif case == "order":
        other = write_cache(tmp_path / "o.h5", logits=z, labels=y, attrs=attrs,
                            ids=[str(i) for i in range(59, -1, -1)])
        want = "image order differs"
    else:
        other = write_cache(tmp_path / "o.h5", logits=np.c_[z, z[:, :1]], labels=y, attrs=attrs)
        want = "label spaces differ"
    capsys.readouterr()
    rc = cli_main(["similarity", str(t), str(other), "--out", str(tmp_path / "out"), "--quiet",
                   "--n-boot", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert want in err and "o.h5" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "similarity.json").exists()


def test_bias_corrected_interval_known_cases():
    from scipy.stats import norm

    from interptool.analyzers.similarity import bias_corrected_interval

    rng = np.random.default_rng(0)
    sym = rng.normal(0.0, 1.0, 20001)
    # symmetric around the estimate: z0 ~ 0, the BC interval is the percentile interval
    lo, hi = bias_corrected_interval(sym, float(np.median(sym)), 0.95)
    plo, phi = np.percentile(sym, [2.5, 97.5])
    assert abs(lo - plo) < 0.02 and abs(hi - phi) < 0.02
    # replicates shifted up by one sd: z0 = Phi^-1(P(x < est)) = -1, bounds at
    # Phi(-2 -+ 1.96) quantiles, i.e. far lower than the plain percentile interval
    shifted = sym + 1.0
    lo, hi = bias_corrected_interval(shifted, 0.0, 0.95)
    want_lo = np.quantile(shifted, norm.cdf(-2 + norm.ppf(0.025)))
    want_hi = np.quantile(shifted, norm.cdf(-2 + norm.ppf(0.975)))
    assert lo == pytest.approx(want_lo, abs=0.03) and hi == pytest.approx(want_hi, abs=0.03)
    assert hi < np.percentile(shifted, 97.5) - 0.5
    # all replicates equal to the estimate: zero-width interval
    assert bias_corrected_interval(np.full(100, 0.3), 0.3) == (0.3, 0.3)
    assert all(np.isnan(bias_corrected_interval(np.array([np.nan]), 0.3)))
