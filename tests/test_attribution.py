"""Attribution maps: equality with direct captum calls, in-place ReLUs, hooks, errors,
HDF5 storage and resume, result objects, CLI."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from interptool.analyzers.attribution import Attribution, AttributionResult, hook_count
from interptool.analyzers.attribution._methods import batch_seed
from interptool.errors import AnalysisError, InterptoolError
from interptool.loading._zoo import ZOO

pytestmark = [
    # raised by the direct captum calls the tests compare against
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU"),
]


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = ZOO["cw-student"](num_classes=10)
    # non-trivial BN statistics so that eval mode matters
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _no_inplace(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(getattr(mod, "inplace", None), bool):
            mod.inplace = False
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _student()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, 32, 32, generator=g), torch.tensor([0, 3, 9, 1, 3])


def _captum(method: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The same attribution written directly against captum."""
    from captum.attr import (
        GuidedBackprop,
        InputXGradient,
        IntegratedGradients,
        LayerAttribution,
        LayerGradCam,
        NoiseTunnel,
        Occlusion,
        Saliency,
    )

    x = x.clone().requires_grad_(True)
    if method == "saliency":
        return Saliency(model).attribute(x, target=t)
    if method == "input_x_gradient":
        return InputXGradient(model).attribute(x, target=t)
    if method == "integrated_gradients":
        return IntegratedGradients(model).attribute(
            x, baselines=torch.zeros_like(x), target=t, n_steps=6, internal_batch_size=7)
    if method == "smoothgrad":
        with torch.random.fork_rng():
            torch.manual_seed(batch_seed(3, 0))
            # internal batching (rows per pass = batch_size 8 for 5 images): one noise
            # sample of every image per pass, which fixes which noise each image draws
            return NoiseTunnel(Saliency(model)).attribute(
                x, nt_type="smoothgrad", nt_samples=4, stdevs=0.2, target=t,
                nt_samples_batch_size=8 // len(x))
    if method == "guided_backprop":
        return GuidedBackprop(model).attribute(x, target=t)
    if method == "grad_cam":
        cam = LayerGradCam(model, model.layer3).attribute(x, target=t, relu_attributions=True)
        return LayerAttribution.interpolate(cam, (32, 32), interpolate_mode="bilinear")
    if method == "occlusion":
        return Occlusion(model).attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4),
                                          baselines=torch.zeros_like(x), target=t,
                                          perturbations_per_eval=16)
    raise AssertionError(method)


PARAMS = {
    "saliency": {},
    "input_x_gradient": {},
    "integrated_gradients": {"steps": 6, "internal_batch_size": 7},
    "smoothgrad": {"nt_samples": 4, "stdevs": 0.2, "seed": 3},
    "guided_backprop": {},
    "grad_cam": {"layer": "layer3"},
    "occlusion": {"window": 8, "stride": 4},
}


@pytest.mark.parametrize("method", list(PARAMS))
def test_maps_equal_captum(method, model, batch):
    x, y = batch
    res = Attribution(method, keep_raw=True, **PARAMS[method]).run(
        model, x, labels=y, batch_size=8)
    ref = _captum(method, _no_inplace(model), x, y).detach()
    assert res.raw.shape == tuple(ref.shape)
    np.testing.assert_allclose(res.raw, ref.numpy(), rtol=1e-5, atol=1e-7)
    # documented reduction: sum of |.| over channels; grad_cam already one channel
    expect = ref[:, 0] if method == "grad_cam" else ref.abs().sum(dim=1)
    np.testing.assert_allclose(res.maps, expect.numpy(), rtol=1e-5, atol=1e-7)
    assert res.maps.dtype == np.float32 and res.maps.shape == (5, 32, 32)
    assert list(res.targets) == y.tolist()
    with torch.no_grad():
        assert list(res.predictions) == model(x).argmax(1).tolist()
    if method == "grad_cam":
        assert (res.maps >= 0).all()  # relu_attributions=True


def test_reduce_options(model, batch):
    x, y = batch
    r = Attribution("input_x_gradient", keep_raw=True, reduce="sum").run(model, x, labels=y)
    np.testing.assert_allclose(r.maps, r.raw.sum(axis=1), rtol=1e-6)
    with pytest.raises(AnalysisError, match="reduce must be one of"):
        Attribution("saliency", reduce="mean")


def _input_clamp_net() -> nn.Module:
    torch.manual_seed(0)
    # first op in-place on the input: captum's input gradients break on the leaf tensor
    return nn.Sequential(nn.Hardtanh(-2.0, 2.0, inplace=True), nn.Conv2d(3, 4, 3, padding=1),
                         nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


@pytest.mark.parametrize("method", ["saliency", "guided_backprop", "input_x_gradient"])
def test_inplace_model_works_via_copy(method):
    from captum.attr import GuidedBackprop, InputXGradient, Saliency

    net = _input_clamp_net()
    x = torch.randn(3, 3, 12, 12)
    t = torch.tensor([0, 1, 2])
    cls = {"saliency": Saliency, "guided_backprop": GuidedBackprop,
           "input_x_gradient": InputXGradient}[method]
    # the failure the copy avoids: captum directly on the in-place model
    with pytest.raises(RuntimeError, match="in-place"):
        cls(net).attribute(x.clone(), target=t)
    res = Attribution(method, keep_raw=True).run(net, x, labels=t)
    ref = cls(_no_inplace(net)).attribute(x.clone().requires_grad_(True), target=t).detach()
    np.testing.assert_allclose(res.raw, ref.numpy(), rtol=1e-6, atol=1e-8)
    # the user's model keeps its in-place flags; the copy has none
    assert net[0].inplace and net[2].inplace
    assert not any(getattr(m, "inplace", False) for m in res_model(method, net).modules())


def res_model(method, net):
    a = Attribution(method)
    a.run(net, torch.randn(1, 3, 12, 12), target=0)
    return a.model_


@pytest.mark.parametrize("method", list(PARAMS))
def test_no_hooks_leak(method, model, batch):
    x, y = batch
    before = hook_count(model)
    a = Attribution(method, **PARAMS[method])
    a.run(model, x[:2], labels=y[:2])
    first_copy = a.model_
    a.run(model, x[:2], labels=y[:2])
    assert hook_count(model) == before == 0
    assert hook_count(a.model_) == 0 and hook_count(first_copy) == 0
    assert a.model_ is not model


def test_user_model_untouched(batch):
    x, y = batch
    m = _student(1).train()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    Attribution("grad_cam", layer="layer4").run(m, x[:2], labels=y[:2])
    assert m.training  # mode untouched, maps computed in eval mode on the copy
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert all(p.device.type == "cpu" for p in m.parameters())


# ----------------------------------------------------------------------------- errors


def test_bad_method_lists_valid():
    with pytest.raises(AnalysisError) as e:
        Attribution("integrated_gradient")
    msg = str(e.value)
    assert "integrated_gradients" in msg and "grad_cam" in msg and "Did you mean" in msg


def test_unknown_param():
    with pytest.raises(AnalysisError, match="unknown parameter.*n_steps.*valid.*steps"):
        Attribution("integrated_gradients", n_steps=3)


def test_grad_cam_missing_layer_lists_close_names(model, batch):
    x, y = batch
    with pytest.raises(AnalysisError) as e:
        Attribution("grad_cam", layer="layer5").run(model, x[:1], labels=y[:1])
    assert "'layer5' not found" in str(e.value) and "layer4" in str(e.value)
    with pytest.raises(AnalysisError, match="grad_cam needs a layer"):
        Attribution("grad_cam")


def test_target_out_of_range(model, batch):
    x, y = batch
    with pytest.raises(AnalysisError, match=r"target 10 .* 10 outputs \(valid 0..9\)"):
        Attribution("saliency").run(model, x[:2], target=10)
    with pytest.raises(AnalysisError, match=r"label 12 of image '1'"):
        Attribution("saliency").run(model, x[:2], labels=torch.tensor([1, 12]))


def test_label_target_on_unlabelled(model, batch):
    x, _ = batch
    with pytest.raises(AnalysisError, match="has no label.*predicted"):
        Attribution("saliency").run(model, x[:2])
    res = Attribution("saliency").run(model, x[:2], target="predicted")
    assert list(res.targets) == list(res.predictions)
    assert list(res.labels) == [-1, -1]


def test_bad_inputs(model):
    with pytest.raises(AnalysisError, match=r"\(N, C, H, W\)"):
        Attribution("saliency").run(model, torch.zeros(3, 32, 32), target=0)
    with pytest.raises(AnalysisError, match="target must be"):
        Attribution("saliency").run(model, torch.zeros(1, 3, 32, 32), target="max")
    assert issubclass(AnalysisError, InterptoolError)


# ----------------------------------------------------------------------------- storage


def _h5_content(path):
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: v for k, v in f.attrs.items() if k not in ("created",)}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj[()], dict(obj.attrs))
        f.visititems(visit)
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "attrs":
            assert a[k] == b[k]
            continue
        (va, aa), (vb, ab) = a[k], b[k]
        assert aa == ab, k
        np.testing.assert_array_equal(va, vb, err_msg=k)


def test_resume_after_interruption_identical(tmp_path, model):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, 32, 32, generator=g)
    y = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    params = dict(nt_samples=3, stdevs=0.3, seed=11)
    full = Attribution("smoothgrad", keep_raw=True, **params).run(
        model, x, labels=y, batch_size=3, out=tmp_path / "full")

    a = Attribution("smoothgrad", keep_raw=True, **params)
    real = a.adapter.attribute
    calls = []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    a.adapter.attribute = flaky
    with pytest.raises(KeyboardInterrupt):
        a.run(model, x, labels=y, batch_size=3, out=tmp_path / "part")
    with h5py.File(tmp_path / "part" / "attributions.h5", "r") as f:
        ds = f["attributions/smoothgrad"]
        assert ds.attrs["n_done"] == 6 and not ds.attrs["complete"]
        assert not f.attrs["complete"]

    b = Attribution("smoothgrad", keep_raw=True, **params)
    n_calls = []
    real_b = b.adapter.attribute
    b.adapter.attribute = lambda *a_, **k: (n_calls.append(1), real_b(*a_, **k))[1]
    resumed = b.run(model, x, labels=y, batch_size=3, out=tmp_path / "part")
    assert len(n_calls) == 1  # only the last batch was computed
    np.testing.assert_array_equal(resumed.maps, full.maps)
    _assert_same(_h5_content(tmp_path / "full" / "attributions.h5"),
                 _h5_content(tmp_path / "part" / "attributions.h5"))
    with h5py.File(tmp_path / "part" / "attributions.h5", "r") as f:
        assert f.attrs["complete"] and f["attributions/smoothgrad"].attrs["n_done"] == 7
        assert json.loads(f["attributions/smoothgrad"].attrs["params"])["seed"] == 11
        assert [s.decode() for s in f["index"][:]] == [str(i) for i in range(7)]
        np.testing.assert_array_equal(f["targets"][:], y.numpy())


def test_store_refuses_to_resume_maps_made_on_another_device(tmp_path, model, batch):
    """The device type is part of a method's recorded settings: a file whose SmoothGrad maps
    were computed on CUDA (edited here to say so; torch draws the noise per device) is not
    resumed or reused on the CPU, which would mix two noise streams."""
    x, y = batch
    first = Attribution("smoothgrad", nt_samples=2, seed=3).run(model, x, labels=y, out=tmp_path)
    assert first.params["device_type"] == "cpu"
    path = tmp_path / "attributions.h5"
    with h5py.File(path, "r+") as f:
        ds = f["attributions/smoothgrad"]
        params = json.loads(ds.attrs["params"])
        ds.attrs["params"] = json.dumps({**params, "device_type": "cuda"}, sort_keys=True)
    with pytest.raises(AnalysisError, match="other settings.*cuda.*overwrite"):
        Attribution("smoothgrad", nt_samples=2, seed=3).run(model, x, labels=y, out=tmp_path)


def test_store_rejects_other_settings_and_several_methods(tmp_path, model, batch):
    x, y = batch
    Attribution("integrated_gradients", steps=4).run(model, x, labels=y, out=tmp_path)
    with pytest.raises(AnalysisError, match="other settings.*overwrite"):
        Attribution("integrated_gradients", steps=5).run(model, x, labels=y, out=tmp_path)
    r = Attribution("integrated_gradients", steps=5).run(model, x, labels=y, out=tmp_path,
                                                         overwrite=True)
    Attribution("grad_cam", layer="layer4").run(model, x, labels=y, out=tmp_path)
    with pytest.raises(AnalysisError, match="different model"):
        Attribution("saliency").run(_student(7), x, labels=y, out=tmp_path)
    loaded = AttributionResult.load(tmp_path, "integrated_gradients")
    np.testing.assert_array_equal(loaded.maps, r.maps)
    assert loaded.params["steps"] == 5 and loaded.ids == r.ids
    with h5py.File(tmp_path / "attributions.h5", "r") as f:
        assert set(f["attributions"]) == {"integrated_gradients", "grad_cam"}
        assert f.attrs["complete"]


def test_overwrite_with_another_sample_starts_the_file_again(tmp_path, model):
    """issue 13 review: --overwrite with another --seed used to fail ("image ids from row 0
    differ ... ('x' vs 'x')"): only the method's maps were dropped, the shared rows stayed.
    Now the file starts again and holds the new sample only (other methods' maps of the
    old rows are dropped, they no longer match the index)."""
    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = np.arange(20) % 10
    run = dict(labels=labels, n=8, sample="stratified", out=tmp_path, batch_size=4)
    old = Attribution("saliency").run(model, x, sample_seed=0, **run)
    Attribution("input_x_gradient").run(model, x, sample_seed=0, **run)
    new = Attribution("saliency").run(model, x, sample_seed=1, overwrite=True, **run)
    assert new.ids != old.ids
    with h5py.File(tmp_path / "attributions.h5", "r") as f:
        assert [s.decode() for s in f["index"][:]] == new.ids
        assert set(f["attributions"]) == {"saliency"} and f.attrs["complete"]
    fresh = Attribution("saliency").run(model, x, labels=labels, n=8, sample="stratified",
                                        sample_seed=1, batch_size=4)
    loaded = AttributionResult.load(tmp_path, "saliency")
    assert loaded.ids == fresh.ids
    np.testing.assert_array_equal(np.asarray(loaded.maps), fresh.maps)
    np.testing.assert_array_equal(loaded.labels, fresh.labels)


def test_other_rows_refused_naming_the_first_differing_image(tmp_path, model, batch):
    """The message names the first row whose id differs (it used to name row 0's, equal)."""
    x, y = batch
    Attribution("saliency").run(model, x, labels=y, ids=["a0", "a1", "a2", "a3", "a4"],
                                out=tmp_path)
    other = ["a0", "a1", "a2", "z3", "a4"]
    with pytest.raises(AnalysisError, match=r"row 3 holds image 'a3' but this run attributes "
                                            r"'z3'.*another output folder.*--overwrite"):
        Attribution("input_x_gradient").run(model, x, labels=y, ids=other, out=tmp_path)
    # the store's own check while appending says the same
    from interptool.analyzers.attribution._store import AttributionStore

    path = tmp_path / "attributions.h5"
    with h5py.File(path, "r") as f:
        root = {k: f.attrs[k] for k in ("model", "data_spec", "data_fingerprint",
                                        "target_mode", "input_shape")}
    store = AttributionStore(
        path, method="guided_backprop", params={}, reduce="abs_sum", batch_size=5,
        model_info=json.loads(root["model"]), data_spec=root["data_spec"],
        data_fingerprint=root["data_fingerprint"], target_mode=json.loads(root["target_mode"]),
        input_shape=tuple(json.loads(root["input_shape"])), keep_raw=False)
    try:
        with pytest.raises(AnalysisError, match=r"row 3 holds image 'a3' but this run "
                                                r"attributes 'z3'"):
            store.append(0, np.zeros((5, 32, 32), np.float32), None, other, y.numpy(),
                         y.numpy(), y.numpy())
    finally:
        store.close()


def test_result_frame_dict_save(tmp_path, model, batch):
    x, y = batch
    r = Attribution("saliency").run(model, x, labels=y, ids=list("abcde"))
    frame = r.to_frame()
    assert list(frame["id"]) == list("abcde")
    np.testing.assert_allclose(frame["map_max"], r.maps.reshape(5, -1).max(1), rtol=1e-6)
    d = r.to_dict()
    json.dumps(d)
    assert d["method"] == "saliency" and d["n"] == 5 and d["map_shape"] == [32, 32]
    paths = r.save(tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


# ----------------------------------------------------------------------------- integration


def _real_loaders():
    from interptool.data import open_dataset
    from interptool.loading import load_model

    return load_model, open_dataset


def test_loaded_model_with_concept_world(tmp_path):
    load_model, open_dataset = _real_loaders()
    loaded = load_model("interptool:cw-student", num_classes=10)
    ds = open_dataset("builtin:concept-world?version=1&n=12&size=64&seed=0")
    res = Attribution("grad_cam", layer="layer4").run(loaded, ds, n=6, batch_size=4,
                                                      out=tmp_path, sample="first")
    assert res.maps.shape == (6, 64, 64)
    assert res.ids == list(ds.ids[:6])
    np.testing.assert_array_equal(res.labels, ds.labels[:6])
    # the probe transform (no crop) is what a Broden data set gets
    x = torch.stack([ds.torch_dataset(loaded.preprocessing.probe_transform())[i][0]
                     for i in range(6)])
    direct = Attribution("grad_cam", layer="layer4").run(loaded.model, x,
                                                         labels=ds.labels[:6])
    np.testing.assert_allclose(res.maps, direct.maps, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- CLI


def test_cli_bad_input_exit_2(capsys):
    from interptool.cli import main

    rc = main(["attribute", "--arch", "interptool:cw-student", "--data", "x", "--method",
               "gradcam", "--out", "/tmp/never"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "unknown attribution method 'gradcam'" in err and "grad_cam" in err
    rc = main(["attribute", "--data", "x", "--out", "/tmp/never"])
    err = capsys.readouterr().err
    assert rc == 2 and "no model given" in err and "Traceback" not in err
    rc = main(["attribute", "--model", "bad", "--data", "x", "--out", "/tmp/never"])
    assert rc == 2 and "NAME=ARCH" in capsys.readouterr().err


def test_cli_two_models_concept_world(tmp_path, capsys):
    _real_loaders()
    from interptool.cli import main

    out = tmp_path / "out"
    rc = main(["attribute", "--model", "teacher=interptool:cw-teacher",
               "--model", "student=interptool:cw-student", "--num-classes", "10",
               "--data", "builtin:concept-world?version=1&n=12&size=64&seed=0", "--method", "grad_cam",
               "--method", "saliency", "--layer", "layer4", "--n", "4", "--batch-size", "4",
               "--faithfulness-steps", "4", "--sanity-n", "2", "--sanity-top-k", "1",
               "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    for name in ("teacher", "student"):
        with h5py.File(out / name / "attributions.h5", "r") as f:
            assert f.attrs["complete"]
            assert f["attributions/grad_cam"].shape == (4, 64, 64)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["teacher"] == "teacher"
    assert set(scores["agreement"]["teacher vs student"]) == {"grad_cam", "saliency"}
    # the scores in scores.json are those of the stored maps, recomputed independently here
    from interptool.analyzers.attribution import agreement, class_object_masks, localisation
    from interptool.data import open_dataset

    t = AttributionResult.load(out / "teacher", "saliency")
    s = AttributionResult.load(out / "student", "saliency")
    ag = scores["agreement"]["teacher vs student"]["saliency"]
    assert ag["spearman"]["mean"] == pytest.approx(float(agreement(t, s).spearman.mean()))
    assert ag["spearman"]["ci_low"] <= ag["spearman"]["mean"] <= ag["spearman"]["ci_high"]
    assert set(ag) >= {"cosine", "top5_iou", "top10_iou", "top20_iou"}
    assert (ag["a"], ag["b"]) == ("teacher:saliency", "student:saliency")
    ds = open_dataset("builtin:concept-world?version=1&n=12&size=64&seed=0")
    # --n 4 of 12: a stratified sample (the default), not rows 0..3; masks at its rows
    sample = scores["sample"]
    assert sample["method"] == "stratified" and sample["seed"] == 0
    assert sample["ids"] == s.ids == [ds.ids[r] for r in sample["rows"]]
    masks = class_object_masks(ds, sample["rows"], size=(64, 64))
    m = scores["models"]["student"]["methods"]["saliency"]
    assert m["localisation"]["energy"]["mean"] == pytest.approx(
        float(np.nanmean(localisation(s, masks).energy)))
    assert m["localisation"]["mask_area"]["mean"] == pytest.approx(
        float(masks.reshape(4, -1).mean(1).mean()))
    for mode in ("deletion", "insertion"):
        f = m["faithfulness"][mode]
        assert f["n"] == 4 and f["params"]["steps"] == 4 and len(f["mean_curve"]) == 5
        assert 0 <= f["auc"]["mean"] <= 1
    # the sanity check is part of the scores, per model, for every method
    rnd = scores["models"]["teacher"]["randomisation"]
    assert set(rnd["flagged"]) == {"grad_cam", "saliency"} and len(rnd["layers"]) == 1
    assert [r["step"] for r in rnd["steps"] if r["method"] == "saliency"] == [0, 1]
    assert (out / "attributions.png").stat().st_size > 0
    rc = main(["attribute", "--arch", "interptool:cw-student", "--num-classes", "10",
               "--data", "builtin:concept-world?version=1&n=12&size=64&seed=0", "--method", "grad_cam",
               "--layer", "layer9", "--n", "2", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "layer9" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- lazy maps


def test_maps_with_out_are_read_lazily_from_the_file(tmp_path, model, batch):
    from interptool.analyzers.attribution import H5Maps, agreement, localisation

    x, y = batch
    mem = Attribution("input_x_gradient", keep_raw=True).run(model, x, labels=y, batch_size=2)
    disk = Attribution("input_x_gradient", keep_raw=True).run(model, x, labels=y,
                                                             out=tmp_path, batch_size=2)
    # file-backed: nothing but a view is held; every access reads the file
    assert isinstance(disk.maps, H5Maps) and isinstance(disk.raw, H5Maps)
    assert disk.maps.shape == (5, 32, 32) and len(disk.maps) == 5 and disk.n == 5
    np.testing.assert_allclose(np.asarray(disk.maps), mem.maps, rtol=1e-6)
    np.testing.assert_allclose(disk.raw[1:3], mem.raw[1:3], rtol=1e-6)
    np.testing.assert_allclose(disk.maps[-1], mem.maps[4], rtol=1e-6)
    np.testing.assert_allclose(disk.maps[[3, 0, 3]], mem.maps[[3, 0, 3]], rtol=1e-6)
    with pytest.raises(IndexError):
        disk.maps[5]
    # scores read file-backed maps block by block: same numbers as in memory
    a_mem = agreement(mem, mem, n_boot=0)
    a_disk = agreement(disk, mem, n_boot=0, block=2)
    np.testing.assert_allclose(a_disk.spearman, a_mem.spearman, rtol=1e-6)
    mask = np.zeros((5, 32, 32), bool)
    mask[:, 4:20, 8:30] = True
    np.testing.assert_allclose(localisation(disk, mask, n_boot=0, block_size=2).energy,
                               localisation(mem, mask, n_boot=0).energy, rtol=1e-6)
    frame_mem, frame_disk = mem.to_frame(), disk.to_frame()
    np.testing.assert_allclose(frame_disk["top10_mass"], frame_mem["top10_mass"], rtol=1e-6)
    lazy = AttributionResult.load(tmp_path)
    assert isinstance(lazy.maps, H5Maps)
    np.testing.assert_allclose(np.asarray(lazy.maps), mem.maps, rtol=1e-6)
    eager = AttributionResult.load(tmp_path, lazy=False)
    assert isinstance(eager.maps, np.ndarray) and eager.raw.shape == (5, 3, 32, 32)
    # a resumed (complete) run reads nothing back into memory and gives the same view
    again = Attribution("input_x_gradient", keep_raw=True).run(model, x, labels=y,
                                                              out=tmp_path, batch_size=2)
    np.testing.assert_array_equal(np.asarray(again.maps), np.asarray(disk.maps))
    np.testing.assert_array_equal(again.targets, y.numpy())


def test_cli_torchvision_imagefolder_masks_targets(tmp_path, capsys):
    _real_loaders()
    import torchvision
    from PIL import Image

    from interptool.cli import main

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for d in ("imgs", "masks"):
            (tmp_path / d / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((rng.random((24, 20, 3)) * 255).astype(np.uint8)).save(
                tmp_path / "imgs" / c / f"{i}.png")
            m = np.zeros((24, 20), np.uint8)
            m[4:12, 2:10] = 1
            Image.fromarray(m).save(tmp_path / "masks" / c / f"{i}.png")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "r.pth")
    base = ["attribute", "--arch", "torchvision:resnet18", "--checkpoint",
            str(tmp_path / "r.pth"), "--image-size", "32", "--data",
            f"imagefolder:{tmp_path / 'imgs'}", "--quiet"]
    out = tmp_path / "out"
    rc = main(base + ["--method", "integrated_gradients", "--steps", "2", "--baseline", "mean",
                      "--internal-batch-size", "8", "--target", "predicted", "--keep-raw",
                      "--masks", str(tmp_path / "masks"), "--faithfulness-steps", "2",
                      "--sanity-n", "2", "--sanity-top-k", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    with h5py.File(out / "attributions.h5", "r") as f:
        ds = f["attributions/integrated_gradients"]
        params = json.loads(ds.attrs["params"])
        assert params["baseline"] == "mean" and params["internal_batch_size"] == 8
        assert f["attributions/integrated_gradients_raw"].shape == (4, 3, 32, 32)
        np.testing.assert_array_equal(f["targets"][:], f["predictions"][:])
    (entry,) = json.loads((out / "scores.json").read_text())["models"].values()
    loc = entry["methods"]["integrated_gradients"]["localisation"]
    # masks resized like the images (whole image to 32x32, no crop), nearest neighbour
    # (torch rule: output i takes source floor(i * in / out)): rows 4..11 of 24 -> 10 rows,
    # columns 2..9 of 20 -> 12 columns
    rows = sum(4 <= (i * 24) // 32 <= 11 for i in range(32))
    cols = sum(2 <= (j * 20) // 32 <= 9 for j in range(32))
    assert (rows, cols) == (10, 12)
    assert loc["mask_area"]["mean"] == pytest.approx(rows * cols / 32**2)
    assert loc["energy"]["n"] == 4
    # error paths: one line, exit 2, no traceback
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "masks" / "b" / "1.png")
    for extra, expect in (
            (["--masks", str(tmp_path / "masks")], "1.png is 5x5 px but image"),
            (["--target", "2"], "target 2 of image 'a/0.png' is out of range"),
            (["--method", "grad_cam", "--layer", "layer9"], "'layer9' not found")):
        rc = main(base + ["--method", "saliency"] * ("--method" not in extra) + extra +
                  ["--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert rc == 2 and expect in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1


def test_timm_model_in_place_activations_grad_cam_and_guided_backprop():
    import timm
    from captum.attr import GuidedBackprop, LayerAttribution, LayerGradCam

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    assert any(getattr(m, "inplace", False) for m in net.modules())  # timm's act_layer
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 3])
    ref_net = _no_inplace(net)
    cam = Attribution("grad_cam", layer="layer4").run(net, x, labels=t)
    ref = LayerGradCam(ref_net, ref_net.layer4).attribute(x.clone().requires_grad_(True),
                                                          target=t, relu_attributions=True)
    ref = LayerAttribution.interpolate(ref, (32, 32), interpolate_mode="bilinear")
    np.testing.assert_allclose(cam.maps, ref.detach()[:, 0].numpy(), rtol=1e-5, atol=1e-7)
    gb = Attribution("guided_backprop", keep_raw=True).run(net, x, labels=t)
    ref = GuidedBackprop(ref_net).attribute(x.clone().requires_grad_(True), target=t)
    np.testing.assert_allclose(gb.raw, ref.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert hook_count(net) == 0 and hook_count(ref_net) == 0


# ------------------------------------------------------------------ fair sample (issue 10)
def test_stratified_sample_covers_every_class_and_is_recorded(model):
    """Images in class order (as an image folder lists them): the first 8 are one class;
    the stratified sample takes two of each of the four, seeded and recorded."""
    from interptool.analyzers.attribution._analyzer import stratified_sample

    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 3, 32, 32, generator=g)
    y = torch.arange(4).repeat_interleave(10)
    ids = [f"class{int(c)}/img{i}.png" for i, c in enumerate(y)]
    first = Attribution("saliency").run(model, x, labels=y, ids=ids, n=8, batch_size=4,
                                        sample="first")
    assert set(first.labels.tolist()) == {0}  # the fault: one class only
    # the Python default is the CLI's and the compare config's: stratified, seed 0
    default = Attribution("saliency").run(model, x, labels=y, ids=ids, n=8, batch_size=4)
    assert default.params["sample"] == {"method": "stratified", "seed": 0, "n": 8, "of": 40}
    np.testing.assert_array_equal(default.indices, stratified_sample(y.numpy(), 8, 0))
    res = Attribution("saliency").run(model, x, labels=y, ids=ids, n=8, batch_size=4,
                                      sample="stratified", sample_seed=3)
    assert sorted(np.bincount(res.labels, minlength=4).tolist()) == [2, 2, 2, 2]
    assert res.params["sample"] == {"method": "stratified", "seed": 3, "n": 8, "of": 40}
    assert res.ids == [ids[i] for i in res.indices]
    np.testing.assert_array_equal(res.indices, stratified_sample(y.numpy(), 8, 3))
    # the maps are those of the chosen images
    direct = Attribution("saliency").run(model, x[torch.as_tensor(res.indices)],
                                         labels=y[torch.as_tensor(res.indices)], batch_size=4)
    np.testing.assert_allclose(res.maps, direct.maps, rtol=1e-6)
    again = stratified_sample(y.numpy(), 8, 3)
    other = stratified_sample(y.numpy(), 8, 4)
    np.testing.assert_array_equal(res.indices, again)
    assert not np.array_equal(again, other)


def test_stratified_sample_small_classes_and_unlabelled():
    from interptool.analyzers.attribution._analyzer import stratified_sample

    labels = np.array([0] * 50 + [1] * 2 + [2] * 30 + [-1] * 5)
    idx = stratified_sample(labels, 21, seed=0)
    counts = {c: int((labels[idx] == c).sum()) for c in (-1, 0, 1, 2)}
    assert counts[1] == 2 and counts[-1] == 5  # small groups give all they have
    assert counts[0] + counts[2] == 14 and abs(counts[0] - counts[2]) <= 1
    assert len(set(idx.tolist())) == 21 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(stratified_sample(labels, 500, 0), np.arange(len(labels)))


_CW40 = "builtin:concept-world?version=1&n=40&size=32"

def _student_checkpoint() -> Path:
    """A seeded, randomly initialised cw-student saved once per process (any fixed weights
    do: the tests compare the CLI's scores with the same model scored directly)."""
    import tempfile

    from safetensors.torch import save_file

    from interptool.loading._zoo import ZOO

    path = Path(tempfile.gettempdir()) / f"interptool-test-cw-student-{os.getpid()}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        save_file(ZOO["cw-student"](num_classes=10).state_dict(), str(path))
    return path


_WEIGHTS = _student_checkpoint()


def _attribute_cli(out, *extra):
    from interptool.cli import main

    rc = main(["attribute", "--arch", "interptool:cw-student", "--checkpoint", str(_WEIGHTS),
               "--num-classes", "10", "--data", _CW40, "--method", "saliency", "--n", "10",
               "--batch-size", "10", "--faithfulness-steps", "4", "--sanity-n", "0",
               "--out", str(out), "--quiet", *extra])
    assert rc == 0
    return json.loads((out / "scores.json").read_text())


def test_cli_scores_a_stratified_sample_at_its_own_rows(tmp_path):
    """`interptool attribute --n 10` on 40 concept-world images: the first ten rows hold
    7 of the 10 classes; the default sample holds every class once, is recorded by data-set
    id, and localisation / deletion are scored on those images (they used to be scored on
    rows 0..9 whatever was attributed)."""
    load_model, open_dataset = _real_loaders()
    from interptool.analyzers.attribution import class_object_masks, faithfulness, localisation

    ds = open_dataset(_CW40)
    labels = np.asarray(ds.labels)
    assert len(set(labels[:10].tolist())) < 10  # the fault: first-n misses classes
    scores = _attribute_cli(tmp_path / "a")
    sample = scores["sample"]
    assert (sample["method"], sample["seed"], sample["n"], sample["of"]) == (
        "stratified", 0, 10, 40)
    row_of = {str(i): r for r, i in enumerate(ds.ids)}
    rows = [row_of[i] for i in sample["ids"]]
    assert rows == sample["rows"]
    # every class of the data set, once each (10 images, 10 classes)
    assert sorted(labels[rows].tolist()) == sorted(set(labels.tolist())) == list(range(10))
    entry = scores["models"]["kd"]["methods"]["saliency"] if "kd" in scores["models"] else \
        next(iter(scores["models"].values()))["methods"]["saliency"]
    assert entry["per_image"]["ids"] == sample["ids"]

    # hand check: one recorded image that is not at its position (row != index), loaded
    # and scored here directly
    j = next(k for k, r in enumerate(rows) if r != k)
    loaded = load_model("interptool:cw-student", checkpoint=str(_WEIGHTS), num_classes=10)
    x = loaded.preprocessing.probe_transform()(ds.load_image(rows[j]))[None]
    y = torch.tensor([int(labels[rows[j]])])
    direct = Attribution("saliency").run(loaded.model, x, labels=y, batch_size=1)
    size = tuple(direct.maps.shape[1:])  # the model's input size (64: its probe transform)
    mask = class_object_masks(ds, [rows[j]], size=size)
    energy = float(localisation(direct, mask, n_boot=0).energy[0])
    assert entry["per_image"]["localisation_energy"][j] == pytest.approx(energy, rel=1e-5)
    dele = faithfulness(loaded.model, x, direct.maps, direct.targets, mode="deletion",
                        patch=8, steps=4, baseline="blur", n_boot=0)
    assert entry["per_image"]["deletion_auc"][j] == pytest.approx(float(dele.auc[0]),
                                                                   rel=1e-5)
    # and those are not the scores of the image at row j (what first-n scoring read)
    other = class_object_masks(ds, [j], size=size)
    assert not np.array_equal(other, mask)


def test_score_maps_reads_inputs_and_masks_at_the_attributed_rows(model):
    """The shared scoring path of `attribute` and `compare` asks for inputs and masks at
    result.indices, records the sample, and refuses models attributed on other rows."""
    from interptool.analyzers.attribution import score_maps

    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 3, 32, 32, generator=g)
    y = torch.tensor([0] * 6 + [1] * 6)
    ids = [f"img{i:02d}" for i in range(12)]
    kw = dict(labels=y, ids=ids, n=4, batch_size=4, sample="stratified", sample_seed=1)
    t = Attribution("saliency").run(model, x, **kw)
    s = Attribution("saliency").run(_student(1), x, **kw)
    assert sorted(y[torch.as_tensor(t.indices)].tolist()) == [0, 0, 1, 1]
    asked: dict[str, list] = {"inputs": [], "masks": []}
    mask = np.zeros((12, 32, 32), bool)
    mask[:, 8:24, 8:24] = True

    def inputs(name, rows):
        asked["inputs"].append(list(rows))
        return x[torch.as_tensor(rows)]

    def masks(size, rows):
        asked["masks"].append(list(rows))
        return mask[np.asarray(rows)]

    out = score_maps({"t": t, "s": s}, teacher="t", models={"t": model, "s": _student(1)},
                     inputs=inputs, masks=masks, modes=("deletion",), steps=2, patch=16)
    rows = t.indices.tolist()
    assert rows != [0, 1, 2, 3]
    assert all(r == rows for r in asked["inputs"]) and len(asked["inputs"]) == 2
    assert all(r == rows for r in asked["masks"])
    assert out["sample"] == {"method": "stratified", "seed": 1, "n": 4, "of": 12,
                             "ids": [ids[r] for r in rows], "rows": rows}
    # deletion AUC of the teacher equals faithfulness on those images, called directly
    from interptool.analyzers.attribution import faithfulness

    direct = faithfulness(model, x[torch.as_tensor(rows)], t.maps, t.targets,
                          mode="deletion", steps=2, patch=16, n_boot=0)
    np.testing.assert_allclose(out["per_image"]["deletion_auc"]["t"], direct.auc, rtol=1e-6)
    other = Attribution("saliency").run(_student(1), x, **{**kw, "sample_seed": 2})
    with pytest.raises(AnalysisError, match="covers other images than 't'"):
        score_maps({"t": t, "s": other}, teacher="t")


def test_cli_sample_seed_chooses_the_ids(tmp_path):
    """The same --seed chooses the same ids (and scores); another seed other ids."""
    _real_loaders()
    a = _attribute_cli(tmp_path / "a", "--seed", "4", "--faithfulness-steps", "0")
    b = _attribute_cli(tmp_path / "b", "--seed", "4", "--faithfulness-steps", "0")
    c = _attribute_cli(tmp_path / "c", "--seed", "5", "--faithfulness-steps", "0")
    assert a["sample"]["seed"] == 4 and c["sample"]["seed"] == 5
    assert a["sample"]["ids"] == b["sample"]["ids"]
    assert a["sample"]["ids"] != c["sample"]["ids"]
    (ma,), (mb,) = a["models"].values(), b["models"].values()
    assert ma["methods"]["saliency"]["per_image"] == mb["methods"]["saliency"]["per_image"]
    # --sample first keeps rows 0..N-1 on request, recorded as such
    f = _attribute_cli(tmp_path / "f", "--sample", "first", "--faithfulness-steps", "0")
    assert f["sample"]["method"] == "first" and f["sample"]["rows"] == list(range(10))


def test_cli_overwrite_with_another_seed(tmp_path):
    """`attribute ... --overwrite` with another --seed (another sample) used to exit 2."""
    _real_loaders()
    out = tmp_path / "a"
    _attribute_cli(out, "--seed", "0", "--faithfulness-steps", "0")
    again = _attribute_cli(out, "--seed", "1", "--faithfulness-steps", "0", "--overwrite")
    with h5py.File(out / "attributions.h5", "r") as f:
        assert [s.decode() for s in f["index"][:]] == again["sample"]["ids"]


def test_cli_internal_batch_size_reaches_occlusion_and_faithfulness(tmp_path, monkeypatch,
                                                                      capsys):
    """--internal-batch-size used to reach integrated gradients only: occlusion ran
    batch_size // images windows per pass whatever it said. Occlusion is exact under
    batching, so the maps equal the default run's; a value < 1 is a one-line error."""
    _real_loaders()
    from captum.attr import Occlusion

    import interptool.analyzers.attribution as attribution_pkg
    from interptool.cli import main

    per_eval: list[int] = []
    original = Occlusion.attribute

    def spy_occlusion(self, *args, **kwargs):
        per_eval.append(kwargs["perturbations_per_eval"])
        return original(self, *args, **kwargs)

    faithfulness_rows: list[int] = []
    original_score = attribution_pkg.score_maps

    def spy_score(*args, **kwargs):
        faithfulness_rows.append(kwargs["batch_size"])
        return original_score(*args, **kwargs)

    monkeypatch.setattr(Occlusion, "attribute", spy_occlusion)
    monkeypatch.setattr(attribution_pkg, "score_maps", spy_score)
    base = ["attribute", "--arch", "interptool:cw-student", "--checkpoint", str(_WEIGHTS),
            "--num-classes", "10", "--data", _CW40, "--method", "occlusion", "--window", "16",
            "--stride", "16", "--n", "4", "--batch-size", "4", "--faithfulness-steps", "2",
            "--sanity-n", "0", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "default")]) == 0
    assert per_eval == [1] and faithfulness_rows == [32]  # 4 rows / 4 images; max(4, 32)
    per_eval.clear()
    faithfulness_rows.clear()
    assert main(base + ["--internal-batch-size", "12", "--out", str(tmp_path / "set")]) == 0
    assert per_eval == [3] and faithfulness_rows == [12]  # 12 rows / 4 images
    default = AttributionResult.load(tmp_path / "default", "occlusion")
    explicit = AttributionResult.load(tmp_path / "set", "occlusion")
    assert explicit.params["perturbations_per_eval"] == 3
    np.testing.assert_allclose(np.asarray(explicit.maps), np.asarray(default.maps),
                               rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    rc = main(base + ["--internal-batch-size", "0", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "internal_batch_size: expected an integer >= 1, got 0" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


# ------------------------------------------------------------------ non-finite (issue 11)
def test_nan_model_refused_naming_the_image(tmp_path):
    """A NaN weight used to give NaN maps, stored and scored with exit 0."""
    net = _student()
    with torch.no_grad():
        net.fc.weight[3, 0] = float("nan")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = ["a.png", "b.png", "c.png", "d.png"]
    with pytest.raises(AnalysisError, match=r"saliency.*'a\.png'.*NaN or inf"):
        Attribution("saliency").run(net, x, ids=ids, target=1, out=tmp_path / "o")


def test_scores_refuse_non_finite_maps(model, batch):
    from interptool.analyzers.attribution import agreement, localisation

    x, y = batch
    res = Attribution("saliency").run(model, x, labels=y, batch_size=8)
    other = Attribution("saliency").run(model, x, labels=y, batch_size=8)
    other.maps[2, 5, 5] = np.nan
    with pytest.raises(AnalysisError, match=r"res_b row 2 \(image '2'\) holds NaN"):
        agreement(res, other)
    with pytest.raises(AnalysisError, match="row 2"):
        localisation(other, np.ones((5, 32, 32), bool))


# ------------------------------------------------------------------ Grad-CAM on tokens (issue 11)
def _token_grad_cam_by_hand(model, layer, x, target, prefix, grid):
    """Grad-CAM written out: activations A (N, T, D) of ``layer`` and their gradients G;
    patch tokens only; weights = mean of G over patches; relu(sum_d w_d A_d) on the grid,
    bilinearly upsampled (as captum's LayerAttribution.interpolate)."""
    import torch.nn.functional as F

    store = {}

    def hook(_m, _i, out):
        out.retain_grad()
        store["a"] = out

    h = layer.register_forward_hook(hook)
    try:
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        out.gather(1, target[:, None]).sum().backward()
    finally:
        h.remove()
    a, g = store["a"][:, prefix:], store["a"].grad[:, prefix:]
    w = g.mean(dim=1, keepdim=True)  # (N, 1, D)
    cam = torch.relu((w * a).sum(dim=2)).reshape(len(x), 1, *grid)
    return F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear").detach()[:, 0]


@pytest.mark.parametrize("arch, size, prefix", [
    ("deit_tiny_distilled_patch16_224", 32, 2),   # class + distillation tokens
    ("vit_small_patch14_reg4_dinov2", 28, 5),     # class + 4 registers
])
def test_grad_cam_on_token_layers(arch, size, prefix):
    import timm
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, img_size=size, num_classes=5).eval()
    assert net.num_prefix_tokens == prefix
    grid = tuple(net.patch_embed.grid_size)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 4])
    res = Attribution("grad_cam", layer="blocks.5").run(net, x, labels=y, batch_size=3)
    ref = copy.deepcopy(net)
    want = _token_grad_cam_by_hand(ref, ref.blocks[5], x, y, prefix, grid)
    assert res.maps.shape == (3, size, size)
    np.testing.assert_allclose(res.maps, want.numpy(), rtol=1e-4, atol=1e-6)
    assert float(np.abs(res.maps).sum()) > 0
    # the user's model is unchanged (the view lives in the private copy)
    assert type(net.blocks[5]).__name__ == "Block"
    # a wrong explicit count is refused, naming the layer
    with pytest.raises(AnalysisError, match="blocks.5"):
        Attribution("grad_cam", layer="blocks.5", prefix_tokens=prefix + 1).run(
            net, x, labels=y, batch_size=3)


# ------------------------------------------------------------------ kill during writes (issue 11)
_KILL_CHILD = r"""
import sys, torch
from interptool._progress import set_quiet
from interptool._provenance import atomic_savefig
from interptool.analyzers.attribution import Attribution
from interptool.loading._zoo import ZOO
set_quiet(True)
torch.manual_seed(0)
net = ZOO["cw-student"](num_classes=10).eval()
x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))
out = sys.argv[1]
print("START", flush=True)
res = Attribution("integrated_gradients", steps=4).run(net, x, target="predicted",
                                                       batch_size=4, out=out, keep_images=8)
print("MAPS", flush=True)
for _ in range(int(sys.argv[2])):
    res.save(out)  # attribution.csv / .json / .png, atomically
    fig = res.plot()
    atomic_savefig(fig, f"{out}/attributions.png", dpi=150)
print("DONE", flush=True)
"""


def _check_no_torn_files(folder):
    """Every output either reads back whole or is refused as incomplete."""
    import json as _json

    from PIL import Image

    from interptool.errors import CacheError

    h5 = folder / "attributions.h5"
    if h5.exists():
        try:
            res = AttributionResult.load(folder)
        except CacheError:
            pass  # incomplete or cut short: refused, never read as whole
        else:
            assert res.n == 12 and np.isfinite(np.asarray(res.maps)).all()
    for png in folder.glob("*.png"):
        with Image.open(png) as im:
            im.load()  # a truncated PNG raises here
    for js in folder.glob("*.json"):
        _json.loads(js.read_text())
    for csv in folder.glob("*.csv"):
        lines = csv.read_text().splitlines()
        assert len(lines) == 13  # header + 12 rows


@pytest.mark.slow
def test_sigkill_during_writes_leaves_no_torn_file(tmp_path):
    """SIGKILL a process while it writes attributions.h5, attribution.csv/.json/.png and
    attributions.png (maps, then the outputs in a loop), at two moments: every file left
    either reads back whole or is refused as incomplete, and the same command again gives
    the maps of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    ref = None
    for trial, delay in enumerate((0.5, 3.0)):
        folder = tmp_path / f"run{trial}"
        proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(folder), "50"],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "START"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _check_no_torn_files(folder)
        # the same command again resumes (or restarts, with overwrite, a damaged file)
        done = subprocess.run([sys.executable, "-c", _KILL_CHILD.replace(
            "out=out, keep_images=8", "out=out, keep_images=8, overwrite=True"), str(folder),
            "1"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        res = AttributionResult.load(folder)
        _check_no_torn_files(folder)
        maps = np.asarray(res.maps)
        if ref is None:
            ref = maps
        np.testing.assert_array_equal(maps, ref)  # identical to every other run


def test_grad_cam_on_a_vit_block_whose_patches_never_reach_the_head_is_an_error():
    """A class-token ViT: the last block's patch tokens do not reach the output, so Grad-CAM
    there is exactly 0 everywhere; that is refused with the fix, not returned as maps."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2,
                            num_classes=5, global_pool="token").eval()
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(AnalysisError, match=r"'blocks\.1'.*every map of the batch is zero.*"
                                            r"earlier block"):
        Attribution("grad_cam", layer="blocks.1").run(vit, x, labels=y)
    # the block before it reaches the head through the last block's attention: real maps
    res = Attribution("grad_cam", layer="blocks.0").run(vit, x, labels=y)
    assert np.asarray(res.maps).shape == (3, 32, 32)
    assert np.abs(np.asarray(res.maps)).sum(axis=(1, 2)).min() > 0


def test_seeded_rng_draws_as_manual_seed_and_restores_the_generator():
    """SmoothGrad's noise and the randomisation check's re-initialisation draw from generators
    seeded for the call only: the same values as after torch.manual_seed, and the caller's
    generator state untouched afterwards (on CUDA only the listed devices are reseeded)."""
    from interptool.common.numerics import seeded_rng

    torch.manual_seed(123)
    before = torch.get_rng_state()
    with seeded_rng(7, [torch.device("cpu")]):
        drawn = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(5))


def test_cuda_files_from_before_the_precision_was_recorded_still_match():
    """Since 2026-12 a CUDA run records how float32 convolutions and matmuls rounded; a file
    written on CUDA before that (its params without those keys) is resumed and reused as
    before, while a file that records another precision, device or setting is not."""
    from interptool.analyzers.attribution._store import _json, params_match

    run = {"steps": 8, "device_type": "cuda", "conv_fp32_precision": "tf32",
           "matmul_fp32_precision": "ieee"}
    legacy = {"steps": 8, "device_type": "cuda"}
    assert params_match(_json(run), run)
    assert params_match(_json(legacy), run)
    assert not params_match(_json({**run, "conv_fp32_precision": "ieee"}), run)
    assert not params_match(_json({**legacy, "steps": 9}), run)
    assert not params_match(_json({**legacy, "device_type": "cpu"}), run)
    assert not params_match(None, run) and not params_match("not json", run)
