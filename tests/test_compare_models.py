"""The models people distil, through ``compare`` (issue 11 items 7-8): a DeiT distilled
teacher (class + distillation tokens) with a CNN student, per-model Grad-CAM layers, every
setting validated against every model before caching, and TorchScript students in the
logits-only analyses.
"""

from __future__ import annotations

import json

import pytest
import torch

from interptool.errors import ConfigError

EVAL = "builtin:concept-world?version=1&n=16&size=32&seed=6&split=eval"
PROBE = "builtin:concept-world?version=1&n=16&size=32&seed=6&split=probe"


def _cfg(tmp_path, text: str, name: str = "c.toml"):
    from interptool.pipeline import load_config

    (tmp_path / name).write_text(text)
    return load_config(tmp_path / name)


def _no_cache_written(out) -> bool:
    return not (out / "cache").exists() or not any((out / "cache").glob("*.h5"))


# --------------------------------------------------------------------------------------------
# TorchScript: logits-only analyses
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    from interptool.loading._zoo import ZOO

    d = tmp_path_factory.mktemp("ts")
    torch.manual_seed(4)
    net = ZOO["cw-student"](num_classes=10).eval()
    ts = torch.jit.trace(net, torch.zeros(1, 3, 32, 32))
    ts.save(str(d / "student.pt"))
    return d / "student.pt", net


def _ts_config(path, *, dissection: bool) -> str:
    return f"""
[data]
eval = "{EVAL}"
probe = "{PROBE}"
[models.teacher]
arch = "interptool:cw-student"
layers = ["layer4"]
image_size = 32
role = "teacher"
[models.ts]
arch = "{path}"
image_size = 32
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
[analysis]
dissection = {"{ bootstrap = 20 }" if dissection else "false"}
similarity = {{ temperatures = [1], n_boot = 20 }}
attribution = false
[run]
batch_size = 8
"""


def test_torchscript_with_a_layer_analysis_is_refused_before_caching(tmp_path, scripted):
    from interptool.pipeline import run_compare

    cfg = _cfg(tmp_path, _ts_config(scripted[0], dissection=True))
    assert cfg.models["ts"].layers == []  # layers may be omitted for a TorchScript file
    with pytest.raises(ConfigError) as err:
        run_compare(cfg, tmp_path / "out")
    msg = str(err.value)
    assert "c.toml: models.ts: student.pt is a TorchScript model" in msg
    assert "dissection needs them" in msg and "analysis.dissection = false" in msg
    assert _no_cache_written(tmp_path / "out")


def test_torchscript_student_in_similarity(tmp_path, scripted):
    from interptool.analyzers.similarity import compare_similarity
    from interptool.cache import ActivationCache
    from interptool.pipeline import run_compare

    cfg = _cfg(tmp_path, _ts_config(scripted[0], dissection=False))
    run_compare(cfg, tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "ts" in s["similarity"]["models"] and "cka" not in s["similarity"]
    # the scripted student's logits are the traced network's, so its transfer equals the
    # analyzer run directly on the two caches
    out = tmp_path / "out" / "cache"
    with ActivationCache(out / "teacher_eval.h5") as t, ActivationCache(out / "ts_eval.h5") as c:
        direct = compare_similarity(t, c, temperature=1, n_boot=20, seed=0, k=5).to_frame()
        x = torch.as_tensor(c.logits[:2])
    row = direct[(direct["metric"] == "spearman") & (direct["role"] == "student")].iloc[0]
    got = next(r for r in s["similarity"]["estimates"] if r["metric"] == "spearman"
               and r["role"] == "student")
    assert got["value"] == pytest.approx(row["value"])
    assert x.shape == (2, 10)
    assert any(f["measure"] == "accuracy (eval)" for f in s["findings"])


# --------------------------------------------------------------------------------------------
# per-model Grad-CAM layer and validation before caching
# --------------------------------------------------------------------------------------------
CNN = f"""
[data]
eval = "{EVAL}"
[models.teacher]
arch = "interptool:cw-teacher"
layers = ["layer3", "layer4"]
image_size = 32
role = "teacher"
[models.small]
arch = "interptool:cw-student"
layers = ["layer3", "layer4"]
image_size = 32
attribution_layer = "layer3"
[analysis]
dissection = false
similarity = false
attribution = {{ methods = ["grad_cam"], n_images = 2, faithfulness = false }}
[run]
batch_size = 8
"""


def test_attribution_layer_per_model_resolution_and_use(tmp_path, monkeypatch):
    import interptool.analyzers.attribution as attribution_pkg
    from interptool.pipeline import run_compare
    from interptool.pipeline._context import RunContext
    from interptool.pipeline._validate import gradcam_layer

    cfg = _cfg(tmp_path, CNN)
    run = RunContext(cfg, tmp_path / "o")
    assert gradcam_layer(run, "small") == ("layer3", "models.small.attribution_layer")
    assert gradcam_layer(run, "teacher") == ("layer4", "models.teacher.layers (last)")
    cfg.analysis.attribution.layer = "layer4"
    assert gradcam_layer(run, "teacher") == ("layer4", "analysis.attribution.layer")
    assert gradcam_layer(run, "small")[0] == "layer3"  # the model's own setting wins
    cfg.analysis.attribution.layer = None
    # record the layer every Grad-CAM is built with, and which model it then runs on
    real = attribution_pkg.Attribution
    used: list[tuple[str, int]] = []

    class Spy(real):
        def run(self, model_or_loaded, data, **kw):
            used.append((self.params.get("layer"),
                         sum(q.numel() for q in model_or_loaded.model.parameters())))
            return super().run(model_or_loaded, data, **kw)

    monkeypatch.setattr(attribution_pkg, "Attribution", Spy)
    run_compare(cfg, tmp_path / "out")
    from interptool.loading import load_model

    sizes = {m: sum(q.numel() for q in load_model(cfg.models[m].arch, num_classes=10)
                    .model.parameters()) for m in ("teacher", "small")}
    by_model = {}
    for layer, size in used:
        by_model.setdefault(size, set()).add(layer)
    # validation tried each model's layer once, the stage used the same one
    assert by_model[sizes["small"]] == {"layer3"}
    assert by_model[sizes["teacher"]] == {"layer4"}


def test_unknown_attribution_layer_named_before_caching(tmp_path):
    from interptool.pipeline import run_compare

    cfg = _cfg(tmp_path, CNN.replace('attribution_layer = "layer3"',
                                     'attribution_layer = "layer33"'))
    with pytest.raises(ConfigError, match=r"c.toml: models.small.attribution_layer: 'layer33' "
                                          r"is not a module of interptool:cw-student.*layer3"):
        run_compare(cfg, tmp_path / "out")
    assert _no_cache_written(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# DeiT distilled (class + distillation tokens) teacher, CNN student
# --------------------------------------------------------------------------------------------
DEIT = f"""
[data]
eval = "{EVAL}"
probe = "{PROBE}"
[models.deit]
arch = "timm:deit_tiny_distilled_patch16_224"
num_classes = 10
layers = ["blocks.11"]
role = "teacher"
[models.small]
arch = "interptool:cw-student"
layers = ["layer4"]
image_size = 224
[analysis]
dissection = {{ top_units = 2, bootstrap = 20, baseline = "none" }}
similarity = {{ temperatures = [1], n_boot = 20 }}
attribution = {{ methods = ["saliency"], n_images = 2, faithfulness = false }}
[run]
batch_size = 8
"""


def test_deit_distilled_teacher_through_compare_with_token_montage(tmp_path):
    from PIL import Image

    from interptool.pipeline import run_compare

    run_compare(_cfg(tmp_path, DEIT), tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    part = s["dissection"]["per_model"]["deit"]["blocks.11"]
    assert part["units"] == 192  # token layer: one unit per channel, prefix tokens dropped
    sheet = Image.open(tmp_path / "out" / part["montage"])
    assert sheet.size[0] > 0 and sheet.size[1] > 0
    assert "cka" in s["similarity"]  # token layers in CKA too
    with open(tmp_path / "out" / "report.html") as f:
        assert "montage_deit_blocks.11" in json.dumps(s["figures"]) and "deit" in f.read()


def test_gradcam_on_a_layer_it_cannot_use_is_refused_before_caching(tmp_path):
    """Grad-CAM is tried on one zero image per model before any caching: a layer it cannot
    use (here the classifier head, whose output (N, 10) has no spatial map) is named with the
    field."""
    from interptool.pipeline import run_compare

    text = DEIT.replace('layers = ["blocks.11"]\nrole',
                        'layers = ["blocks.11"]\nattribution_layer = "head"\nrole')
    text = text.replace('methods = ["saliency"]', 'methods = ["grad_cam"]')
    cfg = _cfg(tmp_path, text)
    with pytest.raises(ConfigError, match=r"models.deit.attribution_layer: Grad-CAM cannot "
                                          r"use 'head' of deit"):
        run_compare(cfg, tmp_path / "out")
    assert _no_cache_written(tmp_path / "out")


def test_attribution_across_input_sizes_refused_before_caching(tmp_path):
    from interptool.pipeline import run_compare

    cfg = _cfg(tmp_path, DEIT.replace("image_size = 224", "image_size = 32"))
    with pytest.raises(ConfigError, match=r"models.small.image_size: attribution compares maps "
                                          r"pixel by pixel .* small takes 32x32 images and "
                                          r"deit 224x224; set image_size = \[224, 224\]"):
        run_compare(cfg, tmp_path / "out")
    assert _no_cache_written(tmp_path / "out")
