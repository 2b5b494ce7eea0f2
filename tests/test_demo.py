"""The built-in demo: shipped weights, their manifest, the default config and a tiny run."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from interptool.pipeline._demo import WEIGHTS_DIR, demo_config, demo_config_text, demo_manifest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_manifest_documents_recipe_and_checksums():
    from interptool._provenance import sha256_file

    m = demo_manifest()
    r = m["recipe"]
    assert (r["kd_alpha"], r["kd_temperature"], r["label_smoothing_epsilon"]) == (0.5, 4.0, 0.1)
    assert set(m["models"]) == {"teacher", "scratch", "ls", "kd"}
    total = 0
    for name, entry in m["models"].items():
        path = WEIGHTS_DIR / entry["file"]
        assert sha256_file(path) == entry["sha256"], name
        total += path.stat().st_size
    assert total < 10 * 2**20  # every shipped weight file together
    # nothing but the shipped models and their manifest in the package's weights folder
    shipped = {e["file"] for e in m["models"].values()} | {"reproduction.json"}
    assert {p.name for p in WEIGHTS_DIR.iterdir()} == shipped
    assert m["models"]["teacher"]["arch"] == "interptool:cw2-resnet34"
    assert {m["models"][s]["arch"] for s in ("scratch", "ls", "kd")} == {"interptool:cw2-resnet18"}


# The shipped models' recorded accuracies are recomputed from the files in
# tests/test_reproduction.py (test of the study that produced them).


def test_demo_config_and_its_toml_agree():
    from interptool.pipeline import parse_config

    cfg = demo_config(n=40)
    assert cfg.teacher.name == "teacher"
    assert [s.name for s in cfg.students] == ["kd", "scratch", "ls"]
    assert "n=40" in cfg.data.eval and cfg.data.eval.endswith("split=eval")
    assert "version=2" in cfg.data.eval and "size=48" in cfg.data.probe
    text = demo_config_text(cfg)
    again = parse_config(tomllib.loads(text), source="demo.toml", base_dir=WEIGHTS_DIR)
    assert again.models == cfg.models
    assert again.data == cfg.data
    assert again.analysis.attribution == cfg.analysis.attribution


@pytest.mark.slow
def test_cli_demo_tiny(tmp_path, capsys):
    from interptool.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "20", "--quiet"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str(out / "report.html")
    s = json.loads((out / "summary.json").read_text())
    assert [m["name"] for m in s["models"]] == ["teacher", "kd", "scratch", "ls"]
    man = demo_manifest()
    for m in s["models"]:
        assert m["checkpoint_sha256"] == man["models"][m["name"]]["sha256"]
    assert np.isfinite([m["accuracy"] for m in s["models"]]).all()
    # the paper's question is answered for every measure: KD vs scratch is always compared
    assert s["findings"]
    for f in s["findings"]:
        names = [c["comparison"] for c in f["comparisons"]]
        assert names[0] == "kd vs scratch", f["measure"]
        assert {"kd vs ls", "scratch vs ls"} <= set(names)


def test_missing_weights_is_a_clear_error(tmp_path):
    from interptool.errors import InterptoolError

    with pytest.raises(InterptoolError, match="demo weights are missing.*kd_reproduction"):
        demo_config(weights_dir=tmp_path)
