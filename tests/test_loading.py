"""Tests of interptool.loading: every checkpoint format round-trips to identical logits."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torchvision  # noqa: E402

from interptool.errors import CheckpointError, ConfigError  # noqa: E402
from interptool.loading import (  # noqa: E402
    ImagePixels,
    LoadedModel,
    Preprocessing,
    ToNormalizedChannelsLast,
    list_layers,
    load_model,
    read_state_dict,
    split_normalization,
)
from interptool.loading._zoo import ZOO  # noqa: E402

ARCH = "timm:resnet10t"
X = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))


def _randomise_bn(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-default BN statistics, so a lost buffer would change the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def src() -> torch.nn.Module:
    torch.manual_seed(1)
    return _randomise_bn(timm.create_model("resnet10t", pretrained=False, num_classes=5), 1)


@pytest.fixture(scope="module")
def logits(src) -> torch.Tensor:
    with torch.no_grad():
        return src(X)


def _logits(loaded: LoadedModel, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(x)


# ----------------------------------------------------------------------------- formats


def _save(kind: str, path, sd):
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif kind == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(sd, path)


@pytest.mark.parametrize(
    "name,kind,wrap,source_keys,stripped",
    [
        ("plain.pth", "zip", lambda sd: sd, "", []),
        ("legacy.pth", "legacy", lambda sd: sd, "", []),
        ("weights.bin", "zip", lambda sd: sd, "", []),
        ("weights.safetensors", "safetensors", lambda sd: sd, "", []),
        ("sd.pth", "zip", lambda sd: {"state_dict": sd, "epoch": 3}, "state_dict", []),
        ("model.pth", "zip", lambda sd: {"model": sd, "optimizer": {}}, "model", []),
        ("ema.pth", "zip", lambda sd: {"state_dict_ema": sd}, "state_dict_ema", []),
        ("mema.pth", "zip", lambda sd: {"model_ema": sd}, "model_ema", []),
        ("net.pth", "zip", lambda sd: {"net": sd, "acc": 0.5}, "net", []),
        ("nested.pth", "zip", lambda sd: {"model": {"state_dict": sd}}, "model/state_dict", []),
        ("ddp.pth", "zip", lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
         "state_dict", ["module."]),
        ("compiled.pth", "zip", lambda sd: {"_orig_mod." + k: v for k, v in sd.items()}, "",
         ["_orig_mod."]),
        ("both.pth", "zip", lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()}, "",
         ["_orig_mod.", "module."]),
    ],
)
def test_formats_round_trip(tmp_path, src, logits, name, kind, wrap, source_keys, stripped):
    path = tmp_path / name
    sd = src.state_dict()
    _save(kind, path, wrap(sd) if kind != "safetensors" else sd)
    loaded = load_model(ARCH, path)
    assert torch.equal(_logits(loaded), logits)
    rep = loaded.load_report
    assert rep.source_keys == source_keys
    assert rep.stripped_prefixes == stripped
    assert rep.missing == rep.unexpected == rep.renamed == []
    assert loaded.num_classes == 5
    assert rep.format == ("legacy" if kind == "legacy" else
                          "safetensors" if kind == "safetensors" else "zip")
    assert loaded.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_torchdistill_namespace_loads_without_trust(tmp_path, src, logits):
    path = tmp_path / "td.pth"
    torch.save({"model": src.state_dict(), "optimizer": None, "best_value": np.float64(0.7),
                "args": argparse.Namespace(config="kd.yaml", lr=0.1)}, path)
    loaded = load_model(ARCH, path)
    assert torch.equal(_logits(loaded), logits)
    assert loaded.load_report.source_keys == "model"
    assert "argparse.Namespace" in loaded.load_report.allowed_globals
    assert "numpy.dtype" in loaded.load_report.allowed_globals
    assert not loaded.load_report.trusted_pickle


def test_read_state_dict_info(tmp_path, src):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": src.state_dict(), "state_dict_ema": src.state_dict(), "epoch": 1},
               path)
    sd, info = read_state_dict(path)
    assert set(sd) == set(src.state_dict())
    assert info["format"] == "zip" and info["source_keys"] == "state_dict"
    assert info["alternatives"] == ["state_dict_ema"]


def test_ema_selection(tmp_path, src, logits):
    other = _randomise_bn(timm.create_model("resnet10t", num_classes=5), 7)
    path = tmp_path / "ema.pth"
    torch.save({"state_dict": src.state_dict(), "state_dict_ema": other.state_dict()}, path)
    default = load_model(ARCH, path)
    assert torch.equal(_logits(default), logits)
    assert "#state_dict_ema" in default.load_report.alternatives
    ema = load_model(ARCH, f"{path}#state_dict_ema")
    with torch.no_grad():
        assert torch.equal(_logits(ema), other(X))
    assert ema.load_report.source_keys == "state_dict_ema"
    assert ema.name == "ema#state_dict_ema"


# ----------------------------------------------------------------------------- teacher/student


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(2)
    return (_randomise_bn(ZOO["cw-student"](num_classes=4), 2),
            _randomise_bn(ZOO["cw-teacher"](num_classes=4), 3))


def test_student_teacher_prefixes(tmp_path, pair):
    student, teacher = pair
    sd = {f"model.student_model.{k}": v for k, v in student.state_dict().items()}
    sd.update({f"model.teacher_model.{k}": v for k, v in teacher.state_dict().items()})
    path = tmp_path / "kd.pth"
    torch.save({"state_dict": sd}, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_s, ref_t = student(x), teacher(x)
    # the architecture decides which network fits
    s = load_model("interptool:cw-student", path)
    assert torch.equal(_logits(s, x), ref_s)
    assert s.load_report.selected == "model.student_model."
    assert s.load_report.alternatives == ["#model.teacher_model"]
    t = load_model("interptool:cw-teacher", path)
    assert torch.equal(_logits(t, x), ref_t)
    assert t.load_report.selected == "model.teacher_model."
    # explicit selection; "teacher" matches the component "teacher_model"
    t2 = load_model("interptool:cw-teacher", f"{path}#teacher")
    assert torch.equal(_logits(t2, x), ref_t)
    with pytest.raises(CheckpointError, match="#nobody matches no wrapper key"):
        load_model("interptool:cw-teacher", f"{path}#nobody")


def test_same_arch_pair_prefers_student(tmp_path, pair):
    student, _ = pair
    other = _randomise_bn(ZOO["cw-student"](num_classes=4), 9)
    path = tmp_path / "pair.pth"
    torch.save({"student": student.state_dict(), "teacher": other.state_dict()}, path)
    x = torch.randn(1, 3, 32, 32)
    s = load_model("interptool:cw-student", path)
    with torch.no_grad():
        assert torch.equal(_logits(s, x), student(x))
    assert s.load_report.selected == "student."
    assert "teacher." in s.load_report.notes[0]
    t = load_model("interptool:cw-student", f"{path}#teacher")
    with torch.no_grad():
        assert torch.equal(_logits(t, x), other(x))
    assert t.load_report.source_keys == "teacher"


def test_shared_prefix_is_stripped_when_it_fits(tmp_path, src, logits):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, path)
    loaded = load_model(ARCH, path)
    assert torch.equal(_logits(loaded), logits)
    assert loaded.load_report.selected == "model."


# ----------------------------------------------------------------------------- key maps


def _renamed_sd(src):
    # a foreign naming scheme: backbone.* for the body, head.linear.* for the classifier
    out = {}
    for k, v in src.state_dict().items():
        out[("head.linear." + k[3:]) if k.startswith("fc.") else "backbone." + k] = v
    return out


def test_key_map_toml(tmp_path, src, logits):
    path = tmp_path / "foreign.pth"
    torch.save(_renamed_sd(src), path)
    rules = tmp_path / "map.toml"
    rules.write_text('[[rules]]\npattern = "^backbone\\\\."\nreplacement = ""\n\n'
                     '[[rules]]\npattern = "^head\\\\.linear\\\\."\nreplacement = "fc."\n')
    loaded = load_model(ARCH, path, key_map=rules)
    assert torch.equal(_logits(loaded), logits)
    expected = [(("head.linear." + k[3:]) if k.startswith("fc.") else "backbone." + k, k)
                for k in src.state_dict()]
    assert loaded.load_report.renamed == expected
    # the same as a dict and as a list of pairs
    for km in ({"^backbone[.]": "", "^head[.]linear[.]": "fc."},
               [("^backbone[.]", ""), ("^head[.]linear[.]", "fc.")]):
        assert torch.equal(_logits(load_model(ARCH, path, key_map=km)), logits)


def test_key_map_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rules]]\nreplacement = 'x'\n")
    with pytest.raises(ConfigError, match="rule 1 lacks 'pattern'"):
        load_model(ARCH, key_map=bad)
    with pytest.raises(ConfigError, match="not a valid regex"):
        load_model(ARCH, key_map={"(": ""})
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(ARCH, key_map=tmp_path / "none.toml")


def test_positional_key_map(tmp_path, src, logits):
    sd = src.state_dict()
    path = tmp_path / "pos.safetensors"
    from safetensors.torch import save_file

    save_file({f"p{i:03d}": v for i, v in enumerate(sd.values())}, str(path))
    loaded = load_model(ARCH, path, key_map="positional")
    assert torch.equal(_logits(loaded), logits)
    assert loaded.num_classes == 5
    assert loaded.load_report.renamed == [(f"p{i:03d}", k) for i, k in enumerate(sd)]


def test_positional_names_first_shape_mismatch(tmp_path, pair):
    student, teacher = pair
    path = tmp_path / "t.pth"
    torch.save(teacher.state_dict(), path)
    # cw-teacher has the same tensor count as a cw-student? no: counts differ -> count error
    with pytest.raises(CheckpointError, match="positional key map: the checkpoint has"):
        load_model("interptool:cw-student", path, key_map="positional")
    # same count, different widths: first mismatch named
    sd = {f"k{i}": v for i, v in enumerate(student.state_dict().values())}
    first = next(iter(sd))
    sd[first] = torch.zeros(8, 3, 3, 3)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"tensor #0 'k0' has shape \(8, 3, 3, 3\) but the "
                                              r"model's #0 'stem.0.weight' expects \(16, 3, 3, 3\)"):
        load_model("interptool:cw-student", path, key_map="positional")


# ----------------------------------------------------------------------------- safety


def test_pickled_module_needs_trust(tmp_path, src, logits):
    path = tmp_path / "full.pth"
    torch.save(src, path)
    with pytest.raises(CheckpointError, match="--trust-pickle") as err:
        load_model(ARCH, path)
    assert "torch.nn.modules" in str(err.value) or "timm." in str(err.value)
    loaded = load_model(ARCH, path, trust_pickle=True)
    assert torch.equal(_logits(loaded), logits)
    assert loaded.load_report.trusted_pickle
    # a whole module inside a wrapper: same rule
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": src, "epoch": 2}, wrapped)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        read_state_dict(wrapped)
    sd, info = read_state_dict(wrapped, trust_pickle=True)
    assert info["source_keys"] == "model" and set(sd) == set(src.state_dict())


# ----------------------------------------------------------------------------- errors


def test_wrong_architecture(tmp_path, src):
    path = tmp_path / "r10.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_model("timm:resnet14t", path)
    msg = str(err.value)
    assert str(path) in msg and "timm:resnet14t" in msg and "wrong architecture" in msg
    # resnet14t uses bottleneck blocks: conv1 of each block is 1x1 there, 3x3 in resnet10t;
    # wrong shapes are listed first, then the keys only the model has (conv3, bn3)
    want = timm.create_model("resnet14t", num_classes=5).state_dict()
    have = src.state_dict()
    bad = [k for k in have if k in want and want[k].shape != have[k].shape]
    missing = [k for k in want if k not in have and not k.endswith("num_batches_tracked")]
    assert f"0 unexpected and {len(bad)} wrongly shaped" in msg
    assert f"{len(missing)} missing" in msg
    assert ("shape layer1.0.conv1.weight: model expects (64, 64, 1, 1), checkpoint has "
            "(64, 64, 3, 3)") in msg
    # at most 10 offending keys are listed, wrong shapes first (there are 20 here), on the
    # error's one line
    assert "\n" not in msg
    assert len(bad) == 20 and len(re.findall(r"(?:: |; )shape ", msg)) == 10
    assert not re.search(r"(?:: |; )missing ", msg)


def test_wrong_num_classes(tmp_path, src):
    path = tmp_path / "r10.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_model(ARCH, path, num_classes=7)
    msg = str(err.value)
    assert "fc.weight: model expects (7, 512), checkpoint has (5, 512)" in msg
    assert "wrong num_classes" in msg and "drop --num-classes" in msg


def test_prefix_suggestion_when_keys_do_not_fit(tmp_path, src):
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "body.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_model(ARCH, path, num_classes=5)
    msg = str(err.value)
    assert "read under the prefix 'backbone.'" in msg
    assert "no classifier (fc.weight, fc.bias)" in msg and "wrong architecture" not in msg
    # foreign names under a shared prefix: the prefix and the key map are suggested
    foreign = tmp_path / "foreign.pth"
    torch.save({f"backbone.t{i}": v for i, v in enumerate(src.state_dict().values())}, foreign)
    with pytest.raises(CheckpointError) as err:
        load_model(ARCH, foreign)
    msg = str(err.value)
    assert "every checkpoint key starts with 'backbone.'" in msg
    assert "--key-map positional" in msg and "unexpected backbone.t0" in msg
    # strict=False loads what fits and lists the rest
    loaded = load_model(ARCH, path, key_map={"^backbone[.]": ""}, num_classes=5, strict=False)
    assert loaded.load_report.missing == ["fc.weight", "fc.bias"]
    assert loaded.load_report.unexpected == []
    ref = src.state_dict()["conv1.0.weight"]
    assert torch.equal(loaded.model.state_dict()["conv1.0.weight"], ref)


def test_truncated_file(tmp_path, src):
    for name, legacy in (("t.pth", False), ("t_legacy.pth", True)):
        full = tmp_path / ("full_" + name)
        torch.save(src.state_dict(), full, _use_new_zipfile_serialization=not legacy)
        data = full.read_bytes()
        path = tmp_path / name
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            load_model(ARCH, path)
        assert str(path) in str(err.value)
    st = tmp_path / "t.safetensors"
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(st))
    st.write_bytes(st.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(ARCH, st)


def test_not_a_checkpoint(tmp_path):
    js = tmp_path / "config.json"
    js.write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(CheckpointError, match="not a weight file.*JSON"):
        load_model(ARCH, js)
    txt = tmp_path / "notes.pth"
    txt.write_text("hello, these are my weights")
    with pytest.raises(CheckpointError, match="not a weight file.*text"):
        load_model(ARCH, txt)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(ARCH, empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(ARCH, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        torch.save({"epoch": 3, "acc": 0.9}, tmp_path / "meta.pth")
        load_model(ARCH, tmp_path / "meta.pth")


def test_unknown_arch_suggestions():
    with pytest.raises(CheckpointError, match="timm:resnet10t"):
        load_model("timm:resnet10")
    with pytest.raises(CheckpointError, match="torchvision:resnet18"):
        load_model("torchvision:resnet81")
    with pytest.raises(CheckpointError, match="interptool:cw-student"):
        load_model("interptool:cw-studnet")
    with pytest.raises(CheckpointError, match="did you mean timm:resnet18 or torchvision:resnet18"):
        load_model("resnet18")


# ----------------------------------------------------------------------------- inference


def test_num_classes_and_channels_inferred(tmp_path):
    torch.manual_seed(3)
    gray = _randomise_bn(timm.create_model("resnet10t", num_classes=3, in_chans=1), 4)
    path = tmp_path / "gray.pth"
    torch.save(gray.state_dict(), path)
    loaded = load_model(ARCH, path)
    assert loaded.num_classes == 3
    assert loaded.load_report.inferred == dict(num_classes=3, num_classes_from="fc.weight",
                                               in_chans=1, in_chans_from="conv1.0.weight")
    pre = loaded.preprocessing
    assert pre.input_size == (1, 176, 176)
    assert pre.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))
    x = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        assert torch.equal(_logits(loaded, x), gray(x))
    # an RGB image becomes one grayscale channel: PIL's L = (299 R + 587 G + 114 B) / 1000
    img = Image.new("RGB", (40, 30), (200, 100, 50))
    t = pre.eval_transform()(img)
    assert t.shape == (1, 176, 176)
    level = round((200 * 299 + 100 * 587 + 50 * 114) / 1000)
    assert torch.allclose(t, torch.full_like(t, (level / 255 - pre.mean[0]) / pre.std[0]),
                          atol=1e-5)


def test_zoo_and_torchvision_inference(tmp_path):
    zoo = ZOO["cw-student"](num_classes=7, in_chans=1)
    path = tmp_path / "zoo.pth"
    torch.save(zoo.state_dict(), path)
    loaded = load_model("interptool:cw-student", path)
    assert loaded.num_classes == 7 and loaded.preprocessing.input_size == (1, 64, 64)
    assert loaded.preprocessing.source.startswith("zoo")
    tv = torchvision.models.resnet18(num_classes=3).eval()
    path = tmp_path / "tv.pth"
    torch.save({"model": tv.state_dict()}, path)
    loaded = load_model("torchvision:resnet18", path)
    assert loaded.num_classes == 3 and loaded.load_report.inferred["num_classes_from"] == "fc.weight"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(_logits(loaded, x), tv(x))


# ----------------------------------------------------------------------------- TorchScript


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript(tmp_path, src, logits):
    path = tmp_path / "model.pt"
    torch.jit.trace(src, torch.zeros(1, 3, 48, 48)).save(str(path))
    with pytest.raises(CheckpointError, match="--image-size --mean --std"):
        load_model(path)
    loaded = load_model(path, image_size=(48, 48), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.equal(_logits(loaded), logits)
    assert loaded.num_classes == 5 and loaded.preprocessing.source == "flags"
    assert loaded.arch_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # a TorchScript archive as a weight file for the matching architecture
    again = load_model(ARCH, path)
    assert torch.equal(_logits(again), logits) and again.load_report.format == "torchscript"
    # the channel count is read from the scripted first convolution
    with pytest.raises(CheckpointError, match="takes 3 input channel.*1 mean/std value"):
        load_model(path, image_size=48, mean=0.5, std=0.25)
    with pytest.raises(CheckpointError, match="outputs 5 classes but num_classes=4"):
        load_model(path, image_size=48, mean=(0.5,) * 3, std=(0.2,) * 3, num_classes=4)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocessing_sources_and_overrides():
    tv = load_model("torchvision:resnet18")
    p = tv.preprocessing
    assert (p.input_size, p.crop_pct, p.interpolation) == ((3, 224, 224), 0.875, "bilinear")
    assert p.mean == (0.485, 0.456, 0.406) and p.source == "torchvision"
    tm = load_model(ARCH, image_size=(64, 48), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    q = tm.preprocessing
    assert q.input_size == (3, 64, 48) and q.interpolation == "bicubic"
    assert q.mean == (0.5,) * 3 and q.source == "timm+flags"
    with pytest.raises(CheckpointError, match="takes 3 input channel"):
        load_model(ARCH, mean=0.5, std=0.25)
    assert Preprocessing.from_dict(json.loads(json.dumps(q.to_dict()))) == q


def test_transforms_known_values():
    pre = Preprocessing((3, 8, 8), (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), "bilinear", 0.5, "center")
    # left half red, right half blue, 32x16: eval resizes the shorter side to 16 (32x16 ->
    # 32x16 stays), centre-crops 8x8 from the middle columns 12..19 (all on the seam)
    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, :16] = (255, 0, 0)
    arr[:, 16:] = (0, 0, 255)
    img = Image.fromarray(arr)
    t = pre.eval_transform()(img)
    assert t.shape == (3, 8, 8)
    assert torch.allclose(t[0, :, :4], torch.full((8, 4), (1 - 0.5) / 0.5))
    assert torch.allclose(t[2, :, 4:], torch.full((8, 4), 1.0))
    probe = pre.probe_transform()(img)
    assert probe.shape == (3, 8, 8)  # whole image squeezed to 8x8: no crop
    assert torch.allclose(probe[0, :, 0], torch.full((8,), 1.0))
    assert torch.allclose(probe[1], torch.full((8, 8), -1.0))
    # picklable (DataLoader workers)
    import pickle

    pickle.loads(pickle.dumps(pre.eval_transform()))


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_channels_last_transforms_give_the_same_values_in_channels_last_order(channels,
                                                                              crop_mode):
    """The channels-last transforms (the cache's, for conv models on the CPU) must give the
    very values of timm's/torchvision's ToTensor + Normalize, for every crop mode and for
    inputs that need a conversion first (palette, 16-bit, RGBA, odd sizes)."""
    mean, std = (0.485, 0.456, 0.406)[:channels], (0.229, 0.224, 0.225)[:channels]
    pre = Preprocessing((channels, 20, 18), mean, std, "bicubic", 0.8, crop_mode)
    rng = np.random.default_rng(channels)
    rgb = Image.fromarray(rng.integers(0, 256, (31, 27, 3), dtype=np.uint8))
    images = [rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"),
              Image.fromarray(rng.integers(0, 65535, (9, 40), dtype=np.uint16))]
    for build in (pre.eval_transform, pre.probe_transform):
        plain, cl = build(), build(channels_last=True)
        assert any(isinstance(step, ToNormalizedChannelsLast) for step in cl.transforms)
        for img in images:
            want, got = plain(img), cl(img)
            assert want.is_contiguous() and torch.equal(got, want), (build.__name__, img.mode)
            # (C, H, W) viewed from an (H, W, C) buffer: strides (1, W*C, C)
            c, h, w = got.shape
            assert got.stride() == (1, w * c, c)
    pickle.loads(pickle.dumps(pre.probe_transform(channels_last=True)))


def test_channels_last_step_split_into_pixels_and_a_normalising_stack():
    """The cache's split of the step (8-bit pixels per image, normalised into a channels-last
    batch) gives the values of torch.stack over the plain transform, for RGB and grayscale;
    inputs other than 8-bit PIL images keep torchvision's conversion (no second /255)."""
    rng = np.random.default_rng(3)
    for channels in (3, 1):
        pre = Preprocessing((channels, 12, 10), (0.3, 0.5, 0.7)[:channels],
                            (0.2, 0.4, 0.6)[:channels], "bilinear", 0.9, "center")
        plain = pre.eval_transform()
        part, step = split_normalization(pre.eval_transform(channels_last=True))
        images = [Image.fromarray(rng.integers(0, 256, (15, 13, 3), dtype=np.uint8))
                  for _ in range(5)]
        pixels = [part(im) for im in images]
        assert all(isinstance(px, ImagePixels) and px.hwc.dtype == torch.uint8
                   and px.hwc.shape == (12, 10, channels) for px in pixels)
        batch = step.stack(pixels)
        assert batch.is_contiguous(memory_format=torch.channels_last)
        want = torch.stack([plain(im) for im in images])
        assert torch.equal(batch, want)
        # final (C, H, W) values among them (a data set that ignores the transform): copied
        mixed = step.stack([pixels[0], want[1], pixels[2]])
        assert mixed.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(mixed, want[:3])
        pickle.loads(pickle.dumps(part))
    assert split_normalization(pre.eval_transform()) is None  # the default layout: no split
    with pytest.raises(RuntimeError, match="equal size"):
        step.stack([pixels[0], ImagePixels(pixels[0].hwc[:5])])

    step = ToNormalizedChannelsLast((0.5, 0.25), (2.0, 0.5))
    hwc = rng.random((3, 4, 2), dtype=np.float32)
    got = step(hwc)  # not a PIL image: torchvision's conversion (no scaling), then the layout
    x = torch.from_numpy(hwc).permute(2, 0, 1)
    assert torch.equal(got, torch.stack([(x[0] - 0.5) / 2.0, (x[1] - 0.25) / 0.5]))
    assert got.stride() == (1, 8, 2)
    with pytest.raises(ValueError, match="std evaluated to zero"):
        ToNormalizedChannelsLast((0.5,), (0.0,))(Image.new("L", (2, 2)))


def test_channels_last_step_follows_the_default_dtype_at_call_time():
    """Like ToTensor/Normalize, the step converts to torch's default dtype when called, not
    when built: a transform built under float32 and called under float64 gives the same
    values as the plain transform (mean/std converted from the floats, not from float32)."""
    pre = Preprocessing((3, 9, 7), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    img = Image.fromarray(np.random.default_rng(5).integers(0, 256, (11, 8, 3), dtype=np.uint8))
    transforms = [(pre.probe_transform(), pre.probe_transform(channels_last=True)),
                  (pre.eval_transform(), pre.eval_transform(channels_last=True))]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for plain, cl in transforms:
            want, got = plain(img), cl(img)
            assert got.dtype == want.dtype == torch.float64 and torch.equal(got, want)
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- layers & dict


@pytest.fixture(scope="module")
def tv18() -> LoadedModel:
    return load_model("torchvision:resnet18")


def test_list_layers_resnet18(tv18):
    layers = dict(list_layers(tv18))
    assert layers["layer4"] == (512, 7, 7)
    assert layers["layer1"] == (64, 56, 56)
    assert layers["layer3.1.conv2"] == (256, 14, 14)
    assert layers["fc"] == (1000,)
    assert layers["avgpool"] == (512, 1, 1)
    names = [n for n, _ in list_layers(tv18)]
    assert names.index("layer1") < names.index("layer4") < names.index("fc")
    assert dict(list_layers(tv18, example_size=(64, 64)))["layer4"] == (512, 2, 2)
    assert all(not m._forward_hooks for m in tv18.model.modules())


def test_list_layers_removes_hooks_on_error(tv18):
    # a wrong channel count is the user's input, not a bug: a CheckpointError naming the shape
    with pytest.raises(CheckpointError, match=r"zero input of shape \(1, 2, 32, 32\).*"
                                              r"--image-size.*--mean/--std"):
        list_layers(tv18, example_size=(2, 32, 32))
    assert all(not m._forward_hooks for m in tv18.model.modules())
    assert not tv18.model.training


def test_bad_image_size_is_a_clear_error():
    with pytest.raises(CheckpointError, match=r"--image-size.*positive.*\(0, 0\)"):
        load_model(ARCH, image_size=0)
    with pytest.raises(CheckpointError, match=r"std must be positive \(--std\)"):
        load_model(ARCH, mean=(0.5,) * 3, std=(0.2, 0.0, 0.2))


def test_to_dict(tmp_path, src):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    loaded = load_model(ARCH, path)
    d = json.loads(json.dumps(loaded.to_dict()))
    assert d["arch"] == ARCH and d["checkpoint"] == str(path) and d["num_classes"] == 5
    assert d["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert d["preprocessing"]["input_size"] == [3, 176, 176]
    assert d["load_report"]["source_keys"] == "state_dict"
    assert loaded.name == "w" and not loaded.model.training
    assert load_model(ARCH).to_dict()["checkpoint"] is None


def test_no_checkpoint_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_model(ARCH)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    torch.manual_seed(999)
    b = load_model(ARCH)
    # same weights whatever the global seed was: the init is drawn from seed 0
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = timm.create_model("resnet10t", pretrained=False)
    assert torch.equal(a.model.state_dict()["fc.weight"], ref.state_dict()["fc.weight"])
    assert "random initialisation with seed 0" in a.load_report.notes[0]


def test_device_errors():
    with pytest.raises(ConfigError, match="not a torch device"):
        load_model(ARCH, device="gpu0")
    for other in ("mps", "meta", "xpu:0"):  # torch devices interptool does not run on
        with pytest.raises(ConfigError, match=r"not supported: interptool runs on cpu or cuda"):
            load_model(ARCH, device=other)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model(ARCH, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_device(tmp_path, src, logits):
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    loaded = load_model(ARCH, path, device="cuda")
    assert next(loaded.model.parameters()).is_cuda and loaded.device.startswith("cuda")
    assert torch.allclose(_logits(loaded, X.cuda()).cpu(), logits, atol=1e-4)
    assert dict(list_layers(loaded))["layer4"][0] == 512
