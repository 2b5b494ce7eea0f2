"""Dissection protocols: NetDissect-Lite's five categories by default (material-only images
dropped from thresholds and tallies), the paper's ``han2023`` preset, and the record of both.

The expected numbers come from an independent loop over the images written here, following
NetDissect-Lite's ``feature_operation.py`` (see ../shared/reference.md): images without a label
of a selected category are removed before anything is computed; primary categories are chosen
among the selected categories by coverage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from interptool.analyzers.dissection import Dissection
from interptool.cache import write_cache
from interptool.cli import main
from interptool.errors import ConfigError

S = 4  # images and segmentations are 4x4: the 4x4 maps are upsampled to themselves
CATS = ["color", "object", "material", "scene"]
# label -> (name, primary category among all four by coverage)
LABELS = {1: "red", 2: "dog", 3: "wood", 4: "beach", 5: "glass"}


def _png(root: Path, name: str, lab: np.ndarray) -> None:
    lab = np.asarray(lab, np.int64)  # R + 256 G written by hand, independent of the reader
    rgb = np.zeros(lab.shape + (3,), np.uint8)
    rgb[..., 0], rgb[..., 1] = lab % 256, lab // 256
    Image.fromarray(rgb).save(root / "images" / name)


def _planes() -> list[dict[str, list]]:
    """Per image: category -> list of 4x4 label planes (pixel) or list of ints (image-level)."""
    z = np.zeros((S, S), np.int64)
    red, dogwood, dogcol, woodhalf, glassrow, glassall = (z.copy() for _ in range(6))
    red[:, 0] = 1
    dogwood[:2, :2] = 2
    dogwood[3, :] = 3  # wood inside an object plane: primary object unless material selected
    dogcol[:, 3] = 2
    woodhalf[2:, :] = 3
    glassrow[0, :] = 5
    glassall[:] = 5
    return [
        {"color": [red], "object": [dogwood]},          # im0
        {"object": [dogcol], "scene": [4]},             # im1
        {"material": [woodhalf, glassrow]},             # im2: material only
        {"material": [glassall]},                       # im3: material only
        {"scene": [4]},                                 # im4: scene only
    ]


def write_probe(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = ["image,split,ih,iw,sh,sw," + ",".join(CATS)]
    for i, img in enumerate(_planes()):
        Image.new("RGB", (S, S), (30 * i, 60, 90)).save(root / "images" / f"im{i}.jpg")
        cells = []
        for cat in CATS:
            items = img.get(cat, [])
            if items and isinstance(items[0], np.ndarray):
                names = []
                for k, plane in enumerate(items):
                    _png(root, f"im{i}_{cat}{k}.png", plane)
                    names.append(f"im{i}_{cat}{k}.png")
                cells.append(";".join(names))
            else:
                cells.append(";".join(str(v) for v in items))
        rows.append(f"im{i}.jpg,train,{S},{S},{S},{S}," + ",".join(cells))
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    (root / "category.csv").write_text(
        "name,first,last,count,frequency\ncolor,1,1,1,1\nobject,2,3,2,2\n"
        "material,3,5,2,2\nscene,4,4,1,2\n")
    (root / "label.csv").write_text(
        "number,name,category,frequency,coverage,syns\n1,red,color(1),1,1,\n"
        "2,dog,object(2),2,1,\n3,wood,material(1);object(1),2,1,\n4,beach,scene(2),2,2,\n"
        "5,glass,material(2),2,1,\n")
    (root / "c_color.csv").write_text("code,number,name,frequency,coverage\n1,1,red,1,0.25\n")
    (root / "c_object.csv").write_text(
        "code,number,name,frequency,coverage\n1,2,dog,2,0.3\n2,3,wood,1,0.1\n")
    (root / "c_material.csv").write_text(
        "code,number,name,frequency,coverage\n1,3,wood,1,0.5\n2,5,glass,2,0.6\n")
    (root / "c_scene.csv").write_text("code,number,name,frequency,coverage\n1,4,beach,2,1.0\n")
    return root


def reference(feats: np.ndarray, cats: list[str], quantile: float) -> dict[str, np.ndarray]:
    """NetDissect-Lite by plain loops over the images that carry a selected category."""
    planes = _planes()
    cov = {"color": {1: .25}, "object": {2: .3, 3: .1}, "material": {3: .5, 5: .6},
           "scene": {4: 1.0}}
    primary = {lab: max((cov[c].get(lab, 0.0), k) for k, c in enumerate(cats))[1] for lab in LABELS}
    kept = [i for i, img in enumerate(planes) if any(c in img for c in cats)]
    U, L, C = feats.shape[1], 6, len(cats)
    vals = feats[kept].transpose(1, 0, 2, 3).reshape(U, -1).astype(np.float64)
    T = np.quantile(vals, 1 - quantile, axis=1, method="linear")
    inter, larea, ucat = np.zeros((U, L)), np.zeros(L), np.zeros((U, C))
    for i in kept:
        img = {c: v for c, v in planes[i].items() if c in cats}
        pix = [p for v in img.values() if isinstance(v[0], np.ndarray) for p in v]
        scal = [lab for v in img.values() if not isinstance(v[0], np.ndarray) for lab in v]
        for p in pix:
            for lab in p[p > 0]:
                larea[lab] += 1
        for lab in scal:
            larea[lab] += S * S
        for u in range(U):
            m = feats[i, u].astype(np.float64) > T[u]
            if not m.any():
                continue
            touched = set()
            for p in pix:
                for lab in p[m]:
                    if lab:
                        inter[u, lab] += 1
                        touched.add(primary[lab])
            for lab in scal:
                inter[u, lab] += m.sum()
                touched.add(primary[lab])
            for c in touched:
                ucat[u, c] += m.sum()
    iou = np.zeros((U, L))
    for lab in LABELS:
        iou[:, lab] = inter[:, lab] / (ucat[:, primary[lab]] + larea[lab] - inter[:, lab] + 1e-10)
    return {"thresholds": T, "iou": iou, "label_area": larea, "kept": np.array(kept),
            "primary": primary}


@pytest.fixture()
def probe_and_cache(tmp_path):
    from interptool.data import open_dataset

    probe = open_dataset(f"broden:{write_probe(tmp_path / 'broden')}")
    rng = np.random.default_rng(3)
    feats = rng.random((5, 6, S, S)).astype(np.float32)
    feats[2:4] += 0.6  # the material-only images hold the strongest activations
    path = write_cache(tmp_path / "acts.h5", logits=np.zeros((5, 2)), ids=probe.ids,
                       features={"l4": feats},
                       attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    return probe, path, feats


def test_default_protocol_is_netdissect_lite_and_drops_material_only_rows(probe_and_cache):
    probe, path, feats = probe_and_cache
    r = Dissection(quantile=0.2, checksum=False).run(path, "l4", probe)
    ref = reference(feats, ["color", "object", "scene"], 0.2)
    assert r.categories == ["color", "object", "scene"]
    np.testing.assert_array_equal(ref["kept"], [0, 1, 4])
    # thresholds over the kept images only, exactly numpy's
    np.testing.assert_array_equal(r.thresholds, ref["thresholds"])
    np.testing.assert_array_equal(r.label_area, ref["label_area"])
    np.testing.assert_allclose(r.iou, ref["iou"], rtol=0, atol=1e-12)
    # wood is primary object once material is off (coverage among the selected categories)
    assert r.categories[r.label_category[3]] == "object" and ref["primary"][3] == 1
    assert r.label_area[5] == 0  # glass appears only in the dropped rows
    # the material-only rows would change the thresholds if they took part
    assert not np.array_equal(r.thresholds, reference(feats, CATS, 0.2)["thresholds"])
    rec = r.protocol
    assert rec["name"] == "netdissect-lite" and rec["iou_threshold"] == 0.04
    assert rec["quantile"] == 0.2 and rec["overrides"] == {"quantile": 0.2}
    assert (rec["images_total"], rec["images_used"], rec["images_dropped"]) == (5, 3, 2)
    assert rec["categories_absent_from_probe"] == ["part", "texture"]
    assert r.iou_threshold == 0.04
    assert r.summary()["protocol"] == rec and r.to_dict()["summary"]["protocol"] == rec
    assert r.provenance["n_images"] == 3 and r.provenance["n_images_total"] == 5


def test_hand_computed_iou_default_protocol(tmp_path, probe_and_cache):
    # one unit firing exactly on im0's left column and on im1's top row (T from the values)
    probe, _, _ = probe_and_cache
    feats = np.zeros((5, 1, S, S), np.float32)
    feats[:, 0] = 0.01 * np.arange(16).reshape(4, 4)
    feats[0, 0, :, 0] = 5.0
    feats[1, 0, 0, :] = 5.0
    feats[2:4, 0] = 9.0  # material-only rows: strongest, but dropped
    path = write_cache(tmp_path / "u.h5", logits=np.zeros((5, 2)), ids=probe.ids,
                       features={"l4": feats},
                       attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    q = 8 / 48  # over the 48 kept values exactly the 8 fives are above T
    r = Dissection(quantile=q, checksum=False).run(path, "l4", probe)
    assert 0.15 < r.thresholds[0] < 5.0
    # im0 left column: red 4 px (color area 4), dog 2 px, wood 1 px (object area 4);
    # im1 top row: dog 1 px ((0, 3)), beach image-level 4 (object area 4, scene area 4)
    # label areas: red 4, dog 4 + 4 = 8, wood 4 (object plane of im0), beach 16 + 16 = 32
    np.testing.assert_array_equal(r.label_area[1:5], [4, 8, 4, 32])
    assert r.iou[0, 1] == pytest.approx(4 / (4 + 4 - 4))
    assert r.iou[0, 2] == pytest.approx(3 / (8 + 8 - 3))
    assert r.iou[0, 3] == pytest.approx(1 / (8 + 4 - 1))
    assert r.iou[0, 4] == pytest.approx(4 / (4 + 32 - 4))
    assert r.label_names[r.best_label[0]] == "red"


def test_han2023_includes_material_rows(probe_and_cache):
    probe, path, feats = probe_and_cache
    r = Dissection(quantile=0.2, protocol="han2023", checksum=False).run(path, "l4", probe)
    ref = reference(feats, CATS, 0.2)
    assert r.categories == CATS
    np.testing.assert_array_equal(r.thresholds, ref["thresholds"])
    np.testing.assert_array_equal(r.label_area, ref["label_area"])
    np.testing.assert_allclose(r.iou, ref["iou"], rtol=0, atol=1e-12)
    assert r.categories[r.label_category[3]] == "material"  # wood by coverage among all four
    assert r.label_area[5] > 0
    assert r.iou_threshold == 0.05 and r.protocol["name"] == "han2023"
    assert r.protocol["images_dropped"] == 0
    assert r.protocol["categories_absent_from_probe"] == ["part", "texture"]


def test_explicit_categories_are_recorded_and_checked(probe_and_cache):
    probe, path, feats = probe_and_cache
    r = Dissection(quantile=0.2, categories="material,object", checksum=False).run(path, "l4", probe)
    ref = reference(feats, ["object", "material"], 0.2)
    assert r.categories == ["object", "material"]  # the probe's order
    np.testing.assert_allclose(r.iou, ref["iou"], rtol=0, atol=1e-12)
    assert r.protocol["overrides"]["categories"] == ["material", "object"]
    assert r.protocol["images_dropped"] == 1  # im4 carries only a scene label
    with pytest.raises(ConfigError, match="texture.*not in the probe"):
        Dissection(categories=["object", "texture"], checksum=False).run(path, "l4", probe)
    with pytest.raises(ConfigError, match="netdissect-lite, han2023"):
        Dissection(protocol="netdissect")
    with pytest.raises(ConfigError, match="listed twice"):
        Dissection(categories="object,object")


def test_protocol_in_saved_files_and_cli(tmp_path, probe_and_cache):
    probe, path, _ = probe_and_cache
    out = tmp_path / "out"
    rc = main(["dissect", str(path), "--layer", "l4", "--probe", probe.spec, "--out", str(out),
               "--protocol", "han2023", "--quantile", "0.2", "--montages", "none", "--quiet"])
    assert rc == 0
    doc = json.loads((out / "l4" / "summary.json").read_text())
    assert doc["protocol"]["name"] == "han2023" and doc["protocol"]["iou_threshold"] == 0.05
    assert doc["iou_threshold"] == 0.05 and "material" in doc["by_category"]
    rc = main(["dissect", str(path), "--layer", "l4", "--probe", probe.spec, "--out",
               str(tmp_path / "o2"), "--categories", "object,scene", "--quantile", "0.2",
               "--montages", "none", "--quiet"])
    assert rc == 0
    doc = json.loads((tmp_path / "o2" / "l4" / "summary.json").read_text())
    assert doc["protocol"]["categories"] == ["object", "scene"]
    assert doc["protocol"]["name"] == "netdissect-lite" and doc["iou_threshold"] == 0.04
    assert main(["dissect", str(path), "--layer", "l4", "--out", str(tmp_path / "o3"),
                 "--protocol", "nope", "--quiet"]) == 2
