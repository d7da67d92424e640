"""Tests of varjax/beyond.py (the study's open questions as tests) and the unit layout's top
sites, on toy arrays whose answers are worked out by hand (or by enumerating every permutation)."""

import itertools

import numpy as np
import pytest

from varjax import beyond
from varjax.names import UnitLayout


def test_holm_adjustment():
    # Sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> monotone: 0.03, 0.06, 0.06.
    np.testing.assert_allclose(beyond._holm(np.array([0.01, 0.04, 0.03])), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(beyond._holm(np.array([0.6, 0.9])), [1.0, 1.0])


def test_class_influence_by_hand():
    """4 samples, classes [0, 0, 1, 1], NumMemUnits [2, 1, 0, 0]: |U10| = 3, E = [1.5, 1.5].

    Observed O = [3, 0]: chi2 = 2 x 1.5^2 / 1.5 = 3. Of the C(4, 2) = 6 equally likely class
    splits, the two nonzero samples share a class in 2 (chi2 3), else O = [2, 1] (chi2 1/3):
    p = 2/6. Per class the same events: 1/3 each, Holm 2/3 each.
    """
    r = beyond.class_influence(np.array([2, 1, 0, 0]), np.array([0, 0, 1, 1]), n_permutations=20_000, seed=1)
    np.testing.assert_array_equal(r.classes, [0, 1])
    np.testing.assert_array_equal(r.u10_argmax, [3, 0])
    np.testing.assert_allclose(r.expected, [1.5, 1.5])
    np.testing.assert_allclose(r.u10_share, [1, 0])
    np.testing.assert_allclose(r.lift, [2, 0])
    np.testing.assert_allclose(r.nmu_mean, [1.5, 0])
    np.testing.assert_array_equal(r.with_memunits, [2, 0])
    assert r.chi2 == pytest.approx(3.0)
    assert r.p_value == pytest.approx(1 / 3, abs=0.015)
    np.testing.assert_allclose(r.p_class, [1 / 3, 1 / 3], atol=0.015)
    np.testing.assert_allclose(r.p_class_holm, [2 / 3, 2 / 3], atol=0.03)
    assert r.stand_out == ()
    again = beyond.class_influence(np.array([2, 1, 0, 0]), np.array([0, 0, 1, 1]), n_permutations=20_000, seed=1)
    assert again.p_value == r.p_value  # a fixed seed: reproducible


def test_class_influence_expects_each_class_by_its_size():
    """Classes of 3 and 1 samples, NumMemUnits [2, 0, 0, 1]: E = 3 x [3/4, 1/4] = [2.25, 0.75],
    O = [2, 1]: chi2 = 0.25^2 / 2.25 + 0.25^2 / 0.75 = 1/9, the least of the 4 equally likely
    relabellings (class 1 = the sample with 2, 0, 0 or 1: chi2 25/9, 1, 1, 1/9): p = 1."""
    r = beyond.class_influence(np.array([2, 0, 0, 1]), np.array([0, 0, 0, 1]), n_permutations=1000)
    np.testing.assert_allclose(r.expected, [2.25, 0.75])
    np.testing.assert_allclose(r.sample_share, [0.75, 0.25])
    np.testing.assert_allclose(r.lift, [(2 / 3) / 0.75, (1 / 3) / 0.25])
    assert r.chi2 == pytest.approx(1 / 9) and r.p_value == 1.0


def test_class_influence_finds_the_class_that_stands_out():
    """40 samples, 4 classes of 10; every class-2 sample has 5 units, the others none.

    Only a relabelling that gives class 2 exactly its own samples reaches the observed chi2
    (1 in C(40, 10)): p = 1 / (1 + n). Another class (O = 0, E = 12.5) is as extreme when it
    draws X = 0 or X >= 5 of the 10 loaded samples, X hypergeometric (40, 10, 10): 0.084;
    x3 (Holm) = 0.25 > 0.05: only class 2 stands out.
    """
    from scipy.stats import hypergeom

    labels = np.repeat([0, 1, 2, 3], 10)
    nmu = np.where(labels == 2, 5, 0)
    r = beyond.class_influence(nmu, labels, n_permutations=5000, seed=0)
    assert r.p_value == pytest.approx(1 / 5001)
    x = hypergeom(40, 10, 10)
    np.testing.assert_allclose(r.p_class[[0, 1, 3]], x.cdf(0) + x.sf(4), atol=0.012)
    assert r.stand_out == (2,)


def test_class_influence_without_a_test():
    assert beyond.class_influence(np.array([1, 0, 2]), np.array([5, 5, 5])).p_value is None  # one class
    none = beyond.class_influence(np.zeros(4), np.array([0, 0, 1, 1]))  # U10 empty
    assert none.p_value is None and np.isnan(none.p_class).all() and none.stand_out == ()
    assert beyond.class_influence(np.array([1, 0]), np.array([0, 1]), n_permutations=0).p_value is None


def _fc1_layout(depth: int, per_block: int, top: tuple[str, ...] = ()) -> UnitLayout:
    return UnitLayout.for_var(depth, 1, per_block, 2, ("ffn.fc1",) + top)


def test_diversity_test_by_hand():
    """2 blocks x 4 fc1 units, k = 4: block 0's units point at 4 images (2 bits; classes 0, 1,
    0, 1: 1 bit), block 1's all at one image (0 bits). Relative depth 0 and 0.5: slopes -4
    and -2 bits per unit of depth.

    Null: the 8 units split into two blocks of 4, C(8, 4) = 70 ways equally likely. Block 1
    keeps entropy 0 only with all four units of the one image (1/70); the slope is as low
    only then, and as extreme in |.| in 2 of 70. The null mean is enumerated below.
    """
    lay = _fc1_layout(2, 4)
    um = np.array([0.9, 0.8, 0.7, 0.6, 0.9, 0.8, 0.7, 0.6])
    argmax = np.array([10, 11, 12, 13, 20, 20, 20, 20])
    label = np.array([0, 1, 0, 1, 0, 0, 0, 0])
    t = beyond.diversity_test(um, argmax, label, lay, site=0, k=4, n_permutations=20_000, seed=0)
    assert t.site == "ffn.fc1" and t.k == 4
    np.testing.assert_array_equal(t.blocks, [0, 1])
    np.testing.assert_allclose(t.relative_depth, [0, 0.5])
    np.testing.assert_array_equal(t.distinct_images, [4, 1])
    np.testing.assert_array_equal(t.distinct_classes, [2, 1])
    np.testing.assert_allclose(t.image_entropy, [2, 0])
    np.testing.assert_allclose(t.class_entropy, [1, 0])
    assert (t.image_slope, t.class_slope) == (pytest.approx(-4), pytest.approx(-2))
    assert t.p_image_falls == pytest.approx(1 / 70, abs=0.003)
    assert t.p_image_two_sided == pytest.approx(2 / 70, abs=0.004)
    np.testing.assert_allclose(t.p_image_low, [1, 1 / 70], atol=0.003)

    def h(group) -> float:
        _, c = np.unique(group, return_counts=True)
        p = c / c.sum()
        return float(-(p * np.log2(p)).sum())

    mean = np.mean([h(argmax[list(g)]) for g in itertools.combinations(range(8), 4)])
    np.testing.assert_allclose(t.null_image_entropy, [mean, mean], atol=0.02)
    # k = 2: the two highest-UnitMem units of each block (units 0, 1 and 4, 5).
    t2 = beyond.diversity_test(um, argmax, label, lay, site=0, k=2, n_permutations=0)
    np.testing.assert_array_equal(t2.distinct_images, [2, 1])
    np.testing.assert_array_equal(t2.n_units, [2, 2])
    assert t2.p_image_falls is None and np.isnan(t2.p_image_low).all()


def test_diversity_test_of_a_top_site_has_no_trend():
    lay = _fc1_layout(2, 2, ("head",))  # head: 2 units at block 2
    um = np.array([0.5, 0.4, 0.3, 0.2, 0.9, 0.8])
    argmax = np.array([1, 2, 3, 3, 4, 4])
    t = beyond.diversity_test(um, argmax, argmax % 2, lay, site=lay.sites.index("head"), k=10)
    np.testing.assert_array_equal(t.blocks, [2])
    np.testing.assert_allclose(t.relative_depth, [1.0])  # block = depth: relative depth 1
    assert t.distinct_images[0] == 1 and t.p_image_falls is None and t.n_permutations == 0
    every = beyond.diversity_test(um, argmax, argmax % 2, lay, site=None, k=10, n_permutations=100)
    np.testing.assert_array_equal(every.blocks, [0, 1])  # the head is in no block


def test_scale_depth_profile_by_hand():
    """4 blocks x 2 fc1 units + 2 head units (block 4), 3 scales, q = 70: each scale's U_30
    holds its 3 highest units (position 0.7 x 9 = 6.3 of 10 sorted values).

      scale 0: head unit 8, units 0 and 1 (block 0)      -> centre block 0, relative 0
      scale 1: head unit 9, units 2 (block 1), 5 (block 2) -> 1.5, 0.375
      scale 2: head unit 8, units 6 and 7 (block 3)      -> 3, 0.75
    rho = 1; slope 0.375 per scale step. 3! = 6 orders <= permutations: exact p(deeper) = 1/6
    (only the identity reaches rho 1), two-sided 2/6.
    """
    lay = _fc1_layout(4, 2, ("head",))
    low = np.array([0.1, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17, 0.18, 0.19])
    um = np.tile(low, (3, 1))
    um[0, [8, 0, 1]] = [0.95, 0.9, 0.8]
    um[1, [9, 2, 5]] = [0.95, 0.9, 0.8]
    um[2, [8, 6, 7]] = [0.95, 0.9, 0.8]
    p = beyond.scale_depth_profile(um, lay, q=70, n_permutations=1000)
    np.testing.assert_array_equal(p.blocks, [0, 1, 2, 3])
    assert p.sites == ("ffn.fc1",)
    np.testing.assert_allclose(p.centre_block, [0, 1.5, 3])
    np.testing.assert_allclose(p.centre, [0, 0.375, 0.75])
    np.testing.assert_allclose(p.centre_by_site[:, 0], [0, 0.375, 0.75])
    np.testing.assert_allclose(p.u10_share[:, :, 0], [[1, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(p.u10_share_all, p.u10_share[:, :, 0])
    assert p.mean[0, 0, 0] == pytest.approx(0.85)  # units 0 and 1 at scale 0
    assert p.rho == pytest.approx(1.0) and p.slope == pytest.approx(0.375)
    assert p.exact and p.n_permutations == 6
    assert p.p_deeper == pytest.approx(1 / 6) and p.p_two_sided == pytest.approx(2 / 6)
    # Random orders when K! exceeds the permutations asked: p = (1 + hits) / (1 + n).
    r = beyond.scale_depth_profile(um, lay, q=70, n_permutations=5, seed=0)
    assert not r.exact and r.n_permutations == 5 and r.p_deeper >= 1 / 6
    two = beyond.scale_depth_profile(um[:2], lay, q=70)  # 2 scales: a rho, no test
    assert two.rho == pytest.approx(1.0) and two.p_deeper is None


def test_run_overlap_by_hand():
    ids = np.arange(100, 110)
    a = np.array([9, 8, 7, 0, 0, 0, 0, 0, 0, 1])
    b = np.array([9, 0, 7, 8, 0, 0, 0, 0, 0, 1])
    mask_a = np.array([1, 1, 0, 0], bool)
    mask_b = np.array([0, 1, 1, 0], bool)
    r = beyond.run_overlap(ids, a, b, mask_a, mask_b, np.array([1, 5, 1, 1]), np.array([1, 5, 2, 2]), top_n=3)
    # top 3: a {100, 101, 102}, b {100, 103, 102}: 2 of 3. Top 10% = 1 sample: 100 in both.
    assert (r.n_common, r.top_n, r.top10pct_n) == (10, 3, 1)
    assert r.top_overlap == pytest.approx(2 / 3) and r.top10pct_overlap == 1.0
    assert r.u10_jaccard == pytest.approx(1 / 3)  # {0, 1} vs {1, 2}
    assert r.argmax_agree == 1.0  # unit 1: sample 5 in both
    from scipy.stats import spearmanr

    assert r.nmu_spearman == pytest.approx(spearmanr(a, b).statistic)
    assert beyond.run_overlap(ids, a, b).u10_jaccard is None  # other units: no Jaccard


def test_layout_with_top_sites_and_the_residual_stream():
    lay = UnitLayout.for_var(2, 3, 12, 7, ("head", "resid", "ffn.fc1", "head_nm"))
    assert lay.sites == ("ffn.fc1", "resid", "head_nm", "head")  # canonical order
    assert [(p, b, n) for p, b, _, n in lay.segments()] == [
        ("blocks.0.ffn.fc1", 0, 12), ("blocks.0", 0, 3), ("blocks.1.ffn.fc1", 1, 12), ("blocks.1", 1, 3),
        ("head_nm", 2, 3), ("head", 2, 7)]
    assert lay.depth == 2 and list(lay.blocks) == [0, 1, 2]
    np.testing.assert_array_equal(lay.blocks_of(None), [0, 1])
    assert lay.top.sum() == 10
    back = UnitLayout.from_columns(lay.block, [p for p, _, _, n in lay.segments() for _ in range(n)])
    assert back.sites == lay.sites
    np.testing.assert_array_equal(back.site, lay.site)
    np.testing.assert_array_equal(back.index, lay.index)
    with pytest.raises(ValueError, match="unknown site"):
        UnitLayout.for_var(2, 3, 12, 7, ("ffn.fc3",))
