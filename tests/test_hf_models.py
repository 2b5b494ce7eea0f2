"""Hugging Face ``save_pretrained`` folders (``--arch hf:PATH``), built and saved by the tests
themselves from tiny random configs: nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402 - a test dependency (extra "test"): never skipped

from interptool.cli import main as cli_main  # noqa: E402
from interptool.errors import CheckpointError  # noqa: E402
from interptool.loading import list_layers, load_model  # noqa: E402

VIT_LABELS = {0: "cat", 1: "dog", 2: "fox"}


def _vit(seed: int = 0) -> transformers.ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, id2label=VIT_LABELS,
        label2id={v: k for k, v in VIT_LABELS.items()},
    )
    return transformers.ViTForImageClassification(cfg).eval()


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    model = _vit()
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, resample=2, image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    ).save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def convnext_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("hf") / "tiny-convnext"
    torch.manual_seed(1)
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1],
                                      num_stages=2, num_labels=4, image_size=32)
    model = transformers.ConvNextForImageClassification(cfg).eval()
    model.save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875,
                                        resample=3).save_pretrained(folder)
    return folder, model


def _x(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_vit_folder_loads_with_identical_logits_and_metadata(vit_dir):
    folder, ref = vit_dir
    loaded = load_model(f"hf:{folder}")
    with torch.no_grad():
        want = ref(pixel_values=_x()).logits
        got = loaded.model(_x())
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    assert loaded.num_classes == 3
    assert loaded.class_names == ["cat", "dog", "fox"]
    assert loaded.num_prefix_tokens == 1 and loaded.token_grid == (4, 4)  # 32 px / patch 8
    assert loaded.name == "tiny-vit"
    assert loaded.checkpoint is None
    assert loaded.checkpoint_sha256 == _sha(folder / "model.safetensors")
    assert loaded.arch_sha256 == _sha(folder / "config.json")
    pre = loaded.preprocessing
    assert pre.source == "hf" and pre.input_size == (3, 32, 32)
    assert (pre.crop_mode, pre.crop_pct, pre.interpolation) == ("squash", 1.0, "bilinear")
    np.testing.assert_allclose(pre.mean, [0.5, 0.4, 0.3])
    np.testing.assert_allclose(pre.std, [0.2, 0.25, 0.3])
    rep = loaded.load_report
    assert rep.format == "safetensors" and rep.missing == rep.unexpected == []
    d = loaded.to_dict()
    assert d["num_prefix_tokens"] == 1 and d["token_grid"] == [4, 4]
    assert d["class_names"] == ["cat", "dog", "fox"]
    json.dumps(d)


def test_vit_layers_have_the_hf_names_and_hooks_fire(vit_dir):
    folder, ref = vit_dir
    loaded = load_model(f"hf:{folder}")
    names = [n for n, _ in loaded.model.named_modules()]
    assert names == [n for n, _ in ref.named_modules()]
    assert list(loaded.model.state_dict()) == list(ref.state_dict())
    blocks = [n for n, m in ref.named_modules() if type(m).__name__ == "ViTLayer"]
    assert len(blocks) == 2
    layers = dict(list_layers(loaded))
    assert layers[blocks[-1]] == (1 + 16, 32)  # class token + 4 x 4 patches, width 32
    assert layers["classifier"] == (3,)
    seen: dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(_m, _i, out):
            seen[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    h1 = loaded.model.get_submodule(blocks[-1]).register_forward_hook(grab("ours"))
    h2 = ref.get_submodule(blocks[-1]).register_forward_hook(grab("ref"))
    try:
        with torch.no_grad():
            loaded.model(_x(1))
            ref(pixel_values=_x(1))
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(seen["ours"], seen["ref"])


def test_cli_layers_on_an_hf_folder(vit_dir, capsys):
    folder, ref = vit_dir
    assert cli_main(["layers", "--arch", f"hf:{folder}", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["num_prefix_tokens"] == 1 and out["model"]["token_grid"] == [4, 4]
    assert out["model"]["preprocessing"]["source"] == "hf"
    names = [row["name"] for row in out["layers"]]
    assert "classifier" in names and names[0] == next(n for n, _ in ref.named_children())
    assert cli_main(["layers", "--arch", f"hf:{folder}", "--depth", "1"]) == 0
    table = capsys.readouterr().out
    assert "classifier" in table and "(3,)" in table


def test_convnext_folder(convnext_dir):
    folder, ref = convnext_dir
    loaded = load_model(f"hf:{folder}")
    with torch.no_grad():
        assert torch.equal(loaded.model(_x()), ref(pixel_values=_x()).logits)
    assert loaded.num_classes == 4
    assert loaded.class_names is None  # transformers' placeholders LABEL_0..LABEL_3
    assert loaded.num_prefix_tokens == 0 and loaded.token_grid is None
    pre = loaded.preprocessing
    # ConvNext below 384 px: shorter side to 32 / 0.875 = 36, centre 32 x 32, bicubic
    assert (pre.input_size, pre.crop_mode, pre.crop_pct, pre.interpolation) == (
        (3, 32, 32), "center", 0.875, "bicubic")
    layers = dict(list_layers(loaded))
    assert layers["classifier"] == (4,)
    assert any(len(s) == 3 for s in layers.values() if s is not None)  # (C, H, W) maps


@pytest.mark.parametrize("which,size", [("vit", (48, 40)), ("convnext", (52, 40))])
def test_preprocessing_matches_the_folder_processor(vit_dir, convnext_dir, which, size):
    """Our eval transform against transformers' own processor on a non-square image.

    The crop offsets are even here (transformers floors the offset, torchvision rounds), and
    both resize with antialiasing; what must agree is which part of the image is kept and at
    what scale and normalisation: a squash-vs-crop or scale mistake moves most pixels by far
    more than the tolerance.
    """
    folder = (vit_dir if which == "vit" else convnext_dir)[0]
    rng = np.random.default_rng(0)
    # smooth content, so that resampling-kernel details stay small against real mistakes
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    img = np.stack([(yy * 255 // size[1]), (xx * 255 // size[0]),
                    ((xx + yy) * 127 // sum(size))], -1).astype(np.uint8)
    img = np.clip(img + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    proc = transformers.AutoImageProcessor.from_pretrained(folder)
    want = proc(images=pil, return_tensors="pt")["pixel_values"][0]
    got = load_model(f"hf:{folder}").preprocessing.eval_transform()(pil)
    assert got.shape == want.shape
    err = (got - want).abs()
    # measured: ViT 0.0008 / 0.008 (antialias kernels differ), ConvNext ~1e-8; the wrong crop
    # mode gives 0.034 / 0.15 or more
    assert err.mean() < 0.005 and err.max() < 0.05, (err.mean(), err.max())


def test_pytorch_model_bin_folder_loads_and_unsafe_pickles_are_refused(tmp_path, vit_dir):
    folder, ref = vit_dir
    binf = tmp_path / "bin-vit"
    binf.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (binf / name).write_bytes((folder / name).read_bytes())
    torch.save(ref.state_dict(), binf / "pytorch_model.bin")
    loaded = load_model(f"hf:{binf}")
    assert loaded.load_report.format == "zip"
    with torch.no_grad():
        assert torch.equal(loaded.model(_x()), ref(pixel_values=_x()).logits)
    # a flipped bit inside a tensor of the .bin is caught by the zip CRC check
    raw = bytearray((binf / "pytorch_model.bin").read_bytes())
    pos = raw.index(ref.state_dict()["classifier.weight"].numpy().tobytes()[:16])
    raw[pos + 1] ^= 0x04
    (binf / "pytorch_model.bin").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        load_model(f"hf:{binf}")
    # a .bin that needs full unpickling is refused by interptool's reader first
    torch.save({**ref.state_dict(), "cfg": Path("x")}, binf / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_model(f"hf:{binf}")


def test_incomplete_weights_are_refused_not_randomly_filled(tmp_path, vit_dir):
    from safetensors.torch import load_file, save_file

    folder, _ = vit_dir
    part = tmp_path / "headless"
    part.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (part / name).write_bytes((folder / name).read_bytes())
    sd = {k: v for k, v in load_file(folder / "model.safetensors").items()
          if not k.startswith("classifier.")}
    save_file(sd, part / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"2 missing \(e\.g\. classifier\.bias"):
        load_model(f"hf:{part}")
    lenient = load_model(f"hf:{part}", strict=False)
    assert sorted(lenient.load_report.missing) == ["classifier.bias", "classifier.weight"]


def test_hf_architecture_with_a_separate_checkpoint(tmp_path, vit_dir):
    folder, _ = vit_dir
    other = _vit(seed=7)
    ckpt = tmp_path / "student.pth"
    torch.save({"state_dict": other.state_dict()}, ckpt)
    loaded = load_model(f"hf:{folder}", ckpt)
    assert loaded.load_report.source_keys == "state_dict"
    with torch.no_grad():
        assert torch.equal(loaded.model(_x()), other(pixel_values=_x()).logits)
    assert loaded.checkpoint_sha256 == _sha(ckpt) and loaded.name == "student"


def test_bad_hf_folders(tmp_path, vit_dir):
    folder, _ = vit_dir
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_model(f"hf:{tmp_path / 'nope'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(f"hf:{empty}")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="no weights in .*model.safetensors"):
        load_model(f"hf:{noweights}")
    text = tmp_path / "bert"
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(text)
    with pytest.raises(CheckpointError, match="'bert' .*no image-classification head"):
        load_model(f"hf:{text}")
    with pytest.raises(CheckpointError, match=f"write --arch hf:{folder}"):
        load_model(str(folder))
    with pytest.raises(CheckpointError, match="has 3 classes .*drop --num-classes"):
        load_model(f"hf:{folder}", num_classes=5)
    # no preprocessor_config.json: the numbers must come from flags
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(CheckpointError, match="--image-size --mean --std"):
        load_model(f"hf:{bare}")
    ok = load_model(f"hf:{bare}", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert ok.preprocessing.source == "flags"
    assert cli_main(["layers", "--arch", f"hf:{empty}"]) == 2


def test_distilled_deit_and_register_tokens(tmp_path):
    """Leading tokens counted from the model: DeiT distilled = class + distillation (2),
    DINOv2 with 4 registers = class + 4 (5). The token layers hold prefix + grid tokens."""
    torch.manual_seed(2)
    deit = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3)).eval()
    reg = transformers.Dinov2WithRegistersForImageClassification(
        transformers.Dinov2WithRegistersConfig(
            image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_register_tokens=4, num_labels=3)).eval()
    for name, model, side, prefix in (("deit", deit, 32, 2), ("reg", reg, 28, 5)):
        folder = tmp_path / name
        model.save_pretrained(folder)
        loaded = load_model(f"hf:{folder}", image_size=side, mean=(0.5,) * 3, std=(0.5,) * 3)
        assert loaded.num_prefix_tokens == prefix and loaded.token_grid == (4, 4)
        x = torch.randn(1, 3, side, side)
        with torch.no_grad():
            assert torch.equal(loaded.model(x), model(pixel_values=x).logits)
        blocks = [n for n, m in model.named_modules() if type(m).__name__.endswith("Layer")
                  and n.rsplit(".", 1)[-1].isdigit()]
        assert dict(list_layers(loaded))[blocks[-1]] == (prefix + 16, 32)


def test_hf_folder_through_the_activation_cache(tmp_path, vit_dir):
    """The cache stage sees an ordinary module: token features, logits equal to the HF
    model's own on the same preprocessed images, and the token layout recorded."""
    from interptool.cache import ActivationCache, cache_activations
    from interptool.data import open_dataset

    folder, ref = vit_dir
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / c / f"{i}.png")
    loaded = load_model(f"hf:{folder}")
    ds = open_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    block = [n for n, m in ref.named_modules() if type(m).__name__ == "ViTLayer"][-1]
    path = cache_activations(loaded, ds, [block], tmp_path / "c.h5", batch_size=3,
                             dtype="float32")
    tf = loaded.preprocessing.eval_transform()
    x = torch.stack([tf(ds.load_image(i)) for i in range(len(ds))])
    with torch.no_grad():
        want = ref(pixel_values=x).logits.numpy()
    with ActivationCache(path) as cache:
        assert cache.features(block).shape == (4, 17, 32)
        np.testing.assert_allclose(cache.logits, want, rtol=1e-5, atol=1e-6)
        info = cache.model_info  # LoadedModel.to_dict(), recorded by every cache
        assert info["num_prefix_tokens"] == 1 and info["token_grid"] == [4, 4]
        assert info["class_names"] == ["cat", "dog", "fox"]
