"""Tests of varjax/unitmem.py: the study's metrics on toy arrays with hand-computed answers."""


import numpy as np
import pytest

from varjax import unitmem as um_lib

# Rows deliberately NOT in sample-id order, so the tie-break by sample id is exercised.
IDS = np.array([12, 10, 13, 11])
ACTS = np.array(
    [  # u0    u1   u2   u3
        [0.0, 6.0, 2.0, 0.0],  # id 12
        [4.0, 3.0, 1.0, 0.0],  # id 10
        [0.0, 0.0, 2.0, 0.0],  # id 13
        [0.0, 0.0, 1.0, 0.0],  # id 11
    ],
    dtype=np.float32,
)
# By hand, mean variant, mu_-max = (sum - max) / 3:
#   u0: max 4 (id 10), rest 0          -> (4 - 0) / (4 + 0)         = 1
#   u1: max 6 (id 12), rest 3/3 = 1    -> (6 - 1) / (6 + 1)         = 5/7
#   u2: max 2 (ids 12 and 13 tie -> 12), rest (6 - 2)/3 = 4/3 -> (2/3) / (10/3) = 0.2
#   u3: zero everywhere -> 0/0, defined as 0
UM_MEAN = np.array([1.0, 5 / 7, 0.2, 0.0])
# Median variant, median of the other 3 values after dropping one max:
#   u0: [0,0,0] -> 0 -> 1;  u1: [3,0,0] -> 0 -> 1;  u2: [1,2,1] -> 1 -> (2-1)/(2+1) = 1/3;  u3: 0
UM_MEDIAN = np.array([1.0, 1.0, 1 / 3, 0.0])


def test_stats_from_matrix_by_hand():
    s = um_lib.stats_from_matrix(ACTS, IDS)
    np.testing.assert_array_equal(s.max, [4, 6, 2, 0])
    np.testing.assert_array_equal(s.argmax, [10, 12, 12, 10])  # u2 tie -> smaller id 12; u3 all 0 -> 10
    np.testing.assert_array_equal(s.sum, [4, 9, 6, 0])
    assert s.count == 4 and s.sum.dtype == np.float64 and s.argmax.dtype == np.int64


def test_stats_from_matrix_rows_subset():
    s = um_lib.stats_from_matrix(ACTS, IDS[[2, 3]], rows=np.array([2, 3]))  # ids 13, 11
    np.testing.assert_array_equal(s.max, [0, 0, 2, 0])
    np.testing.assert_array_equal(s.argmax, [11, 11, 13, 11])
    assert s.count == 2


def test_duplicate_ids_rejected():
    with pytest.raises(ValueError, match="unique"):
        um_lib.stats_from_matrix(ACTS, np.array([1, 1, 2, 3]))


def test_unitmem_mean_and_zero_unit():
    um = um_lib.unitmem_mean(um_lib.stats_from_matrix(ACTS, IDS))
    np.testing.assert_allclose(um, UM_MEAN, rtol=1e-12)
    assert np.all(np.isfinite(um))


def test_unitmem_median():
    np.testing.assert_allclose(um_lib.unitmem_median(ACTS), UM_MEDIAN, rtol=1e-12)
    # Even N - 1: median of the 4 others averages the middle two. Column [5,1,3,2,0]:
    # others [1,3,2,0] -> median 1.5 -> (5 - 1.5) / (5 + 1.5) = 7/13.
    col = np.array([[5.0], [1.0], [3.0], [2.0], [0.0]])
    np.testing.assert_allclose(um_lib.unitmem_median(col), [7 / 13])


def test_unitmem_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        um_lib.unitmem_mean(um_lib.stats_from_matrix(ACTS[:1], IDS[:1]))


def test_chunking_matches_unchunked(monkeypatch):
    rng = np.random.default_rng(0)
    acts = rng.integers(0, 3, size=(7, 11)).astype(np.float32)  # small ints: many ties
    ids = rng.permutation(100)[:7]
    full = um_lib.stats_from_matrix(acts, ids)
    med = um_lib.unitmem_median(acts)
    monkeypatch.setattr(um_lib, "_CHUNK", 3)
    part = um_lib.stats_from_matrix(acts, ids)
    for a, b in [(full.max, part.max), (full.argmax, part.argmax), (full.sum, part.sum)]:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(med, um_lib.unitmem_median(acts))


def test_combine_equals_concatenated_matrix():
    rng = np.random.default_rng(1)
    acts = rng.integers(0, 4, size=(20, 30)).astype(np.float32)  # ties across the two parts
    ids = rng.permutation(20) * 3 + 5
    a_rows, b_rows = np.arange(0, 20, 2), np.arange(1, 20, 2)  # interleaved ids
    a = um_lib.stats_from_matrix(acts, ids[a_rows], rows=a_rows)
    b = um_lib.stats_from_matrix(acts, ids[b_rows], rows=b_rows)
    whole = um_lib.stats_from_matrix(acts, ids)
    for c in (um_lib.combine_stats(a, b), um_lib.combine_stats(b, a)):
        np.testing.assert_array_equal(c.max, whole.max)
        np.testing.assert_array_equal(c.argmax, whole.argmax)
        np.testing.assert_allclose(c.sum, whole.sum)
        assert c.count == 20


def test_combine_works_on_scale_axis():
    a = um_lib.UnitStats(np.array([[1.0, 2.0]]), np.array([[3, 4]]), np.array([[1.0, 2.0]]), 1)
    b = um_lib.UnitStats(np.array([[1.0, 5.0]]), np.array([[1, 9]]), np.array([[1.0, 5.0]]), 1)
    c = um_lib.combine_stats(a, b)
    np.testing.assert_array_equal(c.max, [[1, 5]])
    np.testing.assert_array_equal(c.argmax, [[1, 9]])  # tie at 1.0 -> smaller id 1


def test_percentile_top_units_and_num_mem_units():
    mask, thr = um_lib.top_units(UM_MEAN, 90)
    # Sorted [0, 0.2, 5/7, 1]; position 0.9 * 3 = 2.7 -> 5/7 + 0.7 * (1 - 5/7) = 6.4/7.
    assert thr == pytest.approx(6.4 / 7)
    np.testing.assert_array_equal(mask, [True, False, False, False])
    argmax = np.array([10, 12, 12, 10])
    np.testing.assert_array_equal(um_lib.num_mem_units(argmax, mask, IDS), [0, 1, 0, 0])
    # q = 50: position 1.5 -> 0.2 + 0.5 * (5/7 - 0.2); U50 = {u0, u1} -> ids 10 and 12.
    mask50, thr50 = um_lib.top_units(UM_MEAN, 50)
    assert thr50 == pytest.approx(0.2 + 0.5 * (5 / 7 - 0.2))
    np.testing.assert_array_equal(um_lib.num_mem_units(argmax, mask50, IDS), [1, 1, 0, 0])
    # The threshold itself is included (>=): with all-equal UnitMem every unit is in U10.
    assert um_lib.top_units(np.full(5, 0.3), 90)[0].all()


def test_num_mem_units_unknown_id():
    with pytest.raises(ValueError, match="99"):
        um_lib.num_mem_units(np.array([10, 99]), np.array([True, True]), IDS)


def test_coverage_floor_and_ties():
    # 250 samples: top 1% = floor(2.5) = 2, 5% = floor(12.5) = 12, 10% = 25.
    ids = np.arange(1000, 1250)
    nmu = np.zeros(250, np.int64)
    nmu[[5, 9]] = 10  # two samples with 10 units each
    nmu[100:120] = 1  # 20 samples with one unit each
    cov = um_lib.coverage(nmu, ids)
    assert cov.samples_with_memunits == 22
    assert cov.samples_with_memunits_frac == pytest.approx(22 / 250)
    top = {t.fraction: t for t in cov.top}
    assert [top[p].n_samples for p in (0.01, 0.05, 0.1)] == [2, 12, 25]
    assert top[0.01].share == pytest.approx(20 / 40)
    assert top[0.05].share == pytest.approx(30 / 40)  # 2 x 10 + 10 of the ones
    assert top[0.1].share == pytest.approx(1.0)
    # Ties broken by ascending sample id: ranks 3.. are ids 1100, 1101, ...
    order = um_lib.rank_samples(nmu, ids)
    np.testing.assert_array_equal(ids[order[:4]], [1005, 1009, 1100, 1101])


def test_coverage_tiny_dataset_and_exact_floor():
    cov = um_lib.coverage(np.array([3, 0, 0, 0, 0, 0, 0, 0, 0, 1]), np.arange(10))
    assert cov.top[0].n_samples == 0 and cov.top[0].share == 0.0
    assert um_lib.top_count(100, 0.29) == 29  # 100 * 0.29 is 28.999... in floats
    assert um_lib.top_count(8192, 0.01) == 81


def test_coverage_curve():
    x, y = um_lib.coverage_curve(np.array([0, 3, 1]), np.array([7, 8, 9]))
    np.testing.assert_allclose(x, [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(y, [0, 0.75, 1, 1])


def _layout():
    # 2 blocks x (attn.proj 1 unit, ffn.fc1 4 units, ffn.fc2 1 unit), full names as in design.md.
    names = []
    for b in range(2):
        names += [f"blocks.{b}.attn.proj"] + [f"blocks.{b}.ffn.fc1"] * 4 + [f"blocks.{b}.ffn.fc2"]
    return um_lib.UnitLayout.from_columns(np.repeat([0, 1], 6), names)


def test_layout_strips_block_prefix():
    lay = _layout()
    assert lay.sites == ("attn.proj", "ffn.fc1", "ffn.fc2")
    np.testing.assert_array_equal(lay.site[:6], [0, 1, 1, 1, 1, 2])
    assert lay.site_index("fc1") == 1 and lay.site_index("head") is None


def test_block_site_table():
    lay = _layout()
    um = np.array([0.1, 0.9, 0.8, 0.0, 0.0, 0.3,   # block 0
                   0.2, 0.0, 0.0, 0.0, 0.0, 0.7])  # block 1
    mask = um >= 0.7
    t = um_lib.block_site_table(um, mask, lay)
    np.testing.assert_array_equal(t.u10, [[0, 2, 0], [0, 0, 1]])
    np.testing.assert_array_equal(t.block_u10, [2, 1])
    np.testing.assert_allclose(t.mean, [[0.1, 1.7 / 4, 0.3], [0.2, 0.0, 0.7]])
    np.testing.assert_allclose(t.max, [[0.1, 0.9, 0.3], [0.2, 0.0, 0.7]])
    # The block mean is over all 6 units: fc1 weighs 4x.
    np.testing.assert_allclose(t.block_mean, [2.1 / 6, 0.9 / 6])
    np.testing.assert_array_equal(t.site_u10, [0, 2, 1])
    np.testing.assert_allclose(t.site_u10_adjusted, [0, 0.5, 1])  # fc1 count / 4
    np.testing.assert_allclose(t.site_u10_frac, [0, 2 / 8, 1 / 2])
    np.testing.assert_allclose(t.site_mean, [0.15, 1.7 / 8, 0.5])


def test_top_units_of_block():
    lay = _layout()
    um = np.array([0.1, 0.9, 0.8, 0.8, 0.0, 0.3, 0.2, 0.5, 0.5, 0.5, 0.5, 0.7])
    np.testing.assert_array_equal(um_lib.top_units_of_block(um, lay, 0, site=1, k=3), [1, 2, 3])
    np.testing.assert_array_equal(um_lib.top_units_of_block(um, lay, 1, k=2), [11, 7])
    # Ties (0.5 x 4 in block 1's fc1) go to the lower unit index.
    np.testing.assert_array_equal(um_lib.top_units_of_block(um, lay, 1, site=1, k=3), [7, 8, 9])


def test_split_comparison_permutation_p_value():
    # 2 train samples with 3 units each, 2 val with none: of the 6 equally likely
    # relabellings, 2 reach |diff| >= 3, so p -> 1/3.
    r = um_lib.split_comparison(np.array([3, 0, 3, 0]), np.array([True, False, True, False]),
                                n_permutations=20_000, seed=0)
    assert (r.sum_train, r.sum_val, r.diff_mean) == (6, 0, 3)
    assert r.p_value == pytest.approx(1 / 3, abs=0.015)
    again = um_lib.split_comparison(np.array([3, 0, 3, 0]), np.array([True, False, True, False]),
                                    n_permutations=20_000, seed=0)
    assert again.p_value == r.p_value  # fixed seed: reproducible
    flat = um_lib.split_comparison(np.ones(6), np.arange(6) < 2, n_permutations=100)
    assert flat.p_value == 1.0 and flat.mean_train == flat.mean_val == 1.0
    assert um_lib.split_comparison(np.ones(4), np.arange(4) < 2, n_permutations=0).p_value is None
    with pytest.raises(ValueError):
        um_lib.split_comparison(np.ones(4), np.ones(4, bool))


def test_split_comparison_matches_exact_permutation_distribution():
    # All C(8, 4) = 70 train/val labellings enumerated: the exact two-sided p-value.
    import itertools

    nmu = np.array([0, 5, 1, 0, 2, 0, 7, 1])
    is_train = np.array([1, 1, 0, 0, 1, 0, 1, 0], bool)
    obs = abs(nmu[is_train].mean() - nmu[~is_train].mean())
    diffs = [abs(nmu[list(c)].mean() - np.delete(nmu, list(c)).mean())
             for c in itertools.combinations(range(8), 4)]
    exact = np.mean(np.array(diffs) >= obs - 1e-12)
    r = um_lib.split_comparison(nmu, is_train, n_permutations=40_000, seed=3)
    assert r.p_value == pytest.approx(exact, abs=0.01)
    assert r.diff_mean == pytest.approx(nmu[is_train].mean() - nmu[~is_train].mean())


def test_loss_correlation():
    nmu = np.array([0, 1, 2, 5, 9])
    r = um_lib.loss_correlation(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), nmu)
    assert r.rho == pytest.approx(-1.0) and r.n == 5
    r = um_lib.loss_correlation(np.array([1.0, np.nan, 3.0, 4.0, 5.0]), nmu)
    assert r.rho == pytest.approx(1.0) and r.n == 4
    assert np.isnan(um_lib.loss_correlation(np.ones(5), nmu).rho)


def test_per_scale_view():
    # K = 2 scales x 12 units (_layout), N = 3; each unit's stats built from the UnitMem it should
    # have: max m = 2 and mean of the others r = m (1 - UM) / (1 + UM), so sum = m + 2 r.
    lay = _layout()
    um = np.zeros((2, 12))
    um[0, [0, 5, 11]] = [0.9, 0.5, 0.8]
    um[1, [1, 2, 10]] = [0.6, 0.6, 0.2]
    m = np.full((2, 12), 2.0)
    stats = um_lib.UnitStats(m, np.zeros((2, 12), np.int64), m + 2 * m * (1 - um) / (1 + um), 3)
    overall = np.zeros(12, bool)
    overall[[0, 1, 2, 7]] = True  # a partial U10 of the all-token UnitMem
    v = um_lib.per_scale_view(stats, lay, 90, overall_mask=overall)
    np.testing.assert_allclose(v.um, um, atol=1e-12)
    # Sorted, 12 values: position 0.9 * 11 = 9.9 -> s_9 + 0.9 (s_10 - s_9).
    #   scale 0: nine 0s, 0.5, 0.8, 0.9 -> 0.5 + 0.9 * 0.3 = 0.77: U = {0 (attn.proj), 11 (fc2)}
    #   scale 1: nine 0s, 0.2, 0.6, 0.6 -> 0.2 + 0.9 * 0.4 = 0.56: U = {1, 2} (fc1)
    np.testing.assert_allclose(v.threshold, [0.77, 0.56])
    np.testing.assert_array_equal(v.u10, [[1, 0, 1], [0, 2, 0]])  # per (attn.proj, ffn.fc1, ffn.fc2)
    # Mean per site: attn.proj units 0 and 6, fc1 units 1-4 and 7-10, fc2 units 5 and 11.
    np.testing.assert_allclose(v.mean, [[0.45, 0.0, 0.65], [0.0, 1.4 / 8, 0.0]])
    # Scale 0's U: {0, 11}, of which 0 is in the overall U10; scale 1's {1, 2}: both are.
    np.testing.assert_allclose(v.overlap, [0.5, 1.0])
    assert um_lib.per_scale_view(stats, lay, 90).overlap is None
