"""Untrusted and careless data sets (issue 11): Broden paths that leave the data set root,
empty class folders, and 16-bit images that used to decode as all white."""

from __future__ import annotations

import argparse
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from interptool.data import BrodenDataset, check_dataset, make_concept_world, open_dataset
from interptool.data._base import to_rgb8
from interptool.data._broden import UnsafePathError, lexical_escape
from interptool.errors import DataError


def _cli(*argv: str) -> int:
    from interptool.cli import _data

    parser = argparse.ArgumentParser(prog="interptool")
    _data.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


# ------------------------------------------------------------------ Broden paths
@pytest.fixture(scope="module")
def cw_master(tmp_path_factory) -> Path:
    return make_concept_world(tmp_path_factory.mktemp("cwh") / "cw", n=3, size=16, seed=1)


@pytest.fixture()
def cw(cw_master, tmp_path) -> Path:
    root = tmp_path / "cw"
    shutil.copytree(cw_master, root)
    return root


def _edit_index(root: Path, line: int, column: str, value: str) -> None:
    """Replace one cell of index.csv (line numbers count the header as line 1)."""
    rows = [r.split(",") for r in (root / "index.csv").read_text().splitlines()]
    rows[line - 1][rows[0].index(column)] = value
    (root / "index.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")


def test_lexical_escape_rules():
    assert lexical_escape("a/b.png") is None
    assert lexical_escape("a/../b.png") is None
    assert lexical_escape("../labels.csv") is None  # ROOT/labels.csv: still inside the root
    assert lexical_escape("../../x.png") == "climbs out of the data set root with '..'"
    assert lexical_escape("a/../../../x.png") is not None
    assert lexical_escape("/etc/passwd") == "is an absolute path"
    assert lexical_escape("C:\\Windows\\x.png") == "is an absolute path"
    assert lexical_escape("\\\\server\\share\\x.png") == "is an absolute path"
    assert lexical_escape("..\\..\\x.png") is not None


def test_absolute_image_path_is_refused_with_line_and_column(cw, capsys):
    # before the fix this opened /etc/passwd as an image and `data check` said OK
    _edit_index(cw, 3, "image", "/etc/passwd")
    with pytest.raises(DataError) as err:
        BrodenDataset(cw)
    msg = str(err.value)
    assert f"{cw / 'index.csv'}, line 3, column 'image': '/etc/passwd' is an absolute path" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match="line 3, column 'image'"):
        open_dataset(f"broden:{cw}")
    rep = check_dataset("concept_world", cw)
    assert not rep.ok
    assert len(rep.problems) == 1 and "line 3, column 'image'" in rep.problems[0]
    assert rep.problems[0].startswith("path outside the data set: ")
    assert _cli("data", "check", "concept_world", str(cw)) == 2
    assert "/etc/passwd" in capsys.readouterr().out


def test_dotdot_mask_paths_are_refused_and_all_listed_by_check(cw):
    _edit_index(cw, 2, "object", "../../secret.png")
    _edit_index(cw, 4, "part", "concept-world/probe/00002_part_1.png;../../../x.png")
    with pytest.raises(UnsafePathError) as err:
        BrodenDataset(cw)
    assert "line 2, column 'object': '../../secret.png' climbs out" in str(err.value)
    assert "(1 more such cells)" in str(err.value)
    assert len(err.value.problems) == 2
    assert "line 4, column 'part': '../../../x.png'" in err.value.problems[1]
    # every split: a bad row outside the requested split still marks the file as hostile
    with pytest.raises(UnsafePathError):
        BrodenDataset(cw, split="probe")
    rep = check_dataset("concept_world", cw)
    assert [p.split(": '")[0].rsplit(", ", 2)[1:] for p in rep.problems] == [
        ["line 2", "column 'object'"], ["line 4", "column 'part'"]]
    # a `..` that stays inside the root is not an escape (the file is only missing)
    _edit_index(cw, 2, "object", "concept-world/../concept-world/probe/00000_object.png")
    _edit_index(cw, 4, "part", "concept-world/probe/00002_part_1.png")
    ds = BrodenDataset(cw)
    assert ds.load_segmentation(0).pixel["object"].shape == (1, 8, 8)


def test_symlink_escapes_are_refused_on_load_and_reported_by_check(cw, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(outside / "img.png")
    Image.new("RGB", (8, 8), (1, 0, 0)).save(outside / "mask.png")
    probe = cw / "images" / "concept-world" / "probe"
    (probe / "00001.png").unlink()
    (probe / "00001.png").symlink_to(outside / "img.png")
    (probe / "00002_color.png").unlink()
    (probe / "00002_color.png").symlink_to(outside / "mask.png")
    ds = BrodenDataset(cw)  # the text of index.csv is fine: only resolving shows the escape
    assert np.asarray(ds.load_image(0)).shape == (16, 16, 3)
    with pytest.raises(DataError) as err:
        ds.load_image(1)
    assert f"index.csv, line 3, column 'image': {probe / '00001.png'} resolves to " \
           f"{(outside / 'img.png').resolve()}, outside the data set root" in str(err.value)
    with pytest.raises(DataError, match="line 4, column 'color'.*resolves to"):
        ds.load_segmentation(2)
    # skip_bad treats it as a bad image, like any other refused file
    assert ds.torch_dataset(None, skip_bad=True)[1] is None
    rep = check_dataset("concept_world", cw)
    assert rep.problems == [
        f"path outside the data set: images/concept-world/probe/00001.png (image of index.csv "
        f"line 3) resolves to {(outside / 'img.png').resolve()}, outside {cw}",
        f"path outside the data set: images/concept-world/probe/00002_color.png (color of "
        f"index.csv line 4) resolves to {(outside / 'mask.png').resolve()}, outside {cw}",
    ]


def test_images_folder_may_link_to_other_storage(cw, tmp_path):
    """A common layout: ROOT/images is a symlink to a big disk. Files in it are inside."""
    store = tmp_path / "bigdisk" / "images"
    shutil.move(str(cw / "images"), store)
    (cw / "images").symlink_to(store, target_is_directory=True)
    ds = BrodenDataset(cw)
    assert np.asarray(ds.load_image(2)).shape == (16, 16, 3)
    assert ds.load_segmentation(2).pixel["color"].shape == (1, 8, 8)
    assert check_dataset("concept_world", cw).ok


def test_every_escape_is_refused_while_folders_are_resolved_once(cw, tmp_path, monkeypatch):
    """The cheap check (one realpath per folder, one lstat per file) refuses what resolving
    every path refused: a mask linking outside, a folder linking outside, an absolute path
    and a `..` path; and it resolves each folder once, not each of its files."""
    import os

    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (1, 0, 0)).save(outside / "mask.png")
    probe = cw / "images" / "concept-world" / "probe"
    # 1. a mask file that is a symlink out of the root
    (probe / "00000_color.png").unlink()
    (probe / "00000_color.png").symlink_to(outside / "mask.png")
    # 2. a folder that is a symlink out of the root: a regular file inside it still escapes
    shutil.copytree(probe, outside / "copy")
    (cw / "images" / "linked").symlink_to(outside / "copy", target_is_directory=True)
    _edit_index(cw, 3, "color", "linked/00001_color.png")
    # a folder linking elsewhere inside the root is fine
    (cw / "images" / "alias").symlink_to(probe, target_is_directory=True)
    _edit_index(cw, 4, "color", "alias/00002_color.png")
    ds = BrodenDataset(cw)
    with pytest.raises(DataError, match=r"line 2, column 'color'.*resolves to .*outside/mask"):
        ds.load_segmentation(0)
    with pytest.raises(DataError, match=r"line 3, column 'color'.*resolves to .*outside/copy/"):
        ds.load_segmentation(1)
    assert ds.load_segmentation(2).pixel["color"].shape == (1, 8, 8)
    assert ds.resolve_escape(cw / "images" / "linked" / "00001_color.png") == str(
        (outside / "copy" / "00001_color.png").resolve())
    # a folder reached through `..` from a linked folder is resolved as the kernel would
    assert ds.resolve_escape(cw / "images" / "linked" / ".." / "concept-world" / "x.png") \
        == str((outside / "concept-world" / "x.png").resolve())
    # 3. an absolute path and 4. a `..` path are refused from the text of index.csv
    for value, why in (("/etc/passwd", "is an absolute path"),
                       ("../../secret.png", "climbs out of the data set root")):
        _edit_index(cw, 2, "object", value)
        with pytest.raises(UnsafePathError, match=f"line 2, column 'object': '{value}' {why}"):
            BrodenDataset(cw)
    _edit_index(cw, 2, "object", "concept-world/probe/00000_object.png")
    _edit_index(cw, 2, "color", "concept-world/probe/00000_object.png")
    _edit_index(cw, 3, "color", "concept-world/probe/00001_color.png")

    calls: list[str] = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, **k: calls.append(str(p)) or real(p, **k))
    ds = BrodenDataset(cw)
    for i in range(len(ds)):
        ds.load_segmentation(i)
    n_masks = sum(len(fs) for i in range(len(ds)) for fs in ds.mask_files(i).values())
    # root, images/, and each folder once (probe/ and alias/): not once per mask file
    assert n_masks >= 9
    assert sorted(calls) == sorted(str(p) for p in (cw, cw / "images", probe,
                                                      cw / "images" / "alias"))


# ------------------------------------------------------------------ empty class folders
def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, value, value)).save(path)


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = tmp_path / "imgs"
    for k, name in enumerate(["a", "c", "d"]):
        _png(root / name / f"{k}.png", 10 * k)
    (root / "b").mkdir()  # class 1 of a 4-class model, no images in this copy
    (root / "b" / "README.txt").write_text("not an image")
    with pytest.raises(DataError) as err:
        open_dataset(f"imagefolder:{root}")
    msg = str(err.value)
    assert f"class folder {root / 'b'} holds no images" in msg and "allow_empty=1" in msg
    # the explicit option keeps every class at its sorted position: c stays 2, d stays 3
    ds = open_dataset(f"imagefolder:{root}?allow_empty=1")
    assert ds.class_names == ["a", "b", "c", "d"] and ds.num_classes == 4
    assert ds.ids == ["a/0.png", "c/1.png", "d/2.png"]
    assert ds.labels.tolist() == [0, 2, 3]
    assert ds.spec.endswith("?allow_empty=1")
    with pytest.raises(DataError, match="holds no images"):
        open_dataset(f"imagefolder:{root}?allow_empty=0")
    with pytest.raises(DataError, match="allow_empty='maybe'; expected 1 or 0"):
        open_dataset(f"imagefolder:{root}?allow_empty=maybe")
    with pytest.raises(DataError, match="unknown parameter 'split'"):
        open_dataset(f"imagefolder:{root}?split=x")
    (root / "e").mkdir()
    with pytest.raises(DataError, match=r"b holds no images .*\(also empty: e\), so"):
        open_dataset(f"imagefolder:{root}")


# ------------------------------------------------------------------ 16-bit images
def _png_bytes(width: int, height: int, color_type: int, samples: np.ndarray) -> bytes:
    """A 16-bit PNG written from the format definition (not by Pillow): ``samples`` is
    (H, W) for grayscale (colour type 0) or (H, W, 3) for RGB (colour type 2)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)  # filter 0
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


VALUES16 = np.array([[0, 255, 256, 511], [4096, 32768, 40000, 65535]], dtype=np.uint16)
# v >> 8, computed by hand: 0,0,1,1 / 16,128,156,255
EXPECTED8 = np.array([[0, 0, 1, 1], [16, 128, 156, 255]], dtype=np.uint8)


def test_16bit_grayscale_png_is_scaled_not_saturated(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "g16.png").write_bytes(_png_bytes(4, 2, 0, VALUES16))
    with Image.open(root / "g16.png") as im:
        assert im.mode.startswith("I")  # Pillow's own convert("RGB") clips these to 255
        assert np.asarray(im.convert("RGB"))[1, 0, 0] == 255
    ds = open_dataset(f"imagefolder:{root}")
    rgb = np.asarray(ds.load_image(0))
    assert rgb.shape == (2, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], EXPECTED8)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_wide_modes_scale_by_the_high_byte(mode):
    arr = VALUES16.astype({"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode])
    im = Image.frombytes(mode, (4, 2), arr.tobytes(), "raw", mode if mode != "I" else "I")
    assert im.mode == mode
    np.testing.assert_array_equal(np.asarray(to_rgb8(im))[..., 1], EXPECTED8)


def test_32bit_integer_image_out_of_16bit_range_is_refused(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(root / "wide.tif")
    ds = open_dataset(f"imagefolder:{root}")
    with pytest.raises(DataError, match=r"wide\.tif .*32-bit integer pixels from 0 to 70000"):
        ds.load_image(0)


def test_16bit_rgb_png_keeps_the_high_byte(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rgb16 = np.stack([VALUES16, VALUES16[::-1], np.full_like(VALUES16, 0x1234)], axis=-1)
    (root / "c48.png").write_bytes(_png_bytes(4, 2, 2, rgb16))
    rgb = np.asarray(open_dataset(f"imagefolder:{root}").load_image(0))
    np.testing.assert_array_equal(rgb[..., 0], EXPECTED8)
    np.testing.assert_array_equal(rgb[..., 1], EXPECTED8[::-1])
    assert (rgb[..., 2] == 0x12).all()
