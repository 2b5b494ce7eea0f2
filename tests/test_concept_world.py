"""builtin:concept-world: determinism, masks that agree with the drawing, Broden statistics."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from interptool.data import (
    BrodenDataset,
    canonical_spec,
    make_concept_world,
    open_dataset,
    recorded_spec,
)
from interptool.data import _concept_world as cw
from interptool.errors import DataError

N, SIZE = 24, 32


@pytest.fixture(scope="module")
def cw_root(tmp_path_factory) -> Path:
    return make_concept_world(tmp_path_factory.mktemp("cw") / "set", n=N, size=SIZE, seed=3,
                              version=1)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_parameters_give_byte_identical_files(cw_root, tmp_path):
    again = make_concept_world(tmp_path / "again", n=N, size=SIZE, seed=3, version=1)
    a, b = _files(cw_root), _files(again)
    assert a.keys() == b.keys()
    assert len(a) == N * 6 + 11  # image + 5 masks per image; 11 metadata files
    assert all(a[k] == b[k] for k in a)


def test_seed_split_and_prefix(cw_root, tmp_path):
    other = make_concept_world(tmp_path / "seed4", n=4, size=SIZE, seed=4, version=1)
    img = "images/concept-world/probe/00000.png"
    assert (other / img).read_bytes() != (cw_root / img).read_bytes()
    # a smaller n is a prefix of a larger one (per-image seeds)
    small = make_concept_world(tmp_path / "small", n=5, size=SIZE, seed=3, version=1)
    for i in range(5):
        rel = f"images/concept-world/probe/{i:05d}.png"
        assert (small / rel).read_bytes() == (cw_root / rel).read_bytes()
    # splits draw different images from the same base seed
    a = cw.render(0, SIZE, 3, "train")["image"]
    b = cw.render(0, SIZE, 3, "probe")["image"]
    c = cw.render(0, SIZE, 3, "eval")["image"]
    assert not np.array_equal(a, b) and not np.array_equal(b, c)


def test_no_temporary_folders_left_and_reuse(cw_root):
    assert not [p for p in cw_root.parent.iterdir() if p.name.startswith(".")]
    mtime = (cw_root / "index.csv").stat().st_mtime_ns
    assert make_concept_world(cw_root, n=N, size=SIZE, seed=3, version=1) == cw_root
    assert (cw_root / "index.csv").stat().st_mtime_ns == mtime  # reused, not regenerated


def test_refuses_to_overwrite_a_different_or_partial_folder(tmp_path):
    d = tmp_path / "occupied"
    d.mkdir()
    (d / "index.csv").write_text("image,split,ih,iw,sh,sw\n")  # looks like a half set
    with pytest.raises(DataError, match="overwrite"):
        make_concept_world(d, n=3, size=SIZE)
    root = make_concept_world(d, n=3, size=SIZE, overwrite=True)
    assert len(BrodenDataset(root)) == 3


def _make_small(root: str) -> str:
    return str(make_concept_world(root, n=10, size=32, seed=8))


def test_concurrent_generation_ends_with_one_complete_set(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    target = str(tmp_path / "shared")
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(_make_small, [target, target]))
    assert results == [target, target]
    assert len(BrodenDataset(target)) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temporary folder left
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        make_concept_world(tmp_path / "file", n=2, size=32)


def test_bad_parameters():
    for kwargs, msg in [({"n": 0}, "n=0"), ({"size": 8}, "size=8"), ({"split": "test"},
                        "split"), ({"n": "ten"}, "not an integer")]:
        with pytest.raises(DataError, match=msg):
            make_concept_world(None, **kwargs)


def test_circle_and_box_geometry_independent():
    y, x = np.mgrid[0:64, 0:64] + 0.5
    circ = cw.Shape("circle", 30.2, 20.7, 11.0, 0.3, 1.0, "red", "plain", False)
    d, _ = cw.shape_field(circ, x, y)
    assert np.array_equal(d < 0, (x - 30.2) ** 2 + (y - 20.7) ** 2 < 11.0**2)
    sq = cw.Shape("square", 32.0, 32.0, 10.0, 0.0, 1.0, "red", "plain", False)
    d, _ = cw.shape_field(sq, x, y)
    assert np.array_equal(d < 0, (np.abs(x - 32) < 8.2) & (np.abs(y - 32) < 8.2))
    # a cross rotated by 90 degrees is the same set of pixels
    c1 = cw.Shape("cross", 32.0, 32.0, 12.0, 0.0, 1.0, "red", "plain", False)
    c2 = cw.Shape("cross", 32.0, 32.0, 12.0, math.pi / 2, 1.0, "red", "plain", False)
    assert ((cw.shape_field(c1, x, y)[0] < 0) != (cw.shape_field(c2, x, y)[0] < 0)).sum() < 4


@pytest.mark.parametrize("index", range(12))
def test_masks_agree_with_the_drawing(index):
    r = cw.render(index, 64, 5, "probe")
    maps, clean, shapes = r["maps"], r["clean"], r["shapes"]
    owner = maps["owner"]
    L = cw.LABEL_NUMBER
    on = owner >= 0
    # every object pixel carries exactly its owner's colour (base, pattern or rim shade)
    for k, sh in enumerate(shapes):
        m = owner == k
        if not m.any():
            continue
        assert (maps["object"][m] == L[("object", sh.kind)]).all()
        assert (maps["color"][m] == L[("color", sh.color)]).all()
        assert (maps["texture"][m] == L[("texture", sh.texture)]).all()
        base = np.array(cw.COLORS[sh.color], float)
        plain = m & ~maps["pattern"] & ~maps["rim"]
        assert np.allclose(clean[plain], base)
        assert np.allclose(clean[m & maps["rim"]], cw.shade(sh.color, cw.RIM_MIX))
        assert np.allclose(clean[m & maps["pattern"]], cw.shade(sh.color, cw.PATTERN_MIX))
        # rim pixels exist only for outlined shapes, and are labelled 'rim'
        if not sh.outlined:
            assert not maps["rim"][m].any()
        assert ((maps["part_1"] == L[("part", "rim")]) == maps["rim"]).all()
        # top/bottom half split at the shape's centre row
        yy = np.mgrid[0:64, 0:64][0] + 0.5
        top = m & (yy < sh.cy)
        assert (maps["part_2"][top] == L[("part", "top-half")]).all()
        assert (maps["part_2"][m & ~top] == L[("part", "bottom-half")]).all()
        if sh.kind not in ("star", "cross"):
            assert set(np.unique(maps["part_1"][m])) <= {L[("part", "rim")], L[("part", "body")]}
    # parts (and textures) are sub-regions of objects; background is the scene's colour
    for key in ("part_1", "part_2", "texture"):
        assert ((maps[key] > 0) == on).all()
    assert ((maps["object"] > 0) == on).all()
    assert (maps["color"][~on] == L[("color", cw.SCENE_COLOR[r["scene"]])]).all()
    # the saved image is the drawing plus bounded noise
    err = r["image"].astype(float) - np.clip(np.round(clean), 0, 255)
    assert np.abs(err).mean() < 2 * cw.NOISE_STD
    # the main object is the class and is visible
    assert shapes[r["main"]].kind == cw.CLASSES[r["label"]]
    assert (owner == r["main"]).sum() > 20


def test_reader_returns_the_drawing_at_segmentation_size(cw_root):
    ds = BrodenDataset(cw_root)
    assert ds.categories == cw.CATEGORIES
    assert ds.pixel_categories == ["color", "object", "part", "texture"]
    assert ds.image_categories == ["scene"]
    assert ds.class_names == cw.CLASSES and ds.num_classes == 10
    seg = SIZE // 2
    rows = 2 * np.arange(seg) + 1  # PIL nearest for a factor of 2
    for i in range(0, N, 5):
        r = cw.render(i, SIZE, 3, "probe")
        s = ds.load_segmentation(i)
        assert ds.seg_size(i) == (seg, seg) and s.size == (seg, seg)
        assert ds.labels[i] == r["label"]
        assert np.array_equal(np.asarray(ds.load_image(i)), r["image"])
        for cat, keys in [("color", ["color"]), ("object", ["object"]),
                          ("part", ["part_1", "part_2"]), ("texture", ["texture"])]:
            want = np.stack([r["maps"][k][np.ix_(rows, rows)] for k in keys])
            assert s.pixel[cat].dtype == np.int64
            assert np.array_equal(s.pixel[cat], want)
        assert s.image["scene"].tolist() == [cw.LABEL_NUMBER[("scene", r["scene"])]]
        # pixels labelled with a colour have that colour in the saved image (up to noise)
        img = np.asarray(ds.load_image(i)).astype(float)[np.ix_(rows, rows)]
        plain = (r["maps"]["owner"] >= 0) & ~r["maps"]["pattern"] & ~r["maps"]["rim"]
        plain = plain[np.ix_(rows, rows)]
        for num in np.unique(s.pixel["color"][0][plain]):
            name = ds.label_names[num]
            got = np.median(img[plain & (s.pixel["color"][0] == num)], axis=0)
            assert np.abs(got - np.array(cw.COLORS[name])).max() <= 12, name


def test_label_statistics_are_correct(cw_root):
    ds = BrodenDataset(cw_root)
    counts = np.zeros(ds.num_labels, int)
    cover = np.zeros(ds.num_labels)
    for i in range(len(ds)):
        s = ds.load_segmentation(i)
        for planes in s.pixel.values():
            for plane in planes:
                u, c = np.unique(plane, return_counts=True)
                counts[u[u > 0]] += 1
                cover[u[u > 0]] += c[u > 0] / plane.size
        for nums in s.image.values():
            counts[nums] += 1
            cover[nums] += 1.0
    table = ds.label_table.set_index("number")
    assert (table["frequency"].to_numpy() == counts[1:]).all()
    assert np.allclose(table["coverage"].to_numpy(), cover[1:], atol=1e-5)
    with open(cw_root / "category.csv") as f:
        cats = list(csv.DictReader(f))
    assert [c["name"] for c in cats] == cw.CATEGORIES
    for c in cats:
        nums = table.index[table["category"] == c["name"]]
        assert int(c["first"]) == nums.min() and int(c["last"]) == nums.max()
        assert int(c["count"]) == len(nums)
        assert int(c["frequency"]) == counts[nums].sum()


def test_class_balance_and_partial_correlations():
    n = 300
    labels, pref_scene, pref_color = [], 0, 0
    for i in range(n):
        info = cw.sample_scene(i, 64, 0, "train")
        cls = cw.CLASSES[info["label"]]
        labels.append(info["label"])
        pref_scene += info["scene"] == cw.PREFERRED_SCENE[cls]
        pref_color += info["shapes"][info["main"]].color == cw.PREFERRED_COLOR[cls]
    assert set(labels) == set(range(10))
    assert max(np.bincount(labels)) < 3 * n / 10
    # correlated (well above chance 1/5 and 1/11) but far from a shortcut
    assert 0.3 < pref_scene / n < 0.75
    assert 0.2 < pref_color / n < 0.6


def test_builtin_spec_uses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERPTOOL_DATA", str(tmp_path))
    ds = open_dataset("builtin:concept-world?n=6&size=32&seed=2&split=eval")
    assert isinstance(ds, BrodenDataset) and len(ds) == 6
    assert ds.root.parent == tmp_path / "concept-world"
    again = open_dataset("builtin:concept-world?seed=2&split=eval&size=32&n=6")
    assert again.root == ds.root and again.fingerprint == ds.fingerprint
    with pytest.raises(DataError, match="unknown parameter 'colour'"):
        open_dataset("builtin:concept-world?n=6&colour=1")
    with pytest.raises(DataError, match="split"):
        open_dataset("builtin:concept-world?split=test")


def test_generator_version_1_is_frozen():
    """Weights and caches made before version 2 rely on version 1 (train split, 64 px, seed 0)
    never changing. Reference values recorded from version 1; pixel counts and sums get a
    small tolerance for last-bit differences of floating-point math between machines (a real
    change moves them far more)."""
    assert cw.DEFAULT_VERSION == 2 and cw.LATEST_VERSION == 2 and cw.VERSIONS == (1, 2)
    golden = [  # index: (label, scene, object pixels, sum of uint8 image values)
        (5, "sand", 832, 1987122),
        (6, "grass", 495, 1156709),
        (5, "sky", 1037, 2228503),
        (1, "sand", 698, 1659225),
    ]
    for i, (label, scene, area, total) in enumerate(golden):
        r = cw.render(i, 64, 0, "train")
        assert (r["label"], r["scene"]) == (label, scene), i
        assert abs(int((r["maps"]["object"] > 0).sum()) - area) <= 3, i
        assert abs(int(r["image"].astype(np.int64).sum()) - total) <= 2e-4 * total, i


# ------------------------------------------------------------------ version 1 stays reachable
def _content_digest(root: Path) -> str:
    """sha256 over relative names, decoded PNG pixels and the other files' bytes (PNG bytes
    themselves depend on the zlib inside Pillow; the pixels do not)."""
    import hashlib

    from PIL import Image

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(np.asarray(Image.open(p)).tobytes() if p.suffix == ".png" else p.read_bytes())
    return h.hexdigest()


def test_version_1_reproduces_the_sets_made_before_version_2(tmp_path, monkeypatch):
    """Known answer: digest and cache folder name of a version 1 set recorded with the
    generator as it was before version 2 existed (commit a14d53d)."""
    root = make_concept_world(tmp_path / "v1", n=12, size=32, seed=7, split="eval", version=1)
    assert _content_digest(root) == \
        "97cdecc8119fbed798e13bc964cdec02cedec9fbad1a9639e64eb26c414de7bd"
    # the cache folder of an old unversioned spec is the folder of version=1
    assert cw.params_hash(12, 32, 7, "eval", 1) == "1bd35b8abbf68d6e"
    assert cw.params_hash(1000, 64, 0, "probe", 1) == "9609c8f3ffe5f0be"
    monkeypatch.setenv("INTERPTOOL_DATA", str(tmp_path / "cache"))
    # an unversioned spec read back from an old cache opens version 1's cache folder
    old = open_dataset(recorded_spec("builtin:concept-world?n=5&size=32&seed=1&split=eval"))
    v1 = open_dataset("builtin:concept-world?version=1&n=5&size=32&seed=1&split=eval")
    v2 = open_dataset("builtin:concept-world?version=2&n=5&size=32&seed=1&split=eval")
    assert old.root == v1.root and old.fingerprint == v1.fingerprint
    assert v2.root != v1.root and v2.fingerprint != v1.fingerprint
    # a spec typed today without a version is version 2 (the default)
    new = open_dataset("builtin:concept-world?n=5&size=32&seed=1&split=eval")
    assert new.root == v2.root and new.fingerprint == v2.fingerprint
    assert v1.root.name == cw.params_hash(5, 32, 1, "eval", 1)
    assert len(v1.class_names) == 10 and len(v2.class_names) == 12
    with pytest.raises(DataError, match="version=3"):
        open_dataset("builtin:concept-world?version=3&n=5")


def test_version_2_digest_is_recorded(tmp_path):
    """Known answer: version 2 (the default) is as deterministic as version 1; a change to its
    drawing must come with a new version. Digest recorded when version 2 became the default."""
    root = make_concept_world(tmp_path / "v2", n=12, size=32, seed=7, split="eval", version=2)
    assert _content_digest(root) == \
        "8f128a631dbfe66ef86ae268faca65abe0a9779ab41fd6c9c89742e7aefbc711"
    assert cw.params_hash(12, 32, 7, "eval", 2) == "8b520cdc7262d70d"
    # the default (no version) is this same set
    assert _content_digest(make_concept_world(tmp_path / "default", n=12, size=32, seed=7,
                                              split="eval")) == _content_digest(root)


def test_canonical_and_recorded_specs(tmp_path, monkeypatch):
    """Data sets record their spec with the version written out; an unversioned
    concept-world spec read back from a file (made before version 2 was the default) is
    version 1."""
    assert canonical_spec("builtin:concept-world?n=200&size=64") == \
        "builtin:concept-world?version=2&n=200&size=64&seed=0&split=probe"
    assert canonical_spec(" builtin:concept-world?split=eval&version=1&n=07 ") == \
        "builtin:concept-world?version=1&n=7&size=64&seed=0&split=eval"
    assert canonical_spec("builtin:concept-world") == \
        "builtin:concept-world?version=2&n=1000&size=64&seed=0&split=probe"
    assert canonical_spec("broden:/x?split=a") == "broden:/x?split=a"
    with pytest.raises(DataError, match=r"data spec .*version=3.*expected one of 1, 2"):
        canonical_spec("builtin:concept-world?version=3")
    assert recorded_spec("builtin:concept-world?n=200&size=64") == \
        "builtin:concept-world?version=1&n=200&size=64"
    assert recorded_spec("builtin:concept-world") == "builtin:concept-world?version=1"
    for unchanged in ("builtin:concept-world?n=5&version=2", "imagefolder:/a?b", "",
                      "builtin:concept-world?n=5&&=", "builtin:other?n=1"):
        assert recorded_spec(unchanged) == unchanged
    monkeypatch.setenv("INTERPTOOL_DATA", str(tmp_path))
    ds = open_dataset("builtin:concept-world?seed=5&size=32&n=4")
    assert ds.spec == "builtin:concept-world?version=2&n=4&size=32&seed=5&split=probe"
    # round trip: the recorded spec reopens the very same set, also as read back from a file
    again = open_dataset(recorded_spec(ds.spec))
    assert again.root == ds.root and again.fingerprint == ds.fingerprint
    assert open_dataset("builtin:concept-world?version=1&n=4&size=32&seed=5").spec == \
        "builtin:concept-world?version=1&n=4&size=32&seed=5&split=probe"


def test_old_cache_with_an_unversioned_spec_is_read_as_version_1(tmp_path, monkeypatch):
    """The fault: a cache made before the flip records ``builtin:concept-world?n=..`` meaning
    version 1; reopened naively it would now draw version 2. The cache reader reports it as
    version 1, dissection's default probe matches it, and a version 2 request for the same
    file takes the ordinary mismatch path."""
    import h5py
    import torch

    from interptool.analyzers.dissection import Dissection
    from interptool.cache import ActivationCache, cache_activations
    from interptool.errors import CacheError
    from interptool.loading import load_model

    monkeypatch.setenv("INTERPTOOL_DATA", str(tmp_path / "data"))
    torch.manual_seed(0)
    loaded = load_model("interptool:cw-student", num_classes=10, image_size=(32, 32))
    v1 = open_dataset("builtin:concept-world?version=1&n=6&size=32&seed=1")
    path = cache_activations(loaded, v1, ["layer4"], tmp_path / "old.h5", batch_size=6)
    old_spec = "builtin:concept-world?n=6&size=32&seed=1"  # what the writer recorded then
    with h5py.File(path, "r+") as f:
        assert f.attrs["data_spec"] == "builtin:concept-world?version=1&n=6&size=32&seed=1&split=probe"
        f.attrs["data_spec"] = old_spec
    with ActivationCache(path) as c:
        assert c.attrs["data_spec"] == old_spec  # the raw record is kept
        assert c.data_spec == "builtin:concept-world?version=1&n=6&size=32&seed=1"
        reopened = open_dataset(c.data_spec)
        assert reopened.fingerprint == c.data_fingerprint and reopened.num_classes == 10
        # without the rule the same text means version 2 now: other images and labels
        assert open_dataset(old_spec).fingerprint != c.data_fingerprint
    # dissection's default probe is the cache's spec: it opens version 1 and aligns
    result = Dissection(quantile=0.05, checksum=False).run(path, "layer4")
    assert result.provenance["probe_fingerprint"] == v1.fingerprint
    assert result.provenance["probe_spec"] == v1.spec
    v2 = open_dataset("builtin:concept-world?n=6&size=32&seed=1")
    assert v2.spec.startswith("builtin:concept-world?version=2&")
    with pytest.raises(CacheError, match="data_fingerprint differs"):
        cache_activations(loaded, v2, ["layer4"], path, batch_size=6)


# ------------------------------------------------------------------------------ version 2
V2 = {"n": 16, "size": 32, "seed": 3, "version": 2}


@pytest.fixture(scope="module")
def v2_root(tmp_path_factory) -> Path:
    return make_concept_world(tmp_path_factory.mktemp("cw2") / "set", **V2)


def test_v2_same_seed_identical_other_seed_differs(v2_root, tmp_path):
    again = make_concept_world(tmp_path / "again", **V2)
    a, b = _files(v2_root), _files(again)
    assert a.keys() == b.keys() and len(a) == V2["n"] * 6 + 11
    assert all(a[k] == b[k] for k in a)
    assert BrodenDataset(again).fingerprint == BrodenDataset(v2_root).fingerprint
    other = make_concept_world(tmp_path / "seed4", **{**V2, "seed": 4})
    assert BrodenDataset(other).fingerprint != BrodenDataset(v2_root).fingerprint
    img = "images/concept-world/probe/00000.png"
    assert (other / img).read_bytes() != (v2_root / img).read_bytes()
    # a smaller n is a prefix; version 1 with the same parameters is another drawing
    small = make_concept_world(tmp_path / "small", **{**V2, "n": 3})
    for i in range(3):
        rel = f"images/concept-world/probe/{i:05d}.png"
        assert (small / rel).read_bytes() == (v2_root / rel).read_bytes()
    assert not np.array_equal(cw.render(0, 32, 3, "probe")["image"],
                              cw.render_v2(0, 32, 3, "probe")["image"])
    meta = (v2_root / "concept_world.json").read_text()
    assert '"generator": 2' in meta and '"superclasses"' in meta


def test_v2_reader_and_tables(v2_root):
    ds = BrodenDataset(v2_root)
    assert ds.categories == ["color", "object", "part", "texture", "scene"]
    assert ds.pixel_categories == ["color", "object", "part", "texture"]
    assert ds.image_categories == ["scene"]
    assert ds.class_names == cw.CLASSES_V2 and ds.num_classes == 12
    table = ds.label_table.set_index("number")
    assert len(table) == 11 + 12 + 6 + 5 + 16
    for cat, names in (("object", cw.CLASSES_V2), ("texture", cw.TEXTURES_V2),
                       ("scene", cw.SCENES_V2)):
        for name in names:
            num = cw.LABEL_NUMBER_V2[(cat, name)]
            assert ds.label_names[num] == name
            if table.loc[num, "frequency"] > 0:  # absent labels have no category count
                assert table.loc[num, "category"] == cat
    for i in range(0, V2["n"], 5):
        r = cw.render_v2(i, 32, 3, "probe")
        s = ds.load_segmentation(i)
        rows = 2 * np.arange(16) + 1  # PIL nearest for a factor of 2
        assert ds.labels[i] == r["label"]
        assert np.array_equal(s.pixel["texture"][0], r["maps"]["texture"][np.ix_(rows, rows)])
        assert s.image["scene"].tolist() == [cw.LABEL_NUMBER_V2[("scene", r["scene"])]]


@pytest.mark.parametrize("index", range(8))
def test_v2_masks_agree_with_the_drawing(index):
    r = cw.render_v2(index, 48, 11, "train")
    maps, clean, shapes = r["maps"], r["clean"], r["shapes"]
    owner = maps["owner"]
    L = cw.LABEL_NUMBER_V2
    on = owner >= 0
    for k, sh in enumerate(shapes):
        m = owner == k
        if not m.any():
            continue
        assert (maps["object"][m] == L[("object", sh.kind)]).all()
        assert (maps["color"][m] == L[("color", sh.color)]).all()
        # a texture region is the whole patterned object; plain objects carry no texture
        want = 0 if sh.texture == "plain" else L[("texture", sh.texture)]
        assert (maps["texture"][m] == want).all()
        assert sh.texture != "plain" or not maps["pattern"][m].any()
        plain = m & ~maps["pattern"] & ~maps["rim"]
        assert np.allclose(clean[plain], np.array(cw.COLORS[sh.color], float))
        assert np.allclose(clean[m & maps["pattern"]], cw.shade(sh.color, cw.PATTERN_MIX))
        assert np.allclose(clean[m & maps["rim"]], cw.shade(sh.color, cw.RIM_MIX))
        # an object never takes its background's colour (it could vanish)
        assert sh.color != cw.SCENE_COLOR_V2[r["scene"]]
    assert ((maps["object"] > 0) == on).all() and ((maps["part_1"] > 0) == on).all()
    assert (maps["texture"][~on] == 0).all()
    assert (maps["color"][~on] == L[("color", cw.SCENE_COLOR_V2[r["scene"]])]).all()
    assert shapes[r["main"]].kind == cw.CLASSES_V2[r["label"]]
    assert (owner == r["main"]).sum() > 40


def test_v2_new_shapes_geometry_independent():
    y, x = np.mgrid[0:64, 0:64] + 0.5
    # a half disk of radius 12, flat side down in image coordinates at angle 0 (v = y - cy)
    semi = cw.Shape("semicircle", 32.0, 32.0, 12.0, 0.0, 1.0, "red", "plain", False)
    d, _ = cw.shape_field_v2(semi, x, y)
    off = 4 * 12.0 / (3 * math.pi)
    want = ((x - 32) ** 2 + (y - 32 - off) ** 2 < 144) & (y - 32 < off)
    assert np.array_equal(d < 0, want)
    # its area is half the disk's (pi r^2 / 2 = 226) up to pixelisation
    assert abs(int(want.sum()) - 226) < 12
    # a regular pentagon with circumradius 1.1 r: area 5/2 R^2 sin(72 deg)
    pent = cw.Shape("pentagon", 32.0, 32.0, 12.0, 0.4, 1.0, "red", "plain", False)
    area = int((cw.shape_field_v2(pent, x, y)[0] < 0).sum())
    assert abs(area - 2.5 * (13.2**2) * math.sin(math.radians(72))) < 15


def test_v2_class_structure_and_scene_frequencies():
    """The documented probabilities, measured on 1200 draws (binomial sd <= 0.015)."""
    n = 1200
    labels, in_set, own_color, own_texture = [], 0, 0, 0
    scenes = []
    for i in range(n):
        info = cw.sample_scene_v2(i, 48, 0, "probe")
        cls = cw.CLASSES_V2[info["label"]]
        sup = cw.SUPERCLASS_OF_V2[cls]
        main = info["shapes"][info["main"]]
        labels.append(info["label"])
        scenes.append(info["scene"])
        in_set += info["scene"] in cw.SUPER_SCENES_V2[sup]
        own_color += main.color == cw.CLASS_COLOR_V2[cls]
        own_texture += main.texture == cw.CLASS_TEXTURE_V2[cls]
    counts = np.bincount(labels, minlength=12)
    assert counts.min() > 0.6 * n / 12 and counts.max() < 1.4 * n / 12
    # 0.75 + 0.25 * 4/16 = 0.8125; 0.8 + 0.2 * 1/6 = 0.833
    assert abs(in_set / n - 0.8125) < 0.05
    assert abs(own_texture / n - 0.8333) < 0.05
    # 0.8 unless the class colour is the background's (then any other colour)
    assert 0.65 < own_color / n < 0.85
    # every scene is rare enough that a unit can reach IoU 0.04 at quantile 0.005
    freq = np.array([scenes.count(s) for s in cw.SCENES_V2]) / n
    assert freq.min() > 0.03 and freq.max() < 0.005 / 0.04
    sim = cw.class_similarity_v2()
    assert np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1)
    i = {c: k for k, c in enumerate(cw.CLASSES_V2)}
    # siblings > cousins (shared texture or colour) > unrelated
    assert sim[i["circle"], i["ellipse"]] == pytest.approx(0.6)
    assert sim[i["circle"], i["star"]] == pytest.approx(0.2)  # dots
    assert sim[i["circle"], i["hexagon"]] == pytest.approx(0.2)  # yellow
    assert sim[i["diamond"], i["cross"]] == pytest.approx(0.4)  # grid and orange
    assert sim[i["circle"], i["rectangle"]] == 0.0
    # siblings never share their preferred colour or texture: only the superclass links them
    for members in cw.SUPERCLASSES_V2.values():
        assert len({cw.CLASS_COLOR_V2[c] for c in members}) == 3
        assert len({cw.CLASS_TEXTURE_V2[c] for c in members}) == 3


# ------------------------------------------------------- every concept can reach the threshold
def _oracle_cache(probe, path: Path, ceiling: bool) -> tuple[Path, list[int]]:
    """One unit per label: its mask at segmentation size (the whole image for a scene).
    ``ceiling``: mask * (1 + random tie-break), so that the top 0.5 % of positions are a
    subset of the label (per image for scenes), the best a unit can do at quantile 0.005."""
    from interptool.cache import write_cache

    rng = np.random.default_rng(0)
    labels = [j for j in range(1, probe.num_labels) if probe.label_category[j] >= 0]
    sh, sw = probe.seg_size(0)
    feats = np.zeros((len(probe), len(labels), sh, sw), np.float32)
    col = {j: k for k, j in enumerate(labels)}
    for i in range(len(probe)):
        seg = probe.load_segmentation(i)
        for planes in seg.pixel.values():
            for plane in planes:
                for j in np.unique(plane[plane > 0]):
                    feats[i, col[int(j)]][plane == j] = 1.0
        for nums in seg.image.values():
            for j in nums:
                feats[i, col[int(j)]] = 1.0
    if ceiling:
        scene = np.array([probe.categories[probe.label_category[j]] == "scene" for j in labels])
        tie = rng.random(feats.shape, dtype=np.float32)
        tie[:, scene] = rng.random((len(probe), int(scene.sum()), 1, 1), dtype=np.float32)
        feats = feats * (1 + tie)
    write_cache(path, logits=np.zeros((len(probe), 1)), ids=probe.ids,
                features={"oracle": feats},
                attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    return path, labels


def _unit_iou(res, labels) -> np.ndarray:
    """IoU of unit k with its own label, NetDissect-Lite's formula on the tallies."""
    out = []
    for u, j in enumerate(labels):
        c = res.label_category[j]
        inter = float(res.intersect[u, j])
        out.append(inter / (float(res.unit_cat_area[u, c]) + float(res.label_area[j]) - inter))
    return np.array(out)


def test_every_category_can_reach_the_detector_threshold(tmp_path):
    from interptool.analyzers import Dissection

    probe = BrodenDataset(make_concept_world(tmp_path / "probe", n=200, size=32, seed=0,
                                             version=2))
    cats = list(probe.categories)
    # a unit that copies a concept's mask scores 1 (quantile 0.99 puts its threshold at 0)
    path, labels = _oracle_cache(probe, tmp_path / "copy.h5", ceiling=False)
    res = Dissection(quantile=0.99, categories=cats).run(path, "oracle", probe)
    iou = _unit_iou(res, labels)
    assert iou.min() > 0.999, [probe.label_names[j] for j, v in zip(labels, iou) if v < 0.999]
    assert np.allclose(res.best_iou, iou)  # and it is each unit's best label
    # at the standard quantile 0.005, every category has labels a unit can detect
    path, labels = _oracle_cache(probe, tmp_path / "ceiling.h5", ceiling=True)
    res = Dissection(quantile=0.005, categories=cats).run(path, "oracle", probe)
    iou = _unit_iou(res, labels)
    cat_of = np.array([probe.categories[probe.label_category[j]] for j in labels])
    for cat in cats:
        assert iou[cat_of == cat].max() >= 0.04, cat
    # every scene, being image-level and rare enough, reaches it too
    assert iou[cat_of == "scene"].min() >= 0.04
