"""Dissection outputs: montages rendered in one pass (equal to Pillow per tile), figures that
can be switched off without loading a plotting library, and atomic writes of every file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from interptool import _provenance
from interptool.analyzers.dissection import Dissection
from interptool.analyzers.dissection._plots import _OUTLINE, _TILE, render_montages
from interptool.cache import write_cache
from interptool.data import Segmentation

CATS = ["object", "scene"]
NAMES = ["-", "a", "b", "sky"]
LABCAT = np.array([-1, 0, 0, 1])


class GridProbe:
    """Eight images whose object plane is a label in one quadrant (rotating), scene sky."""

    def __init__(self, n: int = 8, sizes=((8, 8), (6, 10))):
        self.n, self.sizes = n, sizes
        self.ids = [f"g{i}.png" for i in range(n)]
        self.spec = "grid:probe"
        self.fingerprint = "grid-" + str(n)
        self.categories = CATS
        self.label_names = np.array(NAMES)
        self.label_category = LABCAT
        self.num_labels = len(NAMES)
        self.loads: list[int] = []

    def __len__(self) -> int:
        return self.n

    def seg_size(self, i: int) -> tuple[int, int]:
        return (8, 8)

    def load_segmentation(self, i: int) -> Segmentation:
        plane = np.zeros((8, 8), np.int64)
        r, c = divmod(i % 4, 2)
        plane[4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 1 + i % 2
        return Segmentation(size=(8, 8), pixel={"object": plane[None]},
                            image={"scene": np.array([3], np.int64)})

    def load_image(self, i: int) -> Image.Image:
        self.loads.append(i)
        h, w = self.sizes[i % len(self.sizes)]
        rng = np.random.default_rng(i)
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _features(n: int = 8, units: int = 3, seed: int = 0) -> np.ndarray:
    """(n, units, 4, 4): unit u fires on the quadrant of label 1 + u % 2, noise elsewhere."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.5, (n, units, 4, 4)).astype(np.float32)
    for i in range(n):
        r, c = divmod(i % 4, 2)
        for u in range(units):
            if i % 2 == u % 2:
                x[i, u, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] += 2.0 + u
    return x


def _result(tmp_path: Path, probe: GridProbe | None = None, seed: int = 0, **kw):
    probe = probe or GridProbe()
    feats = _features(seed=seed)
    path = write_cache(tmp_path / f"c{seed}.h5", logits=np.zeros((len(feats), 2)),
                       ids=probe.ids, features={"l4": feats},
                       attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    return Dissection(quantile=0.2, iou_threshold=0.01, checksum=False, top_images=3,
                      **kw).run(path, "l4", probe)


# --------------------------------------------------------------------------- montages
def _pillow_tile(image: Image.Image, fmap: np.ndarray, threshold: float) -> np.ndarray:
    """One montage tile computed directly with Pillow (independent of resize_maps)."""
    w0, h0 = image.size
    scale = _TILE / max(w0, h0)
    h, w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    img = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32)
    up = np.asarray(Image.fromarray(fmap.astype(np.float32), mode="F").resize(
        (w, h), Image.BILINEAR)).astype(np.float64)
    mask = up > threshold
    edge = np.zeros_like(mask)
    for i in range(h):
        for j in range(w):
            if mask[i, j]:
                nb = [(i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)]
                edge[i, j] = any(not (0 <= a < h and 0 <= b < w) or not mask[a, b]
                                 for a, b in nb)
    out = np.where(mask[..., None], img, img * np.float32(0.35))
    out[edge] = _OUTLINE
    tile = np.zeros((_TILE, _TILE, 3), np.uint8)
    tile[:h, :w] = np.clip(out, 0, 255).astype(np.uint8)
    return tile


def test_montages_in_one_pass_equal_pillow_per_tile(tmp_path):
    probe = GridProbe()
    r = _result(tmp_path, probe)
    units = [2, 0, 1]
    probe.loads.clear()
    got = dict(render_montages(r, units))
    assert list(got) == units
    shown = {int(i) for u in units for i in r.top_images[u]}
    # every probe image decoded once, however many units show it
    assert sorted(probe.loads) == sorted(shown) and len(shown) < len(units) * 3
    for u in units:
        img = np.asarray(got[u])
        assert img.shape == (_TILE + 16, 3 * (_TILE + 2), 3)
        for j in range(3):
            i = int(r.top_images[u, j])
            want = _pillow_tile(probe.load_image(i), r.top_maps[u, j], float(r.thresholds[u]))
            x = j * (_TILE + 2)
            np.testing.assert_array_equal(img[16:, x : x + _TILE], want, err_msg=f"{u},{j}")
        # the caption names the unit (1-based), its concept and IoU
        caption = Image.new("RGB", (img.shape[1], _TILE + 16), (255, 255, 255))
        ImageDraw.Draw(caption).text(
            (2, 2), f"l4 unit {u + 1}: {r.label_names[r.best_label[u]]} "
            f"({r.categories[r.best_category[u]]}) IoU {r.best_iou[u]:.3f}", fill=(0, 0, 0))
        np.testing.assert_array_equal(img[:16], np.asarray(caption)[:16])
    # the single-unit API is the same rendering
    np.testing.assert_array_equal(np.asarray(r.montage(1)), np.asarray(got[1]))


def test_montage_of_fake_result_with_non_square_images():
    # two image sizes in one call: each size group is upsampled in its own batch
    probe = GridProbe(sizes=((8, 8), (6, 10)))
    rng = np.random.default_rng(2)
    res = SimpleNamespace(
        top_images=np.array([[0, 1], [1, 2]]), top_maps=rng.uniform(0, 1, (2, 2, 3, 3)),
        thresholds=np.array([0.5, 0.3]), probe=probe, categories=CATS, label_names=NAMES,
        best_category=np.array([0, 1]), best_label=np.array([1, 3]),
        best_iou=np.array([0.5, 0.25]), layer="l")
    got = dict(render_montages(res, [0, 1]))
    for u in (0, 1):
        for j in (0, 1):
            i = int(res.top_images[u, j])
            want = _pillow_tile(probe.load_image(i), res.top_maps[u, j], res.thresholds[u])
            x = j * (_TILE + 2)
            np.testing.assert_array_equal(np.asarray(got[u])[16:, x : x + _TILE], want)


# ---------------------------------------------------------------------------- figures
def test_save_without_figures_writes_tables_only(tmp_path):
    r = _result(tmp_path)
    assert len(r.detectors()) >= 2
    paths = r.save(tmp_path / "out", figures=False)
    names = {p.relative_to(tmp_path / "out").as_posix() for p in paths}
    assert {"tally.csv", "summary.json", "iou.npz"} <= names
    assert not any(n.endswith(".png") for n in names)
    assert not list((tmp_path / "out").rglob("*.png"))
    with_figs = r.save(tmp_path / "figs")
    units = sorted(p.name for p in with_figs if p.parent.name == "units")
    assert units == [f"unit_{u + 1:04d}.png" for u in sorted(r.detectors())]


def test_save_without_figures_loads_no_plotting_library(tmp_path):
    # a fresh process: saving without figures (`dissect --no-figures`) imports no plotting library
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_dissection_outputs import _result
r = _result(Path({str(tmp_path)!r}))
r.save(Path({str(tmp_path)!r}) / "out", figures=False)
print(sorted(m for m in ("matplotlib", "seaborn") if m in sys.modules))
"""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ----------------------------------------------------------------------- atomic writes
FILES = ["tally.csv", "summary.json", "iou.npz", "concepts.csv", "thresholds_curve.png",
         "detectors_by_category.png", "units/unit_0001.png"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", FILES)
def test_failed_write_keeps_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch, target):
    out = tmp_path / "out"
    first = _result(tmp_path, seed=0)
    first.save(out)
    before = _snapshot(out)
    assert target in before
    # a second result with other numbers (so a torn write would change the bytes)
    second = _result(tmp_path, seed=1)
    stem = Path(target).stem
    real = _provenance.fsync_file

    def failing_fsync(path):
        name = Path(path).name  # "STEM.tmpPID.SUFFIX" or "NAME.tmpPID" (_provenance._tmp_name)
        if name.startswith(stem + ".tmp") or name.startswith(Path(target).name + ".tmp"):
            raise OSError(5, "Input/output error (injected)")
        real(path)

    monkeypatch.setattr(_provenance, "fsync_file", failing_fsync)
    with pytest.raises(OSError, match="injected"):
        second.save(out)
    after = _snapshot(out)
    assert after[target] == before[target]
    assert not [p for p in after if ".tmp" in p]


def test_npz_writer_failing_midway_leaves_previous_file(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _result(tmp_path, seed=0).save(out, figures=False)
    before = (out / "iou.npz").read_bytes()
    second = _result(tmp_path, seed=1)

    def torn_savez(file, **arrays):
        Path(file).write_bytes(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(np, "savez_compressed", torn_savez)
    with pytest.raises(KeyboardInterrupt):
        second.save(out, figures=False)
    assert (out / "iou.npz").read_bytes() == before
    assert np.load(out / "iou.npz")["iou"].shape[0] == 3
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
