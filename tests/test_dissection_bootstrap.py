"""Bootstrap of detector counts from per-block sufficient statistics: known distributions,
exact agreement with the plain tally and with a re-tally of resampled images, paired
differences, containment, persistence; detector fraction, concept table, gained/lost."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import sparse

from interptool.analyzers.dissection import Dissection
from interptool.analyzers.dissection._analyzer import _score
from interptool.analyzers.dissection._bootstrap import (
    BlockStats,
    point_measures,
    resample_measures,
)
from interptool.analyzers.dissection._tally import TallyAccumulator, seg_item
from interptool.cache import write_cache
from interptool.cli import main
from interptool.common.stats import assert_intervals_contain_estimates, multinomial_weights
from interptool.errors import AnalysisError

S = 4
N = 14


def write_random_broden(root: Path, n: int = N, seed: int = 0) -> Path:
    """n images 4x4: object plane (labels 1-3), color plane (4), scene (5 or 6) -- random;
    the last image carries no label at all (dropped by the protocol)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = ["image,split,ih,iw,sh,sw,color,object,scene"]

    def png(name, lab):
        rgb = np.zeros((S, S, 3), np.uint8)
        rgb[..., 0] = lab
        Image.fromarray(rgb).save(root / "images" / name)

    for i in range(n):
        Image.new("RGB", (S, S), (10 * i, 50, 50)).save(root / "images" / f"im{i}.jpg")
        if i == n - 1:
            rows.append(f"im{i}.jpg,train,{S},{S},{S},{S},,,")
            continue
        png(f"im{i}_o.png", rng.choice([0, 1, 2, 3], size=(S, S), p=[.4, .3, .2, .1]))
        png(f"im{i}_c.png", np.where(rng.random((S, S)) < .3, 4, 0))
        scene = str(rng.choice([5, 6])) if rng.random() < .6 else ""
        rows.append(f"im{i}.jpg,train,{S},{S},{S},{S},im{i}_c.png,im{i}_o.png,{scene}")
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    (root / "category.csv").write_text("name,first,last,count,frequency\ncolor,4,4,1,1\n"
                                       "object,1,3,3,3\nscene,5,6,2,2\n")
    (root / "label.csv").write_text(
        "number,name,category,frequency,coverage,syns\n1,dog,object(9),9,1,\n2,cat,object(8),8,1,\n"
        "3,car,object(5),5,1,\n4,red,color(9),9,1,\n5,beach,scene(5),5,1,\n6,street,scene(4),4,1,\n")
    return root


@pytest.fixture()
def probe(tmp_path):
    from interptool.data import open_dataset

    return open_dataset(f"broden:{write_random_broden(tmp_path / 'broden')}")


def _feats(seed: int, units: int = 10) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = rng.random((N, units, S, S)).astype(np.float32)
    f[:, ::3] *= 3.0  # some units with larger ranges
    return f


def _cache(tmp_path: Path, probe, feats: np.ndarray, name: str) -> Path:
    return write_cache(tmp_path / name, logits=np.zeros((len(feats), 2)), ids=probe.ids,
                       features={"l4": feats},
                       attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})


def _dissect(tmp_path, probe, feats, name="a.h5", **kw):
    kw.setdefault("quantile", 0.2)
    kw.setdefault("bootstrap", 200)
    return Dissection(checksum=False, **kw).run(_cache(tmp_path, probe, feats, name), "l4", probe)


# ------------------------------------------------------------------ exactness
def test_unit_weights_reproduce_the_plain_tally_exactly(tmp_path, probe):
    r = _dissect(tmp_path, probe, _feats(1))
    st = r.block_stats
    assert st.n_blocks == N - 1 and st.n_images == N - 1  # the unlabelled image is dropped
    U, L, C = r.units, len(r.label_names), len(r.categories)
    # per-block statistics sum to the tally's counts
    total = np.zeros((U, L))
    total[st.pair_unit, st.pair_label] = np.asarray(st.intersect.sum(axis=0)).ravel()
    expect = r.intersect.astype(float).copy()
    expect[:, r.label_category < 0] = 0
    np.testing.assert_array_equal(total, expect)
    np.testing.assert_array_equal(np.asarray(st.unit_cat_area.sum(axis=0)).reshape(U, C),
                                  r.unit_cat_area)
    np.testing.assert_array_equal(np.asarray(st.label_area.sum(axis=0)).ravel(), r.label_area)
    # measures with every weight 1 equal the result's, at every IoU threshold (0 included)
    for t in (0.0, 0.01, 0.04, 0.1, 0.2, 0.3, 0.5):
        got = st.evaluate(np.ones((1, st.n_blocks)), t)
        assert got["detectors"][0] == len(r.detectors(t)), t
        assert got["unique_concepts"][0] == r.unique_concepts(t), t
        assert got["by_category"][0].tolist() == list(r.by_category(t).values()), t
    assert point_measures(st, r.iou_threshold).equals(r._measures())


def test_a_resample_equals_a_retally_of_the_resampled_images(tmp_path, probe):
    feats = _feats(2)
    r = _dissect(tmp_path, probe, feats)
    st = r.block_stats
    kept = np.arange(N - 1)
    cats = r.categories
    w = multinomial_weights(np.random.default_rng(11), st.n_blocks, 3)
    for row in w:
        # re-tally: each kept image added as often as it is drawn, thresholds held fixed
        tally = TallyAccumulator(r.thresholds, r.label_category, len(cats), torch.device("cpu"))
        for b, count in enumerate(row.astype(int)):
            i = int(kept[b])
            item = seg_item(i, probe.load_segmentation(i), cats)
            for _ in range(count):
                tally.add(torch.from_numpy(feats[i : i + 1]), [item])
        sc = _score(tally.counts(), r.label_category, len(cats))
        retally = dataclasses.replace(r, **tally.counts(), **sc)
        for t in (0.04, 0.1, 0.2):
            got = st.evaluate(row[None, :], t)
            assert got["detectors"][0] == len(retally.detectors(t))
            assert got["unique_concepts"][0] == retally.unique_concepts(t)
            assert got["by_category"][0].tolist() == list(retally.by_category(t).values())


@pytest.mark.parametrize("category_area", ["overlap", "image"])
def test_counts_are_identical_with_and_without_bootstrap_statistics(tmp_path, probe,
                                                                    category_area):
    # the statistics are recorded inside the tally's counting pass: the tally must not change
    feats = _feats(15)
    plain = _dissect(tmp_path, probe, feats, "p.h5", bootstrap=0, category_area=category_area)
    for block_size in (1, 3):
        boot = _dissect(tmp_path, probe, feats, f"b{block_size}.h5", bootstrap=20,
                        bootstrap_block_size=block_size, category_area=category_area)
        assert plain.block_stats is None and boot.block_stats is not None
        for name in ("intersect", "label_area", "unit_area", "unit_cat_area", "iou",
                     "cat_label", "cat_iou", "best_category", "best_label", "best_iou"):
            np.testing.assert_array_equal(getattr(boot, name), getattr(plain, name), name)


def test_each_block_equals_a_separate_tally_of_its_images(tmp_path, probe, monkeypatch):
    import interptool.analyzers.dissection._tally as tmod

    feats = _feats(16)
    r = _dissect(tmp_path, probe, feats, "a.h5", bootstrap_block_size=2, batch_size=5)
    # pairs counted one at a time (the memory bound's slices) give the same statistics
    monkeypatch.setattr(tmod, "_PAIR_LABEL_ENTRIES", 1)
    sliced = _dissect(tmp_path, probe, feats, "b.h5", bootstrap_block_size=2, batch_size=5)
    st = r.block_stats
    for name in ("intersect", "unit_cat_area", "label_area"):
        assert (getattr(st, name) != getattr(sliced.block_stats, name)).nnz == 0, name
    cats = r.categories
    assert st.n_blocks == 7  # 13 kept images (the last is unlabelled) in blocks of 2
    for b in range(st.n_blocks):
        tally = TallyAccumulator(r.thresholds, r.label_category, len(cats), torch.device("cpu"))
        for i in range(2 * b, min(2 * b + 2, N - 1)):
            tally.add(torch.from_numpy(feats[i : i + 1]),
                      [seg_item(i, probe.load_segmentation(i), cats)])
        c = tally.counts()
        np.testing.assert_array_equal(st.intersect[b].toarray().ravel(),
                                      c["intersect"][st.pair_unit, st.pair_label])
        np.testing.assert_array_equal(st.unit_cat_area[b].toarray().reshape(r.units, len(cats)),
                                      c["unit_cat_area"])
        np.testing.assert_array_equal(st.label_area[b].toarray().ravel(), c["label_area"])


# ------------------------------------------------------------------ known distributions
def test_single_block_every_resample_equals_the_estimate(tmp_path, probe):
    r = _dissect(tmp_path, probe, _feats(3), bootstrap_block_size=100)
    assert r.block_stats.n_blocks == 1
    est = r._measures()
    for m in r.bootstrap_samples.columns:
        assert (r.bootstrap_samples[m] == est[m]).all()
    iv = r.intervals()
    assert (iv["ci_low"] == iv["estimate"]).all() and (iv["ci_high"] == iv["estimate"]).all()
    assert (iv["bias"] == 0).all()


def _two_block_stats() -> BlockStats:
    """1 unit, category object, label 1. Block 0: I 8, unit area 10, label area 10 (IoU 2/3);
    block 1: I 1, areas 10 and 10 (IoU 1/19); both: 9 / 31."""
    inter = sparse.csr_matrix(np.array([[0, 8], [0, 1]], float))
    ucat = sparse.csr_matrix(np.array([[10], [10]], float))
    larea = sparse.csr_matrix(np.array([[0, 10], [0, 10]], float))
    return BlockStats.build({"intersect": inter, "unit_cat_area": ucat, "label_area": larea},
                            1, np.array([-1, 0]), ["object"], 1, 2, "fp", "ids")


def test_two_blocks_enumerated_distribution():
    st = _two_block_stats()
    assert point_measures(st, 0.3)["detectors"] == 0  # 9/31 < 0.3
    R, seed = 4000, 5
    samples = resample_measures(st, R, seed, 0.3)
    w = multinomial_weights(np.random.default_rng(seed), 2, R)
    # weights (2, 0): block 0 alone, IoU 2/3 -> detector; (1, 1): 9/31; (0, 2): 1/19
    expected = (w[:, 0] == 2).astype(int)
    np.testing.assert_array_equal(samples["detectors"].to_numpy(), expected)
    np.testing.assert_array_equal(samples["detectors[object]"].to_numpy(), expected)
    np.testing.assert_array_equal(samples["unique_concepts"].to_numpy(), expected)
    assert abs(expected.mean() - 0.25) < 0.03  # P(both draws hit block 0) = 1/4
    # at IoU 0.05 every resample has the detector; at 0.7 none
    assert (resample_measures(st, 50, 1, 0.05)["detectors"] == 1).all()
    assert (resample_measures(st, 50, 1, 0.7)["detectors"] == 0).all()


def test_resamples_do_not_depend_on_chunking(monkeypatch):
    import interptool.analyzers.dissection._bootstrap as bmod

    st = _two_block_stats()
    a = resample_measures(st, 300, 9, 0.3)
    monkeypatch.setattr(bmod, "_WORK_ENTRIES", 7)  # 7 resamples per chunk
    pd.testing.assert_frame_equal(a, resample_measures(st, 300, 9, 0.3))


# ------------------------------------------------------------------ paired differences
def test_identical_models_paired_difference_is_exactly_zero(tmp_path, probe):
    feats = _feats(4)
    a = _dissect(tmp_path, probe, feats, "a.h5")
    b = _dissect(tmp_path, probe, feats.copy(), "b.h5")
    pd.testing.assert_frame_equal(a.bootstrap_samples, b.bootstrap_samples)
    d = a.paired_difference(b)
    assert (d["difference"] == 0).all() and (d["ci_low"] == 0).all() and (d["ci_high"] == 0).all()
    assert (d["p_value"] == 1).all()


def test_paired_difference_is_taken_resample_by_resample(tmp_path, probe):
    a = _dissect(tmp_path, probe, _feats(5), "a.h5")
    b = _dissect(tmp_path, probe, _feats(6), "b.h5")
    d = a.paired_difference(b).set_index("measure")
    diff = a.bootstrap_samples["detectors"] - b.bootstrap_samples["detectors"]
    assert d.at["detectors", "difference"] == len(a.detectors()) - len(b.detectors())
    assert d.at["detectors", "bias"] == pytest.approx(diff.mean() - d.at["detectors", "difference"])
    assert_intervals_contain_estimates(d["difference"], d["ci_low"], d["ci_high"], d.index)
    assert ((d["p_value"] > 0) & (d["p_value"] <= 1)).all()


def test_paired_difference_refuses_unpaired_results(tmp_path, probe):
    a = _dissect(tmp_path, probe, _feats(7), "a.h5")
    other = _dissect(tmp_path, probe, _feats(7), "b.h5", categories="object,scene")
    with pytest.raises(AnalysisError, match="categories differ"):
        a.paired_difference(other)
    blocky = _dissect(tmp_path, probe, _feats(7), "c.h5", bootstrap_block_size=2)
    with pytest.raises(AnalysisError, match="block sizes differ"):
        a.paired_difference(blocky)
    plain = _dissect(tmp_path, probe, _feats(7), "d.h5", bootstrap=0)
    assert plain.block_stats is None and "intervals" not in plain.summary()
    with pytest.raises(AnalysisError, match="--bootstrap"):
        a.paired_difference(plain)
    with pytest.raises(AnalysisError, match="without bootstrap statistics"):
        plain.intervals()


# ------------------------------------------------------------------ intervals, blocks, io
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_interval_contains_its_estimate(tmp_path, probe, seed):
    r = _dissect(tmp_path, probe, _feats(10 + seed), bootstrap=150, seed=seed, quantile=0.1)
    iv = r.intervals()
    assert set(iv["measure"]) == {"detectors", "detector_fraction", "unique_concepts",
                                  "detectors[color]", "detectors[object]", "detectors[scene]"}
    assert_intervals_contain_estimates(iv["estimate"], iv["ci_low"], iv["ci_high"], iv["measure"],
                                       allow_undefined=False)
    frac = iv.set_index("measure").loc["detector_fraction"]
    cnt = iv.set_index("measure").loc["detectors"]
    assert frac["ci_high"] == pytest.approx(cnt["ci_high"] / r.units)
    summ = r.summary()["intervals"]["detectors"]
    assert summ["ci_low"] <= summ["estimate"] <= summ["ci_high"]


def test_blocks_follow_image_order_not_batches(tmp_path, probe):
    feats = _feats(8)
    a = _dissect(tmp_path, probe, feats, "a.h5", batch_size=3, bootstrap_block_size=2)
    b = _dissect(tmp_path, probe, feats, "b.h5", batch_size=7, bootstrap_block_size=2)
    assert a.block_stats.n_blocks == 7  # 13 kept images in blocks of 2
    pd.testing.assert_frame_equal(a.bootstrap_samples, b.bootstrap_samples)


def test_saved_block_stats_round_trip(tmp_path, probe):
    r = _dissect(tmp_path, probe, _feats(9))
    r.save(tmp_path / "out", montages="none")
    st = BlockStats.load(tmp_path / "out" / "block_stats.npz")
    pd.testing.assert_frame_equal(resample_measures(st, 200, 0, r.iou_threshold), r.bootstrap_samples)
    table = pd.read_csv(tmp_path / "out" / "intervals.csv")
    assert list(table["measure"])[:3] == ["detectors", "detector_fraction", "unique_concepts"]
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert doc["protocol"]["bootstrap"]["resamples"] == 200
    assert "full-probe" in doc["protocol"]["bootstrap"]["held_fixed"]
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(AnalysisError, match="bad.npz"):
        BlockStats.load(tmp_path / "bad.npz")


def test_cli_bootstrap_writes_intervals(tmp_path, probe, capsys):
    path = _cache(tmp_path, probe, _feats(12), "c.h5")
    rc = main(["dissect", str(path), "--layer", "l4", "--out", str(tmp_path / "o"),
               "--quantile", "0.2", "--bootstrap", "100", "--seed", "3", "--montages", "none"])
    assert rc == 0
    assert "95% CI" in capsys.readouterr().out
    doc = json.loads((tmp_path / "o" / "l4" / "summary.json").read_text())
    assert doc["protocol"]["bootstrap"]["seed"] == 3
    assert (tmp_path / "o" / "l4" / "intervals.csv").is_file()
    assert main(["dissect", str(path), "--layer", "l4", "--out", str(tmp_path / "o2"),
                 "--bootstrap", "-1"]) == 2
    # the printed interval names the level it was computed at (was always "95%")
    capsys.readouterr()
    assert main(["dissect", str(path), "--layer", "l4", "--out", str(tmp_path / "o3"),
                 "--quantile", "0.2", "--bootstrap", "100", "--ci-level", "0.8",
                 "--montages", "none"]) == 0
    out = capsys.readouterr().out
    assert "80% CI" in out and "95%" not in out, out
    doc = json.loads((tmp_path / "o3" / "l4" / "summary.json").read_text())
    assert doc["intervals"]["detectors"]["level"] == 0.8


# ------------------------------------------------------------------ per-model tables
def _with_best(r, labels, ious):
    """The result with hand-set best labels/IoUs (categories follow the labels)."""
    labels = np.asarray(labels)
    return dataclasses.replace(r, best_label=labels, best_iou=np.asarray(ious, float),
                               best_category=np.maximum(r.label_category[labels], 0))


def test_detector_fraction_concept_table_and_gained_lost(tmp_path, probe):
    r = _dissect(tmp_path, probe, _feats(13), bootstrap=0)
    names = list(r.label_names)
    dog, cat, red, beach = (names.index(n) for n in ("dog", "cat", "red", "beach"))
    # 10 units; detectors at IoU 0.04: units 1, 2, 4 (dog), 5 (red), 7 (beach)
    student = _with_best(r, [dog, dog, cat, dog, red, 0, beach, cat, 0, 0],
                         [.2, .05, .01, .3, .04, 0, .1, .039, 0, 0])
    teacher = _with_best(r, [cat, dog, cat, 0, 0, 0, 0, 0, 0, 0],
                         [.2, .05, .06, 0, 0, 0, 0, 0, 0, 0])
    assert student.detector_fraction() == pytest.approx(5 / 10)
    ct = student.concept_table()
    assert ct[["concept", "units"]].values.tolist() == [["dog", 3], ["beach", 1], ["red", 1]]
    assert ct.iloc[0]["unit_ids"] == "1;2;4" and ct.iloc[0]["max_iou"] == pytest.approx(.3)
    assert ct.iloc[0]["category"] == "object" and ct.iloc[0]["fraction"] == pytest.approx(.3)
    gl = student.concepts_gained_lost(teacher)
    assert gl[["concept", "units", "units_other", "status"]].values.tolist() == [
        ["beach", 1, 0, "gained"], ["red", 1, 0, "gained"], ["cat", 0, 2, "lost"],
        ["dog", 3, 1, "shared"]]
    assert student.concept_table(0.5).empty
    assert r.summary()["detector_fraction"] == pytest.approx(len(r.detectors()) / r.units)


@pytest.mark.parametrize("seed", range(4))
def test_weighted_sum_matches_score_on_hand_built_blocks(seed):
    """Random sparse block counts (with silent units and tied IoUs), any weights: the
    bootstrap evaluation equals NetDissect-Lite's scoring (_score) of the weighted sums."""
    rng = np.random.default_rng(seed)
    U, L, C, B = 6, 7, 3, 5
    label_category = np.array([-1, 0, 0, 1, 1, 2, -1])  # label 6: unused number
    inter = rng.integers(0, 4, (B, U, L)) * (rng.random((B, U, L)) < .4)
    inter[:, 0, :] = 0  # unit 1 never intersects anything: IoU 0 everywhere
    inter[:, 1, 1] = inter[:, 1, 2] = 3  # unit 2: labels 1 and 2 tie
    ucat = rng.integers(5, 9, (B, U, C))
    larea = rng.integers(5, 9, (B, L))
    larea[:, 1] = larea[:, 2] = 6
    ucat[:, 1, 0] = 6
    st = BlockStats.build({"intersect": sparse.csr_matrix(inter.reshape(B, -1).astype(float)),
                           "unit_cat_area": sparse.csr_matrix(ucat.reshape(B, -1).astype(float)),
                           "label_area": sparse.csr_matrix(larea.astype(float))},
                          U, label_category, ["a", "b", "c"], 1, B, "fp", "ids")
    for w in [np.ones(B), rng.integers(0, 3, B).astype(float)]:
        counts = {"intersect": np.tensordot(w, inter, 1), "label_area": w @ larea,
                  "unit_cat_area": np.tensordot(w, ucat, 1)}
        sc = _score(counts, label_category, C)
        # no resample's IoU exceeds the per-pair bound used to prune
        assert (sc["iou"][st.pair_unit, st.pair_label] <= st.pair_bound() + 1e-12).all()
        for t in (0.0, 0.1, 0.3):
            det = np.flatnonzero(sc["best_iou"] >= t)
            got = st.evaluate(w[None, :], t)
            assert got["detectors"][0] == len(det), (w, t)
            assert got["unique_concepts"][0] == len(np.unique(sc["best_label"][det])), (w, t)
            assert got["by_category"][0].tolist() == np.bincount(
                sc["best_category"][det], minlength=C).tolist(), (w, t)
    assert len(st.pruned(0.3).pair_unit) < len(st.pair_unit)  # the pruned path is exercised


def test_numba_and_numpy_paths_agree(tmp_path, probe, monkeypatch):
    import interptool.analyzers.dissection._bootstrap as bmod

    if bmod._numba_kernel() is None:
        pytest.fail("numba is part of the test environment (the `fast` extra); install it")
    monkeypatch.setattr(bmod, "NUMBA_MIN_WORK", 0)  # compiled kernel even for small work
    assert bmod.use_compiled(_two_block_stats(), 1)
    r = _dissect(tmp_path, probe, _feats(14), "b.h5", bootstrap=300)
    st = r.block_stats
    for t in (0.0, 0.04, 0.2):
        fast = resample_measures(st, 300, 2, t)
        monkeypatch.setattr(bmod, "USE_NUMBA", False)
        slow = resample_measures(st, 300, 2, t)
        monkeypatch.setattr(bmod, "USE_NUMBA", True)
        pd.testing.assert_frame_equal(fast, slow)
    two = _two_block_stats()
    monkeypatch.setattr(bmod, "USE_NUMBA", False)
    slow2 = resample_measures(two, 500, 5, 0.3)
    monkeypatch.setattr(bmod, "USE_NUMBA", True)
    pd.testing.assert_frame_equal(resample_measures(two, 500, 5, 0.3), slow2)


def test_torch_path_equals_numpy_path(tmp_path, probe, monkeypatch):
    """The torch evaluation (what runs on a GPU; here on the CPU) gives the numpy path's
    numbers for every resample and threshold: detectors, distinct labels, per category."""
    import interptool.analyzers.dissection._bootstrap as bmod

    monkeypatch.setattr(bmod, "USE_NUMBA", False)
    r = _dissect(tmp_path, probe, _feats(21), "t.h5", bootstrap=50)
    rng = np.random.default_rng(0)
    for st in (r.block_stats, _two_block_stats()):
        W = multinomial_weights(rng, st.n_blocks, 200)
        W[:3] = 0  # empty resamples, and one with every weight 1 (the plain tally)
        W[3] = 1
        for t in (0.0, 0.04, 0.2, 0.3, 1.0):
            ref = st.evaluate(W, t)
            got = st.evaluate(W, t, device="cpu")
            for k in ("detectors", "unique_concepts", "by_category"):
                np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{k} at T={t}")
                assert got[k].dtype == np.int64
    # resample_measures with a device takes the torch path for every chunk of resamples
    pd.testing.assert_frame_equal(resample_measures(r.block_stats, 120, 4, 0.04, device="cpu"),
                                  resample_measures(r.block_stats, 120, 4, 0.04))


def test_segmentations_decoded_once_per_probe_and_results_unchanged(tmp_path, probe,
                                                                     monkeypatch):
    import interptool.analyzers.dissection._analyzer as amod
    from interptool.data import open_dataset

    calls = []
    real = probe.load_segmentation
    monkeypatch.setattr(probe, "load_segmentation", lambda i: (calls.append(i), real(i))[1])
    feats_a, feats_b = _feats(17), _feats(18)
    a = _dissect(tmp_path, probe, feats_a, "a.h5")
    assert len(calls) == N
    b = _dissect(tmp_path, probe, feats_b, "b.h5", batch_size=4)  # other batches: same items
    assert len(calls) == N  # reused
    _dissect(tmp_path, probe, feats_b, "c.h5", categories="object,scene")
    assert len(calls) == 2 * N  # other categories: decoded again
    mask = next(iter(probe.mask_files(0).values()))[0]
    st = mask.stat()
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a mask changed on disk
    _dissect(tmp_path, probe, feats_b, "c2.h5", categories="object,scene")
    assert len(calls) == 3 * N
    # the same numbers as a run on a fresh probe object (nothing reused)
    fresh = open_dataset(probe.spec)
    b2 = _dissect(tmp_path, fresh, feats_b, "d.h5")
    for name in ("intersect", "label_area", "unit_cat_area", "best_iou", "best_label"):
        np.testing.assert_array_equal(getattr(b, name), getattr(b2, name), name)
    pd.testing.assert_frame_equal(b.bootstrap_samples, b2.bootstrap_samples)
    assert a.block_stats.n_blocks == b.block_stats.n_blocks
    # a probe over the memory bound is decoded on every run, and the files of the images
    # after the bound is passed are not even looked at (one image's masks here)
    monkeypatch.setattr(amod, "SEGMENTATION_MEMO_BYTES", 1)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(amod.os, "stat", lambda f, *a, **k: stats.append(f) or
                        real_stat(f, *a, **k))
    calls.clear()
    _dissect(tmp_path, probe, feats_a, "e.h5", categories="color,object")
    mask_stats = [f for f in stats if str(f).endswith(".png")]
    assert 0 < len(mask_stats) <= sum(map(len, probe.mask_files(0).values()))
    _dissect(tmp_path, probe, feats_a, "f.h5", categories="color,object")
    assert len(calls) == 2 * N
