"""Network dissection: known answers computed by hand, a NetDissect-Lite-style reference loop,
invariances, error paths and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from interptool.analyzers.dissection import Dissection, DissectionResult
from interptool.cache import ActivationCache, write_cache
from interptool.cli import main
from interptool.data import Segmentation
from interptool.errors import AnalysisError, CacheError, ConfigError

# ----------------------------------------------------------------------------- toy probe
# categories object (pixel) and scene (image-level); labels 1 a, 2 b (object), 3 sky, 4 sea
CATS = ["object", "scene"]
NAMES = ["-", "a", "b", "sky", "sea"]
LABCAT = np.array([-1, 0, 0, 1, 1])
P = 16  # 4x4 segmentation


def _toy_segs() -> list[tuple[np.ndarray | None, list[int]]]:
    """(object plane 4x4 or None, scene labels) for six images."""
    segs = []
    segs.append((None, []))  # 0: nothing labelled
    m = np.zeros((4, 4), np.int64)
    m[:2, :2] = 1
    m[3, :] = 2
    segs.append((m, [3]))  # 1: a top-left 2x2, b bottom row, sky
    m = np.zeros((4, 4), np.int64)
    m[:, 0] = 1
    segs.append((m, []))  # 2: a left column
    segs.append((None, [4]))  # 3: only an image-level label (stale-accumulator case)
    segs.append((np.full((4, 4), 2, np.int64), [3]))  # 4: b everywhere, sky
    segs.append((np.zeros((4, 4), np.int64), []))  # 5: an empty object plane
    return segs


class ToyProbe:
    """Duck-typed stand-in for BrodenDataset (same attributes the analyzer uses)."""

    def __init__(self, segs, order=None):
        self._segs = segs if order is None else [segs[i] for i in order]
        names = [f"img{i}.png" for i in range(len(segs))]
        self.ids = names if order is None else [names[i] for i in order]
        self.spec = "toy:probe"
        self.fingerprint = "toy-" + "-".join(self.ids)
        self.categories = CATS
        self.label_names = np.array(NAMES)
        self.label_category = LABCAT
        self.num_labels = len(NAMES)

    def __len__(self):
        return len(self._segs)

    def seg_size(self, i):
        return (4, 4)

    def load_segmentation(self, i):
        plane, scene = self._segs[i]
        pix = np.zeros((0, 4, 4), np.int64) if plane is None else plane[None]
        return Segmentation(size=(4, 4), pixel={"object": pix},
                            image={"scene": np.array(scene, np.int64)})

    def load_image(self, i):
        return Image.new("RGB", (4, 4), (10 * i, 100, 200))


def _cache(tmp_path: Path, feats: np.ndarray, probe, name="c.h5", **attrs) -> Path:
    base = {"data_fingerprint": probe.fingerprint, "data_spec": probe.spec}
    base.update(attrs)
    return write_cache(tmp_path / name, logits=np.zeros((len(feats), 2)), ids=probe.ids,
                       features={"l4": feats}, attrs=base)


def _mask_unit(masks: list[np.ndarray | None]) -> np.ndarray:
    """One unit per image: 2 on the given 4x4 boolean masks, small distinct values elsewhere."""
    out = np.zeros((len(masks), 1, 4, 4), np.float32)
    for i, m in enumerate(masks):
        out[i, 0] = 0.01 * (np.arange(16).reshape(4, 4) % 7) / 7
        if m is not None:
            out[i, 0][m] = 2.0
    return out


def _run(tmp_path, feats, probe=None, q=None, **kw) -> DissectionResult:
    probe = probe or ToyProbe(_toy_segs())
    path = _cache(tmp_path, feats, probe)
    if q is None:  # the quantile that puts the threshold just under the 2.0 values, over the
        # images the protocol keeps (one with no label at all, like image 0, is dropped)
        kept = [i for i in range(len(probe)) if probe._segs[i][0] is not None or probe._segs[i][1]]
        q = float((feats[kept] >= 2.0).sum() / feats[kept].size)
    return Dissection(quantile=q, checksum=False, **kw).run(path, "l4", probe)


# ------------------------------------------------------------------ known answers by hand
def test_activation_equal_to_concept_mask_has_iou_one(tmp_path):
    segs = _toy_segs()
    masks = [None if s[0] is None else s[0] == 1 for s in segs]
    r = _run(tmp_path, _mask_unit(masks))
    assert 0.01 < r.thresholds[0] < 2.0
    assert r.intersect[0, 1] == 8 and r.label_area[1] == 8
    assert r.best_iou[0] == pytest.approx(1.0) and NAMES[r.best_label[0]] == "a"
    assert CATS[r.best_category[0]] == "object"
    row = r.to_frame().iloc[0]
    assert row["unit"] == 1 and row["label"] == "a" and row["object-iou"] == pytest.approx(1.0)
    assert row["object-truth"] == 8 and row["object-intersect"] == 8
    assert row["object-activation"] == 8


def test_unit_firing_everywhere_gives_area_fractions(tmp_path):
    # 2.0 everywhere except image 5 (1.0; its object plane is empty, so it counts for no
    # category): T = 1.0 and the unit fires on all of images 1-4 (image 0 carries no label and
    # takes no part, as in NetDissect-Lite)
    feats = np.full((6, 1, 4, 4), 2.0, np.float32)
    feats[5] = 1.0
    r = _run(tmp_path, feats, q=0.9)
    assert r.thresholds[0] == 1.0
    assert r.unit_area[0] == 4 * P
    # label areas: a 4+4, b 4+16, sky 2 images, sea 1 image (image-level: sh*sw each)
    np.testing.assert_array_equal(r.label_area, [0, 8, 20, 32, 16])
    # the unit's area per category: object on images 1,2,4; scene on images 1,3,4
    np.testing.assert_array_equal(r.unit_cat_area[0], [48, 48])
    expect = {1: 8 / 48, 2: 20 / 48, 3: 32 / 48, 4: 16 / 48}
    for lab, v in expect.items():
        assert r.iou[0, lab] == pytest.approx(v, abs=1e-9)  # +1e-10 in the denominator
    assert NAMES[r.best_label[0]] == "sky" and CATS[r.best_category[0]] == "scene"
    assert r.cat_label[0, 0] == 2 and r.cat_iou[0, 0] == pytest.approx(20 / 48)


def test_category_restricted_unit_area(tmp_path):
    # the unit fires on the right column of images 1 and 2; it touches an object label only
    # in image 1 (pixel (3,3) is b), so NetDissect-Lite counts only image 1's area for object
    right = np.zeros((4, 4), bool)
    right[:, 3] = True
    feats = _mask_unit([None, right, right, None, None, None])
    r = _run(tmp_path, feats)
    assert r.intersect[0, 2] == 1 and r.intersect[0, 3] == 4
    np.testing.assert_array_equal(r.unit_cat_area[0], [4, 4])
    assert r.iou[0, 2] == pytest.approx(1 / (4 + 20 - 1))
    assert r.iou[0, 3] == pytest.approx(4 / (4 + 32 - 4))
    # "image": every image carrying an object label counts (images 1 and 2)
    r2 = _run(tmp_path, feats, category_area="image")
    np.testing.assert_array_equal(r2.unit_cat_area[0], [8, 4])
    assert r2.iou[0, 2] == pytest.approx(1 / (8 + 20 - 1))


def test_image_level_label_and_stale_accumulator(tmp_path):
    # fires on image 2's left column (label a) and all of image 3 (scene "sea" only)
    left = np.zeros((4, 4), bool)
    left[:, 0] = True
    feats = _mask_unit([None, None, left, np.ones((4, 4), bool), None, None])
    r = _run(tmp_path, feats)
    np.testing.assert_array_equal(r.unit_cat_area[0], [4, 16])
    assert r.iou[0, 4] == pytest.approx(1.0)  # sea: 16 / (16 + 16 - 16)
    assert r.iou[0, 1] == pytest.approx(4 / (4 + 8 - 4))  # a: 0.5
    # NetDissect-Lite's stale accumulator would add image 3's 16 px to object: a = 1/6
    ref_fresh = _reference(feats, ToyProbe(_toy_segs()), r.thresholds, stale=False)
    ref_stale = _reference(feats, ToyProbe(_toy_segs()), r.thresholds, stale=True)
    assert ref_fresh["iou"][0, 1] == pytest.approx(0.5)
    assert ref_stale["iou"][0, 1] == pytest.approx(4 / (20 + 8 - 4))
    np.testing.assert_allclose(r.iou, ref_fresh["iou"], rtol=0, atol=0)


def test_upsampled_mask_from_small_map(tmp_path):
    # a 2x2 map with 1 at top-left: Pillow-bilinear 4x4 profile [1,.75,.25,0]; T between .5625
    # and .75 keeps (0,0),(0,1),(1,0): object label a exactly there in a custom probe
    m = np.zeros((4, 4), np.int64)
    m[0, 0] = m[0, 1] = m[1, 0] = 1
    segs = [(m, []), (np.zeros((4, 4), np.int64), [])]
    probe = ToyProbe(segs)
    feats = np.zeros((2, 1, 2, 2), np.float32)
    feats[0, 0, 0, 0] = 1.0
    feats[1, 0] = 0.6  # image 1: flat 0.6 -> upsampled flat 0.6, below T
    # 8 values: sorted [0,0,0,.6,.6,.6,.6,1]; q=0.1 -> p=.9, h=6.3 -> T=.6+.3*(1-.6)=.72
    r = _run(tmp_path, feats, probe=probe, q=0.1)
    assert r.thresholds[0] == pytest.approx(0.72, rel=1e-6)
    assert r.unit_area[0] == 3 and r.intersect[0, 1] == 3 and r.best_iou[0] == pytest.approx(1)


# ------------------------------------------------- reference loop (NetDissect-Lite style)
def _reference(feats, probe, thresholds, stale=False):
    """Per image, per unit, float64 numpy + Pillow imresize, as feature_operation.tally_job."""
    n, units = feats.shape[:2]
    L, C = probe.num_labels, len(probe.categories)
    labelcat = np.zeros((L, C))
    for lab in range(1, L):
        if probe.label_category[lab] >= 0:
            labelcat[lab, probe.label_category[lab]] = 1
    both = np.zeros((units, L))
    labels = np.zeros(L)
    ucat = np.zeros((units, C))
    tally_cat = np.zeros(C)
    for i in range(n):
        seg = probe.load_segmentation(i)
        sh, sw = seg.size
        scalars = [int(s) for c in probe.categories for s in seg.image.get(c, [])]
        planes = [p for c in probe.categories for p in seg.pixel.get(c, np.zeros((0, sh, sw)))]
        pixels = np.stack(planes) if planes else None
        for s in scalars:
            labels[s] += sh * sw
        if pixels is not None:
            t = np.bincount(pixels.ravel(), minlength=L)
            t[0] = 0
            labels += t
        for u in range(units):
            fm = feats[i, u].astype(np.float64)
            if fm.max() <= thresholds[u]:
                continue
            mask = np.asarray(Image.fromarray(fm.astype(np.float32), mode="F").resize(
                (sw, sh), Image.BILINEAR))
            idx = np.argwhere(mask > thresholds[u])
            if not stale:
                tally_cat = np.zeros(C)
            if pixels is not None:
                bt = np.bincount(pixels[:, idx[:, 0], idx[:, 1]].ravel(), minlength=L)
                bt[0] = 0
                tally_cat = bt @ labelcat
                both[u] += bt
            for s in scalars:
                tally_cat = tally_cat + labelcat[s]
                both[u, s] += len(idx)
            ucat[u] += len(idx) * (tally_cat > 0)
    ucat_l = ucat @ labelcat.T
    iou = both / (ucat_l + labels[None] - both + 1e-10)
    iou[:, probe.label_category < 0] = 0
    iou[:, 0] = 0
    return {"iou": iou, "both": both, "labels": labels}


@pytest.fixture(scope="module")
def world():
    from interptool.data import open_dataset

    return open_dataset("builtin:concept-world?version=1&n=48&size=32")


def _world_feats(n, units=6, hw=4, seed=0):
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((n, units, hw, hw)), 0).astype(np.float32)


def test_matches_reference_loop_on_concept_world(tmp_path, world):
    feats = _world_feats(len(world))
    path = _cache(tmp_path, feats, world)
    r = Dissection(quantile=0.02, batch_size=5, checksum=False).run(path, "l4", world)
    ref = _reference(feats, world, r.thresholds)
    np.testing.assert_array_equal(r.intersect, ref["both"].astype(np.int64))
    np.testing.assert_array_equal(r.label_area, ref["labels"].astype(np.int64))
    np.testing.assert_array_equal(r.iou, ref["iou"])
    flat = feats.transpose(1, 0, 2, 3).reshape(feats.shape[1], -1).astype(np.float64)
    np.testing.assert_array_equal(r.thresholds, np.quantile(flat, 0.98, axis=1))


def test_invariant_to_batch_size_and_order(tmp_path):
    segs = _toy_segs()
    rng = np.random.default_rng(1)
    feats = rng.gamma(1.0, size=(6, 5, 2, 2)).astype(np.float32)
    base = _run(tmp_path, feats, q=0.1, batch_size=64)
    for bs in (1, 4):
        other = _run(tmp_path, feats, q=0.1, batch_size=bs)
        np.testing.assert_array_equal(other.iou, base.iou)
    order = [3, 5, 0, 2, 4, 1]
    perm = _run(tmp_path, feats[order], probe=ToyProbe(segs, order), q=0.1, batch_size=4)
    np.testing.assert_array_equal(perm.iou, base.iou)
    np.testing.assert_array_equal(perm.thresholds, base.thresholds)


def test_thresholds_curve_monotone_and_summary(tmp_path, world):
    feats = _world_feats(len(world), units=12, seed=2)
    r = Dissection(quantile=0.02, checksum=False).run(_cache(tmp_path, feats, world), "l4", world)
    curve = r.thresholds_curve()
    assert [c["iou_threshold"] for c in curve] == [round(0.01 * i, 2) for i in range(1, 21)]
    det = [c["detectors"] for c in curve]
    assert all(a >= b for a, b in zip(det, det[1:]))
    s = r.summary()
    assert set(s) >= {"layer", "units", "detectors", "unique_concepts", "by_category",
                      "iou_threshold", "quantile", "thresholds_curve"}
    assert s["detectors"] == int((r.best_iou >= 0.04).sum())
    assert sum(s["by_category"].values()) == s["detectors"]
    json.dumps(r.to_dict())


def test_tokens_with_class_token_match_spatial(tmp_path):
    segs = _toy_segs()
    probe = ToyProbe(segs)
    rng = np.random.default_rng(4)
    spatial = rng.gamma(1.0, size=(6, 3, 2, 2)).astype(np.float32)
    tokens = np.concatenate([np.full((6, 1, 3), 99, np.float32),
                             spatial.reshape(6, 3, 4).transpose(0, 2, 1)], axis=1)
    a = _run(tmp_path, spatial, q=0.2)
    path = _cache(tmp_path, tokens, probe, name="tok.h5")
    b = Dissection(quantile=0.2, checksum=False).run(path, "l4", probe)
    np.testing.assert_array_equal(a.iou, b.iou)
    assert b.config["dropped_class_token"]


# ------------------------------------------------------------------------------ errors
def test_fingerprint_mismatch(tmp_path):
    probe = ToyProbe(_toy_segs())
    path = _cache(tmp_path, _mask_unit([None] * 6), probe, data_fingerprint="other")
    with pytest.raises(CacheError, match="different data set"):
        Dissection(checksum=False).run(path, "l4", probe)


def test_ids_mismatch(tmp_path):
    probe = ToyProbe(_toy_segs())
    path = _cache(tmp_path, _mask_unit([None] * 6), probe, data_fingerprint="")
    with pytest.raises(CacheError, match="first difference at row 0"):
        Dissection(checksum=False).run(path, "l4", ToyProbe(_toy_segs(), [1, 0, 2, 3, 4, 5]))


def test_missing_layer(tmp_path):
    probe = ToyProbe(_toy_segs())
    path = _cache(tmp_path, _mask_unit([None] * 6), probe)
    with pytest.raises(CacheError, match="layer 'layer3' is not in this cache"):
        Dissection(checksum=False).run(path, "layer3", probe)


def test_nan_names_layer_and_unit(tmp_path):
    feats = _mask_unit([None] * 6).repeat(3, axis=1)
    feats[4, 2, 1, 1] = np.nan
    with pytest.raises(AnalysisError, match=r"layer 'l4' has NaN/Inf .*image 4 'img4.png', unit 3 "):
        _run(tmp_path, feats, q=0.1)


def test_probe_without_masks_and_bad_layers(tmp_path):
    class NoMasks:
        spec = "imagefolder:x"

    with pytest.raises(AnalysisError, match="no segmentation masks"):
        Dissection(checksum=False).run(_cache(tmp_path, _mask_unit([None] * 6),
                                              ToyProbe(_toy_segs())), "l4", NoMasks())
    probe = ToyProbe(_toy_segs())
    path = _cache(tmp_path, np.zeros((6, 7, 3), np.float32), probe, name="t.h5")
    with pytest.raises(AnalysisError, match="not a square"):
        Dissection(checksum=False).run(path, "l4", probe)
    with pytest.raises(ConfigError):
        Dissection(quantile=0.0)


# ------------------------------------------------------------------------ outputs, CLI
def test_save_writes_tally_and_montages(tmp_path):
    segs = _toy_segs()
    feats = _mask_unit([None if s[0] is None else s[0] == 1 for s in segs])
    feats = np.concatenate([feats, np.flip(feats, 0)], axis=1)
    r = _run(tmp_path, feats, top_images=3)
    paths = r.save(tmp_path / "out")
    names = {p.name for p in paths}
    assert {"tally.csv", "summary.json", "detectors_by_category.png",
            "thresholds_curve.png", "unit_0001.png"} <= names
    tally = pd.read_csv(tmp_path / "out" / "tally.csv")
    cols = ["unit", "category", "label", "score", "iou"]
    for c in CATS:
        cols += [f"{c}-label", f"{c}-truth", f"{c}-activation", f"{c}-intersect", f"{c}-iou"]
    assert list(tally.columns) == cols
    assert sorted(tally["unit"]) == [1, 2]
    assert list(tally["score"]) == sorted(tally["score"], reverse=True)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["provenance"]["data_fingerprint"] == ToyProbe(segs).fingerprint
    assert r.top_images.shape == (2, 3)
    with Image.open(tmp_path / "out" / "units" / "unit_0001.png") as im:
        assert im.size[0] >= 3 * 112


def test_cli_dissect(tmp_path, world, capsys):
    feats = _world_feats(len(world), units=4, seed=5)
    path = _cache(tmp_path, feats, world)
    out = tmp_path / "d"
    rc = main(["dissect", str(path), "--layer", "l4", "--out", str(out), "--quiet",
               "--quantile", "0.02", "--montages", "2"])
    assert rc == 0
    for f in ("tally.csv", "summary.json", "detectors_by_category.png", "thresholds_curve.png"):
        assert (out / "l4" / f).is_file()
    assert len(list((out / "l4" / "units").glob("unit_*.png"))) == 2
    with ActivationCache(path) as c:
        assert c.data_spec == world.spec
    rc = main(["dissect", str(path), "--layer", "nope", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "interptool dissect: error:" in err and "Traceback" not in err
    assert "'nope'" in err


# ------------------------------------------------- a real Broden folder on disk, by hand
def _write_broden(root: Path) -> None:
    """4 images 4x4 (seg 4x4); color red=1, object dog=2 and car=300 (G channel), scene
    beach=5. Image 0: two object mask files (dog top-left 2x2, car bottom row) + red left
    column; image 1: car right column + beach; image 2: beach only; image 3: nothing."""
    (root / "images").mkdir(parents=True)

    def png(name, lab):  # encode R + 256*G by hand, independently of the reader
        lab = np.asarray(lab, np.int64)
        rgb = np.zeros(lab.shape + (3,), np.uint8)
        rgb[..., 0], rgb[..., 1] = lab % 256, lab // 256
        Image.fromarray(rgb).save(root / "images" / name)

    for i in range(4):
        Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(root / "images" / f"im{i}.jpg")
    z = np.zeros((4, 4), np.int64)
    dog, car0, red, car1 = z.copy(), z.copy(), z.copy(), z.copy()
    dog[:2, :2], car0[3, :], red[:, 0], car1[:, 3] = 2, 300, 1, 300
    for name, lab in [("im0_o1.png", dog), ("im0_o2.png", car0), ("im0_c.png", red),
                      ("im1_o.png", car1)]:
        png(name, lab)
    (root / "category.csv").write_text("name,first,last,count,frequency\ncolor,1,1,1,1\n"
                                       "object,2,300,2,2\nscene,5,5,2,2\n")
    (root / "label.csv").write_text("number,name,category,frequency,coverage,syns\n"
                                    "1,red,color(1),1,1,\n2,dog,object(1),1,1,\n"
                                    "5,beach,scene(2),2,2,\n300,car,object(2),2,2,\n")
    (root / "index.csv").write_text(
        "image,split,ih,iw,sh,sw,color,object,scene\n"
        "im0.jpg,train,4,4,4,4,im0_c.png,im0_o1.png;im0_o2.png,\n"
        "im1.jpg,train,4,4,4,4,,im1_o.png,5\n"
        "im2.jpg,train,4,4,4,4,,,5\n"
        "im3.jpg,train,4,4,4,4,,,\n")


def test_broden_folder_on_disk_hand_computed(tmp_path):
    from interptool.data import open_dataset
    from interptool.errors import DataError

    _write_broden(tmp_path / "b")
    probe = open_dataset(f"broden:{tmp_path / 'b'}")
    z, a = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    dog, left = z.copy(), z.copy()
    dog[:2, :2], left[:, 0] = True, True
    a_but_corner = a.copy()
    a_but_corner[3, 3] = False
    # per unit: where it fires on images 0..3, expected IoU per label (by hand), best label.
    # Label areas: red 4, dog 4, car 4+4=8, beach 16+16=32 (image-level: sh*sw per image).
    cases = [
        # dog pixels only: areas object 4, color 4 (touches red), scene 0
        ([dog, z, z, z], {1: 2 / 6, 2: 1.0, 300: 0.0, 5: 0.0}, 2),
        # everywhere on images 0-1 and on image 2 but its corner (3, 3) (with image 3 left
        # out, a quantile threshold cannot sit below every kept value): object 16+16,
        # color 16, scene 16+15; beach 31 / (31 + 32 - 31)
        ([a, a, a_but_corner, z], {1: 4 / 16, 2: 4 / 32, 300: 8 / 32, 5: 31 / 32}, 5),
        # left column of image 0 + all of scene-only image 2 (stale-accumulator case:
        # NetDissect-Lite would add image 2's 16 px to color and object, red -> 0.2)
        ([left, z, a, z], {1: 1.0, 2: 2 / 6, 300: 1 / 11, 5: 16 / 32}, 1),
    ]
    feats = np.zeros((4, len(cases), 4, 4), np.float32)
    for u, (fire, _, _) in enumerate(cases):
        for i, m in enumerate(fire):
            feats[i, u] = 0.5 + 0.01 * np.arange(16).reshape(4, 4) / 16 + 0.1 * i
            feats[i, u][m] = 2.0
    for u, (fire, expect, best) in enumerate(cases):
        k = int(sum(m.sum() for m in fire))
        # threshold halfway between the last off and first on, over the 48 values of images
        # 0-2 (image 3 carries no label: the protocol leaves it out, as NetDissect-Lite does)
        q = 1 - (48 - k - 0.5) / 47
        path = _cache(tmp_path, feats[:, u : u + 1], probe, name=f"u{u}.h5")
        r = Dissection(quantile=q, checksum=False).run(path, "l4", probe)
        assert 1.0 < r.thresholds[0] < 2.0
        np.testing.assert_array_equal(r.label_area[[1, 2, 5, 300]], [4, 4, 32, 8])
        for lab, v in expect.items():
            assert r.iou[0, lab] == pytest.approx(v, abs=1e-9), (u, lab)
        assert r.best_label[0] == best
    # a mask file listed in index.csv but missing: DataError naming the file and the fix
    (tmp_path / "b" / "images" / "im0_o2.png").unlink()
    with pytest.raises(DataError, match=r"im0_o2.png .*index.csv line 2.*does not exist"):
        Dissection(quantile=0.1, checksum=False).run(path, "l4", probe)


def test_montage_outlines_mask_and_dims_outside(tmp_path):
    from interptool.analyzers.dissection._plots import _OUTLINE, _TILE

    # unit fires on label a's top-left 2x2 of image 1 (and a's column in image 2)
    segs = _toy_segs()
    r = _run(tmp_path, _mask_unit([None if s[0] is None else s[0] == 1 for s in segs]),
             top_images=1)
    img = np.asarray(r.montage(0))
    tile = img[16:16 + _TILE, :_TILE].astype(int)
    outline = np.all(tile == _OUTLINE, axis=2)
    assert outline.any()
    colour = np.array(ToyProbe(segs).load_image(int(r.top_images[0, 0])).getpixel((0, 0)))
    # far corner (bottom-right) lies outside the mask in both images: dimmed to 35 %
    np.testing.assert_allclose(tile[-5, -5], colour * 0.35, atol=1.5)
    # top image 1: label a is the top-left 2x2 of 4x4, so the (bilinearly softened) mask and
    # its outline stay within the top-left ~3/4 of the tile; the outline hugs the border
    assert r.top_images[0, 0] == 1
    assert not outline[:, 90:].any() and not outline[90:, :].any()
    assert outline[0, :40].all() and outline[:40, 0].all()  # mask touches the image edge
    # one tile plus a 16 px caption band above it (text: unit, concept, category, IoU)
    assert r.montage(0).size == (_TILE + 2, _TILE + 16)
    assert (img[:16] < 128).any()  # the caption text is drawn


def test_cli_iou_threshold_and_top_unit_montages(tmp_path, world):
    feats = _world_feats(len(world), units=8, seed=7)
    path = _cache(tmp_path, feats, world)
    out = {}
    for t in ("0.04", "0.05"):
        rc = main(["dissect", str(path), "--layer", "l4", "--out", str(tmp_path / t), "--quiet",
                   "--quantile", "0.02", "--iou-threshold", t, "--montages", "3"])
        assert rc == 0
        out[t] = json.loads((tmp_path / t / "l4" / "summary.json").read_text())
    iou = pd.read_csv(tmp_path / "0.04" / "l4" / "tally.csv").set_index("unit")["iou"]
    for t, s in out.items():
        assert s["iou_threshold"] == float(t)
        assert s["detectors"] == int((iou >= float(t)).sum())
        on_curve = [c for c in s["thresholds_curve"] if c["iou_threshold"] == float(t)]
        assert on_curve[0]["detectors"] == s["detectors"]  # the curve has both cuts
    # the curve does not depend on the chosen cut
    assert out["0.04"]["thresholds_curve"] == out["0.05"]["thresholds_curve"]
    # montages for the 3 best units by IoU
    top = iou.sort_values(ascending=False, kind="stable").index[:3]
    got = sorted(p.name for p in (tmp_path / "0.04" / "l4" / "units").glob("*.png"))
    assert got == sorted(f"unit_{u:04d}.png" for u in top)


def test_eval_transform_cache_refused(tmp_path):
    """A centre-cropped (eval transform) cache no longer lines up with the masks (issue 11)."""
    probe = ToyProbe(_toy_segs())
    masks = [s[0] == 1 if s[0] is not None else None for s in _toy_segs()]
    feats = _mask_unit(masks)
    path = _cache(tmp_path, feats, probe, transform="eval")
    with pytest.raises(CacheError, match="field 'transform' is 'eval'.*--probe yes"):
        Dissection(checksum=False).run(path, "l4", probe)
    # the same features cached with the probe transform dissect normally
    ok = _cache(tmp_path, feats, probe, name="probe.h5", transform="probe")
    assert Dissection(checksum=False).run(ok, "l4", probe).iou.shape[0] == 1
