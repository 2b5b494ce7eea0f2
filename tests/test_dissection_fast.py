"""The dissection tally's tile path: identical masks and counts to the whole-map Pillow path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from interptool.analyzers.dissection import _resize as _dissection_resize
from interptool.analyzers.dissection._resize import (
    above_bound,
    masked_pixels,
    resize_maps,
    tiles_apply,
)
from interptool.analyzers.dissection._tally import TallyAccumulator, seg_item
from interptool.errors import DataError


def _thresholds_with_ties(x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per map: a quantile of the upsampled map, an upsampled value itself (ties), or a
    source-cell value; one negative threshold (every pixel above it)."""
    k = x.shape[0]
    t = torch.cat([exact[: k // 3].double().quantile(0.9, dim=1),
                   exact[k // 3 : 2 * k // 3, 7].double(),
                   x[2 * k // 3 :].flatten(1).double().quantile(0.8, dim=1)])
    t[1] = float(exact[1, 5])
    t[2] = float(exact[2, 0])
    t[3] = -0.25
    return t


@pytest.mark.parametrize("shape", [(7, 7, 112, 112), (14, 14, 112, 112), (2, 2, 32, 32),
                                   (7, 9, 30, 50), (14, 14, 113, 97), (1, 1, 5, 5),
                                   (16, 16, 16, 16), (3, 5, 3, 17),
                                   (12, 12, 6, 12), (13, 11, 5, 29)])  # last two shrink
@pytest.mark.parametrize("relu", [True, False])
def test_masked_pixels_equal_whole_map_threshold(shape, relu):
    h, w, sh, sw = shape
    rng = np.random.default_rng(h * 1000 + sw + relu)
    x = rng.standard_normal((30, h, w)).astype(np.float32)
    if relu:
        x = np.maximum(x, 0)
    x = torch.from_numpy(x)
    exact = resize_maps(x, (sh, sw)).reshape(30, -1)
    t = _thresholds_with_ties(x, exact)
    want = torch.nonzero(exact.double() > t[:, None])
    # a tiny chunk budget exercises the chunking of both stages
    p, px = masked_pixels(x, (sh, sw), t, max_elements=300)
    got = torch.stack([p, px], 1)
    got = got[torch.argsort(got[:, 0] * sh * sw + got[:, 1])]
    assert torch.equal(got, want)


def test_tile_path_chosen_by_geometry():
    assert tiles_apply((7, 7), (112, 112)) and tiles_apply((14, 14), (64, 64))
    assert tiles_apply((4, 4), (32, 32)) and tiles_apply((5, 5), (5, 5))
    assert not tiles_apply((12, 12), (64, 6))  # an axis shrinks: exact whole-map resize


def test_masked_pixels_sparse_peaks_near_threshold():
    # realistic dissection maps: one or two cells above T, others just below it
    rng = np.random.default_rng(5)
    x = rng.uniform(0.0, 1.0, (200, 7, 7)).astype(np.float32)
    t = np.full(200, 1.0)
    for i in range(200):
        for _ in range(1 + i % 2):
            r, c = rng.integers(0, 7, 2)
            x[i, r, c] = np.float32(1.0 + rng.uniform(0.0, 0.5))
    x[::7] = np.float32(1.0)  # plateaus exactly at T: never above it
    x = torch.from_numpy(x)
    t = torch.from_numpy(t)
    exact = resize_maps(x, (112, 112)).reshape(200, -1)
    want = torch.nonzero(exact.double() > t[:, None])
    p, px = masked_pixels(x, (112, 112), t)
    assert len(p) == len(want) > 0
    got = torch.stack([p, px], 1)
    assert torch.equal(got[torch.argsort(got[:, 0] * 12544 + got[:, 1])], want)


def test_above_bound_matches_float32_rounding():
    rng = np.random.default_rng(1)
    t = rng.standard_normal(3000) * 10.0 ** rng.uniform(-44, 37.5, 3000)
    t[:6] = [0.0, -0.0, 1e-45, 1.0, 3.5e38, -3.4e38]
    t[6:200] = rng.standard_normal(194).astype(np.float32)  # thresholds that are float32
    tt = torch.from_numpy(t)
    tau = above_bound(tt)
    up = torch.full_like(tau, np.inf)
    for acc in (tau, torch.nextafter(tau, up), torch.nextafter(tau, -up),
                torch.from_numpy(np.clip(t * (1 + rng.standard_normal(3000) * 1e-8),
                                         -3.4e38, 3.4e38))):
        acc = acc.clamp(-3.4e38, 3.4e38)
        assert torch.equal(acc.float().double() > tt, acc > tau)


@pytest.mark.parametrize("m", [1, 2, 5, 16, 17])
def test_interval_lookup_matches_min_max(m):
    # first True and the span to the last True per row, 0 when none (rows of 16 or fewer
    # columns go through a bit-pattern lookup table, longer ones through min/max)
    rng = np.random.default_rng(m)
    ok = torch.from_numpy(rng.random((400, m)) < rng.choice([0.05, 0.5, 0.95], (400, 1)))
    ok[0] = False
    want = []
    for row in ok.tolist():
        idx = [j for j, v in enumerate(row) if v]
        want.append([idx[0], idx[-1] - idx[0] + 1] if idx else [m - 1, 0])
    assert _dissection_resize._interval(ok).tolist() == want


# ------------------------------------------------------------------------------- tally
def _reference_counts(feats, segs, thresholds, label_category, n_cat, mode):
    """Per image and unit: Pillow resize, numpy counts (NetDissect-Lite, stale fix)."""
    U = feats.shape[1]
    L = len(label_category)
    inter = np.zeros((U, L), np.int64)
    area = np.zeros(L, np.int64)
    uarea = np.zeros(U, np.int64)
    ucat = np.zeros((U, n_cat), np.int64)
    for i, seg in enumerate(segs):
        sh, sw = seg.size
        planes = [p for a in seg.pixel.values() for p in a]
        pix = np.stack(planes) if planes else np.zeros((0, sh, sw), np.int64)
        scal = [int(s) for a in seg.image.values() for s in a]
        area += np.bincount(pix.ravel(), minlength=L)
        for s in scal:
            area[s] += sh * sw
        img_cats = {label_category[v] for v in np.unique(pix) if v > 0} | {
            label_category[s] for s in scal if s > 0}
        for u in range(U):
            up = np.asarray(Image.fromarray(feats[i, u], mode="F").resize((sw, sh),
                                                                         Image.BILINEAR))
            m = up > thresholds[u]
            n = int(m.sum())
            uarea[u] += n
            under = pix[:, m]
            inter[u] += np.bincount(under.ravel(), minlength=L)
            for s in scal:
                inter[u, s] += n
            if mode == "overlap":
                cats = {label_category[v] for v in np.unique(under) if v > 0} | {
                    label_category[s] for s in scal if s > 0}
            else:
                cats = img_cats
            for c in cats:
                ucat[u, c] += n
    inter[:, 0] = 0
    area[0] = 0
    return {"intersect": inter, "label_area": area, "unit_area": uarea, "unit_cat_area": ucat}


@pytest.mark.parametrize("mode", ["overlap", "image"])
@pytest.mark.parametrize("shrink", [False, True])
def test_tally_equals_per_image_reference_with_ties(mode, shrink):
    rng = np.random.default_rng(11)
    n, U = 10, 6
    label_category = np.array([-1, 0, 0, 1, 1, 2, 2, 3, -1])  # 3: image-level, 8: unused
    # growing maps take the tile path; maps taller than the masks (height shrinks, width
    # grows: Pillow's order is known there) the exact whole-map resize
    feats = rng.gamma(1.0, size=(n, U, *((20, 8) if shrink else (4, 4)))).astype(np.float32)
    feats[:, 0] = np.maximum(feats[:, 0] - 1.0, 0)  # sparse unit with ReLU zeros
    segs = []
    for i in range(n):
        size = (16, 16) if i % 3 else (12, 20)  # two segmentation sizes in one batch
        pixel = {"a": rng.integers(0, 3, (1, *size)),  # labels 0..2 (category 0)
                 "b": rng.choice([0, 3, 4], (2, *size))}  # two planes of category 1
        image = {"s": np.array([7] if i % 2 else [], dtype=np.int64)}
        if i == 4:
            pixel = {}  # only image-level labels (NetDissect-Lite's stale accumulator case)
        segs.append(SimpleNamespace(size=size, pixel=pixel, image=image))
    # thresholds at exact upsampled values of some maps: ties at T everywhere
    t = np.array([float(np.asarray(Image.fromarray(feats[u % n, u], mode="F").resize(
        (16, 16), Image.BILINEAR))[5, 3 + u]) for u in range(U)])
    t[1] = float(np.quantile(feats[:, 1], 0.9))
    items = [seg_item(i, s, ["a", "b", "s"]) for i, s in enumerate(segs)]
    acc = TallyAccumulator(t, label_category, 4, torch.device("cpu"), mode)
    acc.add(torch.from_numpy(feats[:7]), items[:7])
    acc.add(torch.from_numpy(feats[7:]), items[7:])
    got = acc.counts()
    want = _reference_counts(feats, segs, t, label_category, 4, mode)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert got["unit_area"].sum() > 0


def test_seg_item_counts_and_label_range():
    seg = SimpleNamespace(size=(2, 3), pixel={"a": np.array([[[0, 1, 1], [2, 2, 2]]]),
                                              "b": np.array([[[5, 0, 0], [0, 0, 1]]])},
                          image={"s": np.array([4])})
    it = seg_item(3, seg, ["a", "b", "s"])
    assert it.pixel.shape == (6, 2) and it.pixel[0].tolist() == [0, 5]
    assert it.label_counts.tolist() == [5, 3, 3, 0, 0, 1]  # 0: 1 + 4 pixels
    assert (it.lo, it.hi) == (0, 5)
    acc = TallyAccumulator(np.zeros(1), np.zeros(5, np.int64), 1, torch.device("cpu"))
    with pytest.raises(DataError, match="probe image 3: label number 5"):
        acc.add(torch.zeros((1, 1, 2, 2)), [it])
    bad = SimpleNamespace(size=(1, 2), pixel={"a": np.array([[[0, -3]]])}, image={})
    with pytest.raises(DataError, match="label number -3"):
        acc.add(torch.zeros((1, 1, 2, 2)), [seg_item(0, bad, ["a"])])


# ------------------------------------------------------------------------------ threads
def _stat(rows: dict[int, tuple[int, int]]) -> str:
    """A /proc/stat text: per CPU (busy user jiffies, idle jiffies)."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    lines += [f"cpu{c} {busy} 0 0 {idle} 0 0 0 0 0 0" for c, (busy, idle) in rows.items()]
    return "\n".join(lines + ["intr 1 2 3"]) + "\n"


def test_idle_cores_from_proc_stat(tmp_path, monkeypatch):
    from interptool.analyzers.dissection import _threads

    stat = tmp_path / "stat"
    snapshots = iter([_stat({0: (100, 100), 1: (100, 100), 2: (0, 0)}),
                      # cpu0 fully busy, cpu1 idle 3/4 of the time, cpu2 not ours
                      _stat({0: (200, 100), 1: (125, 175), 2: (0, 100)})])
    stat.write_text(next(snapshots))
    monkeypatch.setattr(_threads.time, "sleep", lambda s: stat.write_text(next(snapshots)))
    idle = _threads.idle_cores({0, 1}, stat_path=stat)
    assert idle == pytest.approx(0.75)
    assert _threads.idle_cores({0}, stat_path=tmp_path / "missing") is None


@pytest.mark.parametrize("idle,want", [(2.0, 2), (1.6, 2), (1.4, 1), (1.0, 1), (0.0, 1),
                                       (None, 2)])
def test_analysis_threads_keep_only_free_cores(idle, want, monkeypatch):
    from interptool.analyzers.dissection import _threads

    monkeypatch.setattr(_threads, "plan_threads", lambda *a, **k: SimpleNamespace(
        torch_threads=2, available=2, source="affinity"))
    got = _threads.analysis_threads(idle=idle)
    assert got["torch_threads"] == want and got["available_cores"] == 2


class _OneLabelProbe:
    """Two images, every pixel labelled 1 ("x", category object)."""

    ids = ["a", "b"]
    spec, fingerprint = "t:p", "fp"
    categories = ["object"]
    label_names = np.array(["-", "x"])
    label_category = np.array([-1, 0])
    num_labels = 2

    def __len__(self):
        return 2

    def load_segmentation(self, i):
        return SimpleNamespace(size=(4, 4), pixel={"object": np.ones((1, 4, 4), np.int64)},
                               image={})


def test_dissection_records_threads_and_restores_torch(tmp_path, monkeypatch):
    from interptool.analyzers.dissection import Dissection
    from interptool.analyzers.dissection import _analyzer as an
    from interptool.cache import write_cache

    seen = []
    monkeypatch.setattr(an, "analysis_threads", lambda workers=0: {"torch_threads": 1})
    real = an.Dissection._measure

    def spy(self, *a, **k):
        seen.append(torch.get_num_threads())
        return real(self, *a, **k)

    monkeypatch.setattr(an.Dissection, "_measure", spy)
    probe = _OneLabelProbe()
    feats = np.random.default_rng(0).random((2, 3, 2, 2), dtype=np.float32)
    path = write_cache(tmp_path / "c.h5", logits=np.zeros((2, 2)), ids=probe.ids,
                       features={"l": feats}, attrs={"data_fingerprint": "fp", "data_spec": "t:p"})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = Dissection(quantile=0.25, checksum=False, top_images=0).run(path, "l", probe)
        assert seen == [1] and torch.get_num_threads() == 2  # set for the run, then restored
        assert r.config["threads"] == {"torch_threads": 1}
    finally:
        torch.set_num_threads(before)
