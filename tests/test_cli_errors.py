"""Bad command lines, paths and model settings end in one line on stderr and exit 2 (found by
an adversarial sweep of every command: each case here gave a traceback, or ran on, before)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from interptool.cache import write_cache
from interptool.cli import main
from interptool.errors import AnalysisError, ConfigError

EVAL = "builtin:concept-world?version=1&n=24&size=32&seed=3&split=eval"


def _one_line_error(capsys, argv, *expect):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for text in expect:
        assert text in err, err
    return err


def test_argparse_errors_are_one_line(capsys):
    _one_line_error(capsys, ["dissect", "x.h5"], "required: --layer, --out",
                    "usage: interptool dissect --help")
    _one_line_error(capsys, ["no-such-command"], "invalid choice", "usage: interptool --help")


@pytest.fixture
def a_file(tmp_path):
    p = tmp_path / "a_file"
    p.write_text("not a folder")
    return p


@pytest.mark.parametrize("argv", [
    ["dissect", "c.h5", "--layer", "layer4", "--out"],
    ["similarity", "t.h5", "s.h5", "--out"],
    ["cka", "t.h5", "s.h5", "--layers", "layer4", "--out"],
    ["attribute", "--arch", "interptool:cw-student", "--data", EVAL, "--out"],
    ["compare", "config.toml", "--out"],
])
def test_out_folder_that_is_a_file(capsys, a_file, argv):
    _one_line_error(capsys, [*argv, str(a_file)], "argument --out", "is a file, not a folder")


def test_empty_out_and_cache_out_that_is_a_folder(capsys, tmp_path):
    _one_line_error(capsys, ["dissect", "c.h5", "--layer", "layer4", "--out", ""], "empty")
    _one_line_error(capsys, ["cache", "--arch", "interptool:cw-student", "--data", EVAL,
                             "--out", ""], "empty")
    _one_line_error(capsys, ["cache", "--arch", "interptool:cw-student", "--data", EVAL,
                             "--out", str(tmp_path)], "is a folder",
                    str(tmp_path / "activations.h5"))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("seed", ["-1", str(2**32), "99999999999999999999999", "1.5"])
def test_seed_out_of_range(capsys, tmp_path, seed):
    _one_line_error(capsys, ["cache", "--arch", "interptool:cw-student", "--data", EVAL,
                             "--out", str(tmp_path / "c.h5"), "--seed", seed],
                    "argument --seed")
    _one_line_error(capsys, ["attribute", "--arch", "interptool:cw-student", "--data", EVAL,
                             "--out", str(tmp_path / "a"), "--seed", seed], "argument --seed")


@pytest.mark.parametrize(("flags", "expect"), [
    (["--num-classes", "0"], "num_classes (--num-classes) must be a whole number >= 1, got 0"),
    (["--num-classes", "-3"], "got -3"),
    (["--image-size", "100000"], "is above 8192 px per side"),
    (["--std", "nan", "nan", "nan"], "must be finite numbers"),
    (["--mean", "inf", "inf", "inf"], "must be finite numbers"),
])
def test_model_settings_refused_before_running(capsys, flags, expect):
    _one_line_error(capsys, ["layers", "--arch", "interptool:cw-student", *flags], expect)


def test_checkpoint_with_an_empty_classifier(capsys, tmp_path):
    from interptool.loading import load_model

    sd = load_model("interptool:cw-student").model.state_dict()
    sd["fc.weight"], sd["fc.bias"] = sd["fc.weight"][:0], sd["fc.bias"][:0]
    path = tmp_path / "zero.pth"
    torch.save(sd, path)
    _one_line_error(capsys, ["layers", "--arch", "interptool:cw-student", "--checkpoint",
                             str(path)], "fc.weight has 0 outputs")


def test_numpy_integer_num_classes_is_accepted():
    from interptool.loading import load_model

    assert load_model("interptool:cw-student", num_classes=np.int64(7)).num_classes == 7
    with pytest.raises(ConfigError, match="got True"):
        load_model("interptool:cw-student", num_classes=True)


# ----------------------------------------------------------------------------- compare
_CONFIG = """
[data]
eval = "{eval}"
[models.teacher]
arch = "interptool:cw-student"
layers = ["layer4"]
image_size = 32
[models.small]
arch = "interptool:cw-student"
layers = ["layer4"]
image_size = 32
[analysis]
dissection = false
attribution = false
similarity = {{ temperatures = [1], n_boot = 20, cka = false }}
[run]
batch_size = 16
"""


def test_a_file_where_compare_needs_a_folder(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(_CONFIG.format(eval=EVAL))
    out = tmp_path / "out"
    out.mkdir()
    (out / "cache").write_text("in the way")
    _one_line_error(capsys, ["compare", str(cfg), "--out", str(out), "-q"],
                    f"{out / 'cache'}: a file stands where this run needs a folder")


def test_eval_set_with_other_classes_stops_before_caching(capsys, tmp_path):
    # version 2 of concept-world has 12 classes; the cw-student models output 10
    cfg = tmp_path / "c.toml"
    cfg.write_text(_CONFIG.format(eval=EVAL.replace("version=1", "version=2")))
    out = tmp_path / "out"
    _one_line_error(capsys, ["compare", str(cfg), "--out", str(out), "-q"],
                    "data.eval:", "has 12 classes", "the models output 10")
    assert not list(out.glob("cache/*.h5"))


def test_similarity_refuses_a_cache_of_another_label_space(tmp_path):
    from interptool.analyzers.similarity import ClassSimilarity

    rng = np.random.default_rng(0)
    z = rng.normal(size=(20, 10)).astype(np.float32)
    y = np.tile([0, 1], 10)
    path = write_cache(tmp_path / "m.h5", logits=z, labels=y, attrs={"class_names": ["a", "b"]})
    with pytest.raises(AnalysisError, match=r"has 2 classes \(a, b\) but the model has K = 10"):
        ClassSimilarity().run(path)
    ok = write_cache(tmp_path / "ok.h5", logits=z, labels=y,
                     attrs={"class_names": [f"c{i}" for i in range(10)]})
    assert ClassSimilarity().run(ok).class_names[:2] == ["c0", "c1"]


def test_stage_markers_not_written_by_compare_are_redone(tmp_path):
    from interptool.pipeline._stage_cache import StageCache

    stages = StageCache(tmp_path)
    stages.put("a", "k", {"x": 1})
    assert stages.get("a", "k") == {"x": 1}
    (stages.dir / "a.json").write_text(json.dumps([1, 2]))  # valid JSON, not a marker
    assert stages.get("a", "k") is None
    (stages.dir / "b.json").mkdir()  # a folder in its place
    assert stages.get("b", "k") is None
    with pytest.raises(ConfigError, match=r"b.json is a folder where compare keeps the record "
                                          r"of its 'b' stage; remove that folder"):
        stages.put("b", "k", {"x": 1})
    (stages.dir / "c.json").write_bytes(b"\xff\xfe{")  # not UTF-8
    assert stages.get("c", "k") is None


def test_stage_key_follows_a_cache_changed_on_disk(tmp_path):
    from interptool.pipeline._stage_cache import cache_identity, stage_key

    z = np.zeros((4, 3), np.float32)
    path = write_cache(tmp_path / "m.h5", logits=z, labels=np.arange(4) % 3)
    before = stage_key(cache_identity(path))
    assert stage_key(cache_identity(path)) == before  # reading changes nothing
    import h5py

    with h5py.File(path, "r+") as f:  # edited by hand: NaN in the logits
        f["logits"][0, 0] = np.nan
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000))  # coarse clocks
    assert stage_key(cache_identity(path)) != before


def test_same_cache_twice_names_the_repeat(capsys, tmp_path):
    z = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    f = np.random.default_rng(1).normal(size=(8, 4, 2, 2)).astype(np.float32)
    path = write_cache(tmp_path / "m.h5", logits=z, labels=np.arange(8) % 3,
                       features={"layer4": f}, attrs={"model": {"name": "net"}})
    _one_line_error(capsys, ["cka", str(path), str(path), "--layer", "layer4", "--out",
                             str(tmp_path / "o")], "model names repeat (net, net)", "--names")


def test_key_map_without_rules_is_one_line(capsys, tmp_path):
    (tmp_path / "km.toml").write_text("[other]\nx = 1\n")
    _one_line_error(capsys, ["layers", "--arch", "interptool:cw-student", "--key-map",
                             str(tmp_path / "km.toml")], "has no [[rules]] array")


def test_similarity_on_a_cache_without_images(tmp_path):
    from interptool.analyzers.similarity import ClassSimilarity

    path = write_cache(tmp_path / "m.h5", logits=np.zeros((0, 4), np.float32),
                       labels=np.zeros(0, np.int64))
    with pytest.raises(AnalysisError, match="holds no images"):
        ClassSimilarity().run(path)


def test_unlabelled_eval_set_with_similarity_stops_before_caching(capsys, tmp_path):
    from PIL import Image

    rows = ["path"]
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(_CONFIG.format(eval=f"csv:{tmp_path / 'list.csv'}"))
    out = tmp_path / "out"
    _one_line_error(capsys, ["compare", str(cfg), "--out", str(out), "-q"],
                    "data.eval:", "has no labels", "similarity = false")
    assert not list(out.glob("cache/*.h5"))


def test_damaged_compare_cache_points_to_compare_overwrite(capsys, tmp_path):
    import h5py

    cfg = tmp_path / "c.toml"
    cfg.write_text(_CONFIG.format(eval=EVAL))
    out = tmp_path / "out"
    assert main(["compare", str(cfg), "--out", str(out), "-q"]) == 0
    cache = sorted((out / "cache").glob("*.h5"))[0]
    with h5py.File(cache, "a") as f:
        del f["labels"]
    err = _one_line_error(capsys, ["compare", str(cfg), "--out", str(out), "-q"],
                          str(cache), "interptool compare CONFIG --out DIR --overwrite")
    assert "interptool cache ..." not in err
    assert main(["compare", str(cfg), "--out", str(out), "-q", "--overwrite"]) == 0
