"""UnitMem metrics beyond the study's items 1-9: its open questions as numbers with tests.

docs/unitmem.md ends with the questions the study left open; each is a pure numpy function
here of arrays the analysis already has (UnitMem, U10, argmax, NumMemUnits, labels, the
per-scale UnitMem), returning a frozen dataclass:
- `class_influence`: do the memorizing units pick some classes more than their share of the
  samples? (a permutation test of the class labels)
- `diversity_test`: how diverse the images (and classes) maximally activating each block's
  top-k units are, as entropy, against the null that depth does not matter (a permutation
  of the units' blocks), and its trend over depth.
- `scale_depth_profile`: where each scale's U10 sits in depth, the depth of its centre of
  mass per scale, and whether that centre moves with the scale (Kasliwal, Boenisch,
  Dziedzic 2025: early blocks at coarse scales, deeper at finer ones).
- `run_overlap`: how much two runs over the same samples agree (U10 Jaccard, top samples).

Every test states its null and its statistic in its docstring. Permutation p-values are
(1 + #{permuted statistic at least as extreme}) / (1 + permutations), never 0; where all
orderings are fewer than the permutations asked for they are enumerated and the p-value is
the exact share. Seeds are arguments: a report is reproducible.

Shape letters (varjax.names): N samples, U units, K scales; blocks, sites and classes spelled out.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from varjax.names import UnitLayout
from varjax.unitmem import rank_samples, top_count, top_units, top_units_of_block

_CELLS = 2_000_000  # values per chunk of permuted rows: bounds the temporaries


def _p_upper(null: np.ndarray, obs: float) -> float:
    """(1 + #{null >= obs}) / (1 + n), with a tolerance so that exact ties count."""
    tol = 1e-12 * max(1.0, abs(obs))
    return (1 + int(np.count_nonzero(null >= obs - tol))) / (1 + len(null))


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of m p-values (family-wise error), monotone, capped at 1."""
    p = np.asarray(p, np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def _slope(x: np.ndarray, y_RB: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of y_RB (R, B) on x (B,)."""
    xc = x - x.mean()
    return (y_RB - y_RB.mean(axis=-1, keepdims=True)) @ xc / np.sum(xc * xc)


@dataclasses.dataclass(frozen=True, eq=False)
class ClassInfluence:
    """Which classes the U10 units' argmax samples belong to, against the classes' share of samples.

    Null: the class labels are exchangeable among the samples, each sample keeping its
    NumMemUnits (the U10 units pick classes in proportion to their samples; how strongly any
    one sample is memorized is left as it is). Statistic: chi2 = sum_c (O_c - E_c)^2 / E_c,
    O_c the U10 units whose argmax sample is of class c, E_c = |U10| n_c / N. Per class: the
    two-sided |O_c - E_c| under the same permutations, Holm-adjusted over the classes.

    Attributes:
      classes: (C,) labels; n_samples, sample_share: (C,) samples per class and n_c / N.
      u10_argmax: (C,) O_c; u10_share: O_c / |U10|; expected: E_c; lift: u10_share / sample_share.
      nmu_mean, nmu_median, nmu_max: (C,) NumMemUnits over the class's samples;
        with_memunits: (C,) its samples with NumMemUnits > 0.
      chi2: the statistic; p_value: its p (None when no test ran: one class, U10 empty or
        no permutations). p_class, p_class_holm: (C,) per class (NaN without a test).
      stand_out: classes with Holm-adjusted p <= alpha, most significant first.
    """

    classes: np.ndarray
    n_samples: np.ndarray
    sample_share: np.ndarray
    u10_argmax: np.ndarray
    u10_share: np.ndarray
    expected: np.ndarray
    lift: np.ndarray
    nmu_mean: np.ndarray
    nmu_median: np.ndarray
    nmu_max: np.ndarray
    with_memunits: np.ndarray
    chi2: float
    p_value: float | None
    p_class: np.ndarray
    p_class_holm: np.ndarray
    stand_out: tuple[int, ...]
    alpha: float
    n_permutations: int
    seed: int


def _chi2(obs_RC: np.ndarray, exp_C: np.ndarray) -> np.ndarray:
    ok = exp_C > 0
    return np.sum((obs_RC[..., ok] - exp_C[ok]) ** 2 / exp_C[ok], axis=-1)


def class_influence(nmu: np.ndarray, labels: np.ndarray, n_permutations: int = 10_000, seed: int = 0,
                    alpha: float = 0.05) -> ClassInfluence:
    """Class influence on memorization (the study's open question), with a permutation test.

    Args:
      nmu: (N,) NumMemUnits over U10 (sums to |U10|).
      labels: (N,) class of each sample.
      n_permutations: random relabellings (class sizes kept); 0 skips the test.
      seed: numpy Generator seed.
      alpha: family-wise level for `stand_out`.

    Returns:
      ClassInfluence (the null and the statistic: its docstring).
    """
    nmu = np.asarray(nmu, np.float64)
    classes, inv, n_c = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    C, N, total = len(classes), len(nmu), float(nmu.sum())
    obs = np.bincount(inv, weights=nmu, minlength=C)
    share = n_c / N
    exp = total * share
    per = [nmu[inv == c] for c in range(C)]
    chi2 = float(_chi2(obs, exp))
    p_value, p_class = None, np.full(C, np.nan)
    if C >= 2 and total > 0 and n_permutations > 0:
        rng = np.random.default_rng(seed)
        starts = np.concatenate([[0], np.cumsum(n_c)[:-1]])  # classes as contiguous runs
        hits, class_hits, done = 0, np.zeros(C, np.int64), 0
        dev = np.abs(obs - exp) * (1 - 1e-12) - 1e-12
        while done < n_permutations:
            m = min(max(1, _CELLS // N), n_permutations - done)
            sums = np.add.reduceat(rng.permuted(np.tile(nmu, (m, 1)), axis=1), starts, axis=1)
            hits += int(np.count_nonzero(_chi2(sums, exp) >= chi2 * (1 - 1e-12) - 1e-12))
            class_hits += np.count_nonzero(np.abs(sums - exp) >= dev, axis=0)
            done += m
        p_value = (1 + hits) / (1 + n_permutations)
        p_class = (1 + class_hits) / (1 + n_permutations)
    holm = _holm(p_class) if p_value is not None else np.full(C, np.nan)
    out = [int(classes[c]) for c in np.argsort(holm, kind="stable") if holm[c] <= alpha]
    with np.errstate(invalid="ignore", divide="ignore"):
        u10_share = obs / total if total else np.zeros(C)
    return ClassInfluence(
        classes=classes, n_samples=n_c, sample_share=share, u10_argmax=obs.astype(np.int64),
        u10_share=u10_share, expected=exp, lift=u10_share / share,
        nmu_mean=np.array([v.mean() for v in per]), nmu_median=np.array([np.median(v) for v in per]),
        nmu_max=np.array([v.max() for v in per]), with_memunits=np.array([np.count_nonzero(v) for v in per]),
        chi2=chi2, p_value=p_value, p_class=p_class, p_class_holm=holm, stand_out=tuple(out),
        alpha=float(alpha), n_permutations=int(n_permutations), seed=int(seed))


@dataclasses.dataclass(frozen=True, eq=False)
class DiversityTest:
    """Diversity of the samples maximally activating each block's top-k UnitMem units.

    Per block b holding the site: its k highest-UnitMem units (fewer where it has fewer) and
    their argmax samples: distinct images and classes, and the Shannon entropy (bits) of
    each distribution (log2 k when all differ, 0 when one image takes all k).
    Null: depth does not matter: the pooled top units of all blocks are exchangeable across
    blocks (block labels permuted, each block keeping its number of units). Per block: the
    one-sided p that the entropy is this low or lower, and the null's mean entropy. Trend:
    the least-squares slope of entropy on relative depth (block / depth; bits from depth 0 to
    depth 1; the study saw it fall), with the one-sided p that it falls this steeply or more
    and the two-sided p of |slope|. Tests need two blocks (else None / NaN).

    Attributes:
      site: the site's name ("all sites": every per-block site of the block); k: units asked.
      blocks, relative_depth, n_units: (B,) the blocks, block / depth, units taken.
      distinct_images, distinct_classes, image_entropy, class_entropy: (B,) observed.
      null_image_entropy, null_class_entropy, p_image_low, p_class_low: (B,) under the null.
      image_slope, class_slope: the trends; p_image_falls, p_image_two_sided,
        p_class_falls, p_class_two_sided: their p-values.
    """

    site: str
    k: int
    blocks: np.ndarray
    relative_depth: np.ndarray
    n_units: np.ndarray
    distinct_images: np.ndarray
    distinct_classes: np.ndarray
    image_entropy: np.ndarray
    class_entropy: np.ndarray
    null_image_entropy: np.ndarray
    null_class_entropy: np.ndarray
    p_image_low: np.ndarray
    p_class_low: np.ndarray
    image_slope: float
    class_slope: float
    p_image_falls: float | None
    p_image_two_sided: float | None
    p_class_falls: float | None
    p_class_two_sided: float | None
    n_permutations: int
    seed: int


def _entropy(codes_RM: np.ndarray, bounds: list[tuple[int, int]], n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """Shannon entropy (bits) and distinct count per row and segment [lo, hi) of integer codes.

    Returns:
      (R, B) entropies and (R, B) distinct counts.
    """
    R = codes_RM.shape[0]
    offset = n_codes * np.arange(R)[:, None]
    h, d = np.zeros((R, len(bounds))), np.zeros((R, len(bounds)), np.int64)
    for j, (lo, hi) in enumerate(bounds):
        counts = np.bincount((codes_RM[:, lo:hi] + offset).ravel(), minlength=R * n_codes).reshape(R, n_codes)
        p = counts / max(hi - lo, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            h[:, j] = -np.sum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
        d[:, j] = np.count_nonzero(counts, axis=1)
    return h + 0.0, d  # + 0.0: no -0.0 for a single image


def diversity_test(um: np.ndarray, argmax: np.ndarray, label_of_unit: np.ndarray, layout: UnitLayout,
                   site: int | None = None, k: int = 10, n_permutations: int = 10_000,
                   seed: int = 0) -> DiversityTest:
    """Diversity of each block's top-k units' argmax images and classes, tested against depth.

    Args:
      um: (U,) UnitMem; argmax: (U,) sample id per unit; label_of_unit: (U,) its class.
      layout: where each unit sits (relative depth = block / layout.depth).
      site: a site index, or None for all per-block sites of each block.
      k: units per block (the study: 10).
      n_permutations: permutations of the units' blocks; 0 skips the tests.
      seed: numpy Generator seed.

    Returns:
      DiversityTest (the null and the statistics: its docstring).
    """
    blocks = layout.blocks_of(site)
    tops = [top_units_of_block(um, layout, int(b), site, k) for b in blocks]
    sizes = np.array([len(t) for t in tops])
    bounds = [(int(lo), int(hi)) for lo, hi in zip(np.cumsum(sizes) - sizes, np.cumsum(sizes))]
    units = np.concatenate(tops) if tops else np.zeros(0, np.int64)
    _, img = np.unique(np.asarray(argmax)[units], return_inverse=True)
    _, cls = np.unique(np.asarray(label_of_unit)[units], return_inverse=True)
    codes = np.stack([img.ravel(), cls.ravel()])  # (2, M): images, classes
    n_codes = max(int(codes.max(initial=0)) + 1, 1)
    (h_img, h_cls), (d_img, d_cls) = ((x[0] for x in pair) for pair in _entropy_pair(codes[:, None], bounds, n_codes))
    rel = blocks / max(layout.depth, 1)
    trend = len(blocks) >= 2 and np.ptp(rel) > 0
    slopes = (float(_slope(rel, h_img)), float(_slope(rel, h_cls))) if trend else (math.nan, math.nan)
    nan = np.full(len(blocks), np.nan)
    null_mean, p_low, p_trend = [nan, nan], [nan, nan], [(None, None), (None, None)]
    if trend and n_permutations > 0:
        rng = np.random.default_rng(seed)
        h_null = [[], []]
        done = 0
        while done < n_permutations:
            m = min(max(1, _CELLS // max(len(units), 1)), n_permutations - done)
            perm = rng.permuted(np.tile(np.arange(len(units)), (m, 1)), axis=1)
            (hi, hc), _ = _entropy_pair(codes[:, perm], bounds, n_codes)
            h_null[0].append(hi)
            h_null[1].append(hc)
            done += m
        for j, (obs, slope) in enumerate(((h_img, slopes[0]), (h_cls, slopes[1]))):
            null = np.concatenate(h_null[j])
            null_mean[j] = null.mean(axis=0)
            p_low[j] = np.array([_p_upper(-null[:, b], -obs[b]) for b in range(len(blocks))])
            s = _slope(rel, null)
            p_trend[j] = (_p_upper(-s, -slope), _p_upper(np.abs(s), abs(slope)))
    return DiversityTest(
        site="all sites" if site is None else layout.sites[site], k=int(k), blocks=blocks, relative_depth=rel,
        n_units=sizes, distinct_images=d_img, distinct_classes=d_cls, image_entropy=h_img, class_entropy=h_cls,
        null_image_entropy=null_mean[0], null_class_entropy=null_mean[1], p_image_low=p_low[0],
        p_class_low=p_low[1], image_slope=slopes[0], class_slope=slopes[1],
        p_image_falls=p_trend[0][0], p_image_two_sided=p_trend[0][1], p_class_falls=p_trend[1][0],
        p_class_two_sided=p_trend[1][1], n_permutations=int(n_permutations if trend else 0), seed=int(seed))


def _entropy_pair(codes_2RM: np.ndarray, bounds, n_codes: int):
    """((image, class) entropies (R, B), (image, class) distinct counts (R, B))."""
    (hi, di), (hc, dc) = (_entropy(c, bounds, n_codes) for c in codes_2RM)
    return (hi, hc), (di, dc)


@dataclasses.dataclass(frozen=True, eq=False)
class ScaleDepthProfile:
    """Where each scale's U10 sits in depth (UnitMem from the scale's tokens alone).

    U10 share of a (block, site) = the share of its units in the scale's U10 (the scale's
    units with UnitMem >= its P_q; 1 - q/100 of all units on average). Centre of mass: the
    mean relative depth (block / depth) of the scale's U10 units in the blocks (top sites,
    not in a block, left out). Does it move with the scale? Statistic: Spearman's rho of the
    centre against the scale index (positive: deeper at finer scales, as Kasliwal et al.
    report). Null: the K centres are exchangeable over scales (no order): every one of the
    K! orders when that is at most `n_permutations` (exact p), else that many random ones.
    p_deeper is one-sided (rho this high or higher), p_two_sided of |rho|.

    Attributes:
      blocks, relative_depth: (B,) transformer blocks and block / depth; sites: per-block sites.
      u10_share, mean: (K, B, sites) U10 share and mean UnitMem (NaN where a block lacks the site).
      u10_share_all: (K, B) over every per-block site of the block.
      centre: (K,) U10 centre of mass (relative depth); centre_block: (K,) the same in blocks.
      centre_by_site: (K, sites) per site (NaN where a scale has no U10 unit at the site).
      rho, slope: Spearman's rho and the least-squares slope (relative depth per scale step).
      p_deeper, p_two_sided: p-values (None with fewer than 3 scales); exact: enumerated.
    """

    blocks: np.ndarray
    relative_depth: np.ndarray
    sites: tuple[str, ...]
    u10_share: np.ndarray
    mean: np.ndarray
    u10_share_all: np.ndarray
    centre: np.ndarray
    centre_block: np.ndarray
    centre_by_site: np.ndarray
    rho: float
    slope: float
    p_deeper: float | None
    p_two_sided: float | None
    n_permutations: int
    exact: bool
    seed: int


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), as Spearman needs."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _spearman_vs_index(y_RK: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row against 0..K-1 (NaN for a constant row)."""
    r = _ranks(y_RK)
    x = np.arange(r.shape[-1], dtype=np.float64)
    rc, xc = r - r.mean(axis=-1, keepdims=True), x - x.mean()
    den = np.sqrt(np.sum(rc * rc, axis=-1) * np.sum(xc * xc))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, rc @ xc / np.where(den > 0, den, 1), np.nan)


def scale_depth_profile(scale_um_KU: np.ndarray, layout: UnitLayout, q: float = 90.0,
                        n_permutations: int = 10_000, seed: int = 0) -> ScaleDepthProfile:
    """Block x scale profile of U10 and its centre of mass per scale, with a test of movement.

    Args:
      scale_um_KU: (K, U) UnitMem per scale.
      layout: where each unit sits.
      q: percentile defining each scale's U_q.
      n_permutations: orders of the scales tried (exhaustive when K! is not more).
      seed: numpy Generator seed (random orders only).

    Returns:
      ScaleDepthProfile (the null and the statistic: its docstring).
    """
    mask_KU, _ = top_units(scale_um_KU, q)
    inner = ~layout.top
    blocks = layout.blocks_of(None)
    sites = tuple(s for i, s in enumerate(layout.sites) if np.any(inner & (layout.site == i)))
    K, B, S = mask_KU.shape[0], len(blocks), len(sites)
    share, mean = np.full((K, B, S), np.nan), np.full((K, B, S), np.nan)
    share_all = np.full((K, B), np.nan)
    for j, b in enumerate(blocks):
        in_block = inner & (layout.block == b)
        share_all[:, j] = mask_KU[:, in_block].mean(axis=1)
        for s, name in enumerate(sites):
            sel = in_block & (layout.site == layout.sites.index(name))
            if sel.any():
                share[:, j, s] = mask_KU[:, sel].mean(axis=1)
                mean[:, j, s] = scale_um_KU[:, sel].mean(axis=1)
    depth = max(layout.depth, 1)

    def centre_of(sel_U: np.ndarray) -> np.ndarray:
        m = mask_KU & sel_U
        with np.errstate(invalid="ignore", divide="ignore"):
            return (m @ layout.block.astype(np.float64)) / m.sum(axis=1)

    centre_block = centre_of(inner)
    by_site = np.stack([centre_of(inner & (layout.site == layout.sites.index(n))) for n in sites], axis=1) / depth
    centre = centre_block / depth
    rho, slope, p_deeper, p_two, exact, n_done = math.nan, math.nan, None, None, False, 0
    if K >= 2 and np.all(np.isfinite(centre)):
        rho = float(_spearman_vs_index(centre[None])[0])
        slope = float(_slope(np.arange(K, dtype=np.float64), centre[None])[0])
    if K >= 3 and math.isfinite(rho) and n_permutations > 0:
        if math.factorial(K) <= n_permutations:  # every order, identity included: the exact p
            orders = np.array(list(itertools.permutations(range(K))))
            null = _spearman_vs_index(centre[orders])
            tol = 1e-12
            p_deeper = float(np.mean(null >= rho - tol))
            p_two = float(np.mean(np.abs(null) >= abs(rho) - tol))
            exact, n_done = True, len(orders)
        else:
            rng = np.random.default_rng(seed)
            null = _spearman_vs_index(centre[rng.permuted(np.tile(np.arange(K), (n_permutations, 1)), axis=1)])
            p_deeper, p_two, n_done = _p_upper(null, rho), _p_upper(np.abs(null), abs(rho)), n_permutations
    return ScaleDepthProfile(
        blocks=blocks, relative_depth=blocks / depth, sites=sites, u10_share=share, mean=mean,
        u10_share_all=share_all, centre=centre, centre_block=centre_block, centre_by_site=by_site,
        rho=rho, slope=slope, p_deeper=p_deeper, p_two_sided=p_two, n_permutations=n_done, exact=exact,
        seed=int(seed))


def u10_centre(u10_BS: np.ndarray, blocks: np.ndarray, depth: int) -> np.ndarray:
    """The U10 centre of mass of each site over depth: the mean relative depth (block / depth)
    of its U10 units.

    Args:
      u10_BS: (B, sites) U10 units per block and site (a BlockSiteTable's `u10`).
      blocks: (B,) block ids; depth: transformer blocks (a top site's block is depth: 1.0).

    Returns:
      (sites,) relative depth (NaN for a site without U10 units).
    """
    w = np.asarray(u10_BS, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.asarray(blocks, np.float64) / max(depth, 1)) @ w / w.sum(axis=0)


@dataclasses.dataclass(frozen=True)
class RunOverlap:
    """Two runs over the same samples: how much their memorization agrees.

    Attributes:
      n_common: samples in both runs (by sample id and source).
      u10_jaccard: |U10_a & U10_b| / |U10_a | U10_b| (None unless the runs have the same units).
      argmax_agree: share of the units in both U10 whose argmax is the same sample (None as above).
      top_n: samples compared at the top (the study's 20 by NumMemUnits, on the common samples).
      top_overlap: |top_n(a) & top_n(b)| / top_n.
      top10pct_n, top10pct_overlap: the same for the top 10% (floor(n_common / 10)).
      nmu_spearman: Spearman's rho of NumMemUnits over the common samples (NaN if constant).
    """

    n_common: int
    u10_jaccard: float | None
    argmax_agree: float | None
    top_n: int
    top_overlap: float
    top10pct_n: int
    top10pct_overlap: float
    nmu_spearman: float


def _top_set(nmu: np.ndarray, ids: np.ndarray, n: int) -> set[int]:
    return set(ids[rank_samples(nmu, ids)[:n]].tolist())


def run_overlap(ids: np.ndarray, nmu_a: np.ndarray, nmu_b: np.ndarray, mask_a: np.ndarray | None = None,
                mask_b: np.ndarray | None = None, argmax_a: np.ndarray | None = None,
                argmax_b: np.ndarray | None = None, top_n: int = 20) -> RunOverlap:
    """Agreement of two runs on their common samples.

    Args:
      ids: (N,) the common sample ids; nmu_a, nmu_b: (N,) each run's NumMemUnits on them.
      mask_a, mask_b: (U,) each run's U10, when both runs have the same U units (else None).
      argmax_a, argmax_b: (U,) each run's argmax sample ids (with the masks).
      top_n: the top samples compared (ranked by NumMemUnits, ties by ascending id).

    Returns:
      RunOverlap.
    """
    from scipy import stats as sps

    ids = np.asarray(ids, np.int64)
    n = min(top_n, len(ids))
    n10 = top_count(len(ids), 0.10)
    jac = agree = None
    if mask_a is not None and mask_b is not None:
        both, either = mask_a & mask_b, mask_a | mask_b
        jac = float(both.sum() / either.sum()) if either.any() else 1.0
        if argmax_a is not None and argmax_b is not None and both.any():
            agree = float(np.mean(argmax_a[both] == argmax_b[both]))
    rho = math.nan
    if len(ids) >= 3 and np.ptp(nmu_a) > 0 and np.ptp(nmu_b) > 0:
        rho = float(sps.spearmanr(nmu_a, nmu_b).statistic)

    def overlap(m: int) -> float:
        return len(_top_set(nmu_a, ids, m) & _top_set(nmu_b, ids, m)) / m if m else math.nan

    return RunOverlap(len(ids), jac, agree, n, overlap(n), n10, overlap(n10), rho)
