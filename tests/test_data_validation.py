"""Untrusted data sets: malformed CSVs, labels and masks are refused with a one-line
DataError naming the file (and line/column), never read into silently wrong labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from interptool.data import BrodenDataset, open_dataset
from interptool.errors import DataError

S = 4  # segmentation side


def _png(path: Path, value: int = 0, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def _mask(path: Path, labels: np.ndarray) -> None:
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0] = labels & 0xFF
    rgb[..., 1] = labels >> 8
    Image.fromarray(rgb, "RGB").save(path)


INDEX = ("image,split,ih,iw,sh,sw,object,scene\n"
         f"a.png,probe,8,8,{S},{S},a_object.png,3\n"
         f"b.png,probe,8,8,{S},{S},b_object.png,3\n")


def make_broden(root: Path) -> Path:
    """Two images, categories object (pixel) and scene (image-level), labels 1..3."""
    for k, name in enumerate("ab"):
        _png(root / "images" / f"{name}.png", 40 * k)
        _mask(root / "images" / f"{name}_object.png", np.full((S, S), 1 + k, np.int64))
    (root / "index.csv").write_text(INDEX)
    (root / "category.csv").write_text("name,first,last,count,frequency\n"
                                       "object,1,2,2,2\nscene,3,3,1,2\n")
    (root / "label.csv").write_text("number,name,category,frequency,coverage,syns\n"
                                    "1,dog,object(1),1,0.5,\n2,cat,object(1),1,0.5,\n"
                                    "3,beach,scene(2),2,1.0,\n")
    (root / "labels.csv").write_text("image,label\na.png,0\nb.png,1\n")
    (root / "classes.txt").write_text("indoor\noutdoor\n")
    return root


@pytest.fixture()
def broden(tmp_path) -> Path:
    return make_broden(tmp_path / "br")


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text)
    path.write_text(text.replace(old, new, 1))


def _cli_error(argv: list[str], capsys) -> str:
    """Run the CLI expecting exit 2 with exactly one line on stderr and no traceback."""
    from interptool.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


def test_broden_sanity(broden):
    ds = BrodenDataset(broden)
    assert ds.labels.tolist() == [0, 1] and ds.class_names == ["indoor", "outdoor"]
    seg = ds.load_segmentation(1)
    assert seg.pixel["object"].tolist() == [np.full((S, S), 2).tolist()]
    assert seg.image["scene"].tolist() == [3]


# ------------------------------------------------------------------ 1. repeated columns
@pytest.mark.parametrize("file, old, new, column", [
    ("index.csv", "object,scene\n", "object,object\n", "object"),
    ("index.csv", "object,scene\n", "object,split\n", "split"),
    ("label.csv", "coverage,syns", "coverage,name", "name"),
    ("category.csv", "count,frequency", "count,name", "name"),
    ("labels.csv", "image,label\n", "image,label,label\n", "label"),
])
def test_broden_repeated_header_column(broden, file, old, new, column):
    _edit(broden / file, old, new)
    with pytest.raises(DataError) as exc:
        BrodenDataset(broden)
    msg = str(exc.value)
    assert f"{broden / file}: header " in msg and f"column {column!r} twice" in msg
    assert "\n" not in msg


def test_broden_repeated_category_column_via_cli(broden, capsys):
    _edit(broden / "index.csv", "object,scene\n", "object,object\n")
    line = _cli_error(["data", "info", f"broden:{broden}"], capsys)
    assert f"{broden / 'index.csv'}: header image,split,ih,iw,sh,sw,object,object" in line
    assert "'object' twice" in line


def test_broden_unnamed_middle_column_does_not_shift_categories(broden):
    _edit(broden / "index.csv", "object,scene\n", "object,,scene\n")
    with pytest.raises(DataError, match=r"index\.csv: header .*column 8 has no name"):
        BrodenDataset(broden)


@pytest.mark.parametrize("header", ["path,label,label", "path,path,label"])
def test_csv_list_repeated_column(tmp_path, header):
    _png(tmp_path / "a.png")
    f = tmp_path / "list.csv"
    f.write_text(f"{header}\na.png,{'0,1' if header.endswith('label,label') else 'a.png,0'}\n")
    with pytest.raises(DataError) as exc:
        open_dataset(f"csv:{f}")
    col = "label" if header.endswith("label,label") else "path"
    assert f"{f}: header " in str(exc.value) and f"column {col!r} twice" in str(exc.value)


# --------------------------------------------------------- 2. mixed integer / name labels
def test_csv_mixed_integer_and_name_labels(tmp_path, capsys):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    f = tmp_path / "list.csv"
    f.write_text("path,label\na.png,5\nb.png,cat\n")
    with pytest.raises(DataError) as exc:
        open_dataset(f"csv:{f}")
    msg = str(exc.value)
    assert f"{f}, line 3, column 'label': 'cat'" in msg and "line 2" in msg and "'5'" in msg
    line = _cli_error(["data", "info", f"csv:{f}"], capsys)
    assert f"{f}, line 3, column 'label'" in line


def test_csv_mixed_labels_with_classes_txt(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    f = tmp_path / "list.csv"
    f.write_text("path,label\na.png,cat\n\nb.png,1\n")  # blank line: b.png is on line 4
    with pytest.raises(DataError, match=rf"{f}, line 4, column 'label': '1' is an integer"):
        open_dataset(f"csv:{f}")


def test_csv_pure_columns_keep_working(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    f = tmp_path / "list.csv"
    f.write_text("path,label\na.png,5\nb.png,\n")
    assert open_dataset(f"csv:{f}").labels.tolist() == [5, -1]
    f.write_text("path,label\na.png,zebra\nb.png,cat\n")
    ds = open_dataset(f"csv:{f}")
    assert ds.labels.tolist() == [1, 0] and ds.class_names == ["cat", "zebra"]


def test_csv_decimal_labels_are_not_class_names(tmp_path):
    # pandas writes 1.0, 0.0 for an integer column with empty cells: those are the integers
    # (numbering them as names would shift every label); 1.5 is neither an index nor a name
    for name in "abc":
        _png(tmp_path / f"{name}.png")
    f = tmp_path / "list.csv"
    f.write_text(",path,label\n0,a.png,1.0\n1,b.png,\n2,c.png,0.0\n")
    assert open_dataset(f"csv:{f}").labels.tolist() == [1, -1, 0]
    f.write_text("path,label\na.png,1.5\nb.png,2.5\n")
    with pytest.raises(DataError, match=rf"{f}, line 2, column 'label': '1\.5' is a number "
                                        "but not an integer"):
        open_dataset(f"csv:{f}")
    (tmp_path / "classes.txt").write_text("1.5\n2.5\n")  # listed as names: read as names
    assert open_dataset(f"csv:{f}").labels.tolist() == [0, 1]


def test_csv_names_that_look_like_numbers_listed_in_classes_txt(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "classes.txt").write_text("007\n010\ncat\n")
    f = tmp_path / "list.csv"
    f.write_text("path,label\na.png,007\na.png,cat\n")
    ds = open_dataset(f"csv:{f}")
    assert ds.labels.tolist() == [0, 2] and ds.class_names == ["007", "010", "cat"]


def test_csv_integer_label_that_is_also_another_class_name(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "classes.txt").write_text("1\n0\n")
    f = tmp_path / "list.csv"
    f.write_text("path,label\na.png,1\n")
    with pytest.raises(DataError, match=rf"{f}, line 2, column 'label': '1' is class index 1 "
                                        r"but also the name of class 0"):
        open_dataset(f"csv:{f}")


# ------------------------------------------------------------------ 3. label range
def test_csv_label_too_large_for_int64(tmp_path, capsys):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    f = tmp_path / "list.csv"
    f.write_text("path,label\na.png,1\n\nb.png,99999999999999999999999\n")
    with pytest.raises(DataError, match=rf"{f}, line 4, column 'label': "
                                        r"99999999999999999999999 is outside"):
        open_dataset(f"csv:{f}")
    line = _cli_error(["data", "info", f"csv:{f}"], capsys)
    assert f"{f}, line 4" in line


def test_csv_negative_label_line_counts_blank_lines(tmp_path):
    _png(tmp_path / "a.png")
    f = tmp_path / "list.csv"
    f.write_text("path,label\n\n\na.png,-2\n")
    with pytest.raises(DataError, match=rf"{f}, line 4, column 'label': negative label -2"):
        open_dataset(f"csv:{f}")


@pytest.mark.parametrize("value, match", [("99999999999999999999999", "is outside"),
                                          ("-2", "is outside")])
def test_broden_labels_csv_range_without_classes_txt(broden, value, match):
    (broden / "classes.txt").unlink()
    _edit(broden / "labels.csv", "b.png,1", f"b.png,{value}")
    with pytest.raises(DataError, match=rf"labels\.csv, line 3, column 'label': {value} {match}"):
        BrodenDataset(broden)


def test_broden_labels_csv_image_listed_twice(broden):
    _edit(broden / "labels.csv", "b.png,1\n", "b.png,1\nb.png,0\n")
    with pytest.raises(DataError, match=r"labels\.csv, line 4: image 'b\.png' already "
                                        "labelled on line 3"):
        BrodenDataset(broden)


def test_broden_index_image_listed_twice(broden):
    # labels.csv would label only the last copy: the first would silently stay unlabelled
    _edit(broden / "index.csv", f"b.png,probe,8,8,{S},{S},b_object.png,3\n",
          f"b.png,probe,8,8,{S},{S},b_object.png,3\na.png,probe,8,8,{S},{S},,3\n")
    with pytest.raises(DataError, match=r"index\.csv, line 4, column 'image': 'a\.png' "
                                        "already listed on line 2"):
        BrodenDataset(broden)


def test_broden_label_number_too_large(broden):
    _edit(broden / "label.csv", "3,beach", "99999999999999999999,beach")
    with pytest.raises(DataError, match=r"label\.csv, line 4, column 'number': "
                                        r"99999999999999999999 is outside 0\.\.65535"):
        BrodenDataset(broden)


# ------------------------------------------------------------ 4. messages name the file
def test_mask_label_outside_label_csv_names_the_mask(broden):
    _mask(broden / "images" / "b_object.png", np.full((S, S), 65535, np.int64))
    ds = BrodenDataset(broden)
    with pytest.raises(DataError) as exc:
        ds.load_segmentation(1)
    msg = str(exc.value)
    assert f"mask file {broden / 'images' / 'b_object.png'} (index.csv line 3, column " \
           "'object') holds label number 65535" in msg
    assert "label.csv" in msg


@pytest.mark.parametrize("value", ["-3", "1.5", "+3", "1e3"])
def test_image_level_label_that_is_not_a_label_number(broden, value, capsys):
    _edit(broden / "index.csv", "b_object.png,3\n", f"b_object.png,{value}\n")
    with pytest.raises(DataError) as exc:
        BrodenDataset(broden)
    assert f"{broden / 'index.csv'}, line 3, column 'scene': {value!r} is not a label " \
           "number" in str(exc.value)
    line = _cli_error(["data", "info", f"broden:{broden}"], capsys)
    assert "line 3, column 'scene'" in line


def test_imagefolder_on_a_file(tmp_path):
    f = tmp_path / "x.png"
    _png(f)
    with pytest.raises(DataError, match=rf"{f} is a file, not a folder"):
        open_dataset(f"imagefolder:{f}")
    with pytest.raises(DataError, match=rf"{f} is a file, not a folder"):
        open_dataset(f"broden:{f}")


def test_csv_spec_on_a_folder(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path} is a folder, not a CSV file"):
        open_dataset(f"csv:{tmp_path}")


def test_concept_world_seed_out_of_range_says_the_range(capsys):
    spec = "builtin:concept-world?n=10&seed=99999999999999999999"
    with pytest.raises(DataError, match=r"seed=99999999999999999999 is outside "
                                        r"0\.\.9223372036854775807"):
        open_dataset(spec)
    line = _cli_error(["data", "info", spec], capsys)
    assert "0..9223372036854775807" in line


# ----------------------------------------------------------- 5. extra fields, repeats
def test_broden_index_row_with_extra_fields(broden):
    _edit(broden / "index.csv", "b_object.png,3\n", "b_object.png,3,extra,more\n")
    with pytest.raises(DataError, match=r"index\.csv, line 3: 10 fields, expected 8 .*"
                                        r"extra field\(s\) 'extra', 'more'"):
        BrodenDataset(broden)


def test_broden_trailing_empty_fields_are_fine(broden):
    text = (broden / "index.csv").read_text().replace("\n", ",\n")
    (broden / "index.csv").write_text(text)  # header and rows end with a comma
    assert len(BrodenDataset(broden)) == 2


def test_csv_row_with_extra_fields(tmp_path):
    _png(tmp_path / "a.png")
    f = tmp_path / "list.csv"
    f.write_text("path,label\na.png,0,extra\n")
    with pytest.raises(DataError, match=rf"{f}, line 2: 3 fields, expected 2"):
        open_dataset(f"csv:{f}")


@pytest.mark.parametrize("where", ["broden", "csv"])
def test_classes_txt_repeated_name(broden, tmp_path, where):
    if where == "broden":
        ctxt = broden / "classes.txt"
        ctxt.write_text("indoor\n\noutdoor\nindoor\n")
        spec = f"broden:{broden}"
    else:
        _png(tmp_path / "a.png")
        ctxt = tmp_path / "classes.txt"
        ctxt.write_text("dog\ncat\ndog\n")
        (tmp_path / "list.csv").write_text("path,label\na.png,dog\n")
        spec = f"csv:{tmp_path / 'list.csv'}"
    line = 4 if where == "broden" else 3
    with pytest.raises(DataError, match=rf"{ctxt}, line {line}: class '\w+' already listed on "
                                        "line 1"):
        open_dataset(spec)


def test_csv_not_utf8(tmp_path):
    f = tmp_path / "list.csv"
    f.write_bytes(b"path,label\n\xff\xfe.png,1\n")
    with pytest.raises(DataError, match=rf"{f}: not UTF-8 text"):
        open_dataset(f"csv:{f}")


def test_broden_absurd_segmentation_size(broden):
    _edit(broden / "index.csv", f"b.png,probe,8,8,{S},{S}", f"b.png,probe,8,8,{10**12},{S}")
    with pytest.raises(DataError, match=r"index\.csv, line 3: sizes ih,iw,sh,sw = .* 1\.\.65535"):
        BrodenDataset(broden)


def test_header_with_a_quoted_line_break_stays_one_line(broden, capsys):
    _edit(broden / "index.csv", "object,scene\n", 'object,object,"x\ny"\n')
    with pytest.raises(DataError) as exc:
        BrodenDataset(broden)
    assert "'object' twice" in str(exc.value) and "\n" not in str(exc.value)
    _cli_error(["data", "info", f"broden:{broden}"], capsys)
