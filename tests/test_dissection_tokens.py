"""Dissection of transformer token layers: the leading (class, distillation, register) tokens
recorded from the model are dropped and the patch tokens laid out on the model's grid.

Real (tiny, randomly initialised, offline) timm models go through ``cache_activations`` and
``Dissection``; the expected maps are built independently from the cached token sequences
with the prefix counts timm documents (ViT 1, DeiT distilled 2, registers 1 + 4).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import timm
import torch

from interptool.analyzers.dissection import Dissection
from interptool.cache import ActivationCache, cache_activations, write_cache
from interptool.data import open_dataset
from interptool.errors import AnalysisError
from interptool.loading import LoadedModel, LoadReport, Preprocessing
from interptool.loading._builder import parse_arch
from interptool.loading._model import token_layout

os.environ.setdefault("HF_HUB_OFFLINE", "1")

@pytest.fixture(scope="module")
def probe():
    return open_dataset("builtin:concept-world?version=1&n=12&size=32")


def _loaded(name: str, size: int, **kw) -> LoadedModel:
    """A one-block random timm model at ``size`` px, as ``load_model`` would describe it."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=size, depth=1, num_classes=10,
                              **kw).eval()
    n_prefix, grid = token_layout(model, parse_arch(f"timm:{name}"), (size, size))
    pre = Preprocessing((3, size, size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), source="test")
    return LoadedModel(model=model, arch=f"timm:{name}", checkpoint=None,
                       checkpoint_sha256=None, num_classes=10, preprocessing=pre,
                       load_report=LoadReport(), num_prefix_tokens=n_prefix, token_grid=grid)


def _expected_maps(tokens: np.ndarray, prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """(N, T, D) -> (N, D, rows, cols): drop ``prefix`` tokens, patches in row-major order."""
    n, _, d = tokens.shape
    return tokens[:, prefix:, :].transpose(0, 2, 1).reshape(n, d, *grid)


# timm's documented prefix counts: ViT class token; DeiT class + distillation; 1 + 4 registers
MODELS = [("vit_tiny_patch16_224", 32, 1), ("deit_tiny_distilled_patch16_224", 32, 2),
          ("vit_small_patch14_reg4_dinov2", 28, 5)]


@pytest.mark.parametrize("name,size,prefix", MODELS)
def test_timm_token_layers_dissect_on_the_patch_grid(tmp_path, probe, name, size, prefix):
    loaded = _loaded(name, size)
    assert loaded.num_prefix_tokens == prefix and loaded.token_grid == (2, 2)
    path = cache_activations(loaded, probe, ["blocks.0"], tmp_path / "t.h5", batch_size=5,
                             dtype="float32", probe=True)
    with ActivationCache(path) as cache:
        assert cache.attrs["num_prefix_tokens"] == prefix
        assert cache.attrs["token_grid"] == [2, 2]
        tokens = np.asarray(cache.features("blocks.0")[:])
    assert tokens.shape[1] == prefix + 4
    r = Dissection(quantile=0.05, checksum=False, top_images=2).run(path, "blocks.0", probe)
    assert r.config["layer_kind"] == "tokens" and r.config["prefix_tokens"] == prefix
    assert r.config["map_size"] == [2, 2]
    maps = _expected_maps(tokens, prefix, (2, 2))
    # thresholds: numpy's exact quantile over the patch tokens only (never the prefix)
    per_unit = maps.transpose(1, 0, 2, 3).reshape(maps.shape[1], -1).astype(np.float64)
    np.testing.assert_array_equal(r.thresholds, np.quantile(per_unit, 0.95, axis=1))
    for u in (0, 7, maps.shape[1] - 1):
        for j in range(2):
            np.testing.assert_array_equal(r.top_maps[u, j], maps[r.top_images[u, j], u])
    # the same dissection as on the spatial maps cached directly
    spatial = write_cache(tmp_path / "s.h5", logits=np.zeros((len(maps), 10)), ids=probe.ids,
                          features={"blocks.0": maps},
                          attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    s = Dissection(quantile=0.05, checksum=False, top_images=2).run(spatial, "blocks.0", probe)
    np.testing.assert_array_equal(r.iou, s.iou)
    np.testing.assert_array_equal(r.best_label, s.best_label)


def _token_cache(tmp_path, probe, tokens: np.ndarray, name: str = "c.h5", **attrs):
    return write_cache(tmp_path / name, logits=np.zeros((len(tokens), 2)), ids=probe.ids,
                       features={"blocks.0": tokens},
                       attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec,
                              **attrs})


def _tokens(probe, prefix: int, grid: tuple[int, int], d: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = len(probe)
    patches = rng.gamma(1.0, size=(n, d, *grid)).astype(np.float32)
    lead = np.full((n, prefix, d), 50.0, np.float32)  # would dominate every threshold
    seq = patches.reshape(n, d, -1).transpose(0, 2, 1)
    return np.concatenate([lead, seq], axis=1), patches


def test_register_tokens_are_not_mistaken_for_a_square_grid(tmp_path, probe):
    # 1 + 4 register tokens and a 2x2 grid: T = 9 is square, so guessing (what a cache
    # without the recorded layout gets) reads a 3x3 grid with the prefix in it
    tokens, patches = _tokens(probe, 5, (2, 2))
    recorded = _token_cache(tmp_path, probe, tokens, "r.h5", num_prefix_tokens=5,
                            token_grid=[2, 2])
    guessed = _token_cache(tmp_path, probe, tokens, "g.h5")
    spatial = write_cache(tmp_path / "s.h5", logits=np.zeros((len(tokens), 2)), ids=probe.ids,
                          features={"blocks.0": patches},
                          attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    d = Dissection(quantile=0.1, checksum=False)
    want = d.run(spatial, "blocks.0", probe)
    got = d.run(recorded, "blocks.0", probe)
    np.testing.assert_array_equal(got.thresholds, want.thresholds)
    np.testing.assert_array_equal(got.iou, want.iou)
    wrong = d.run(guessed, "blocks.0", probe)
    assert wrong.config["map_size"] == [3, 3] and wrong.config["prefix_tokens"] == 0


def test_non_square_grid_from_the_cache(tmp_path, probe):
    tokens, patches = _tokens(probe, 2, (2, 3), seed=1)
    path = _token_cache(tmp_path, probe, tokens, num_prefix_tokens=2, token_grid=[2, 3])
    r = Dissection(quantile=0.1, checksum=False, top_images=1).run(path, "blocks.0", probe)
    assert r.config["map_size"] == [2, 3]
    np.testing.assert_array_equal(r.top_maps[:, 0], patches[r.top_images[:, 0], [0, 1, 2]])


def test_prefix_without_grid_needs_a_square_rest(tmp_path, probe):
    tokens, _ = _tokens(probe, 2, (3, 3))
    ok = _token_cache(tmp_path, probe, tokens, "ok.h5", num_prefix_tokens=2)
    assert Dissection(checksum=False).run(ok, "blocks.0", probe).config["map_size"] == [3, 3]
    bad = _token_cache(tmp_path, probe, tokens[:, :-1], "bad.h5", num_prefix_tokens=2)
    with pytest.raises(AnalysisError, match=r"bad.h5: layer 'blocks.0' holds tokens \(N, T=10, "
                       r"D=3\); after the model's 2 leading token\(s\), 8 tokens do not form a "
                       r"square grid"):
        Dissection(checksum=False).run(bad, "blocks.0", probe)


def test_tokens_that_do_not_fill_the_recorded_grid_are_refused(tmp_path, probe):
    tokens, _ = _tokens(probe, 2, (2, 2))
    path = _token_cache(tmp_path, probe, tokens[:, :5], num_prefix_tokens=2, token_grid=[2, 2])
    with pytest.raises(AnalysisError, match=r"2 leading token\(s\) and a 2x2 patch grid, so T "
                       r"should be 6, not 5: this layer is not the model's token sequence"):
        Dissection(checksum=False).run(path, "blocks.0", probe)


def test_old_cache_without_layout_guesses_zero_or_one_prefix(tmp_path, probe):
    for prefix in (0, 1):
        tokens, patches = _tokens(probe, prefix, (3, 3), seed=prefix)
        path = _token_cache(tmp_path, probe, tokens, f"o{prefix}.h5")
        r = Dissection(checksum=False, top_images=1).run(path, "blocks.0", probe)
        assert r.config["prefix_tokens"] == prefix and r.config["map_size"] == [3, 3]
    # DeiT distilled (2 + 16 tokens) without the recorded layout: refused, naming the fix
    tokens, _ = _tokens(probe, 2, (4, 4))
    path = _token_cache(tmp_path, probe, tokens, "deit.h5")
    with pytest.raises(AnalysisError, match=r"T=18.*does not record the model's leading .*"
                       r"Re-create the cache"):
        Dissection(checksum=False).run(path, "blocks.0", probe)


def test_non_finite_token_activation_names_layer_and_image(tmp_path, probe):
    tokens, _ = _tokens(probe, 1, (2, 2))
    tokens[7, 3, 1] = np.inf  # image 7, patch token 2 (after the class token), unit 2
    path = _token_cache(tmp_path, probe, tokens, num_prefix_tokens=1, token_grid=[2, 2])
    with pytest.raises(AnalysisError, match=rf"layer 'blocks.0' has NaN/Inf activations \(first: "
                       rf"image 7 {probe.ids[7]!r}, unit 2 "):
        Dissection(checksum=False).run(path, "blocks.0", probe)
