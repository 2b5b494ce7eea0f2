"""Constructor arguments of an architecture (``model_kwargs``): a ViT fine-tuned at another input
size loads, its size becomes the input size, the arguments are checked, recorded in every cache
and compared on resume, and reach the CLI and the compare config."""

from __future__ import annotations

import textwrap

import h5py
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from interptool.cache import ActivationCache, run_cache
from interptool.cli import main
from interptool.data import open_dataset
from interptool.errors import CacheError, CheckpointError, ConfigError
from interptool.loading import check_model_kwargs, load_model
from interptool.loading._builder import _RESERVED_KWARGS
from interptool.pipeline import load_config

DEIT = "timm:deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def deit384(tmp_path_factory):
    """A DeiT-tiny built for 384 px inputs (as a fine-tune at 384 saves it) and its file."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=384,
                              num_classes=10).eval()
    path = tmp_path_factory.mktemp("deit384") / "deit384.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_vit_trained_at_another_size_loads_with_img_size(deit384):
    model, path = deit384
    loaded = load_model(DEIT, path, model_kwargs={"img_size": 384})
    assert loaded.model_kwargs == {"img_size": 384}
    assert loaded.to_dict()["model_kwargs"] == {"img_size": 384}
    # the model is built for 384 px, so that is what it is fed (timm's data config still
    # says 224: the pretrained default)
    assert loaded.preprocessing.image_size == (384, 384)
    assert (loaded.num_prefix_tokens, loaded.token_grid) == (1, (24, 24))
    x = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def test_size_mismatch_names_the_training_size(deit384):
    _, path = deit384
    with pytest.raises(CheckpointError) as info:
        load_model(DEIT, path)
    msg = str(info.value)
    assert "24x24 patch positions" in msg and "trained at 384 px" in msg
    assert "--model-kwargs img_size=384" in msg and "model_kwargs = { img_size = 384 }" in msg
    # the only difference is the input size: no talk of another architecture
    assert "wrong architecture" not in msg


def test_explicit_image_size_wins_over_img_size():
    loaded = load_model(DEIT, model_kwargs={"img_size": 256}, image_size=(224, 224))
    assert loaded.preprocessing.image_size == (224, 224)
    assert loaded.token_grid == (16, 16)  # the model's own grid (256 / 16)


def test_torchvision_vit_image_size_sets_the_input_size():
    loaded = load_model("torchvision:vit_b_16", model_kwargs={"image_size": 256})
    assert loaded.preprocessing.image_size == (256, 256)
    assert loaded.token_grid == (16, 16)
    assert loaded.model.encoder.pos_embedding.shape == (1, 257, 768)


def test_kwargs_change_the_model_and_not_the_weights():
    plain = load_model("timm:resnet18", num_classes=5)
    pooled = load_model("timm:resnet18", num_classes=5, model_kwargs={"global_pool": "max"})
    for a, b in zip(plain.model.state_dict().values(), pooled.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same seeded initialisation
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))  # 3x3 maps
    with torch.no_grad():
        feats = plain.model.forward_features(x)
        torch.testing.assert_close(pooled.model(x), pooled.model.fc(feats.amax(dim=(2, 3))))
        assert not torch.allclose(plain.model(x), pooled.model(x))


@pytest.mark.parametrize("key", sorted(_RESERVED_KWARGS))
def test_reserved_arguments_are_refused(key):
    with pytest.raises(ConfigError, match=rf"may not set '{key}'"):
        load_model("timm:resnet18", model_kwargs={key: 1})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"not a name": 1}, "not a keyword argument name"),
    ({"fn": object()}, "expected a number, string"),
    ({"nested": {"ok": [1, {"bad": object()}]}}, "expected a number, string"),
    ([("img_size", 384)], "must be a mapping"),
    ({"img_size": "big"}, r"img_size='big': expected a positive integer or \[H, W\]"),
])
def test_bad_kwargs_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_model(DEIT, model_kwargs=kwargs)


def test_unknown_argument_names_the_constructor_error():
    with pytest.raises(CheckpointError, match=r"timm could not build 'resnet18' with "
                                              r"\{'depth_scale': 2\}.*depth_scale"):
        load_model("timm:resnet18", model_kwargs={"depth_scale": 2})
    with pytest.raises(CheckpointError, match=r"interptool:cw-student could not be built.*"
                                              r"unexpected keyword argument 'width'"):
        load_model("interptool:cw-student", model_kwargs={"width": 2})


def test_torchscript_and_hf_folders_take_no_kwargs(tmp_path):
    ts = tmp_path / "net.pt"
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(ts))
    with pytest.raises(ConfigError, match="built from its own description"):
        check_model_kwargs({"img_size": 384}, str(ts))
    with pytest.raises(ConfigError, match="config.json"):
        check_model_kwargs({"img_size": 384}, f"hf:{tmp_path}")
    assert check_model_kwargs({}, str(ts)) == {}  # nothing given: nothing to refuse


# ----------------------------------------------------------------------------- cache
def test_cache_records_kwargs_and_refuses_to_mix_them(tmp_path):
    ds = open_dataset("builtin:concept-world?version=1&n=8&size=32&seed=0&split=probe")
    path = tmp_path / "c.h5"
    plain = load_model("timm:resnet18", num_classes=10)
    pooled = load_model("timm:resnet18", num_classes=10, model_kwargs={"global_pool": "max"})
    run_cache(pooled, ds, ["layer4"], path, batch_size=4, dtype="float32")
    with ActivationCache(path) as c:
        assert c.attrs["model_kwargs"] == {"global_pool": "max"}
        assert c.attrs["model"]["model_kwargs"] == {"global_pool": "max"}
    assert run_cache(pooled, ds, ["layer4"], path, batch_size=4, dtype="float32").status == "hit"
    # same weights (global_pool has none), other logits: must not be taken for this cache
    with pytest.raises(CacheError, match=r"model_kwargs: file has \{'global_pool': 'max'\}, "
                                         r"asked for \{\}"):
        run_cache(plain, ds, ["layer4"], path, batch_size=4, dtype="float32")


def test_cache_from_before_model_kwargs_matches_no_kwargs(tmp_path):
    ds = open_dataset("builtin:concept-world?version=1&n=8&size=32&seed=0&split=probe")
    path = tmp_path / "c.h5"
    plain = load_model("timm:resnet18", num_classes=10)
    run_cache(plain, ds, ["layer4"], path, batch_size=4, dtype="float32")
    with h5py.File(path, "a") as f:  # as an older version wrote it
        del f.attrs["model_kwargs"]
    assert run_cache(plain, ds, ["layer4"], path, batch_size=4, dtype="float32").status == "hit"
    pooled = load_model("timm:resnet18", num_classes=10, model_kwargs={"global_pool": "max"})
    with pytest.raises(CacheError, match="model_kwargs: file has None"):
        run_cache(pooled, ds, ["layer4"], path, batch_size=4, dtype="float32")


# ----------------------------------------------------------------------------- CLI
def test_parse_model_kwargs_reads_literals_else_strings():
    from interptool.cli._common import parse_model_kwargs

    got = parse_model_kwargs(["img_size=384", "global_pool=avg", "size=(256, 320)",
                              "name='3'", "drop=None", "flag=True", "expr=a=b"])
    assert got == {"img_size": 384, "global_pool": "avg", "size": (256, 320), "name": "3",
                   "drop": None, "flag": True, "expr": "a=b"}
    assert parse_model_kwargs(None) is None


def test_cli_loads_the_vit_with_model_kwargs(deit384, capsys):
    _, path = deit384
    rc = main(["layers", "--arch", DEIT, "--checkpoint", str(path), "--model-kwargs",
               "img_size=384", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "577" in out  # 24 x 24 patches + the class token in each block's output


@pytest.mark.parametrize(("arg", "expect"), [
    ("img_size", "expected KEY=VALUE"),
    ("pretrained=True", "may not set 'pretrained'"),
    ("img_size=-4", "expected a positive integer"),
])
def test_cli_bad_model_kwargs_exit_2_with_one_line(arg, expect, capsys):
    rc = main(["layers", "--arch", DEIT, "--model-kwargs", arg])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- config
_CONFIG = """
[data]
eval = "builtin:concept-world?version=1&n=40&size=32&seed=0&split=eval"
probe = "builtin:concept-world?version=1&n=40&size=32&seed=0&split=probe"
[models.teacher]
arch = "timm:deit_tiny_patch16_224"
layers = ["blocks.11"]
{extra}
[models.kd]
arch = "interptool:cw-student"
layers = ["layer4"]
"""


def _config(tmp_path, extra):
    p = tmp_path / "config.toml"
    p.write_text(textwrap.dedent(_CONFIG.format(extra=extra)))
    return load_config(p)


def test_config_model_kwargs_reach_load_model(tmp_path):
    cfg = _config(tmp_path, 'model_kwargs = { img_size = 384, global_pool = "avg" }')
    kw = cfg.models["teacher"].load_kwargs()
    assert kw["model_kwargs"] == {"img_size": 384, "global_pool": "avg"}
    assert cfg.models["kd"].load_kwargs()["model_kwargs"] is None  # none given


@pytest.mark.parametrize(("extra", "match"), [
    ("model_kwargs = { pretrained = true }", r"models\.teacher\.model_kwargs: .*'pretrained'"),
    ("model_kwargs = 384", r"models\.teacher\.model_kwargs: expected a table"),
    ("model_kwargs = { when = 2026-12-01 }", r"models\.teacher\.model_kwargs: .*when="),
])
def test_config_bad_model_kwargs_name_the_field(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, extra)


def test_attribution_stage_key_unchanged_without_kwargs():
    from interptool.pipeline._stages import _model_identity

    plain = load_model("timm:resnet18", num_classes=10)
    pooled = load_model("timm:resnet18", num_classes=10, model_kwargs={"global_pool": "max"})
    assert _model_identity("a", plain) == "a"  # the key earlier runs were stored under
    assert _model_identity("a", pooled) == ["a", {"global_pool": "max"}]
    assert np.unique([str(_model_identity("a", m)) for m in (plain, pooled)]).size == 2
