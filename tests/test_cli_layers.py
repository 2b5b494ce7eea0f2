"""Tests of ``interptool layers`` and of loading errors as seen from the command line."""

from __future__ import annotations

import json

import pytest
import torch

import interptool.cli as cli
from interptool.loading._zoo import ZOO


@pytest.fixture(autouse=True)
def _only_built_commands(monkeypatch):
    """Run the real ``main``; if sibling sub-commands are not importable yet, register only
    ``layers`` so this part can be tested on its own."""
    try:
        cli.build_parser()
    except ImportError:
        monkeypatch.setattr(cli, "_COMMANDS", ["layers"])


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["layers", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "student.pth"
    torch.save({"model": ZOO["cw-student"](num_classes=6).state_dict()}, path)
    return path


def test_table(capsys, student_ckpt):
    rc, out, err = run(capsys, "--arch", "interptool:cw-student", "--checkpoint",
                       str(student_ckpt), "--depth", "1", "-q")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[1] == "# load: weights from key 'model'; num_classes 6 read from fc.weight"
    assert lines[2].split() == ["name", "type", "output", "shape"]
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in lines[3:]}
    assert rows["layer4"] == ["Sequential", "(128, 8, 8)"]
    assert rows["fc"] == ["Linear", "(6,)"]
    assert rows["stem"] == ["Sequential", "(16, 32, 32)"]
    assert not any("." in name for name in rows)  # depth 1: top-level modules only
    assert "classes=6" in out.splitlines()[0]


def test_json_and_image_size(capsys):
    rc, out, err = run(capsys, "--arch", "interptool:cw-teacher", "--image-size", "32",
                       "--json", "--depth", "2")
    assert rc == 0, err
    data = json.loads(out)
    layers = {d["name"]: d for d in data["layers"]}
    assert layers["layer4"]["shape"] == [192, 4, 4]
    assert layers["layer4.1"]["type"] == "_BasicBlock"
    assert "layer4.1.conv1" not in layers
    assert data["model"]["preprocessing"]["input_size"] == [3, 32, 32]
    assert data["model"]["num_classes"] == 10


def _assert_clean_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    assert err.startswith("interptool layers: error: ")
    for n in needles:
        assert n in err, err


def test_cli_errors(capsys, tmp_path, student_ckpt):
    rc, _, err = run(capsys, "--arch", "interptool:cw-teacher", "--checkpoint", str(student_ckpt))
    _assert_clean_error(rc, err, "does not fit interptool:cw-teacher", "model expects")

    rc, _, err = run(capsys, "--arch", "interptool:cw-student", "--checkpoint", str(student_ckpt),
                     "--num-classes", "3")
    _assert_clean_error(rc, err, "wrong num_classes", "drop --num-classes")

    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(student_ckpt.read_bytes()[:1000])
    rc, _, err = run(capsys, "--arch", "interptool:cw-student", "--checkpoint", str(trunc))
    _assert_clean_error(rc, err, "truncated or corrupt", str(trunc))

    js = tmp_path / "x.json"
    js.write_text('{"not": "weights"}')
    rc, _, err = run(capsys, "--arch", "interptool:cw-student", "--checkpoint", str(js))
    _assert_clean_error(rc, err, "not a weight file", "JSON")

    full = tmp_path / "full.pth"
    torch.save(ZOO["cw-student"](), full)
    rc, _, err = run(capsys, "--arch", "interptool:cw-student", "--checkpoint", str(full))
    _assert_clean_error(rc, err, "--trust-pickle")
    rc, out, err = run(capsys, "--arch", "interptool:cw-student", "--checkpoint", str(full),
                       "--trust-pickle", "--depth", "1")
    assert rc == 0 and "layer4" in out

    rc, _, err = run(capsys, "--arch", "timm:resnet10q")
    _assert_clean_error(rc, err, "unknown timm architecture", "timm:resnet10t")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_flags(capsys, tmp_path):
    net = ZOO["cw-student"](num_classes=3).eval()
    path = tmp_path / "net.ts"
    torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(str(path))
    rc, _, err = run(capsys, "--arch", str(path))
    _assert_clean_error(rc, err, "--image-size --mean --std")
    rc, out, err = run(capsys, "--arch", str(path), "--image-size", "32", "--mean", "0.5",
                       "0.5", "0.5", "--std", "0.25", "0.25", "0.25")
    assert rc == 0, err
    rows = {ln.split()[0]: ln.split()[-1] for ln in out.splitlines() if not ln.startswith("#")}
    assert rows["(output)"] == "(3,)" and rows["layer4"] == "?" and rows["stem"] == "?"
    assert out.splitlines()[-1].startswith("# ?: TorchScript sub-modules cannot be hooked")


def test_key_map_renames_are_reported(capsys, tmp_path):
    sd = ZOO["cw-student"](num_classes=4).state_dict()
    path = tmp_path / "foreign.pth"
    torch.save({f"body.{k}": v for k, v in sd.items()}, path)
    rules = tmp_path / "map.toml"
    rules.write_text('[[rules]]\npattern = "^body[.]"\nreplacement = ""\n')
    rc, out, err = run(capsys, "--arch", "interptool:cw-student", "--checkpoint", str(path),
                       "--key-map", str(rules), "--depth", "1")
    assert rc == 0, err
    first = next(iter(sd))
    assert (f"# load: key map renamed {len(sd)} key(s): body.{first} -> {first}, ") in out
    rc, out, err = run(capsys, "--arch", "interptool:cw-student", "--checkpoint", str(path),
                       "--key-map", str(rules), "--json")
    renamed = json.loads(out)["model"]["load_report"]["renamed"]
    assert renamed == [[f"body.{k}", k] for k in sd]


def test_forward_failure_is_a_clean_error(capsys):
    # a ViT accepts only its native input size: --image-size 32 fails in the forward pass
    rc, _, err = run(capsys, "--arch", "timm:vit_tiny_patch16_224", "--image-size", "32")
    _assert_clean_error(rc, err, "zero input of shape (1, 3, 32, 32)", "--image-size",
                        "doesn't match model (224)")
    rc, _, err = run(capsys, "--arch", "interptool:cw-student", "--image-size", "0")
    _assert_clean_error(rc, err, "--image-size", "positive")
