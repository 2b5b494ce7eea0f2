"""Linear CKA between cached layers: exact identities, invariances, an independent reference
implementation (centring-matrix formula) and the unbiased minibatch estimator."""

from __future__ import annotations

import numpy as np
import pytest

from interptool.analyzers.cka import cka, linear_cka
from interptool.cache import write_cache
from interptool.errors import AnalysisError, CacheError


def reference_cka(X, Y):
    """Kornblith et al. eq.: HSIC with the centring matrix H, written out independently."""
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H)  # noqa: E731
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def make(tmp_path, name, feats, fp="same", n=None):
    n = next(iter(feats.values())).shape[0] if n is None else n
    logits = np.zeros((n, 3), np.float32)
    return write_cache(tmp_path / f"{name}.h5", logits=logits, labels=np.zeros(n, int),
                       features=feats, attrs={"data_fingerprint": fp, "model": {"name": name}},
                       dtype="float64")


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    a1 = rng.normal(size=(n, 8, 3, 3))
    a2 = np.tanh(a1 * 2) + 0.5 * rng.normal(size=a1.shape)
    W = rng.normal(size=(8, 6))
    b1 = np.einsum("nchw,cd->ndhw", a1, W) + 0.3 * rng.normal(size=(n, 6, 3, 3))
    pa = make(tmp_path, "a", {"l1": a1, "l2": a2})
    pb = make(tmp_path, "b", {"l1": b1, "l2": rng.normal(size=(n, 5, 3, 3))})
    return pa, pb, a1, a2, b1


def test_self_similarity_exactly_one(pair, tmp_path):
    pa, pb, a1, *_ = pair
    res = cka(pa, pa, ["l1", "l2"])
    assert res.method == "features"
    np.testing.assert_allclose(np.diag(res.matrix.to_numpy()), 1.0, atol=1e-10)
    # a second file with the same features (another "model") also gives exactly 1
    pc = make(tmp_path, "c", {"x": a1})
    assert cka(pa, pc, "l1", "x").matrix.iloc[0, 0] == pytest.approx(1.0, abs=1e-10)
    # the Gram path, forced by a small memory budget
    # the Gram path, chosen for few images with large flattened features
    wide = np.random.default_rng(5).normal(size=(20, 16, 4, 4))
    pw = make(tmp_path, "wide", {"w": wide})
    res_g = cka(pw, pw, "w", pooling="flatten", max_memory=100_000)
    assert res_g.method == "gram"
    assert res_g.matrix.iloc[0, 0] == pytest.approx(1.0, abs=1e-10)
    # and the minibatch estimator
    res_m = cka(pa, pa, ["l1", "l2"], minibatch=64)
    np.testing.assert_allclose(np.diag(res_m.matrix.to_numpy()), 1.0, atol=1e-10)


def test_matches_reference_formula_and_pooling(pair):
    pa, pb, a1, a2, b1 = pair
    res = cka(pa, pb, ["l1", "l2"], ["l1"])
    assert list(res.matrix.index) == ["l1", "l2"] and list(res.matrix.columns) == ["l1"]
    pool = lambda x: x.mean(axis=(2, 3))  # noqa: E731
    assert res.matrix.loc["l1", "l1"] == pytest.approx(reference_cka(pool(a1), pool(b1)), abs=1e-10)
    assert res.matrix.loc["l2", "l1"] == pytest.approx(reference_cka(pool(a2), pool(b1)), abs=1e-10)
    flat = cka(pa, pb, "l1", "l1", pooling="flatten").matrix.iloc[0, 0]
    f = lambda x: x.reshape(len(x), -1)  # noqa: E731
    assert flat == pytest.approx(reference_cka(f(a1), f(b1)), abs=1e-10)
    # streamed covariances do not depend on the block size
    small = cka(pa, pb, ["l1", "l2"], ["l1"], batch_size=7).matrix.to_numpy()
    np.testing.assert_allclose(small, res.matrix.to_numpy(), atol=1e-12)
    # and the Gram path (chosen for large features and few images) agrees with it
    from interptool.analyzers.cka._analyzer import _full_gram
    from interptool.cache import ActivationCache

    with ActivationCache(pa) as ca, ActivationCache(pb) as cb:
        gram = _full_gram(ca, cb, ["l1", "l2"], ["l1"], "mean", 64, "cpu")
    np.testing.assert_allclose(gram, res.matrix.to_numpy(), atol=1e-10)


def test_invariances(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 10))
    Y = X @ rng.normal(size=(10, 7)) + rng.normal(size=(200, 7))
    Q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    base = linear_cka(X, Y)
    assert linear_cka(X @ Q, Y) == pytest.approx(base, abs=1e-12)  # orthogonal
    assert linear_cka(3.7 * X, Y) == pytest.approx(base, abs=1e-12)  # isotropic scaling
    assert linear_cka(X + 5.0, Y) == pytest.approx(base, abs=1e-12)  # translation
    assert linear_cka(X, Y) == pytest.approx(reference_cka(X, Y), abs=1e-12)
    # not invariant to an anisotropic scaling (a sanity check that the test can fail)
    assert abs(linear_cka(X * np.linspace(0.1, 10, 10), Y) - base) > 1e-3
    # the same through caches: (N, C, 1, 1) features, channel-space rotation and scaling
    pa = make(tmp_path, "a", {"f": X[:, :, None, None]})
    pb = make(tmp_path, "b", {"f": (2.5 * X @ Q)[:, :, None, None], "g": Y[:, :, None, None]})
    res = cka(pa, pb, ["f"], ["f", "g"])
    assert res.matrix.loc["f", "f"] == pytest.approx(1.0, abs=1e-10)
    assert res.matrix.loc["f", "g"] == pytest.approx(base, abs=1e-10)


def test_minibatch_close_to_full(tmp_path):
    rng = np.random.default_rng(2)
    n = 3000
    X = rng.normal(size=(n, 12))
    Y = np.tanh(X @ rng.normal(size=(12, 9))) + 0.8 * rng.normal(size=(n, 9))
    pa = make(tmp_path, "a", {"f": X[:, :, None, None]})
    pb = make(tmp_path, "b", {"f": Y[:, :, None, None]})
    full = cka(pa, pb, "f").matrix.iloc[0, 0]
    mb = cka(pa, pb, "f", minibatch=300, seed=3)
    assert mb.method == "minibatch"
    assert mb.matrix.iloc[0, 0] == pytest.approx(full, abs=0.02)
    # same seed -> same value; the order is fixed by the seed
    assert cka(pa, pb, "f", minibatch=300, seed=3).matrix.iloc[0, 0] == mb.matrix.iloc[0, 0]
    # out-of-memory path (per-batch reads from the file) gives the same number
    disk = cka(pa, pb, "f", minibatch=300, seed=3, max_memory=1000).matrix.iloc[0, 0]
    assert disk == pytest.approx(mb.matrix.iloc[0, 0], abs=1e-12)


def test_tiny_batches_finite_and_errors(tmp_path, pair):
    pa, pb, *_ = pair
    res = cka(pa, pb, ["l1", "l2"], minibatch=4)
    assert np.isfinite(res.matrix.to_numpy()).all()
    with pytest.raises(AnalysisError, match="at least 4 images"):
        cka(pa, pb, "l1", minibatch=3)
    const = make(tmp_path, "const", {"l1": np.ones((300, 4, 2, 2))})
    with pytest.raises(AnalysisError, match="constant"):
        cka(pa, const, "l1")
    with pytest.raises(AnalysisError, match="constant"):
        cka(pa, const, "l1", minibatch=16)
    other = make(tmp_path, "other", {"l1": np.ones((300, 4, 2, 2))}, fp="elsewhere")
    with pytest.raises(AnalysisError, match="fingerprints differ.*other.h5"):
        cka(pa, other, "l1")
    short = make(tmp_path, "short", {"l1": np.ones((100, 4, 2, 2))})
    with pytest.raises(AnalysisError, match="100 images"):
        cka(pa, short, "l1")
    with pytest.raises(CacheError, match="layer 'layer9'.*cached layers: l1, l2"):
        cka(pa, pb, "layer9")
    with pytest.raises(AnalysisError, match="minibatch=256"):
        cka(pa, pb, "l1", pooling="flatten", max_memory=100)


def test_result_outputs(pair, tmp_path):
    pa, pb, *_ = pair
    res = cka(pa, pb, ["l1", "l2"], ["l1", "l2"])
    frame = res.to_frame()
    assert len(frame) == 4 and set(frame.columns) == {"layer_a", "layer_b", "cka"}
    d = res.to_dict()
    assert d["model_a"] == "a" and d["method"] == "features" and len(d["cka"]) == 2
    paths = res.save(tmp_path / "out")
    assert [p.suffix for p in paths] == [".csv", ".json", ".png"]
    assert all(p.is_file() for p in paths)


def test_unbiased_hsic_equals_u_statistic_definition():
    """Song et al. (2012): HSIC_1 = E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq] over
    distinct indices, written here as explicit averages over index tuples."""
    from itertools import permutations

    import torch

    from interptool.analyzers.cka import unbiased_hsic

    rng = np.random.default_rng(9)
    n = 7
    X, Y = rng.normal(size=(n, 3)), rng.normal(size=(n, 4))
    K, L = X @ X.T, Y @ Y.T
    a = np.mean([K[i, j] * L[i, j] for i, j in permutations(range(n), 2)])
    b = np.mean([K[i, j] * L[q, r] for i, j, q, r in permutations(range(n), 4)])
    c = np.mean([K[i, j] * L[i, q] for i, j, q in permutations(range(n), 3)])
    got = float(unbiased_hsic(torch.as_tensor(K), torch.as_tensor(L)))
    assert got == pytest.approx(a + b - 2 * c, rel=1e-10)


@pytest.mark.parametrize("kwargs", [{}, {"minibatch": 16}, {"max_memory": 1}])
def test_non_finite_features_refused_naming_file_layer_and_image(tmp_path, kwargs):
    """NaN in one image's activations (a diverged model / float16 overflow) used to give a
    CKA of NaN written as null; now an error names the file, the layer and the image."""
    rng = np.random.default_rng(1)
    n = 64
    good = rng.normal(size=(n, 4, 2, 2))
    bad = good.copy()
    bad[37, 1, 0, 1] = np.nan
    bad[50, 0, 0, 0] = np.inf
    pa = make(tmp_path, "a", {"l1": good})
    pb = make(tmp_path, "b", {"l1": bad})
    if kwargs.get("max_memory") == 1 and "minibatch" not in kwargs:
        kwargs = {"minibatch": 16, "max_memory": 1}  # streamed minibatch reads
    # streamed minibatches read images in their random order: either bad row may come first
    with pytest.raises(AnalysisError, match=r"b\.h5.*'l1'.*row (37|50)"):
        cka(pa, pb, ["l1"], ["l1"], **kwargs)
