"""imagefolder / csv specs, bad images with and without skip_bad, manifests and data check."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from interptool.data import (
    CsvDataset,
    ImageFolderDataset,
    check_dataset,
    collate_skip_bad,
    list_manifests,
    load_manifest,
    make_concept_world,
    open_dataset,
)
from interptool.data._check import tomllib
from interptool.errors import DataError


def _png(path: Path, value: int, mode: str = "RGB", size=(5, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value // 2, 3)).save(path)


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    _png(root / "zebra" / "z1.png", 10)
    _png(root / "apple" / "b.png", 20)
    _png(root / "apple" / "sub" / "a.png", 30, mode="L")  # grayscale, nested
    _png(root / "mango" / "m.jpg", 40)
    (root / "mango" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()  # hidden folders are not classes (empty ones: test_data_hardening)
    return root


def test_imagefolder(folder):
    ds = open_dataset(f"imagefolder:{folder}")
    assert isinstance(ds, ImageFolderDataset)
    assert ds.class_names == ["apple", "mango", "zebra"]  # sorted; hidden folder is no class
    assert ds.ids == ["apple/b.png", "apple/sub/a.png", "mango/m.jpg", "zebra/z1.png"]
    assert ds.labels.tolist() == [0, 0, 1, 2] and ds.labels.dtype == np.int64
    assert ds.num_classes == 3 and len(ds) == 4
    im = ds.load_image(1)
    assert im.mode == "RGB" and np.asarray(im)[0, 0].tolist() == [30, 30, 30]
    assert ds.image_path(3) == folder / "zebra" / "z1.png"


def test_fingerprint_matches_across_specs_and_tracks_content(folder):
    a = open_dataset(f"imagefolder:{folder}")
    (folder / "list.csv").write_text(
        "path,label\n" + "".join(f"{i},{a.class_names[k]}\n" for i, k in zip(a.ids, a.labels))
    )
    b = open_dataset(f"csv:{folder / 'list.csv'}")
    assert b.ids == a.ids and b.labels.tolist() == a.labels.tolist()
    assert a.fingerprint == b.fingerprint and a.spec != b.spec
    assert a.fingerprint == open_dataset(str(folder)).fingerprint  # bare folder path
    (folder / "list.csv").write_text("path,label\napple/b.png,mango\n")
    assert open_dataset(f"csv:{folder / 'list.csv'}").fingerprint != a.fingerprint
    noise = np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "apple" / "b.png")  # same name, other content
    assert open_dataset(f"imagefolder:{folder}").fingerprint != a.fingerprint


def test_csv_labels_paths_and_classes(tmp_path):
    _png(tmp_path / "x" / "1.png", 1)
    _png(tmp_path / "x" / "2.png", 2)
    _png(tmp_path / "elsewhere" / "3.png", 3)
    f = tmp_path / "x" / "l.csv"
    f.write_text(f"label,path\n2,1.png\n,2.png\n0,{tmp_path / 'elsewhere' / '3.png'}\n")
    ds = open_dataset(f"csv:{f}")
    assert isinstance(ds, CsvDataset)
    assert ds.labels.tolist() == [2, -1, 0] and ds.class_names is None and ds.num_classes == 3
    assert ds.image_path(0) == tmp_path / "x" / "1.png"
    assert np.asarray(ds.load_image(2))[0, 0, 0] == 3  # absolute path outside the folder
    # names are numbered in sorted order, or in the order of classes.txt beside the CSV
    f.write_text("path,label\n1.png,dog\n2.png,cat\n")
    assert open_dataset(f"csv:{f}").labels.tolist() == [1, 0]
    (tmp_path / "x" / "classes.txt").write_text("dog\ncat\n")
    ds = open_dataset(f"csv:{f}")
    assert ds.labels.tolist() == [0, 1] and ds.class_names == ["dog", "cat"]
    f.write_text("path,label\n1.png,bird\n")
    with pytest.raises(DataError, match=r"line 2, column 'label': 'bird' is not a class"):
        open_dataset(f"csv:{f}")
    f.write_text("file,label\n1.png,0\n")
    with pytest.raises(DataError, match=r"l\.csv: header \['file', 'label'\] has no 'path'"):
        open_dataset(f"csv:{f}")
    f.write_text("path\n1.png\n2.png\n")  # labels are optional
    assert open_dataset(f"csv:{f}").labels.tolist() == [-1, -1]


def test_bad_image_with_and_without_skip_bad(folder):
    (folder / "apple" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = open_dataset(f"imagefolder:{folder}")
    bad = ds.ids.index("apple/broken.png")
    with pytest.raises(DataError, match=r"broken\.png .*cannot be decoded.*skip_bad"):
        ds.load_image(bad)

    def tf(im):
        return torch.from_numpy(np.array(im.resize((4, 4)))).permute(2, 0, 1).float()

    strict = ds.torch_dataset(tf)
    x, y, i = strict[0]
    assert x.shape == (3, 4, 4) and (y, i) == (0, 0)
    with pytest.raises(DataError, match="broken.png"):
        strict[bad]
    with pytest.raises(DataError):
        list(torch.utils.data.DataLoader(strict, batch_size=2))
    lenient = ds.torch_dataset(tf, skip_bad=True)
    assert lenient[bad] is None
    loader = torch.utils.data.DataLoader(lenient, batch_size=3, collate_fn=collate_skip_bad)
    seen, labels = [], []
    for batch in loader:
        xb, yb, ib = batch
        assert xb.shape[1:] == (3, 4, 4)
        seen += ib.tolist()
        labels += yb.tolist()
    assert seen == [k for k in range(len(ds)) if k != bad]
    assert labels == [int(ds.labels[k]) for k in seen]
    skipped = sorted(set(range(len(ds))) - set(seen))
    assert [ds.ids[k] for k in skipped] == ["apple/broken.png"]
    assert collate_skip_bad([None, None]) is None
    (folder / "mango" / "m.jpg").unlink()
    with pytest.raises(DataError, match=r"m\.jpg .*does not exist"):
        ds.load_image(ds.ids.index("mango/m.jpg"))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "empty data spec"),
        ("zip:/x", "unknown kind 'zip'"),
        ("imagefolder:", "path is empty"),
        ("imagefolder:/no/such/dir", "does not exist"),
        ("csv:/no/such.csv", "does not exist"),
        ("builtin:mnist", "unknown built-in set 'mnist'"),
        ("builtin:concept-world?n", "cannot parse"),
        ("builtin:concept-world?n=2&n=3", "given twice"),
        ("/no/such/thing", "no such folder or CSV"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(DataError, match=match):
        open_dataset(spec)


def test_imagefolder_errors(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no images"):
        open_dataset(f"imagefolder:{tmp_path / 'e'}")
    _png(tmp_path / "mix" / "cls" / "a.png", 1)
    _png(tmp_path / "mix" / "loose.png", 1)
    with pytest.raises(DataError, match="both class sub-folders and loose images"):
        open_dataset(f"imagefolder:{tmp_path / 'mix'}")
    _png(tmp_path / "flat" / "a.png", 1)
    flat = open_dataset(f"imagefolder:{tmp_path / 'flat'}")
    assert flat.labels.tolist() == [-1] and flat.class_names is None


# ------------------------------------------------------------------ manifests / check
def test_manifests_are_complete_and_honest():
    found = list_manifests()
    assert {"broden1_224", "broden1_227", "imagenet1k_val", "cifar10", "cifar100",
            "concept_world"} <= set(found)
    for name, path in found.items():
        m = load_manifest(name)
        raw = tomllib.loads(path.read_text())
        assert m["name"] == name and raw["format"] in ("broden", "imagefolder", "cifar-python")
        for key in ("url", "license", "title"):
            assert m.get(key), (name, key)
        for key in [k for k in raw if k.endswith("md5")]:  # archive checksums (informational)
            assert len(raw[key]) == 32 and int(raw[key], 16) >= 0, (name, key)
        for f in raw.get("file", []):
            if "sha256" in f:
                assert len(f["sha256"]) == 64 and int(f["sha256"], 16) >= 0
            if "md5" in f:
                assert len(f["md5"]) == 32 and int(f["md5"], 16) >= 0
    with pytest.raises(DataError, match="no data manifest named 'mnist'.*broden1_224"):
        load_manifest("mnist")


@pytest.fixture(scope="module")
def cw_copy(tmp_path_factory) -> Path:
    return make_concept_world(tmp_path_factory.mktemp("chk") / "cw", n=8, size=32, seed=1)


def _cli(*argv: str) -> int:
    from interptool.cli import _data

    parser = argparse.ArgumentParser(prog="interptool")
    _data.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_check_good_concept_world(cw_copy, capsys):
    rep = check_dataset("concept_world", cw_copy)
    assert rep.ok, rep.format()
    assert any("every image and mask file" in c for c in rep.checked)
    assert _cli("data", "check", "concept_world", str(cw_copy)) == 0
    assert "OK:" in capsys.readouterr().out


def test_check_broken_concept_world(cw_copy, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(cw_copy, broken)
    (broken / "images/concept-world/probe/00003_part_2.png").unlink()
    (broken / "images/concept-world/probe/00005.png").unlink()
    rep = check_dataset("concept_world", broken)
    assert not rep.ok
    assert rep.problems == [
        "images/concept-world/probe/00003_part_2.png: missing (part of index.csv line 5)",
        "images/concept-world/probe/00005.png: missing (image of index.csv line 7)",
    ]
    assert _cli("data", "check", "concept_world", str(broken)) == 2
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "00003_part_2.png" in out and "2 problem(s)" in out
    # a malformed CSV and a missing file are named precisely
    text = (broken / "c_color.csv").read_text()
    (broken / "c_color.csv").write_text(text.replace("code,number", "code,num", 1))
    (broken / "classes.txt").unlink()
    probs = check_dataset("concept_world", broken).problems
    assert "c_color.csv: header code,num,name,frequency,coverage; expected it to start with " \
           "code,number,name,frequency,coverage" in probs
    assert any(p.startswith("classes.txt: missing") for p in probs)
    assert check_dataset("cifar10", tmp_path).problems[0].startswith("data_batch_1: missing")
    assert not check_dataset("concept_world", tmp_path / "nope").ok


def test_check_checksums(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch", "batches.meta"]:
        (d / name).write_bytes(b"fake")
    rep = check_dataset("cifar10", tmp_path)  # descends into cifar-10-batches-py/
    assert len(rep.problems) == 7
    assert rep.problems[0].startswith("data_batch_1: md5 ") and "c99cafc1" in rep.problems[0]
    good = tmp_path / "m.toml"
    import hashlib

    good.write_text(f'name = "mine"\nformat = "csv"\n[[file]]\npath = "cifar-10-batches-py/'
                    f'test_batch"\nsha256 = "{hashlib.sha256(b"fake").hexdigest()}"\n'
                    "[[dir]]\npath = \"cifar-10-batches-py\"\nglob = \"*\"\ncount = 7\n")
    rep = check_dataset(str(good), tmp_path)
    assert rep.ok, rep.problems
    assert "cifar-10-batches-py/: 7 files matching *" in rep.checked
    # a wrong count is a problem and is not also listed as checked
    good.write_text(good.read_text().replace("count = 7", "count = 8"))
    rep = check_dataset(str(good), tmp_path)
    assert rep.problems == ["cifar-10-batches-py/: 7 files matching *, expected 8"]
    assert not any("matching" in c for c in rep.checked)


def test_cli_make_and_info(tmp_path, capsys):
    out = tmp_path / "made"
    assert _cli("data", "make", "concept-world", "--out", str(out), "--n", "3", "--size",
                "32", "--seed", "9", "--split", "train") == 0
    assert f"broden:{out}" in capsys.readouterr().out
    assert _cli("data", "info", f"broden:{out}") == 0
    assert '"n": 3' in capsys.readouterr().out
    with pytest.raises(DataError, match="overwrite"):
        _cli("data", "make", "concept-world", "--out", str(out), "--n", "4", "--size", "32")


@pytest.mark.parametrize("flag, version, classes", [(None, 2, 12), ("1", 1, 10), ("2", 2, 12)])
def test_cli_make_version(tmp_path, capsys, flag, version, classes):
    """`interptool data make --version`: default 2; the version made is the one recorded in
    concept_world.json (as 'generator') and said on stdout, with its own class list."""
    import json

    from interptool.cli import main

    out = tmp_path / "made"
    argv = ["data", "make", "concept-world", "--out", str(out), "--n", "3", "--size", "32"]
    assert main(argv + ([] if flag is None else ["--version", flag])) == 0
    assert f"concept-world version {version} " in capsys.readouterr().out
    meta = json.loads((out / "concept_world.json").read_text())
    assert meta["generator"] == version and meta["complete"] is True
    assert len((out / "classes.txt").read_text().split()) == classes
    assert len(list((out / "images" / "concept-world" / "probe").glob("*.png"))) == 3 * 6
    # the files are those of the library call with that version
    ref = make_concept_world(tmp_path / "ref", n=3, size=32, version=version)
    assert (out / "index.csv").read_bytes() == (ref / "index.csv").read_bytes()
    assert (out / "label.csv").read_bytes() == (ref / "label.csv").read_bytes()


@pytest.mark.parametrize("bad", ["3", "0", "two"])
def test_cli_make_bad_version(tmp_path, capsys, bad):
    from interptool.cli import main

    rc = main(["data", "make", "concept-world", "--out", str(tmp_path / "x"), "--n", "2",
               "--version", bad])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("interptool data: error: concept-world: version"), err
    assert f"version={bad}" in err or f"version='{bad}'" in err
    assert not (tmp_path / "x").exists()


def test_cli_help_default_version_is_the_library_default():
    from interptool.cli import _data
    from interptool.data import _concept_world as cw

    assert _data.HELP_DEFAULT_VERSION == cw.DEFAULT_VERSION


def test_csv_accepts_concept_world_labels_csv(tmp_path):
    from interptool.data import make_concept_world, open_dataset

    root = make_concept_world(tmp_path / "cw", n=12, size=32, seed=3, split="eval")
    cw = open_dataset(f"broden:{root}")
    ds = open_dataset(f"csv:{root / 'labels.csv'}")
    assert len(ds) == len(cw) == 12
    # same images in the same order, same labels, and the pixels load
    assert [ds.image_path(i).resolve() for i in range(12)] == [
        cw.image_path(i).resolve() for i in range(12)
    ]
    assert list(ds.labels) == list(cw.labels)
    assert ds.load_image(0).size == (32, 32)


def test_bare_path_kind_is_inferred_and_said(tmp_path, capsys):
    from PIL import Image

    from interptool.data import BrodenDataset, open_dataset
    from interptool.data._folder import ImageFolderDataset

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "imgs" / "cat" / "a.png")
    ds = open_dataset(str(tmp_path / "imgs"))
    assert isinstance(ds, ImageFolderDataset) and not isinstance(ds, BrodenDataset)
    assert f"read as imagefolder:{tmp_path / 'imgs'}" in capsys.readouterr().err
    # with the prefix nothing is said
    open_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    assert capsys.readouterr().err == ""
