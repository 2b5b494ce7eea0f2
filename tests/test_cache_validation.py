"""A cache file is untrusted input: the reader checks its layout when it is opened.

Every damaged file below is made here with h5py from a cache the real writer wrote. Opening
it raises a ``CacheError`` whose one-line message names the file, the field (dataset or
attribute), what was expected and the fix; the CLI (``dissect``, ``similarity``, ``cka``)
turns it into exit 2 without a traceback. A run of ``interptool cache`` that fails before
writing any row removes the file it created (docs/cache-format.md).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from test_cache import FakeDataset, FakeLoaded, make_student  # noqa: E402

from interptool._locks import lock_path  # noqa: E402
from interptool.cache import ActivationCache, run_cache, write_cache  # noqa: E402
from interptool.errors import CacheError, DataError  # noqa: E402

N = 6  # images in the base cache


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A complete cache (float16, layers layer3 and layer4) written by the real writer."""
    path = tmp_path_factory.mktemp("base") / "base.h5"
    run_cache(FakeLoaded(make_student()), FakeDataset(N), ["layer3", "layer4"], path,
              batch_size=4, workers=0)
    return path


def _replace(name: str, make):
    def damage(f: h5py.File) -> None:
        old = f[name][()]
        del f[name]
        f.create_dataset(name, data=make(old))
    return damage


def _attr(key: str, value):
    def damage(f: h5py.File) -> None:
        f.attrs[key] = value
    return damage


def _delete(name: str):
    def damage(f: h5py.File) -> None:
        del f[name]
    return damage


def _to_group(name: str):
    def damage(f: h5py.File) -> None:
        del f[name]
        f.create_group(name)
    return damage


def _not_utf8(old: np.ndarray) -> np.ndarray:
    rows = [bytes(s) for s in old]
    rows[2] = b"\xff\xfe" + rows[2][2:]
    return np.array(rows)  # fixed-length bytes, like the writer's /index


# id -> (damage, text the one-line message must hold besides the file name)
CASES = {
    # item 1 of the sweep: tracebacks before
    "index_deleted": (_delete("index"), "dataset '/index' is missing"),
    "labels_deleted": (_delete("labels"), "dataset '/labels' is missing"),
    "logits_deleted": (_delete("logits"), "dataset '/logits' is missing"),
    "features_deleted": (_delete("features"), "group '/features' is missing"),
    "layer4_deleted": (_delete("features/layer4"), "dataset '/features/layer4' is missing"),
    "layer4_max_deleted": (_delete("features/layer4_max"),
                           "dataset '/features/layer4_max' is missing"),
    "layer4_short": (_replace("features/layer4", lambda a: a[:3]),
                     "dataset '/features/layer4' has shape (3, "),
    "layer4_group": (_to_group("features/layer4"),
                     "dataset '/features/layer4' is a group, not a dataset"),
    "layer4_strings": (_replace("features/layer4", lambda a: np.array([b"a"] * len(a))),
                       "dataset '/features/layer4' has shape (6,) and dtype string"),
    "logits_strings": (_replace("logits", lambda a: np.array([b"x"] * len(a))),
                       "dataset '/logits' has shape (6,) and dtype string"),
    "logits_int": (_replace("logits", lambda a: a.astype(np.int32)),
                   "dataset '/logits' has shape (6, 10) and dtype int32"),
    "logits_1d": (_replace("logits", lambda a: a[:, 0]), "dataset '/logits' has shape (6,)"),
    "logits_short": (_replace("logits", lambda a: a[:4]),
                     "have /logits 4, /labels 6, /index 6 rows"),
    "labels_two_columns": (_replace("labels", lambda a: np.stack([a, a], 1)),
                           "dataset '/labels' has shape (6, 2)"),
    "labels_float": (_replace("labels", lambda a: a.astype(np.float32)),
                     "dataset '/labels' has shape (6,) and dtype float32"),
    "index_ints": (_replace("index", lambda a: np.arange(len(a))),
                   "dataset '/index' has shape (6,) and dtype int64"),
    "index_not_utf8": (_replace("index", _not_utf8),
                       "dataset '/index' row 2 holds bytes that are not UTF-8"),
    "layers_int": (_attr("layers", 5), "attribute 'layers' is 5"),
    "n_done_text": (_attr("n_done", "abc"), "attribute 'n_done' is 'abc'"),
    "n_done_negative": (_attr("n_done", -3), "attribute 'n_done' is -3"),
    "n_done_too_big": (_attr("n_done", 10**6), "attribute 'n_done' is 1000000"),
    "n_done_below_rows": (_attr("n_done", 2), "attribute 'n_done' is 2 but the datasets hold 6"),
    "complete_text": (_attr("complete", "yes"), "attribute 'complete' is 'yes'"),
    # item 2: silent results before
    "layer4_int8_but_dtype_float16": (_replace("features/layer4", lambda a: a.astype(np.int8)),
                                      "dtype int8, expected float16"),
    "layer4_shape_not_layer_shapes": (_replace("features/layer4", lambda a: a[:, :, :2, :]),
                                      "layer_shapes['layer4']"),
    "layer4_max_short": (_replace("features/layer4_max", lambda a: a[:3]),
                         "dataset '/features/layer4_max' has shape (3, "),
    "layers_not_json": (_attr("layers", "{not json"), "attribute 'layers' is '{not json'"),
    "layers_dict": (_attr("layers", '{"a": 1}'), "attribute 'layers' is {'a': 1}"),
    "layers_name_missing": (_attr("layers", '["layer4", "layerX"]'),
                            "dataset '/features/layerX' is missing"),
    "layer_shapes_not_json": (_attr("layer_shapes", "[[["), "attribute 'layer_shapes' is '[[['"),
    "layer_shapes_wrong": (_attr("layer_shapes", '{"layer3": [1, 2, 3], "layer4": [7]}'),
                           "layer_shapes['layer3'] = [1, 2, 3]"),
    "layer_shapes_deleted": (lambda f: f.attrs.__delitem__("layer_shapes"),
                             "attribute 'layer_shapes' is missing"),
    "dtype_garbage": (_attr("dtype", "int3"), "attribute 'dtype' is 'int3'"),
    "dtype_float32_but_float16_stored": (_attr("dtype", "float32"),
                                         "dtype float16, expected float32"),
}


def _damaged(base: Path, tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.h5"
    shutil.copy(base, path)
    with h5py.File(path, "r+") as f:
        CASES[case][0](f)
    return path


def _one_line(msg: str, path: Path, field: str) -> None:
    assert "\n" not in msg.strip(), msg
    assert str(path) in msg and field in msg, msg


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_cache_is_a_one_line_cache_error(base, tmp_path, case):
    path = _damaged(base, tmp_path, case)
    with pytest.raises(CacheError) as err:
        ActivationCache(path).close()
    msg = str(err.value)
    _one_line(msg, path, CASES[case][1])
    assert "re-create it with `interptool cache ... --overwrite`" in msg


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_cache_exits_2_in_every_analyzer_command(base, tmp_path, case, capsys):
    from interptool.cli import main

    path = _damaged(base, tmp_path, case)
    commands = {
        "dissect": ["dissect", str(path), "--layer", "layer4", "--no-figures"],
        "similarity": ["similarity", str(base), str(path), "--n-boot", "2"],
        "cka": ["cka", str(base), str(path), "--layer", "layer4"],
    }
    for name, argv in commands.items():
        rc = main([*argv, "--out", str(tmp_path / f"out-{name}"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        assert "Traceback" not in err and err.startswith(f"interptool {name}: error: "), err
        _one_line(err, path, CASES[case][1])


def test_a_folder_given_as_the_cache_is_one_line(tmp_path, capsys):
    from interptool.cli import main

    folder = tmp_path / "c.h5"
    folder.mkdir()
    with pytest.raises(CacheError) as err:
        ActivationCache(folder)
    _one_line(str(err.value), folder, "is a folder, not a cache file")
    rc = main(["dissect", str(folder), "--layer", "layer4", "--out", str(tmp_path / "o"),
               "--quiet"])
    err_text = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err_text
    _one_line(err_text, folder, "is a folder")


def test_features_are_checked_when_asked_for(base, tmp_path):
    """The layer check also runs in ``features(layer)`` (a cache whose ``layers`` attribute
    is absent lists the datasets of /features)."""
    path = tmp_path / "c.h5"
    shutil.copy(base, path)
    with h5py.File(path, "r+") as f:
        del f.attrs["layers"]
    with ActivationCache(path) as c:
        assert c.layers == ["layer3", "layer4"]
        assert c.features("layer4").shape[0] == N
        c._checked.clear()  # as if the file changed after opening: checked again
        c._meta["layer_shapes"]["layer4"] = (1, 2, 3)
        with pytest.raises(CacheError, match=r"layer_shapes\['layer4'\] = \[1, 2, 3\]"):
            c.features("layer4")


def test_bring_your_own_caches_stay_valid(tmp_path):
    """write_cache records no ``dtype`` and may store float64 features; token, pooled and
    5-D layers get maxima of the shape the reader expects."""
    rng = np.random.default_rng(0)
    feats = {
        "conv": rng.normal(size=(4, 3, 2, 2)),
        "tokens": rng.normal(size=(4, 5, 6)),
        "pooled": rng.normal(size=(4, 7)),
        "video": rng.normal(size=(4, 2, 3, 2, 2)),
    }
    for dtype in ("float16", "float32", "float64"):
        path = write_cache(tmp_path / f"{dtype}.h5", logits=rng.normal(size=(4, 3)),
                           features=feats, dtype=dtype)
        with ActivationCache(path) as c:
            assert c.layers == list(feats) and "dtype" not in c.attrs
            assert c.features("conv").dtype == np.dtype(dtype)
            assert c.feature_max("tokens").shape == (4, 6)
            assert c.feature_max("pooled").shape == (4, 7)
            assert c.feature_max("video").shape == (4, 2)
            np.testing.assert_array_equal(
                c.feature_max("video"),
                c.features("video")[:].reshape(4, 2, -1).max(2).astype(np.float32))
    empty = write_cache(tmp_path / "logits_only.h5", logits=np.zeros((3, 2)))
    with ActivationCache(empty) as c:
        assert c.n == 3 and c.layers == []


# -- a run that fails before writing any row leaves no file ---------------------------------


def test_first_batch_failure_removes_the_new_file_and_another_model_runs(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(DataError, match=r"img_000"):
        run_cache(FakeLoaded(make_student()), FakeDataset(8, bad={0}), ["layer4"], path,
                  batch_size=4, workers=0)
    assert not path.exists() and not lock_path(path).exists()
    # nothing blocks a run with another model ("made with other settings" before)
    run = run_cache(FakeLoaded(make_student(seed=1)), FakeDataset(8), ["layer4"], path,
                    batch_size=4, workers=0)
    assert run.status == "created" and run.n_done == 8


def test_an_existing_file_is_never_removed(tmp_path):
    """A 0-row incomplete file that was there before the run (a run killed before its first
    batch) is resumed, and kept when the resumed run fails again."""
    from interptool.cache._writer import _make_job

    path = tmp_path / "c.h5"
    job = _make_job(FakeLoaded(make_student()), FakeDataset(8), ["layer4"], path,
                    batch_size=4, workers=0, threads=None, dtype="float16",
                    compression=None, skip_bad=False, probe=None, seed=0, device=None)
    with h5py.File(path, "w") as f:
        job._init_attrs(f)
    with pytest.raises(DataError, match=r"img_000"):
        run_cache(FakeLoaded(make_student()), FakeDataset(8, bad={0}), ["layer4"], path,
                  batch_size=4, workers=0)
    assert path.exists()
    with ActivationCache(path, allow_incomplete=True) as c:
        assert c.n == 0 and c.ids == [] and c.layers == []
    run = run_cache(FakeLoaded(make_student()), FakeDataset(8), ["layer4"], path,
                    batch_size=4, workers=0)
    assert run.status == "resumed" and run.n_done == 8


def test_corrupt_first_image_through_the_cli_leaves_no_file(tmp_path, capsys):
    from interptool.cli import main

    rng = np.random.default_rng(0)
    for c in "ab":
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / c / f"{i}.png")
    first = tmp_path / "imgs" / "a" / "0.png"
    good = first.read_bytes()
    first.write_bytes(b"not a png")
    out = tmp_path / "c.h5"
    argv = ["cache", "--arch", "interptool:cw-student", "--data",
            f"imagefolder:{tmp_path / 'imgs'}", "--layers", "layer4", "--out", str(out),
            "--batch-size", "4", "--workers", "0", "--quiet"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "a/0.png" in err, err
    assert not out.exists() and not lock_path(out).exists()
    first.write_bytes(good)  # fixed; another model (2 classes) writes the file
    rc = main([*argv, "--num-classes", "2"])
    assert rc == 0, capsys.readouterr().err
    with ActivationCache(out) as c:
        assert c.n == 6 and c.logits.shape == (6, 2)


class _NoClasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 0)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_classifier_with_no_outputs_is_a_cache_error_and_leaves_no_file(tmp_path):
    path = tmp_path / "c.h5"
    loaded = FakeLoaded(_NoClasses().eval(), arch="custom:none", name="none")
    with pytest.raises(CacheError, match=r"model none returned logits of shape \(4, 0\): 0 "
                                         r"classes; expected logits \(N, K\) with K >= 1"):
        run_cache(loaded, FakeDataset(6), ["conv"], path, batch_size=4, workers=0)
    assert not path.exists() and not lock_path(path).exists()


def test_cache_being_written_names_the_writer(tmp_path):
    """HDF5 refuses to open a file another process is writing; the message names that run
    (its lock file), not "re-create it with --overwrite"."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "c.h5"
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, h5py
        from interptool._locks import output_lock
        with output_lock({str(path)!r}), h5py.File({str(path)!r}, "w") as f:
            f.attrs["format"] = "interptool-cache/1"
            f.flush()
            print("ready", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        with pytest.raises(CacheError) as info:
            ActivationCache(path)
        msg = str(info.value)
        assert f"pid {writer.pid}" in msg and "is writing" in msg and str(path) in msg, msg
        assert "--overwrite" not in msg and "\n" not in msg
    finally:
        writer.communicate("\n", timeout=60)
