"""The models people distil, end to end through the command line (issue 11, Tests): a DeiT
distilled ViT (class + distillation tokens), a ViT with register tokens (class + 4 registers)
and a Hugging Face ``save_pretrained`` folder (class token) go through ``interptool layers``,
``cache``, ``dissect``, ``attribute --method grad_cam`` on a token layer and ``compare``.

Size: interptool's loader builds ``timm:NAME`` with timm's defaults (only ``num_classes`` /
``in_chans`` are passed on), so ``deit_tiny_distilled_patch16_224`` would run at 224 px with
12 blocks, and ``vit_small_patch14_reg4_dinov2`` at 518 px (seconds per image on this CPU).
The test therefore registers two tiny models under test names in timm's own registry, built
from the very classes those names use (``VisionTransformerDistilled``; ``VisionTransformer``
with ``reg_tokens=4``) at 32 px, patch 8, depth 2; the loader sees them as ordinary
``timm:NAME`` architectures. The commands run in this process (``interptool.cli.main``), where
the registration is visible. Weights are random and saved by the test (safetensors / .pth /
``save_pretrained``); nothing is downloaded.
"""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from interptool.cli import main

PROBE = "builtin:concept-world?version=1&n=24&size=32"
EVAL = "builtin:concept-world?version=1&n=16&size=32&seed=6&split=eval"
CW_PROBE = "builtin:concept-world?version=1&n=16&size=32&seed=6&split=probe"
GRID = (4, 4)  # 32 px / patch 8
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # create_model extras


@register_model
def interptool_test_deit_distilled_tiny(pretrained: bool = False, **kw) -> torch.nn.Module:
    """DeiT distilled (timm's class of ``deit_tiny_distilled_patch16_224``) at 32 px, depth 2."""
    for k in _TIMM_ONLY:
        kw.pop(k, None)
    return VisionTransformerDistilled(**{"img_size": 32, "patch_size": 8, "embed_dim": 32,
                                         "depth": 2, "num_heads": 2, **kw})


@register_model
def interptool_test_vit_reg4_tiny(pretrained: bool = False, **kw) -> torch.nn.Module:
    """A class token and 4 register tokens (as ``vit_*_reg4_dinov2``) at 32 px, depth 2."""
    for k in _TIMM_ONLY:
        kw.pop(k, None)
    return VisionTransformer(**{"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2,
                                "num_heads": 2, "reg_tokens": 4, "no_embed_class": True, **kw})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (arch flags, layer, leading tokens, embedding width); checkpoints written here."""
    d = tmp_path_factory.mktemp("token-models")
    torch.manual_seed(0)
    deit = timm.create_model("interptool_test_deit_distilled_tiny", num_classes=10)
    save_file(deit.state_dict(), str(d / "deit.safetensors"))
    reg = timm.create_model("interptool_test_vit_reg4_tiny", num_classes=10)
    torch.save(reg.state_dict(), d / "reg.pth")
    assert (deit.num_prefix_tokens, reg.num_prefix_tokens) == (2, 5)  # timm's own counts
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, num_labels=10)
    transformers.ViTForImageClassification(cfg).eval().save_pretrained(d / "hfvit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d / "hfvit")
    return d, {
        "deit": (["--arch", "timm:interptool_test_deit_distilled_tiny", "--checkpoint",
                  str(d / "deit.safetensors"), "--image-size", "32"], "blocks.0", 2, 32),
        "reg": (["--arch", "timm:interptool_test_vit_reg4_tiny", "--checkpoint",
                 str(d / "reg.pth"), "--image-size", "32"], "blocks.0", 5, 24),
        "hf": (["--arch", f"hf:{d / 'hfvit'}"], "vit.layers.0", 1, 16),
    }


def _grad_cam_by_hand(model, layer, x, target, prefix):
    """Grad-CAM on tokens written out: drop the leading tokens, weight each channel by its
    mean gradient over the patches, ReLU, reshape to the patch grid, bilinear to the input."""
    store = {}

    def hook(_m, _i, out):
        out = out[0] if isinstance(out, tuple) else out
        out.retain_grad()
        store["a"] = out

    h = layer.register_forward_hook(hook)
    try:
        model(x).gather(1, target[:, None]).sum().backward()
    finally:
        h.remove()
    a, g = store["a"][:, prefix:], store["a"].grad[:, prefix:]
    cam = torch.relu((g.mean(dim=1, keepdim=True) * a).sum(dim=2)).reshape(len(x), 1, *GRID)
    return F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear").detach()[:, 0]


@pytest.mark.parametrize("name", ["deit", "reg", "hf"])
def test_layers_cache_dissect_attribute(tmp_path, capsys, models, name):
    from interptool.data import open_dataset
    from interptool.loading import load_model

    _d, table = models
    flags, layer, prefix, width = table[name]
    tokens = prefix + GRID[0] * GRID[1]

    assert main(["layers", *flags, "--json", "--quiet"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["model"]["num_prefix_tokens"] == prefix
    assert listed["model"]["token_grid"] == list(GRID)
    assert {row["name"]: row["shape"] for row in listed["layers"]}[layer] == [tokens, width]

    cache = tmp_path / "probe.h5"
    assert main(["cache", *flags, "--data", PROBE, "--layers", layer, "--probe", "yes",
                 "--out", str(cache), "--quiet"]) == 0
    with h5py.File(cache, "r") as f:
        assert int(f.attrs["num_prefix_tokens"]) == prefix
        assert json.loads(f.attrs["token_grid"]) == list(GRID)
        assert f.attrs["transform"] == "probe"
        assert json.loads(f.attrs["layer_shapes"])[layer] == [tokens, width]

    assert main(["dissect", str(cache), "--layer", layer, "--out", str(tmp_path / "dis"),
                 "--no-figures", "--quiet"]) == 0
    summary = json.loads((tmp_path / "dis" / layer / "summary.json").read_text())
    assert summary["units"] == width  # one unit per embedding channel, tokens laid out
    with np.load(tmp_path / "dis" / layer / "iou.npz") as iou:
        assert all(v.shape[0] == width for k, v in iou.items() if v.ndim == 2)

    n = 4
    out = tmp_path / "att"
    assert main(["attribute", *flags, "--data", PROBE, "--method", "grad_cam", "--layer", layer,
                 "--n", str(n), "--sanity-n", "0", "--faithfulness-steps", "0",
                 "--sample", "first",  # the hand-written Grad-CAM below reads rows 0..n-1
                 "--out", str(out), "--quiet"]) == 0
    with h5py.File(out / "attributions.h5", "r") as f:
        maps = f["attributions/grad_cam"][:]
        labels = torch.as_tensor(f["labels"][:])
    assert maps.shape == (n, 32, 32)
    assert np.abs(maps).sum(axis=(1, 2)).min() > 0  # the block's patches reach the head
    # the same maps by hand on the same inputs (probe transform: the data set has masks)
    kw = dict(zip(flags[::2], flags[1::2]))
    loaded = load_model(kw["--arch"], checkpoint=kw.get("--checkpoint"),
                        image_size=int(kw["--image-size"]) if "--image-size" in kw else None)
    tds = open_dataset(PROBE).torch_dataset(loaded.preprocessing.probe_transform())
    x = torch.stack([torch.as_tensor(tds[i][0]) for i in range(n)])
    want = _grad_cam_by_hand(loaded.model, loaded.model.get_submodule(layer), x, labels, prefix)
    np.testing.assert_allclose(maps, want.numpy(), rtol=1e-3, atol=1e-5)


def test_compare_with_all_three(tmp_path, capsys, models):
    d, table = models
    toml = d / "c.toml"  # beside the weights: every path in it is relative to its folder
    toml.write_text(f"""
[data]
eval = "{EVAL}"
probe = "{CW_PROBE}"
[models.deit]
arch = "timm:interptool_test_deit_distilled_tiny"
checkpoint = "deit.safetensors"
layers = ["blocks.0"]
image_size = 32
role = "teacher"
[models.reg]
arch = "timm:interptool_test_vit_reg4_tiny"
checkpoint = "reg.pth"
layers = ["blocks.0"]
image_size = 32
[models.hf]
arch = "hf:hfvit"
layers = ["vit.layers.0"]
[analysis]
dissection = {{ top_units = 2, bootstrap = 20, baseline = "none" }}
similarity = {{ temperatures = [1], n_boot = 20 }}
attribution = {{ methods = ["grad_cam"], n_images = 2, faithfulness = false }}
[run]
batch_size = 8
""")
    out = tmp_path / "out"
    assert main(["compare", str(toml), "--out", str(out), "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [m["name"] for m in s["models"]] == ["deit", "reg", "hf"]
    assert {m["name"]: m["arch"] for m in s["models"]}["hf"] == f"hf:{(d / 'hfvit').resolve()}"
    assert s["teacher"] == "deit" and s["students"] == ["reg", "hf"]
    for name, (_flags, layer, _prefix, width) in table.items():
        per = json.loads((out / "dissection" / name / layer / "summary.json").read_text())
        assert per["units"] == width
        assert (out / "dissection" / name / layer / "top_units.png").stat().st_size > 0
    agreement = s["attribution"]["per_method"]["grad_cam"]["agreement"]
    assert set(agreement) == {"reg", "hf"}
    for row in agreement.values():
        est = row["cosine"]
        assert est["ci_low"] <= est["mean"] <= est["ci_high"]
    assert re.search(r"<html", (out / "report.html").read_text(), re.I)


def test_hf_arch_in_a_config_resolves_against_its_folder(tmp_path):
    from interptool.errors import ConfigError
    from interptool.pipeline import load_config

    (tmp_path / "sub" / "student").mkdir(parents=True)
    base = (f'[data]\neval = "{EVAL}"\n[models.t]\narch = "interptool:cw-student"\n'
            'layers = ["layer4"]\n[models.s]\narch = "ARCH"\nlayers = ["vit.layers.0"]\n'
            '[analysis]\ndissection = false\n')
    toml = tmp_path / "sub" / "c.toml"
    toml.write_text(base.replace("ARCH", "hf:student"))
    cfg = load_config(toml)
    assert cfg.models["s"].arch == f"hf:{(tmp_path / 'sub' / 'student').resolve()}"
    toml.write_text(base.replace("ARCH", "hf:missing"))
    with pytest.raises(ConfigError, match=r"c.toml: models.s.arch: folder not found: .*missing "
                                          r"\(paths are relative to the config's folder\)"):
        load_config(toml)
    toml.write_text(base.replace("ARCH", "hf:"))
    with pytest.raises(ConfigError, match=r"models.s.arch: missing folder after 'hf:'"):
        load_config(toml)


def test_the_real_deit_distilled_name_through_cache(tmp_path):
    """The named timm model itself (224 px, 12 blocks: what the loader builds for it), on two
    images: the cache records its class + distillation tokens and the 14 x 14 grid."""
    out = tmp_path / "deit224.h5"
    assert main(["cache", "--arch", "timm:deit_tiny_distilled_patch16_224", "--num-classes", "10",
                 "--data", "builtin:concept-world?version=1&n=2&size=32", "--layers", "blocks.11",
                 "--probe", "yes", "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
    with h5py.File(out, "r") as f:
        assert int(f.attrs["num_prefix_tokens"]) == 2
        assert json.loads(f.attrs["token_grid"]) == [14, 14]
        assert json.loads(f.attrs["layer_shapes"])["blocks.11"] == [2 + 14 * 14, 192]
        assert f["features/blocks.11"].shape == (2, 2 + 14 * 14, 192)
