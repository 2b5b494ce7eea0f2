"""Attribution scores against answers computed independently: agreement, localisation,
faithfulness (deletion / insertion), randomisation check, class-object masks."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from interptool.analyzers.attribution import (
    Attribution,
    agreement,
    class_object_masks,
    faithfulness,
    localisation,
    randomisation_check,
    resize_masks,
)
from interptool.analyzers.attribution._scores import bootstrap_ci, rowwise_spearman
from interptool.errors import AnalysisError

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require")

H = W = 32
BOX = (slice(8, 16), slice(16, 24))  # rows 8..15, cols 16..23: 4 patches of 4 px
GAIN = 3.0
BOX_VALUE = 1.0


class BoxNet(nn.Module):
    """Two classes decided only by the mean of a fixed box: logits (g s, -g s)."""

    calls = []  # class-level: shared with the deep copy made by the analyzers

    def forward(self, x):
        BoxNet.calls.append(x.shape[0])
        s = x[:, :, BOX[0], BOX[1]].mean(dim=(1, 2, 3))
        return torch.stack([GAIN * s, -GAIN * s], dim=1)


def _box_images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 3, H, W, generator=g)
    x[:, :, BOX[0], BOX[1]] = BOX_VALUE
    mask = np.zeros((n, H, W), bool)
    mask[:, BOX[0], BOX[1]] = True
    return x, mask


# ----------------------------------------------------------------------------- agreement


def test_agreement_with_itself_is_one():
    torch.manual_seed(0)
    x, _ = _box_images()
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    r = Attribution("saliency").run(net, x, target=0)
    a = agreement(r, r, n_boot=50)
    for key in ("spearman", "cosine", "top5_iou", "top10_iou", "top20_iou"):
        assert a.summary[key]["mean"] == pytest.approx(1.0, abs=1e-12)
        assert a.summary[key]["ci_low"] == pytest.approx(1.0, abs=1e-12)
    assert list(a.to_frame().columns) == ["id", "spearman", "cosine", "top5_iou", "top10_iou",
                                          "top20_iou"]
    json.dumps(a.to_dict())


def test_agreement_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 10, 10))
    b = np.exp(a)  # monotone: same ranks, different values
    c = -a
    ab, ac = agreement(a, b, ks=(10,), n_boot=0), agreement(a, c, ks=(10,), n_boot=0)
    np.testing.assert_allclose(ab.spearman, 1.0)
    np.testing.assert_allclose(ac.spearman, -1.0)
    np.testing.assert_allclose(ab.topk_iou[10], 1.0)
    np.testing.assert_allclose(ac.topk_iou[10], 0.0)
    cos = [(a[i] * b[i]).sum() / np.linalg.norm(a[i]) / np.linalg.norm(b[i]) for i in range(4)]
    np.testing.assert_allclose(ab.cosine, cos, rtol=1e-12)
    # top-10% of 100 px = 10 px; 5 shared -> IoU 5 / 15
    d = np.zeros((1, 10, 10))
    e = np.zeros((1, 10, 10))
    d.reshape(-1)[:10] = np.arange(10, 0, -1)
    e.reshape(-1)[5:15] = np.arange(10, 0, -1)
    assert agreement(d, e, ks=(10,), n_boot=0).topk_iou[10][0] == pytest.approx(5 / 15)


def test_rowwise_spearman_matches_scipy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 40))
    b = a + rng.normal(size=(5, 40))
    b[0, :10] = b[0, 0]  # ties
    ours = rowwise_spearman(a, b)
    ref = [spearmanr(a[i], b[i]).statistic for i in range(5)]
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    assert np.isnan(rowwise_spearman(np.ones((1, 5)), a[:1, :5])[0])  # constant: undefined


def test_bootstrap_ci_contains_mean_and_is_seeded():
    v = np.random.default_rng(2).normal(size=50)
    m, lo, hi = bootstrap_ci(v, 500, seed=3)
    assert lo < m < hi and m == pytest.approx(v.mean())
    assert bootstrap_ci(v, 500, seed=3) == (m, lo, hi)
    assert (hi - lo) == pytest.approx(2 * 1.96 * v.std(ddof=1) / math.sqrt(50), rel=0.25)


def test_agreement_requires_same_ids():
    x, _ = _box_images(3)
    net = BoxNet()
    r1 = Attribution("saliency").run(net, x, target=0, ids=["a", "b", "c"])
    r2 = Attribution("saliency").run(net, x, target=0, ids=["a", "c", "b"])
    with pytest.raises(AnalysisError, match="same images in the same order.*position 1"):
        agreement(r1, r2)


# ----------------------------------------------------------------------------- localisation


def test_localisation_box_model_is_one():
    x, mask = _box_images()
    for method in ("saliency", "input_x_gradient", "integrated_gradients"):
        r = Attribution(method).run(BoxNet(), x, target=0)
        loc = localisation(r, mask, n_boot=50)
        np.testing.assert_allclose(loc.energy, 1.0)
        np.testing.assert_allclose(loc.hit, 1.0)
        assert loc.summary["mask_area"]["mean"] == pytest.approx(64 / (H * W))
    # a mask elsewhere gets nothing
    other = np.zeros_like(mask)
    other[:, 20:28, 0:8] = True
    r = Attribution("saliency").run(BoxNet(), x, target=0)
    np.testing.assert_allclose(localisation(r, other, n_boot=0).energy, 0.0)


def test_localisation_known_values_and_tolerance():
    maps = np.zeros((2, 6, 6))
    maps[0, 1, 1] = maps[0, 1, 2] = maps[0, 2, 1] = 1.0  # inside
    maps[0, 5, 5] = 1.0  # outside
    maps[0, 4, 4] = -7.0  # negative: ignored
    maps[1, 3, 3] = 2.0  # arg-max one pixel right of the mask
    mask = np.zeros((2, 6, 6), bool)
    mask[0, 0:3, 0:3] = True
    mask[1, 3, 0:3] = True
    loc = localisation(maps, mask, n_boot=0)
    assert loc.energy[0] == pytest.approx(0.75) and loc.hit[0] == 1.0
    assert loc.hit[1] == 0.0 and loc.energy[1] == 0.0
    assert localisation(maps, mask, tolerance=1, n_boot=0).hit[1] == 1.0
    empty = np.zeros_like(mask)
    assert np.isnan(localisation(maps, empty, n_boot=0).energy).all()


def test_localisation_mask_size_mismatch():
    maps = np.zeros((2, 8, 8))
    with pytest.raises(AnalysisError, match=r"mask size \(4, 4\) differs.*resize_masks"):
        localisation(maps, np.zeros((2, 4, 4), bool))
    with pytest.raises(AnalysisError, match="3 masks for 2 maps"):
        localisation(maps, np.zeros((3, 8, 8), bool))
    small = np.zeros((1, 4, 4), bool)
    small[0, 1, 2] = True
    big = resize_masks(small, (8, 8))
    expect = np.zeros((8, 8), bool)
    expect[2:4, 4:6] = True
    np.testing.assert_array_equal(big[0], expect)


def test_class_object_masks_from_broden_like():
    seg = np.zeros((1, 4, 4), np.int64)
    seg[0, 0, :2] = 5  # "ball"
    seg[0, 3, 3] = 7  # "box"

    class Fake:
        labels = np.array([1, 0])
        class_names = ["box", "ball"]
        label_names = np.array(["", "", "", "", "", "ball", "", "box"], dtype=object)

        def __len__(self):
            return 2

        def load_segmentation(self, i):
            return SimpleNamespace(size=(4, 4), pixel={"object": seg}, image={})

    m = class_object_masks(Fake())
    np.testing.assert_array_equal(m[0], seg[0] == 5)  # class 1 = ball
    np.testing.assert_array_equal(m[1], seg[0] == 7)  # class 0 = box
    assert class_object_masks(Fake(), [0], size=(8, 8)).shape == (1, 8, 8)
    with pytest.raises(AnalysisError, match="no segmentations"):
        class_object_masks(object())


# ----------------------------------------------------------------------------- faithfulness


def _expected_deletion_curve(p_patches, box_patches, steps):
    """Deleting k box patches (zeros baseline) leaves s = v (B - k) / B in the box."""
    counts = np.round(np.arange(steps + 1) / steps * p_patches).astype(int)
    s = BOX_VALUE * (box_patches - np.minimum(counts, box_patches)) / box_patches
    return counts / p_patches, 1 / (1 + np.exp(-2 * GAIN * s))


def test_deletion_curve_matches_closed_form_and_beats_random():
    x, _ = _box_images(5)
    r = Attribution("saliency").run(BoxNet(), x, target=0)
    dele = faithfulness(BoxNet(), x, r.maps, r.targets, mode="deletion", patch=4, steps=None,
                        baseline="zeros", batch_size=16, n_boot=0)
    frac, curve = _expected_deletion_curve(64, 4, 64)
    np.testing.assert_allclose(dele.fractions, frac)
    np.testing.assert_allclose(dele.curves, np.tile(curve, (5, 1)), rtol=1e-6)
    np.testing.assert_allclose(dele.auc, np.trapezoid(curve, frac), rtol=1e-6)
    rand = faithfulness(BoxNet(), x, r.maps, r.targets, mode="deletion", patch=4, steps=16,
                        baseline="zeros", order="random", seed=1, n_boot=0)
    ins = faithfulness(BoxNet(), x, r.maps, r.targets, mode="insertion", patch=4, steps=16,
                       baseline="zeros", n_boot=0)
    assert dele.summary["auc"]["mean"] < rand.summary["auc"]["mean"] - 0.1
    assert ins.summary["auc"]["mean"] > dele.summary["auc"]["mean"] + 0.3
    np.testing.assert_allclose(ins.curves[:, 0], 0.5)  # baseline alone: no evidence
    np.testing.assert_allclose(ins.curves[:, -1], dele.curves[:, 0], rtol=1e-6)


def test_faithfulness_is_batched_and_chunking_invariant():
    x, _ = _box_images(5)
    maps = np.random.default_rng(0).random((5, H, W))
    t = np.zeros(5, int)
    BoxNet.calls.clear()
    a = faithfulness(BoxNet(), x, maps, t, patch=8, steps=6, baseline="blur", batch_size=8,
                     n_boot=0, reference=None)
    assert len(BoxNet.calls) == math.ceil(5 * 7 / 8)  # no per-image model call
    assert max(BoxNet.calls) == 8
    # the default also runs the random-order reference: twice the batched calls
    BoxNet.calls.clear()
    ref = faithfulness(BoxNet(), x, maps, t, patch=8, steps=6, baseline="blur", batch_size=8,
                       n_boot=0)
    assert len(BoxNet.calls) == 2 * math.ceil(5 * 7 / 8) and max(BoxNet.calls) == 8
    np.testing.assert_allclose(ref.curves, a.curves)
    b = faithfulness(BoxNet(), x, maps, t, patch=8, steps=6, baseline="blur", batch_size=1000,
                     n_boot=0)
    np.testing.assert_allclose(a.curves, b.curves, rtol=1e-6)
    np.testing.assert_allclose(ref.normalised, b.normalised, rtol=1e-6)
    assert a.curves.shape == (5, 7)
    frame = a.to_frame()
    assert list(frame.columns) == ["id", "mode", "auc", "p_start", "p_end"]
    assert list(ref.to_frame().columns) == ["id", "mode", "auc", "p_start", "p_end", "p0",
                                            "auc_random", "normalised"]
    json.dumps(a.to_dict())
    json.dumps(ref.to_dict())


def test_faithfulness_errors():
    x, _ = _box_images(2)
    with pytest.raises(AnalysisError, match="mode must be"):
        faithfulness(BoxNet(), x, np.zeros((2, H, W)), [0, 0], mode="remove")
    with pytest.raises(AnalysisError, match="do not match images"):
        faithfulness(BoxNet(), x, np.zeros((2, 16, 16)), [0, 0])


# ----------------------------------------------------------------------------- randomisation


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def test_randomisation_changes_gradient_maps():
    net = _convnet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2, 0])
    res = randomisation_check(net, ["saliency", "input_x_gradient"], x, t, n_boot=20)
    frame = res.to_frame()
    assert res.layers == ["6", "2", "0"]  # parametrised children, output side first
    last = frame[frame.step == 3].set_index("method")["spearman"]
    assert (last < 0.5).all()
    assert res.flagged == {"saliency": False, "input_x_gradient": False}
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])  # the user's model is untouched
    # seeded: same numbers again
    again = randomisation_check(net, ["saliency", "input_x_gradient"], x, t, n_boot=20)
    np.testing.assert_allclose(frame["spearman"], again.to_frame()["spearman"])
    json.dumps(res.to_dict())


def test_randomisation_flags_weight_independent_maps():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _convnet()
            self.unused = nn.Linear(3, 3)  # randomising it cannot change anything

        def forward(self, x):
            return self.net(x)

    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    res = randomisation_check(WithUnused(), "saliency", x, [0, 1, 2],
                              layers_to_randomize=["unused"], n_boot=0)
    assert res.flagged == {"saliency": True}
    assert res.to_frame()["spearman"].iloc[-1] == pytest.approx(1.0)
    with pytest.raises(AnalysisError, match="'nope' not found"):
        randomisation_check(WithUnused(), "saliency", x, [0, 1, 2],
                            layers_to_randomize=["nope"])


def test_score_results_save(tmp_path):
    maps = np.random.default_rng(0).random((3, 8, 8))
    mask = np.zeros((3, 8, 8), bool)
    mask[:, :4] = True
    for res in (agreement(maps, maps, n_boot=0), localisation(maps, mask, n_boot=0)):
        paths = res.save(tmp_path / res.kind)
        assert all(p.exists() and p.stat().st_size > 0 for p in paths)
        assert {p.suffix for p in paths} == {".csv", ".json", ".png"}
        # figures=False (compare: the report draws the scores): the same tables, no plot
        bare = res.save(tmp_path / "bare" / res.kind, figures=False)
        assert [p.name for p in bare] == [p.name for p in paths if p.suffix != ".png"]
        assert not list((tmp_path / "bare" / res.kind).glob("*.png"))
        for a, b in zip(bare, paths):
            assert a.read_bytes() == b.read_bytes()


def test_agreement_block_invariant_and_concat_results_equal_whole():
    from interptool.analyzers.attribution import FaithfulnessResult
    from interptool.analyzers.attribution import LocalisationResult as LR

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(7, 9, 9)), rng.normal(size=(7, 9, 9))
    whole = agreement(a, b, n_boot=100)
    chunked = agreement(a, b, n_boot=100, block=3)
    for key in ("spearman", "cosine", "top5_iou", "top20_iou"):
        assert chunked.summary[key] == whole.summary[key]
    x, mask = _box_images(5)
    maps = rng.random((5, H, W))
    kw = dict(patch=8, steps=4, baseline="mean", n_boot=0)
    full = faithfulness(BoxNet(), x, maps, np.zeros(5, int), ids=list("abcde"), **kw)
    parts = [faithfulness(BoxNet(), x[s:e], maps[s:e], np.zeros(e - s, int),
                          ids=list("abcde")[s:e], **kw) for s, e in ((0, 2), (2, 5))]
    merged = FaithfulnessResult.concat(parts, n_boot=50, seed=1)
    np.testing.assert_allclose(merged.curves, full.curves)
    assert merged.ids == list("abcde")
    assert merged.summary["auc"]["mean"] == pytest.approx(full.auc.mean())
    loc = localisation(maps, mask, n_boot=50, seed=1)
    loc_parts = LR.concat([localisation(maps[:2], mask[:2], n_boot=0),
                           localisation(maps[2:], mask[2:], n_boot=0)], n_boot=50, seed=1)
    np.testing.assert_allclose(loc_parts.energy, loc.energy)
    assert loc_parts.summary == loc.summary


def _folder_dataset(tmp_path, sizes):
    from PIL import Image

    ids = []
    for i, (h, w) in enumerate(sizes):
        p = tmp_path / "imgs" / "c" / f"{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(p)
        ids.append(f"c/{i}.jpg")
    class Folder:  # the ImageDataset surface folder_masks uses
        def __init__(self):
            self.ids = ids

        def __len__(self):
            return len(ids)

        def image_path(self, i):
            return tmp_path / "imgs" / ids[i]

    return Folder()


def test_folder_masks_read_resize_and_size_mismatch(tmp_path):
    from PIL import Image

    from interptool.analyzers.attribution import folder_masks

    ds = _folder_dataset(tmp_path, [(8, 4), (8, 4)])
    (tmp_path / "m" / "c").mkdir(parents=True)
    m0 = np.zeros((8, 4), np.uint8)
    m0[0:4, 2:4] = 255  # top-right quarter
    Image.fromarray(m0).save(tmp_path / "m" / "c" / "0.png")
    Image.fromarray(np.full((8, 4), 7, np.uint8)).save(tmp_path / "m" / "c" / "1.png")
    got = folder_masks(tmp_path / "m", ds, [0, 1], size=(4, 4))
    expect = np.zeros((4, 4), bool)
    expect[0:2, 2:4] = True
    np.testing.assert_array_equal(got[0], expect)
    assert got[1].all()  # any non-zero value is object
    np.testing.assert_array_equal(folder_masks(tmp_path / "m", ds, [0])[0], m0 > 0)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "m" / "c" / "1.png")
    with pytest.raises(AnalysisError, match=r"1.png is 5x5 px but image .*1.jpg is 4x8 px"):
        folder_masks(tmp_path / "m", ds)
    (tmp_path / "m" / "c" / "1.png").unlink()
    with pytest.raises(AnalysisError, match=r"no mask for image 'c/1.jpg': expected .*1.png"):
        folder_masks(tmp_path / "m", ds)
    with pytest.raises(AnalysisError, match="does not exist"):
        folder_masks(tmp_path / "nope", ds)


# ----------------------------------------------------------------------------- normalised
class _MeanLogit(nn.Module):
    """Two outputs: logit_0 = a * mean(x), logit_1 = 0, so p(class 0) = sigmoid(a mean(x))."""

    def __init__(self, a: float = 1.0) -> None:
        super().__init__()
        self.a = a

    def forward(self, x):
        m = self.a * x.mean(dim=(1, 2, 3))
        return torch.stack([m, torch.zeros_like(m)], dim=1)


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _trapezoid(ys, dx):
    return sum(0.5 * (ys[i] + ys[i + 1]) * dx for i in range(len(ys) - 1))


def test_normalised_deletion_auc_hand_computed():
    """A 4x4 one-channel image of four 2x2 patches with values 4, 3, 2, 1; the model's
    p(target) = sigmoid(mean pixel). Deleting (zeros baseline) the patches in map order
    gives sigmoid(2.5), sigmoid(1.5), sigmoid(0.75), sigmoid(0.25), sigmoid(0); the random
    curve is whatever order the seed drew, and must be one of the 24 orders."""
    from itertools import permutations

    from interptool.analyzers.attribution import faithfulness

    vals = [4.0, 3.0, 2.0, 1.0]
    img = torch.zeros(1, 1, 4, 4)
    for k, v in enumerate(vals):
        r, c = divmod(k, 2)
        img[0, 0, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = v
    maps = img[:, 0].numpy().copy()  # the map ranks patches by value
    res = faithfulness(_MeanLogit(), img, maps, [0], mode="deletion", patch=2, steps=4,
                       baseline="zeros", n_boot=0, seed=5)
    want = [_sig(2.5), _sig(1.5), _sig(0.75), _sig(0.25), _sig(0.0)]
    np.testing.assert_allclose(res.curves[0], want, rtol=1e-6)
    auc_del = _trapezoid(want, 0.25)
    assert res.auc[0] == pytest.approx(auc_del, rel=1e-6)
    p0 = _sig(2.5)
    assert res.p0[0] == pytest.approx(p0, rel=1e-6)
    # the random curve follows some order of the four patches
    curves = {}
    for order in permutations(range(4)):
        left = sum(vals)
        ys = [_sig(left / 4)]
        for k in order:
            left -= vals[k]
            ys.append(_sig(left / 4))
        curves[order] = ys
    match = [o for o, ys in curves.items() if np.allclose(ys, res.curves_random[0], rtol=1e-6)]
    assert match
    auc_rand = _trapezoid(curves[match[0]], 0.25)
    assert res.auc_random[0] == pytest.approx(auc_rand, rel=1e-6)
    assert res.normalised[0] == pytest.approx((auc_rand - auc_del) / p0, rel=1e-6)
    assert res.normalised[0] >= 0  # the map's order is the steepest possible
    assert res.summary["normalised"]["mean"] == pytest.approx(res.normalised[0])


def test_normalised_score_does_not_reward_confidence():
    """Scaling the logits (a more confident model, same ranking of evidence) raises the raw
    deletion 'gain' AUC_random - AUC_deletion less than p0 grows, so the normalised score
    of the confident model is not inflated the way the raw AUC difference is."""
    from interptool.analyzers.attribution import faithfulness

    g = torch.Generator().manual_seed(0)
    img = torch.rand(6, 1, 8, 8, generator=g) + 0.5
    maps = img[:, 0].numpy().copy()
    scores = {}
    for a in (0.5, 4.0):
        res = faithfulness(_MeanLogit(a), img, maps, [0] * 6, mode="insertion", patch=2,
                           steps=8, baseline="zeros", n_boot=0, seed=1)
        scores[a] = res
        assert (res.normalised >= -1e-9).all()  # the map's order adds evidence fastest
        p_full = torch.sigmoid(a * img.mean(dim=(1, 2, 3))).numpy()
        np.testing.assert_allclose(res.p0, p_full, rtol=1e-6)
    raw_gain = {a: (r.auc - r.auc_random).mean() for a, r in scores.items()}
    norm = {a: r.normalised.mean() for a, r in scores.items()}
    assert raw_gain[4.0] / raw_gain[0.5] > norm[4.0] / norm[0.5]


def test_faithfulness_reference_none_and_concat():
    from interptool.analyzers.attribution import FaithfulnessResult, faithfulness

    img = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    maps = img[:, 0].numpy().copy()
    kw = dict(mode="deletion", patch=2, steps=4, baseline="zeros", seed=0)
    plain = faithfulness(_MeanLogit(), img, maps, [0] * 4, reference=None, n_boot=0, **kw)
    assert plain.normalised is None and "normalised" not in plain.summary
    parts = [faithfulness(_MeanLogit(), img[i:i + 2], maps[i:i + 2], [0, 0], n_boot=0, **kw)
             for i in (0, 2)]
    whole = FaithfulnessResult.concat(parts, n_boot=200)
    assert whole.normalised.shape == (4,)
    assert set(whole.to_frame().columns) >= {"p0", "auc_random", "normalised"}
    s = whole.summary["normalised"]
    assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    with pytest.raises(AnalysisError, match="reference"):
        faithfulness(_MeanLogit(), img, maps, [0] * 4, reference="blur", **kw)


def test_bootstrap_interval_of_a_skewed_mean_contains_it():
    """A heavy-tailed sample at small n: the resampled means are skewed, yet every interval
    holds its mean (widened and flagged when the BC interval alone would miss it)."""
    from interptool.analyzers.attribution._scores import bootstrap_interval

    for seed in range(20):
        v = np.random.default_rng(seed).lognormal(0, 2.5, size=6)
        iv = bootstrap_interval(v, 400, seed)
        assert iv.low <= iv.estimate <= iv.high
        assert iv.estimate == pytest.approx(v.mean())
