"""The batched similarity bootstrap: same replicates as the exact NumPy path (the previous
implementation's metrics) for the same resamples, intervals that contain their estimate, and
non-finite logits refused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from interptool.analyzers.similarity import (
    _core,
    _kernels,
    bias_corrected_interval,
    compare_similarity,
)
from interptool.errors import AnalysisError


def mem(logits, labels, name):
    n = len(labels)
    return SimpleNamespace(logits=np.asarray(logits, np.float32),
                           labels=np.asarray(labels, np.int64), ids=[f"img{i}" for i in range(n)],
                           data_fingerprint="fp", name=name, path=f"{name}.h5", attrs={},
                           model_info=None)


def structured(n, k, seed, noise, structure_seed=0):
    srng = np.random.default_rng(structure_seed)
    base = srng.normal(size=(k, k)) * 2.0
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    z = base[y] + noise * rng.normal(size=(n, k))
    z[np.arange(n), y] += 4.0
    return z.astype(np.float32), y


def evaluators(models, k_near, use, workers=None):
    """A BootstrapEvaluator over ``models`` (logits list) with kernels on / off."""
    labels = models[0][1]
    kk = models[0][0].shape[1]
    sl = _core.SortedLabels.build(labels, kk)
    logits = [z for z, _ in models]
    ones = np.ones((1, len(labels)))
    counts = _core.weighted_counts(ones, sl)
    points = []
    for z in logits:
        sums, _, _ = _core.weighted_class_sums(ones, _core.PerSample(z, sl, 1.0, "softmax"))
        points.append(_core.normalise_rows(sums, counts)[0])
    lab = (labels >= 0).astype(float)
    preds = [z.argmax(1) for z in logits]
    correct = [(p == labels).astype(float) for p in preds]
    agree = [(p == preds[0]).astype(float) for p in preds[1:]]
    names = [f"m{i}" for i in range(len(models))]
    return _core.BootstrapEvaluator(logits, names, sl, lab, correct, agree, [1.0], "softmax",
                                    k_near, [points], None, "cpu", 64, use_kernels=use,
                                    workers=workers)


def test_kernels_equal_reference_metrics_for_the_same_resamples():
    """Small K (float64 sums, exact ranks): the fused kernels give the exact NumPy metrics."""
    z, y = structured(400, 12, seed=1, noise=1.0)
    s1, _ = structured(400, 12, seed=2, noise=2.0)
    s2, _ = structured(400, 12, seed=3, noise=1.0, structure_seed=5)
    models = [(z, y), (s1, y), (s2, y)]
    W = _core.bootstrap_weights(np.random.default_rng(0), 400, 16)
    fast = evaluators(models, 3, True)(W)
    ref = evaluators(models, 3, False)(W)
    assert fast.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(fast[key], ref[key], rtol=1e-9, atol=1e-12, err_msg=str(key))


def test_large_k_fast_path_within_float32_and_rank_grid_precision():
    """K above EXACT_K: float32 sums and grid ranks agree with the exact float64 path."""
    k = _core.EXACT_K + 44
    z, y = structured(3 * k, k, seed=1, noise=1.0)
    s1, _ = structured(3 * k, k, seed=2, noise=2.0)
    models = [(z, y), (s1, y)]
    W = _core.bootstrap_weights(np.random.default_rng(1), 3 * k, 4)
    fast = evaluators(models, 5, True)(W)
    ref = evaluators(models, 5, False)(W)
    for key in ref:
        tol = 2e-4 if key[2] == "spearman" else 2e-5
        np.testing.assert_allclose(fast[key], ref[key], rtol=tol, atol=1e-6, err_msg=str(key))


def test_rank_grid_groups_are_average_ranks_of_their_cells():
    """Grid ranks: monotone in the value, average rank within a cell, exact when every cell
    holds one entry; checked against scipy's rankdata."""
    rng = np.random.default_rng(3)
    k = 40
    P = rng.dirichlet(np.ones(k), size=k)
    valid = np.ones(k, bool)
    valid[7] = False
    m = valid[:, None] & ~np.eye(k, dtype=bool)
    R = (P * rng.uniform(0.8, 1.2, size=P.shape)).astype(np.float32)
    exact = _core.RankGrid(P, valid, binned=False)
    g, G, top = exact.rank_groups(R, valid, 3)
    np.testing.assert_allclose(G[g[m]], rankdata(R[m]))
    binned = _core.RankGrid(P, valid, binned=True, nbins=64)
    g, G, _ = binned.rank_groups(R, valid, 3)
    r = G[g[m]]
    order = np.argsort(R[m], kind="stable")
    assert np.all(np.diff(r[order]) >= 0)  # monotone
    for cell in np.unique(g[m]):  # each cell: the average of the exact ranks it holds
        sel = g[m] == cell
        assert r[sel][0] == pytest.approx(rankdata(R[m])[sel].mean())
    # top-k: the k largest off-diagonal entries of each valid row
    for i in np.flatnonzero(valid):
        row = np.where(np.arange(k) == i, -np.inf, R[i])
        assert set(top[i]) == set(np.argsort(-row)[:3])


def test_intervals_match_the_exact_path_for_a_fixed_seed(monkeypatch):
    """compare_similarity's intervals with the kernels equal those of the exact path (the
    previous implementation's metrics) for the same seed: same resamples, same numbers."""
    z, y = structured(600, 10, seed=4, noise=1.0)
    s1, _ = structured(600, 10, seed=5, noise=2.0)
    s2, _ = structured(600, 10, seed=6, noise=1.0, structure_seed=9)
    args = (mem(z, y, "t"), mem(s1, y, "kd"), mem(s2, y, "scratch"))
    fast = compare_similarity(*args, k=3, n_boot=200, seed=7).estimates
    monkeypatch.setattr(_kernels, "usable", lambda: False)
    exact = compare_similarity(*args, k=3, n_boot=200, seed=7).estimates
    np.testing.assert_allclose(fast["ci_low"], exact["ci_low"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fast["ci_high"], exact["ci_high"], rtol=1e-9, atol=1e-12)


def test_every_interval_contains_its_estimate_with_a_strongly_biased_statistic():
    """Few images per class: KL / JS between class means grow under resampling (duplicated
    images add noise), so most replicates exceed the estimate. Every interval still contains
    its estimate, the bias is reported, and widening is flagged where BC alone would miss."""
    seen_widened = False
    for seed in range(6):
        z, y = structured(24, 8, seed=seed, noise=3.0)
        s, _ = structured(24, 8, seed=seed + 100, noise=3.0)
        res = compare_similarity(mem(z, y, "t"), mem(s, y, "s"), k=2, n_boot=300, seed=seed)
        est = res.estimates
        finite = est.dropna(subset=["ci_low", "ci_high"])
        assert len(finite) > 10
        assert (finite["ci_low"] <= finite["value"]).all()
        assert (finite["value"] <= finite["ci_high"]).all()
        kl = res.value("s", "kl")
        assert kl["bias"] > 0  # biased upwards, and said so
        seen_widened |= bool(est["ci_widened"].any())
    assert seen_widened


def test_bias_corrected_interval_is_widened_to_the_estimate():
    """All replicates above the estimate: the BC interval alone would exclude it."""
    reps = np.linspace(1.0, 2.0, 1000)
    lo, hi = bias_corrected_interval(reps, 0.5)
    assert lo == 0.5 and hi <= 2.0
    lo, hi = bias_corrected_interval(-reps, -0.5)
    assert hi == -0.5


def test_non_finite_logits_refused_naming_file_and_first_image():
    z, y = structured(60, 4, seed=1, noise=1.0)
    bad = z.copy()
    bad[17, 2] = np.nan
    bad[40, 0] = np.inf
    with pytest.raises(AnalysisError, match=r"s\.h5.*img17"):
        compare_similarity(mem(z, y, "t"), mem(bad, y, "s"), n_boot=0, k=1)


def test_class_major_pass_equals_the_row_pass_with_whole_matrices(monkeypatch):
    """Replicates computed class by class (the K > EXACT_K path: each class's sums of every
    resample, then one rank pass per resample) equal those of the resample-major row pass
    with the whole normalised matrices kept, and both equal the exact NumPy path within the
    float32 / rank-grid precision. Classes with 3 images: some resamples have empty ones."""
    k = _core.EXACT_K + 20
    z, y = structured(3 * k, k, seed=11, noise=1.0)
    s1, _ = structured(3 * k, k, seed=12, noise=2.0)
    s2, _ = structured(3 * k, k, seed=13, noise=1.0, structure_seed=4)
    models = [(z, y), (s1, y), (s2, y)]
    W = _core.bootstrap_weights(np.random.default_rng(2), 3 * k, 3)
    assert (_core.weighted_counts(W, _core.SortedLabels.build(y, k)) == 0).any()
    class_major = evaluators(models, 4, True)
    assert class_major.class_major
    blocks = class_major(W)
    monkeypatch.setattr(_core, "KEEP_WHOLE_MATRICES", True)
    row_pass = evaluators(models, 4, True)
    assert not row_pass.class_major
    whole = row_pass(W)
    ref = evaluators(models, 4, False)(W)
    assert blocks.keys() == whole.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(blocks[key], whole[key], rtol=1e-10, atol=1e-13,
                                   err_msg=str(key))
        tol = 2e-4 if key[2] == "spearman" else 2e-5
        np.testing.assert_allclose(blocks[key], ref[key], rtol=tol, atol=1e-6, err_msg=str(key))


@pytest.mark.parametrize("k", [7, _core.EXACT_K + 4])
def test_shared_softmax_pass_gives_exact_point_estimates(k):
    """compare_similarity takes the point estimate and each model's SimilarityResult from the
    softmax pass that also feeds the bootstrap (float32 above EXACT_K): they still equal the
    separate float64 computation of ClassSimilarity, empty class included, both matrices."""
    from interptool.analyzers.similarity import ClassSimilarity

    z, y = structured(3 * k, k, seed=21, noise=1.5)
    s, _ = structured(3 * k, k, seed=22, noise=2.0)
    y = y.copy()
    y[y == 2] = 3  # class 2 has no images
    for n_boot in (0, 3):
        res = compare_similarity(mem(z, y, "t"), mem(s, y, "s"), k=2, n_boot=n_boot,
                                 temperature=[1.0, 3.0], matrix="dark_knowledge")
        for name, logits in (("t", z), ("s", s)):
            alone = ClassSimilarity(temperature=[1.0, 3.0]).run(mem(logits, y, name))
            got = res.similarity[name]
            assert got.empty_classes == alone.empty_classes == [2]
            for t in (1.0, 3.0):
                for field in ("matrices", "dark_knowledge", "entropy", "nontarget_entropy"):
                    np.testing.assert_allclose(getattr(got, field)[t], getattr(alone, field)[t],
                                               rtol=1e-12, atol=1e-15, err_msg=field)
        A = res.similarity["t"].dark_knowledge[3.0]
        B = res.similarity["s"].dark_knowledge[3.0]
        rows = [i for i in range(k) if i != 2]
        kl = np.mean([sum(A[i, j] * np.log(A[i, j] / B[i, j]) for j in range(k) if j != i)
                      for i in rows])
        assert res.value("s", "kl", 3.0)["value"] == pytest.approx(kl, rel=1e-9)


def _special_values(dtype):
    info = np.finfo(dtype)
    rng = np.random.default_rng(5)
    v = np.concatenate([rng.dirichlet(np.full(997, 0.3)), rng.uniform(0, 1, 500),
                        [0.0, info.tiny, info.tiny / 8, info.smallest_subnormal, 1.0,
                         np.sqrt(2.0), np.nextafter(np.sqrt(2.0), 0), 0.5, 3.0, 1e30]])
    return v.astype(dtype)


def test_float64_log_kernel_equals_numpy_log():
    """The vectorised float64 logarithm (exponent and mantissa from the bit patterns):
    within 4 ulp of np.log, -inf at 0, subnormals exact."""
    v = _special_values(np.float64)
    out, mt, et = np.empty_like(v), np.empty_like(v), np.empty_like(v)
    _kernels.kernel("log")(v, v.view(np.int64), mt, mt.view(np.int64), et, et.view(np.int64), out)
    with np.errstate(divide="ignore"):
        ref = np.log(v)
    assert out[v == 0][0] == -np.inf
    fin = v > 0
    np.testing.assert_array_less(np.abs(out[fin] - ref[fin]),
                                 4 * np.spacing(np.maximum(np.abs(ref[fin]), 1e-300)) + 1e-300)


def test_float32_log_kernel_equals_numpy_log():
    """The float32 logarithm of the K > EXACT_K path: within 2 float32 ulp of the float64 log
    (np.log on float32 is within 1), -inf at 0, subnormals handled."""
    v = _special_values(np.float32)
    out, mt = np.empty_like(v), np.empty_like(v)
    _kernels.kernel("log32")(v.view(np.int32), mt, mt.view(np.int32), out)
    with np.errstate(divide="ignore"):
        ref = np.log(v.astype(np.float64))
    assert out[v == 0][0] == -np.inf
    fin = v > 0
    err = np.abs(out[fin].astype(np.float64) - ref[fin])
    np.testing.assert_array_less(err, 2 * np.spacing(np.abs(ref[fin]).astype(np.float32))
                                 .astype(np.float64) + 1e-45)


@pytest.mark.parametrize("k", [12, _core.EXACT_K + 20])
def test_replicates_do_not_depend_on_the_thread_count(k):
    """One thread and two threads (resamples of a block and classes of the matmuls spread
    over them) give bit-identical replicates, for float64 / exact ranks and float32 / grid
    ranks."""
    z, y = structured(3 * k, k, seed=21, noise=1.0)
    s1, _ = structured(3 * k, k, seed=22, noise=2.0)
    s2, _ = structured(3 * k, k, seed=23, noise=1.0, structure_seed=4)
    models = [(z, y), (s1, y), (s2, y)]
    W = _core.bootstrap_weights(np.random.default_rng(3), 3 * k, 6)
    one = evaluators(models, 4, True, workers=1)
    two = evaluators(models, 4, True, workers=2)
    assert (one.workers, two.workers) == (1, 2)
    a, b = one(W), two(W)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_default_threads_follow_the_resource_plan(monkeypatch):
    """Without an explicit count the evaluator takes interptool._resources' choice (cores
    from affinity / cgroup, capped by torch's threads, idle cores), at most 8."""
    import interptool._resources as res

    seen = {}

    def fake(**kw):
        seen.update(kw)
        return {"torch_threads": 12, "source": "fake"}

    monkeypatch.setattr(res, "free_core_threads", fake)
    z, y = structured(60, 4, seed=1, noise=1.0)
    ev = evaluators([(z, y), (z, y)], 2, True)
    assert ev.workers == 8 and ev.threads["source"] == "fake"
    assert seen["cap"] == _core.torch.get_num_threads()


def test_rank_cell_ids_fit_their_compact_dtype_at_the_exact_rank_limit():
    """The replicate pass stores rank-cell ids as uint16 where they fit (grid cells; exact tie
    groups up to K (K - 1) = 65,536 ids) and counts cells in int32. At K = EXACT_K, with
    65,280 distinct exact groups, the replicates still equal the exact NumPy path: an id
    that wrapped around would merge rank groups and move Spearman."""
    k = _core.EXACT_K
    assert _core._cell_dtype(k, 1, False) == np.uint16
    assert _core._cell_dtype(k + 1, 1, False) == np.int32  # 65,792 groups: no longer fits
    assert _core._cell_dtype(1000, _core.RANK_BINS, True) == np.uint16
    z, y = structured(3 * k, k, seed=31, noise=1.0)
    s1, _ = structured(3 * k, k, seed=32, noise=2.0)
    models = [(z, y), (s1, y)]
    W = _core.bootstrap_weights(np.random.default_rng(4), 3 * k, 2)
    fast_eval = evaluators(models, 4, True)
    fast = fast_eval(W)
    assert fast_eval.grids[0][0].binned is False  # exact groups at this K
    ref = evaluators(models, 4, False)(W)
    for key in ref:
        np.testing.assert_allclose(fast[key], ref[key], rtol=1e-9, atol=1e-12, err_msg=str(key))


def test_weighted_counts_sum_each_class_weights_ignoring_unlabelled_samples():
    """Known answer: classes 1 and 3 have no samples, sample 1 is unlabelled (its weight 5
    and 1 must not count anywhere), fractional weights add exactly."""
    labels = np.array([2, -1, 0, 2, 0, 2])
    sl = _core.SortedLabels.build(labels, 4)
    W = np.array([[1.0, 5.0, 2.0, 0.0, 3.0, 1.0],
                  [0.5, 1.0, 1.0, 1.0, 0.0, 2.0]])
    np.testing.assert_array_equal(_core.weighted_counts(W, sl),
                                  [[5.0, 0.0, 2.0, 0.0], [1.0, 0.0, 3.5, 0.0]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_stacked_class_sums_equal_a_direct_weighted_sum(dtype):
    """Every model's weighted class sums (probabilities, entropy, non-target entropy) for a
    block of resamples equal sum_n W[b, n] * row_n over each class's samples, computed here
    sample by sample from the softmax (shuffled labels, an unlabelled sample)."""
    rng = np.random.default_rng(8)
    k, n = 5, 40
    labels = rng.permutation(np.arange(n) % k)
    labels[3] = -1
    logits = [rng.normal(size=(n, k)).astype(np.float32) for _ in range(2)]
    sl = _core.SortedLabels.build(labels, k)
    st = _core.StackedSamples(logits, sl, 2.0, "softmax", np.dtype(dtype))
    W = _core.bootstrap_weights(rng, n, 3)
    got = _core.stacked_class_sums(W, st)
    for m, z in enumerate(logits):
        p, h = _core.softmax_stats(z / 2.0)
        q, hq = _core.softmax_stats(z / 2.0, np.maximum(labels, 0))
        rows = np.concatenate([p, h[:, None], hq[:, None]], axis=1)
        for b in range(3):
            for i in range(k):
                want = (W[b, labels == i, None] * rows[labels == i]).sum(0)
                np.testing.assert_allclose(got[i, b, m * (k + 2):(m + 1) * (k + 2)], want,
                                           rtol=1e-5 if dtype == np.float32 else 1e-12)


def _class_major_inputs(k: int, n_boot: int, seed: int):
    z, y = structured(3 * k, k, seed=seed, noise=1.0)
    s1, _ = structured(3 * k, k, seed=seed + 1, noise=2.0)
    sl = _core.SortedLabels.build(y, k)
    st = _core.StackedSamples([z, s1], sl, 1.0, "softmax", np.dtype(np.float32))
    point = st.point_sums()
    valid = sl.counts > 0
    grids = [_core.RankGrid(point[m, :, :k] / sl.counts[:, None], valid, True) for m in range(2)]
    W = _core.bootstrap_weights(np.random.default_rng(seed), 3 * k, n_boot)
    return st, _core._GridTables(grids), W, _core.weighted_counts(W, sl)


def test_class_major_sums_from_a_prior_block_equal_the_fused_matmuls():
    """The accelerator's order (every class's sums of a sub-block first, by
    stacked_class_sums) and the CPU's (each class's matmul right before its rows) give the
    same replicates; sub-blocks smaller than the block (the memory bound) change nothing."""
    k = _core.EXACT_K + 8
    st, tables, W, counts = _class_major_inputs(k, 5, 41)
    keys = np.empty((5, 2, k, k), np.uint16)
    fused = _core.class_major_metrics(W, st, counts, 3, tables, keys, fuse=True)
    per_class = _core.class_major_metrics(W, st, counts, 3, tables, keys, fuse=False)
    old = _core.SUMS_BLOCK_BYTES
    try:  # two resamples per sub-block
        _core.SUMS_BLOCK_BYTES = 2 * k * 2 * (k + 2) * 4
        assert _core.block_size(k, 2, 4, 5) == 2
        sub_blocks = _core.class_major_metrics(W, st, counts, 3, tables, keys, fuse=False)
    finally:
        _core.SUMS_BLOCK_BYTES = old
    for key in fused:
        np.testing.assert_allclose(per_class[key], fused[key], rtol=1e-6, atol=1e-9,
                                   err_msg=str(key))
        np.testing.assert_array_equal(sub_blocks[key], per_class[key], err_msg=str(key))


def test_class_major_block_keeps_grid_keys_within_the_memory_bound():
    """Grid keys of a block, B x M x K x K uint16, stay within SUMS_BLOCK_BYTES (ImageNet:
    85 resamples of three models' 1,000 x 1,000 keys in 512 MiB); at least one resample."""
    b = _core.class_major_block_size(1000, 3, 1000)
    assert b * 3 * 1000 * 1000 * 2 <= _core.SUMS_BLOCK_BYTES < (b + 1) * 3 * 1000 * 1000 * 2
    assert _core.class_major_block_size(1000, 3, 7) == 7
    assert _core.class_major_block_size(100_000, 3, 1000) == 1


@pytest.mark.parametrize("n,k,skip", [(100, 5, 0), (100, 5, 99), (257, 8, 40), (6, 5, 2),
                                      (70, 1, 3)])
def test_chunked_top_k_equals_a_stable_sort(n, k, skip):
    """The top-k of one row (chunks counted against the current k-th value, then walked):
    the k largest entries other than ``skip``, descending, ties in index order, as a stable
    sort gives; rows with many ties, the largest value at ``skip``, chunk edges crossed."""
    rng = np.random.default_rng(n + k + skip)
    for trial in range(20):
        row = rng.integers(0, 6 if trial % 2 else 1000, size=n).astype(np.float32)
        row[skip] = row.max() + 1.0
        out = np.full(k, -1, np.int32)
        _kernels.kernel("topk")(row, skip, k, np.empty(k), out)
        order = [j for j in np.argsort(-row.astype(np.float64), kind="stable") if j != skip]
        np.testing.assert_array_equal(out, order[:k])


def test_cell_ranks_count_keys_into_cells_and_give_average_ranks():
    """Known answer: 3 x 3 matrices of grid keys, key -> cell table [0, 0, 1, 2]; the
    off-diagonal keys of valid rows counted per cell, each key's rank the average rank of its
    cell (ties share it), the diagonal and the invalid row ignored."""
    U = np.array([[[3, 0, 1],   # diagonal key 3 ignored
                   [2, 0, 3],   # row 1 invalid: ignored
                   [0, 2, 3]]], np.uint16)  # diagonal key 3 ignored
    valid = np.array([True, False, True])
    luts = np.array([[0, 0, 1, 2]], np.uint16)
    counts = np.zeros((1, 4), np.int32)
    cells = np.zeros(3)
    table = np.zeros((1, 4))
    _kernels.kernel("cell_ranks")(U, valid, luts, np.array([4]), np.array([3]), counts, cells,
                                  table)
    # off-diagonal keys of rows 0 and 2: 0, 1, 0, 2 -> cells 0, 0, 0, 1: ranks 1-3 share 2,
    # rank 4 alone; cell 2 is empty
    np.testing.assert_array_equal(counts[0], [2, 1, 1, 0])
    np.testing.assert_array_equal(table[0, :3], [2.0, 2.0, 4.0])


def test_class_sum_products_do_not_depend_on_rows_or_thread():
    """The class-sum matmuls give each resample's row the same bits whatever the number of
    rows in its block (MKL sums products of 1-3 rows in another order on some CPUs) and
    whichever thread runs them: pool threads run torch and MKL on one core, as the calling
    thread inside _class_sum_matmuls (torch.set_num_threads is per thread for MKL; pool
    threads otherwise used every core and summed some shapes differently)."""
    rng = np.random.default_rng(5)
    for n, m in ((3, 7), (8, 6), (50, 5), (300, 13)):
        Z = torch.from_numpy(rng.standard_normal((n, 894)).astype(np.float32))
        W = torch.from_numpy(rng.poisson(1.0, (m, n)).astype(np.float32))
        with _core._class_sum_matmuls(torch.device("cpu")):
            whole = torch.empty(m, 894)
            _core.rows_matmul(W, Z, whole)
            for rows in (1, 2, 3):
                part = torch.empty(rows, 894)
                _core.rows_matmul(W[:rows], Z, part)
                assert torch.equal(part, whole[:rows]), (n, m, rows)

            def in_pool(w, z):
                out = torch.empty(w.shape[0], z.shape[1])
                _core.rows_matmul(w, z, out)
                return torch.get_num_threads(), out

            with _core.single_thread_pool(2) as pool:
                for threads, out in pool.map(in_pool, [W] * 4, [Z] * 4):
                    assert threads == 1
                    assert torch.equal(out, whole), (n, m)


_MATMUL_PRECISION_PROBE = """
import torch
from interptool.analyzers.similarity._core import _class_sum_matmuls
m = torch.backends.cuda.matmul
seen = []
for set_it in (lambda: torch.set_float32_matmul_precision("high"),   # the legacy API
               lambda: setattr(m, "fp32_precision", "tf32")):         # the per-operation one
    set_it()
    with _class_sum_matmuls(torch.device("cuda")):  # no CUDA call: only the setting
        seen.append(m.fp32_precision)
    seen.append(m.fp32_precision)
    with _class_sum_matmuls(torch.device("cpu")):
        seen.append((m.fp32_precision, torch.get_num_threads()))
m.fp32_precision = "none"  # inherit again: the root setting reaches matmuls ...
torch.backends.fp32_precision = "tf32"
with _class_sum_matmuls(torch.device("cuda")):
    pass
torch.backends.fp32_precision = "ieee"  # ... and still does after the block
seen.append(m.fp32_precision)
print(seen)
"""


def test_class_sums_on_cuda_run_in_full_float32_whatever_the_caller_allowed():
    """A program that allowed TF32 matmuls, through either of torch's APIs, must not get class
    sums rounded to 10 mantissa bits on a GPU: the per-class matmuls run in full float32
    there and the caller's setting is back afterwards (once the per-operation settings were
    used, torch.get_float32_matmul_precision raises, so the setting is read through them).
    On the CPU they run on one thread and the setting is left alone. In a child process:
    these are process-wide switches. (Only the setting is checked; tests/test_gpu.py runs the
    sums on CUDA.)"""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _MATMUL_PRECISION_PROBE], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == str(["ieee", "tf32", ("tf32", 1)] * 2
                                                      + ["ieee"])
