"""Broden reader: a hand-made folder read back exactly, and precise errors when malformed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from interptool.data import BrodenDataset, Segmentation, open_dataset
from interptool.errors import DataError

SH, SW = 4, 6


def _mask(path: Path, labels: np.ndarray) -> None:
    # written by hand here (not with interptool's encoder): R = n mod 256, G = n div 256
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0] = labels & 0xFF
    rgb[..., 1] = labels >> 8
    rgb[..., 2] = 77  # blue is ignored by the format
    Image.fromarray(rgb, "RGB").save(path)


OBJ = np.array([[0, 1, 1, 0, 0, 300], [0, 1, 1, 0, 300, 300],
                [513, 513, 0, 0, 0, 0], [513, 513, 0, 2, 2, 0]])
PART1 = np.where(OBJ == 300, 301, 0)
PART2 = np.where(OBJ == 513, 700, np.where(OBJ == 1, 301, 0))
TEX = np.full((SH, SW), 5)


def make_broden(root: Path) -> Path:
    (root / "images" / "src").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((8, 12, 3), 40 * k, np.uint8)).save(root / f"images/src/{k}.jpg")
    _mask(root / "images/src/0_object.png", OBJ)
    _mask(root / "images/src/0_part_1.png", PART1)
    _mask(root / "images/src/0_part_2.png", PART2)
    _mask(root / "images/src/2_texture.png", TEX)
    (root / "index.csv").write_text(
        "image,split,ih,iw,sh,sw,object,part,scene,texture\n"
        f"src/0.jpg,train,8,12,{SH},{SW},src/0_object.png,src/0_part_1.png;src/0_part_2.png,"
        "400;401,\n"
        f"src/1.jpg,val,8,12,{SH},{SW},,,401,6;5\n"
        f"src/2.jpg,val,8,12,{SH},{SW},,,,src/2_texture.png\n"
    )
    (root / "category.csv").write_text(
        "name,first,last,count,frequency\nobject,1,513,4,2\npart,300,700,3,1\n"
        "scene,400,401,2,2\ntexture,5,6,2,2\n"
    )
    (root / "label.csv").write_text(
        "number,name,category,frequency,coverage,syns\n"
        "1,dog,object(1),1,0.1,\n2,cat,object(1),1,0.1,\n"
        "5,striped,texture(2),2,1.5,\n6,dotted,texture(1),1,1.0,\n"
        '300,wheel,part(1);object(1),2,0.3,"tyre"\n'
        "301,leg,part(2),2,0.2,\n400,beach,scene(1),1,1.0,\n401,street,scene(2),2,2.0,\n"
        "513,car,object(1),1,0.2,\n700,window,part(1),1,0.1,\n"
    )
    (root / "c_object.csv").write_text(
        "code,number,name,frequency,coverage\n1,1,dog,1,0.1\n2,2,cat,1,0.1\n3,513,car,1,0.2\n"
        "4,300,wheel,1,0.9\n"
    )
    (root / "c_part.csv").write_text(
        "code,number,name,frequency,coverage\n1,301,leg,2,0.2\n2,300,wheel,1,0.1\n"
        "3,700,window,1,0.1\n"
    )
    return root


@pytest.fixture()
def broden(tmp_path) -> Path:
    return make_broden(tmp_path / "broden")


def test_round_trip_exact_arrays(broden):
    ds = open_dataset(f"broden:{broden}")
    assert isinstance(ds, BrodenDataset) and len(ds) == 3
    assert ds.ids == ["src/0.jpg", "src/1.jpg", "src/2.jpg"]
    assert ds.categories == ["object", "part", "scene", "texture"]
    assert ds.pixel_categories == ["object", "part", "texture"]
    # texture is image-level in one row and pixel-level in another: both lists hold it
    assert ds.image_categories == ["scene", "texture"]
    assert ds.num_labels == 701 and ds.seg_size(0) == (SH, SW) and ds.image_size(0) == (8, 12)
    s = ds.load_segmentation(0)
    assert isinstance(s, Segmentation) and s.size == (SH, SW)
    assert s.pixel["object"].dtype == np.int64 and s.pixel["object"].shape == (1, SH, SW)
    assert np.array_equal(s.pixel["object"][0], OBJ)  # 300 and 513 survive (> 255)
    assert np.array_equal(s.pixel["part"], np.stack([PART1, PART2]))
    assert s.pixel["texture"].shape == (0, SH, SW)
    assert s.image["scene"].tolist() == [400, 401]
    assert s.labels_present().tolist() == [1, 2, 300, 301, 400, 401, 513, 700]
    s1 = ds.load_segmentation(1)
    assert s1.image["texture"].tolist() == [6, 5] and s1.image["scene"].tolist() == [401]
    assert s1.pixel["object"].shape == (0, SH, SW)
    s2 = ds.load_segmentation(2)
    assert np.array_equal(s2.pixel["texture"][0], TEX) and s2.image["scene"].size == 0
    assert np.asarray(ds.load_image(1)).shape == (8, 12, 3)
    assert ds.labels.tolist() == [-1, -1, -1] and ds.class_names is None
    # picklable, so DataLoader workers started with 'spawn' can receive it
    import pickle

    clone = pickle.loads(pickle.dumps(ds.torch_dataset()))
    assert np.array_equal(clone.dataset.load_segmentation(0).pixel["part"], s.pixel["part"])


def test_label_table_and_primary_category(broden):
    ds = BrodenDataset(broden)
    t = ds.label_table
    assert t["number"].tolist() == [1, 2, 5, 6, 300, 301, 400, 401, 513, 700]
    assert list(t.columns[:3]) == ["number", "name", "category"]
    # wheel: part(1);object(1) is a tie on counts -> the first listed (part)
    assert dict(zip(t["name"], t["category"]))["wheel"] == "part"
    assert ds.label_names[513] == "car" and ds.label_names[3] == ""
    assert ds.label_category[513] == 0 and ds.label_category[700] == 1
    assert ds.label_category[0] == -1 and ds.label_category[3] == -1
    # NetDissect-Lite's rule uses c_<cat>.csv coverage: wheel covers more as an object
    (broden / "c_scene.csv").write_text("code,number,name,frequency,coverage\n1,400,beach,1,1\n"
                                        "2,401,street,2,2\n")
    (broden / "c_texture.csv").write_text("code,number,name,frequency,coverage\n1,5,striped,2,1\n"
                                          "2,6,dotted,1,1\n")
    cov = BrodenDataset(broden, primary_category="coverage")
    assert cov.label_category[300] == 0 and cov.label_category[301] == 1
    assert cov.category_codes["object"][3] == 513


def test_split_filter(broden):
    ds = open_dataset(f"broden:{broden}?split=val")
    assert ds.ids == ["src/1.jpg", "src/2.jpg"]
    assert ds.load_segmentation(1).pixel["texture"].shape == (1, SH, SW)
    with pytest.raises(DataError, match="unknown parameter 'splits'"):
        open_dataset(f"broden:{broden}?splits=val")


def test_fingerprint_independent_of_spec(broden):
    a = open_dataset(f"broden:{broden}")
    b = open_dataset(str(broden))  # bare path with index.csv -> Broden
    assert isinstance(b, BrodenDataset) and a.fingerprint == b.fingerprint


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    "file, old, new, match",
    [
        ("index.csv", f"val,8,12,{SH},{SW},,,401", f"val,8,12,{SH},x,,,401",
         r"index\.csv, line 3, column 'sw': 'x' is not an integer"),
        ("index.csv", "image,split", "img,split", r"index\.csv: header .* lacks column\(s\) image"),
        ("index.csv", ",,401,6;5", ",,402,6;5", r"line 3, column 'scene': label number 402"),
        ("index.csv", "scene,texture", "scene,weather", r"column 'weather' is not a category"),
        ("label.csv", "2,cat,object(1)", "2,cat,object[1]", r"label\.csv, line 3, column "
         r"'category'"),
        ("label.csv", "2,cat,object(1)", "2,cat,animal(1)", r"category 'animal' is not in"),
        ("label.csv", "6,dotted", "5,dotted", r"label number 5 already defined on line 4"),
        ("c_object.csv", "3,513,car", "3,514,car", r"c_object\.csv, line 4, column 'number': "
         r"label 514"),
        ("c_part.csv", "1,301,leg", "1,301,arm", r"label\.csv calls label 301 'leg'"),
        ("category.csv", "texture,5,6,2,2\n", "", r"label\.csv, line 4, column 'category': category 'texture' is not in"),
    ],
)
def test_malformed_csv_errors_name_file_line_and_column(broden, file, old, new, match):
    _edit(broden / file, old, new)
    with pytest.raises(DataError, match=match):
        BrodenDataset(broden)


def test_missing_files(broden, tmp_path):
    (broden / "images/src/0_part_2.png").unlink()
    ds = BrodenDataset(broden)  # opening stays cheap: masks are read on demand
    with pytest.raises(DataError, match=r"0_part_2\.png \(index\.csv line 2, column 'part'\) "
                                        "does not exist"):
        ds.load_segmentation(0)
    ds.load_segmentation(1)  # the other images still load
    other = tmp_path / "b2"
    shutil.copytree(broden, other)
    (other / "label.csv").unlink()
    with pytest.raises(DataError, match=r"label\.csv is missing"):
        BrodenDataset(other)
    with pytest.raises(DataError, match="does not exist"):
        BrodenDataset(tmp_path / "nowhere")


def test_mask_of_wrong_size(broden):
    _mask(broden / "images/src/2_texture.png", np.ones((SH + 1, SW), np.int64))
    with pytest.raises(DataError, match=r"2_texture\.png .* is 5x6 but sh,sw = 4,6"):
        BrodenDataset(broden).load_segmentation(2)


def test_mask_decoding_uses_wide_integers(tmp_path):
    from interptool.data import read_mask_png

    labels = np.array([[0, 255, 256, 257], [1000, 65535, 4096, 513]])
    _mask(tmp_path / "m.png", labels)
    got = read_mask_png(tmp_path / "m.png")
    assert got.dtype == np.int64 and np.array_equal(got, labels)


def test_mask_labels_keep_the_narrowest_exact_type(tmp_path):
    """What the dissection decodes: RGB as int32 R + 256 * G (blue ignored), one-channel
    PNGs in their own type; read_mask_png gives the same numbers as int64."""
    from interptool.data import read_mask_labels, read_mask_png

    labels = np.array([[0, 255, 256, 257], [1000, 65535, 4096, 513]])
    _mask(tmp_path / "rgb.png", labels)
    got = read_mask_labels(tmp_path / "rgb.png")
    assert got.dtype == np.int32 and np.array_equal(got, labels)
    Image.fromarray(np.array([[0, 7], [255, 3]], np.uint8), "L").save(tmp_path / "l.png")
    got = read_mask_labels(tmp_path / "l.png")
    assert got.dtype == np.uint8 and got.tolist() == [[0, 7], [255, 3]]
    Image.fromarray(np.array([[0, 700], [65535, 3]], np.uint16)).save(tmp_path / "i16.png")
    got = read_mask_labels(tmp_path / "i16.png")
    assert got.dtype.kind == "u" and got.tolist() == [[0, 700], [65535, 3]]
    assert read_mask_png(tmp_path / "i16.png").dtype == np.int64


def test_each_mask_file_costs_one_lstat_and_no_stat(broden, monkeypatch):
    """The checks before decoding a mask (inside the root, exists, a regular file) come from
    one lstat of the file: a Broden probe has ~300,000 of them, decoded at every dissection.
    A link is followed (one stat more) and still checked."""
    import os

    ds = BrodenDataset(broden)
    ds.load_segmentation(0)  # folders resolved once, before counting
    calls: list[str] = []
    for name in ("lstat", "stat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda p, *a, _r=real, _n=name, **k:
                            calls.append(_n) or _r(p, *a, **k))
    s = ds.load_segmentation(0)
    assert calls == ["lstat"] * 3 and s.pixel["part"].shape == (2, SH, SW)
    monkeypatch.undo()
    (broden / "images/src/0_part_2.png").rename(broden / "images/src/elsewhere.png")
    (broden / "images/src/0_part_2.png").symlink_to(broden / "images/src/elsewhere.png")
    assert np.array_equal(BrodenDataset(broden).load_segmentation(0).pixel["part"][1], PART2)
    # a mask name that is a folder, or a link to nothing, does not exist as a mask
    (broden / "images/src/0_part_2.png").unlink()
    (broden / "images/src/0_part_2.png").symlink_to(broden / "images/src/none.png")
    with pytest.raises(DataError, match=r"0_part_2\.png \(index.csv line 2, column 'part'\) "
                                        "does not exist; restore it"):
        BrodenDataset(broden).load_segmentation(0)
    (broden / "images/src/0_part_2.png").unlink()
    (broden / "images/src/0_part_2.png").mkdir()
    with pytest.raises(DataError, match=r"0_part_2\.png .*does not exist"):
        BrodenDataset(broden).load_segmentation(0)
