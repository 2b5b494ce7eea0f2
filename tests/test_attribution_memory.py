"""Bounded memory by default: integrated gradients, SmoothGrad and occlusion run captum in
internal batches derived from ``batch_size`` (or ``internal_batch_size``), with maps equal to
the unbatched ones; maps stream to the HDF5 store. Peak-memory figures are measured by
benchmarks/bench_attribution.py (no timing or memory assertions here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from interptool.analyzers.attribution import Attribution
from interptool.loading._zoo import ZOO

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients"),
]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return ZOO["cw-student"](num_classes=10).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 3, 9, 1, 3, 5])


def _spy(monkeypatch, cls, calls: list):
    """Record the keyword arguments of every ``cls.attribute`` call (captum's own class)."""
    original = cls.attribute

    def wrapped(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "attribute", wrapped)


def _row_counter(model: nn.Module, rows: list):
    return model.register_forward_pre_hook(lambda _m, inp: rows.append(int(inp[0].shape[0])))


def _count_attributing_rows(a: Attribution, rows: list) -> None:
    """Record the rows of every forward pass of the model ``a`` attributes (its private
    copy, during the attribution only: the prediction pass is not counted)."""
    original = a._attribute_capturing

    def capture(model_, *args, **kwargs):
        handle = _row_counter(model_, rows)
        try:
            return original(model_, *args, **kwargs)
        finally:
            handle.remove()

    a._attribute_capturing = capture


def test_integrated_gradients_internal_batch_defaults_to_batch_size(monkeypatch, model, batch):
    from captum.attr import IntegratedGradients

    x, y = batch
    calls: list = []
    _spy(monkeypatch, IntegratedGradients, calls)
    res = Attribution("integrated_gradients", steps=8, keep_raw=True).run(
        model, x, labels=y, batch_size=4)
    assert [c["internal_batch_size"] for c in calls] == [4, 4]  # two batches: 4 + 2 images
    assert res.params["internal_batch_size"] == 4
    # captum called directly, everything in one pass: the same maps
    monkeypatch.undo()
    xg = x.clone().requires_grad_(True)
    ref = IntegratedGradients(model).attribute(xg, baselines=torch.zeros_like(x), target=y,
                                               n_steps=8, method="gausslegendre")
    np.testing.assert_allclose(res.raw, ref.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_forward_passes_never_exceed_the_internal_batch(model, batch):
    """Every forward pass of the attributed model holds at most ``internal_batch_size`` rows
    (one step of every image of a batch per pass when it equals the batch)."""
    x, y = batch
    a = Attribution("integrated_gradients", steps=16)
    rows: list[int] = []
    _count_attributing_rows(a, rows)
    a.run(model, x, labels=y, batch_size=6, internal_batch_size=12)
    assert rows and max(rows) <= 12
    rows.clear()
    a.run(model, x, labels=y, batch_size=6)  # default: internal batch = batch_size
    assert max(rows) <= 6


def test_explicit_internal_batch_size_is_used_and_recorded(monkeypatch, model, batch):
    from captum.attr import IntegratedGradients

    x, y = batch
    calls: list = []
    _spy(monkeypatch, IntegratedGradients, calls)
    res = Attribution("integrated_gradients", steps=8).run(model, x, labels=y, batch_size=6,
                                                           internal_batch_size=24)
    assert [c["internal_batch_size"] for c in calls] == [24]
    assert res.params["internal_batch_size"] == 24
    calls.clear()
    res = Attribution("integrated_gradients", steps=8, internal_batch_size=7).run(
        model, x, labels=y, batch_size=6, internal_batch_size=24)
    assert [c["internal_batch_size"] for c in calls] == [7]  # the method's own setting wins


def test_smoothgrad_samples_per_pass_bounded_and_seeded(monkeypatch, model, batch):
    from captum.attr import NoiseTunnel

    x, y = batch
    calls: list = []
    _spy(monkeypatch, NoiseTunnel, calls)
    a = Attribution("smoothgrad", nt_samples=8, stdevs=0.1, seed=1, keep_raw=True)
    res = a.run(model, x, labels=y, batch_size=6, internal_batch_size=12)
    assert [c["nt_samples_batch_size"] for c in calls] == [2]  # 12 rows / 6 images
    assert res.params["nt_samples_batch_size"] == 2
    # equal to captum called directly with the same samples per pass and seed
    from interptool.analyzers.attribution._methods import batch_seed

    monkeypatch.undo()
    from captum.attr import Saliency

    with torch.random.fork_rng():
        torch.manual_seed(batch_seed(1, 0))
        ref = NoiseTunnel(Saliency(model)).attribute(
            x.clone().requires_grad_(True), nt_type="smoothgrad", nt_samples=8, stdevs=0.1,
            target=y, nt_samples_batch_size=2)
    np.testing.assert_allclose(res.raw, ref.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_occlusion_windows_per_pass_bounded_results_unchanged(monkeypatch, model, batch):
    from captum.attr import Occlusion

    x, y = batch
    calls: list = []
    _spy(monkeypatch, Occlusion, calls)
    res = Attribution("occlusion", window=8, stride=8, keep_raw=True).run(
        model, x, labels=y, batch_size=3, internal_batch_size=6)
    assert {c["perturbations_per_eval"] for c in calls} == {2}  # 6 rows / 3 images
    monkeypatch.undo()
    ref = Occlusion(model).attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8),
                                     baselines=torch.zeros_like(x), target=y,
                                     perturbations_per_eval=16)
    np.testing.assert_allclose(res.raw, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_maps_stream_to_the_store_not_memory(tmp_path, model):
    """With ``out=`` the result's maps are lazy views of the file: nothing of size N is
    gathered in memory, whatever the number of images."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, 32, 32, generator=g)
    res = Attribution("saliency").run(model, x, batch_size=8, target="predicted",
                                      out=tmp_path / "a")
    assert type(res.maps).__name__ == "H5Maps"
    direct = Attribution("saliency").run(model, x, batch_size=8, target="predicted")
    np.testing.assert_array_equal(np.asarray(res.maps), direct.maps)


def test_large_run_without_out_streams_to_a_temporary_file(monkeypatch, model):
    """Without out=, maps above MAX_IN_MEMORY_MAPS_BYTES go to a temporary attributions.h5
    (they used to be gathered in memory whatever N: ~10 GB for ImageNet val at 224 px); the
    file lives as long as a view of it does."""
    import gc

    from interptool.analyzers.attribution import H5Maps, _analyzer

    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    in_memory = Attribution("saliency", keep_raw=True).run(model, x, batch_size=4,
                                                          target="predicted")
    assert isinstance(in_memory.maps, np.ndarray)  # 12 x 32 x 32 x 4 x 4 bytes: under 1 GiB
    monkeypatch.setattr(_analyzer, "MAX_IN_MEMORY_MAPS_BYTES", 12 * 32 * 32 * 4 - 1)
    res = Attribution("saliency", keep_raw=True).run(model, x, batch_size=4,
                                                     target="predicted")
    assert isinstance(res.maps, H5Maps) and isinstance(res.raw, H5Maps)
    assert res.path is None  # a private file: nothing to reopen later
    np.testing.assert_array_equal(np.asarray(res.maps), in_memory.maps)
    np.testing.assert_array_equal(np.asarray(res.raw), in_memory.raw)
    np.testing.assert_array_equal(res.predictions, in_memory.predictions)
    folder = res.maps.path.parent
    maps, raw = res.maps, res.raw
    del res
    gc.collect()
    assert folder.is_dir()  # the views still read it
    np.testing.assert_array_equal(maps[3:5], in_memory.maps[3:5])
    del maps, raw
    gc.collect()
    assert not folder.exists()
    # just under the limit: in memory as before
    monkeypatch.setattr(_analyzer, "MAX_IN_MEMORY_MAPS_BYTES", 12 * 32 * 32 * 4)
    assert isinstance(Attribution("saliency").run(model, x, batch_size=4,
                                                  target="predicted").maps, np.ndarray)


def test_compare_stage_passes_the_configs_internal_batch(tmp_path, monkeypatch):
    """`[analysis.attribution] internal_batch_size` reaches Attribution.run and the
    faithfulness curves of the compare stage (it used to have no such key)."""
    from types import SimpleNamespace

    import interptool.analyzers.attribution as attribution_pkg
    from interptool.pipeline import _stages, parse_config

    cfg = parse_config({
        "data": {"eval": "builtin:concept-world?version=1&n=40&size=32&seed=0&split=eval"},
        "models": {"t": {"arch": "interptool:cw-teacher", "layers": ["layer4"]},
                   "s": {"arch": "interptool:cw-student", "layers": ["layer4"]}},
        "analysis": {"dissection": False, "similarity": False,
                     "attribution": {"methods": ["saliency"], "n_images": 4,
                                     "internal_batch_size": 5}}})
    assert cfg.analysis.attribution.internal_batch_size == 5
    runs: list[dict] = []

    def fake_run(self, loaded, data, **kwargs):
        runs.append(kwargs)
        return SimpleNamespace(maps=np.zeros((4, 8, 8), np.float32), images=None,
                               predictions=np.zeros(4, np.int64))

    scored: list[dict] = []
    monkeypatch.setattr(Attribution, "run", fake_run)
    monkeypatch.setattr(attribution_pkg, "score_maps",
                        lambda results, **kwargs: scored.append(kwargs) or {})
    (tmp_path / "attribution" / "saliency").mkdir(parents=True)
    loaded = {name: SimpleNamespace(model=None) for name in ("t", "s")}
    ctx = SimpleNamespace(cfg=cfg, loaded=loaded, eval_ds=object(),
                          device="cpu", out=tmp_path)
    _stages._attribute(ctx, "saliency", 4)
    assert [r["internal_batch_size"] for r in runs] == [5, 5]
    assert [r["batch_size"] for r in runs] == [4, 4]
    assert [k["batch_size"] for k in scored] == [5]


def test_attribution_stage_key_leaves_out_the_internal_batch_at_its_default():
    """internal_batch_size came after runs were made: at its default (None) it is left out
    of the stage's settings, so compare reuses the attribution stages of those runs; a set
    value is part of the key (other batches give other SmoothGrad noise streams)."""
    from dataclasses import asdict, replace

    from interptool.pipeline._config import AnalysisConfig
    from interptool.pipeline._stages import attribution_settings

    a = AnalysisConfig().attribution
    before = {k: v for k, v in asdict(a).items() if k != "internal_batch_size"}
    assert attribution_settings(a) == before  # the settings runs made before it hashed
    assert attribution_settings(replace(a, internal_batch_size=8)) == {
        **before, "internal_batch_size": 8}


# ------------------------------------------- internal batches below the batch's image count
def _counting_prepare(monkeypatch, rows: list):
    """Every forward pass of the run's private model copy (attribution and predictions)
    records its rows."""
    from interptool.analyzers.attribution import _analyzer

    original = _analyzer.prepare_model

    def prepare(*args, **kwargs):
        net = original(*args, **kwargs)
        _row_counter(net, rows)
        return net

    monkeypatch.setattr(_analyzer, "prepare_model", prepare)


@pytest.mark.parametrize("internal", [1, 2, 4])
def test_integrated_gradients_internal_batch_below_the_images_holds(monkeypatch, model, batch,
                                                                     internal):
    """internal_batch_size below a batch's image count used to be raised to it (captum
    runs at least one step of every input per pass; `_ig_rows` returned max(ibs, n)) while
    the requested value was recorded. The batch is now attributed in parts: no pass holds
    more rows than asked (also below the steps), the value recorded is the one captum got,
    and the maps equal captum's single pass."""
    from captum.attr import IntegratedGradients

    x, y = batch
    calls: list = []
    rows: list[int] = []
    _spy(monkeypatch, IntegratedGradients, calls)
    _counting_prepare(monkeypatch, rows)
    res = Attribution("integrated_gradients", steps=8, keep_raw=True).run(
        model, x, labels=y, batch_size=6, internal_batch_size=internal)
    assert rows and max(rows) <= internal
    assert {c["internal_batch_size"] for c in calls} == {internal}
    assert res.params["internal_batch_size"] == internal
    monkeypatch.undo()
    ref = IntegratedGradients(model).attribute(x.clone().requires_grad_(True),
                                               baselines=torch.zeros_like(x), target=y,
                                               n_steps=8, method="gausslegendre")
    np.testing.assert_allclose(res.raw, ref.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_smoothgrad_and_occlusion_internal_batch_below_the_images_holds(monkeypatch, model,
                                                                        batch):
    """SmoothGrad and occlusion ran at least one noisy / occluded copy of every input of a
    batch per pass (6 rows here for a bound of 3 or 2). Occlusion's maps equal captum's
    single call on the whole batch; SmoothGrad's equal captum called on the same parts with
    the same seeded noise stream, and are reproducible."""
    from captum.attr import NoiseTunnel, Occlusion, Saliency

    from interptool.analyzers.attribution._methods import batch_seed

    x, y = batch
    rows: list[int] = []
    _counting_prepare(monkeypatch, rows)
    sg = Attribution("smoothgrad", nt_samples=4, stdevs=0.1, seed=1, keep_raw=True)
    res = sg.run(model, x, labels=y, batch_size=6, internal_batch_size=3)
    assert rows and max(rows) <= 3
    assert res.params["nt_samples_batch_size"] == 1  # 3 rows / 3 images per part
    rows.clear()
    occ = Attribution("occlusion", window=8, stride=8, keep_raw=True).run(
        model, x, labels=y, batch_size=6, internal_batch_size=2)
    assert rows and max(rows) <= 2
    assert occ.params["perturbations_per_eval"] == 1
    monkeypatch.undo()
    again = Attribution("smoothgrad", nt_samples=4, stdevs=0.1, seed=1).run(
        model, x, labels=y, batch_size=6, internal_batch_size=3)
    np.testing.assert_array_equal(again.maps, res.maps)
    with torch.random.fork_rng():
        torch.manual_seed(batch_seed(1, 0))
        ref = torch.cat([NoiseTunnel(Saliency(model)).attribute(
            x[s:s + 3].clone().requires_grad_(True), nt_type="smoothgrad", nt_samples=4,
            stdevs=0.1, target=y[s:s + 3], nt_samples_batch_size=1) for s in (0, 3)])
    np.testing.assert_allclose(res.raw, ref.detach().numpy(), rtol=1e-5, atol=1e-7)
    ref = Occlusion(model).attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8),
                                     baselines=torch.zeros_like(x), target=y)
    np.testing.assert_allclose(occ.raw, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_smoothgrad_integrated_gradients_base_keeps_the_bound(monkeypatch, model, batch):
    """The IG base of SmoothGrad: noisy copies x steps stay within internal_batch_size."""
    x, y = batch
    rows: list[int] = []
    _counting_prepare(monkeypatch, rows)
    res = Attribution("smoothgrad", base="integrated_gradients", nt_samples=3, steps=4,
                      stdevs=0.1).run(model, x, labels=y, batch_size=6, internal_batch_size=4)
    assert rows and max(rows) <= 4
    assert res.params["internal_batch_size"] == 4 and res.params["nt_samples_batch_size"] == 1
    # the IG base's own internal_batch_size, below the images (captum raised it to them);
    # it bounds the method's passes (the prediction pass keeps the run's batch)
    a = Attribution("smoothgrad", base="integrated_gradients", nt_samples=3, steps=4,
                    stdevs=0.1, internal_batch_size=2)
    attributing: list[int] = []
    _count_attributing_rows(a, attributing)
    a.run(model, x, labels=y, batch_size=6)
    assert attributing and max(attributing) <= 2
    # above the images: the same noise per pass and captum setting as before parts existed
    res = Attribution("smoothgrad", base="integrated_gradients", nt_samples=3, steps=4,
                      stdevs=0.1, internal_batch_size=64).run(model, x, labels=y, batch_size=6)
    assert res.params["nt_samples_batch_size"] == 1 and res.params["internal_batch_size"] == 64


@pytest.mark.parametrize("as_type", [list, torch.as_tensor])
def test_per_input_targets_are_cut_with_the_parts(model, batch, as_type):
    """Targets given one per input as a list (captum takes lists and tensors) were handed
    whole to every part (captum: "Target list length does not match output")."""
    from captum.attr import IntegratedGradients, Occlusion

    from interptool.analyzers.attribution import get_method

    x, y = batch
    target = as_type([int(v) for v in y])
    ig = get_method("integrated_gradients", {"steps": 4}).attribute(
        model, x.clone(), target, rows=4)
    ref = IntegratedGradients(model).attribute(x.clone().requires_grad_(True),
                                               baselines=torch.zeros_like(x), target=y,
                                               n_steps=4, method="gausslegendre")
    np.testing.assert_allclose(ig.detach().numpy(), ref.detach().numpy(), rtol=1e-4,
                               atol=1e-6)
    occ = get_method("occlusion", {"window": 8, "stride": 8}).attribute(
        model, x.clone(), target, rows=2)
    ref = Occlusion(model).attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8),
                                     baselines=torch.zeros_like(x), target=y)
    np.testing.assert_allclose(occ.detach().numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_smoothgrad_split_is_recorded_and_every_part_gets_the_batchs_settings(monkeypatch,
                                                                             model, batch):
    """A split batch draws each part's noise in turn, so its maps differ from a whole-batch
    run with the same recorded settings: the split is recorded (images_per_part) so that
    such results are not taken for each other; whole batches record no such key (their
    settings and maps are those of earlier versions). Every part, a shorter last one
    included, gets the noise samples per pass that are recorded."""
    from captum.attr import NoiseTunnel

    x, y = batch
    calls: list = []
    _spy(monkeypatch, NoiseTunnel, calls)
    whole = Attribution("smoothgrad", nt_samples=4, stdevs=0.1).run(
        model, x, labels=y, batch_size=6, internal_batch_size=6)
    assert "images_per_part" not in whole.params
    calls.clear()
    split = Attribution("smoothgrad", nt_samples=4, stdevs=0.1).run(
        model, x[:5], labels=y[:5], batch_size=5, internal_batch_size=3)
    assert split.params["images_per_part"] == 3
    assert [int(c["nt_samples_batch_size"]) for c in calls] == \
        [split.params["nt_samples_batch_size"]] * 2  # parts of 3 and 2 images


def test_compare_stage_derives_the_faithfulness_batch_from_the_runs_batch_size(tmp_path,
                                                                               monkeypatch):
    """With internal_batch_size unset, compare used a fixed 64 rows per faithfulness call,
    whatever `[run] batch_size` said; it is now derived from it as `interptool attribute`
    derives it from --batch-size: max(batch_size, 32)."""
    from types import SimpleNamespace

    import interptool.analyzers.attribution as attribution_pkg
    from interptool.pipeline import _stages, parse_config

    scored: list[dict] = []
    monkeypatch.setattr(Attribution, "run", lambda self, loaded, data, **kw: SimpleNamespace(
        maps=np.zeros((4, 8, 8), np.float32), images=None, predictions=np.zeros(4, np.int64)))
    monkeypatch.setattr(attribution_pkg, "score_maps",
                        lambda results, **kwargs: scored.append(kwargs) or {})
    for batch_size in (8, 200):
        cfg = parse_config({
            "run": {"batch_size": batch_size},
            "data": {"eval": "builtin:concept-world?version=1&n=40&size=32&seed=0&split=eval"},
            "models": {"t": {"arch": "interptool:cw-teacher", "layers": ["layer4"]},
                       "s": {"arch": "interptool:cw-student", "layers": ["layer4"]}},
            "analysis": {"dissection": False, "similarity": False,
                         "attribution": {"methods": ["saliency"], "n_images": 4}}})
        (tmp_path / "attribution" / "saliency").mkdir(parents=True, exist_ok=True)
        ctx = SimpleNamespace(cfg=cfg, loaded={k: SimpleNamespace(model=None) for k in "ts"},
                              eval_ds=object(), device="cpu", out=tmp_path)
        _stages._attribute(ctx, "saliency", 4)
    assert [k["batch_size"] for k in scored] == [32, 200]
    from interptool.analyzers.attribution._scoring import faithfulness_batch

    # the attribute command's rule (--batch-size 16 -> 32 rows; an internal batch wins)
    assert faithfulness_batch(None, 16) == 32 and faithfulness_batch(7, 200) == 7
