"""Faithfulness's random-order reference is computed once per model, images, targets and
settings and reused (it does not depend on the maps): reused curves equal a fresh
computation exactly, and any change of weights, images or settings recomputes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import interptool.analyzers.attribution._scores as scores
from interptool.analyzers.attribution import faithfulness


class CountingNet(nn.Module):
    """A small CNN that counts the images it has seen (forward calls x batch rows)."""

    seen = 0

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CountingNet.seen += x.shape[0]
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@pytest.fixture()
def setup(monkeypatch):
    monkeypatch.setattr(scores, "_REFERENCE_CURVES", type(scores._REFERENCE_CURVES)())
    torch.manual_seed(0)
    net = CountingNet().eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, 16, 16, generator=g)
    maps_a = torch.rand(5, 16, 16, generator=g).numpy()
    maps_b = torch.rand(5, 16, 16, generator=g).numpy()
    return net, images, maps_a, maps_b, np.array([0, 1, 2, 0, 1])


def _run(net, images, maps, targets, **kw):
    kw.setdefault("mode", "deletion")
    kw.setdefault("reuse_reference", True)
    return faithfulness(net, images, maps, targets, patch=4, steps=4, n_boot=0, **kw)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_reference_reused_across_maps_equals_a_fresh_computation(setup, monkeypatch, mode):
    net, images, maps_a, maps_b, targets = setup
    CountingNet.seen = 0
    a = _run(net, images, maps_a, targets, mode=mode)
    per_order = 5 * (4 + 1)  # images x (steps + 1)
    assert CountingNet.seen == 2 * per_order  # attribution order + random reference
    b = _run(net, images, maps_b, targets, mode=mode)
    assert CountingNet.seen == 3 * per_order  # the reference was reused
    np.testing.assert_array_equal(b.curves_random, a.curves_random)
    # a fresh computation (empty memo) gives exactly the reused curves and scores
    monkeypatch.setattr(scores, "_REFERENCE_CURVES", type(scores._REFERENCE_CURVES)())
    fresh = _run(net, images, maps_b, targets, mode=mode)
    assert CountingNet.seen == 5 * per_order
    np.testing.assert_array_equal(fresh.curves_random, b.curves_random)
    np.testing.assert_array_equal(fresh.normalised, b.normalised)
    np.testing.assert_array_equal(fresh.curves, b.curves)


def test_changed_weights_images_or_settings_recompute_the_reference(setup):
    net, images, maps_a, maps_b, targets = setup
    first = _run(net, images, maps_a, targets)
    CountingNet.seen = 0
    _run(net, images, maps_b, targets, mode="insertion")  # another mode: its own reference
    assert CountingNet.seen == 2 * 25
    with torch.no_grad():
        net.fc.weight.mul_(3.0)  # same module object, weights changed in place
    CountingNet.seen = 0
    changed = _run(net, images, maps_b, targets)
    assert CountingNet.seen == 2 * 25
    assert not np.array_equal(changed.curves_random, first.curves_random)
    CountingNet.seen = 0
    _run(net, images + 0.5, maps_b, targets)  # other images
    _run(net, images, maps_b, targets[::-1].copy())  # other targets
    _run(net, images, maps_b, targets, seed=3)  # another random order
    assert CountingNet.seen == 3 * 2 * 25
    CountingNet.seen = 0
    _run(net, images, maps_a, targets, reuse_reference=False)  # the default: no memo
    assert CountingNet.seen == 2 * 25


@pytest.mark.parametrize("baseline", ["blur", "mean", "zeros"])
def test_curves_equal_a_per_image_reference_implementation(setup, baseline):
    # the baseline is made once per distinct image of a batch: the curves must equal those
    # of a plain loop that builds every perturbed image on its own
    from interptool.analyzers.attribution._methods import make_baseline

    net, images, maps_a, _, targets = setup
    res = faithfulness(net, images, maps_a, targets, patch=4, steps=4, n_boot=0,
                       baseline=baseline, batch_size=7, reference=None)
    p = 16  # 4 x 4 patches of 4 px
    expect = np.zeros((5, 5))
    for i in range(5):
        score = torch.from_numpy(maps_a[i]).reshape(4, 4, 4, 4).sum(dim=(1, 3)).reshape(-1)
        order = torch.argsort(-score.float(), stable=True)
        base = make_baseline(images[i : i + 1], baseline)
        for s in range(5):
            sel = torch.zeros(p)
            sel[order[: round(s / 4 * p)]] = 1
            sel = sel.reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1)
            x = images[i : i + 1] * (1 - sel) + base * sel
            with torch.no_grad():
                expect[i, s] = torch.softmax(net(x), dim=1)[0, targets[i]].item()
    np.testing.assert_allclose(res.curves, expect, rtol=1e-5, atol=1e-7)
