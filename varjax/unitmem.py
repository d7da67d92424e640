"""UnitMem metrics on per-unit statistics: pure numpy, exactly as the study computed them.

Ports the analysis half of the study's notebook (docs/unitmem.md) and the UnitMem
definition of Wang et al. (NeurIPS 2024). Everything here is a function of small arrays
(per-unit statistics, per-sample counts) and returns arrays or frozen dataclasses; reading
run directories, figures and the report live in `varjax.analysis`.

Shape letters (varjax.names): N samples, U units, K scales; blocks and sites are spelled out.

Definitions (per unit u over the N samples of a dataset):
- mu_max(u) = max_x mu_u(x); argmax(u) = the smallest sample id reaching it.
- mu_-max(u) = (sum - mu_max) / (N - 1) ("mean" variant, the study's), or the median of the
  other N - 1 values ("median" variant, the official UnitMem code; needs the full matrix).
- UnitMem(u) = (mu_max - mu_-max) / (mu_max + mu_-max). A unit that is zero on every sample
  gives 0/0; we define UnitMem = 0 there (it memorizes nothing), so percentiles stay finite.
- U_q = units with UnitMem >= np.percentile(UnitMem, q) (linear interpolation); U10 is q=90.
- NumMemUnits(x) = number of units of U_q whose argmax is x.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np

from varjax.names import UnitLayout

# Columns per chunk when reducing a full (N, U) matrix: bounds the temporary copy to
# N * _CHUNK values, so a d16 D' matrix (8192 x 98,304) never needs a second 3 GiB copy.
_CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class UnitStats:
    """Streaming statistics of one dataset (the content of a `stats_{split}.npz`).

    Attributes:
      max: (..., U) largest mu per unit (leading axes, e.g. K scales, are allowed).
      argmax: (..., U) int64 sample id reaching `max`; the smallest id on ties.
      sum: (..., U) float64 sum of mu over the samples.
      count: number of samples N.
    """

    max: np.ndarray
    argmax: np.ndarray
    sum: np.ndarray
    count: int


def stats_from_matrix(acts_NU: np.ndarray, sample_ids: np.ndarray,
                      rows: np.ndarray | None = None) -> UnitStats:
    """Per-unit statistics of a full activation matrix.

    Args:
      acts_NU: (N_all, U) mu per sample and unit (a memmap is fine: read in column chunks).
      sample_ids: (N,) unique int sample id of each selected row.
      rows: optional (N,) row indices selecting the dataset (e.g. one split); all rows if None.

    Returns:
      UnitStats over the selected rows; argmax ties go to the smallest sample id.
    """
    ids = np.asarray(sample_ids, dtype=np.int64)
    rows = np.arange(acts_NU.shape[0]) if rows is None else np.asarray(rows)
    if len(rows) != len(ids):
        raise ValueError(f"{len(ids)} sample ids for {len(rows)} rows")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("sample ids are not unique")
    # Visit rows in sample-id order so np.argmax's "first" is the smallest id.
    order = rows[np.argsort(ids, kind="stable")]
    ids_sorted = np.sort(ids)
    n_units = acts_NU.shape[1]
    mx = np.empty(n_units, dtype=acts_NU.dtype)
    am = np.empty(n_units, dtype=np.int64)
    sm = np.empty(n_units, dtype=np.float64)
    for start in range(0, n_units, _CHUNK):
        chunk = np.asarray(acts_NU[:, start:start + _CHUNK])[order]
        mx[start:start + _CHUNK] = chunk.max(axis=0)
        am[start:start + _CHUNK] = ids_sorted[chunk.argmax(axis=0)]
        sm[start:start + _CHUNK] = chunk.sum(axis=0, dtype=np.float64)
    return UnitStats(max=mx, argmax=am, sum=sm, count=len(ids))


def combine_stats(*parts: UnitStats) -> UnitStats:
    """Statistics of the union of disjoint datasets (e.g. D_all = D' + D_val).

    Args:
      *parts: UnitStats of the same shape (..., U) over disjoint sample sets.

    Returns:
      UnitStats equal to those of the concatenated matrix (argmax: smallest id on ties).
    """
    if not parts:
        raise ValueError("combine_stats needs at least one part")
    out = parts[0]
    for p in parts[1:]:
        if p.max.shape != out.max.shape:
            raise ValueError(f"stats shapes differ: {out.max.shape} vs {p.max.shape}")
        take = (p.max > out.max) | ((p.max == out.max) & (p.argmax < out.argmax))
        out = UnitStats(
            max=np.where(take, p.max, out.max),
            argmax=np.where(take, p.argmax, out.argmax),
            sum=np.asarray(out.sum, np.float64) + np.asarray(p.sum, np.float64),
            count=int(out.count) + int(p.count),
        )
    return out


def unitmem_from_parts(mu_max: np.ndarray, mu_rest: np.ndarray) -> np.ndarray:
    """UnitMem = (mu_max - mu_rest) / (mu_max + mu_rest), with 0/0 defined as 0.

    Args:
      mu_max: (..., U) max activation per unit.
      mu_rest: (..., U) mu_-max, the mean or median of the other samples.

    Returns:
      (..., U) float64 UnitMem; in [0, 1] for non-negative activations.
    """
    mu_max = np.asarray(mu_max, np.float64)
    mu_rest = np.asarray(mu_rest, np.float64)
    den = mu_max + mu_rest
    with np.errstate(invalid="ignore", divide="ignore"):
        um = (mu_max - mu_rest) / den
    # A unit silent on every sample: no sample stands out, so it memorizes nothing.
    return np.where(den == 0, 0.0, um)


def unitmem_mean(stats: UnitStats) -> np.ndarray:
    """The study's UnitMem: mu_-max = (sum - max) / (N - 1). Streams (needs only stats).

    Args:
      stats: UnitStats with arrays of shape (..., U), count N >= 2.

    Returns:
      (..., U) float64 UnitMem.
    """
    if stats.count < 2:
        raise ValueError(f"UnitMem needs at least 2 samples, got {stats.count}")
    # Float reductions done elsewhere (e.g. on device) may leave sum a hair below max.
    rest = np.maximum(np.asarray(stats.sum, np.float64) - stats.max, 0.0) / (stats.count - 1)
    return unitmem_from_parts(stats.max, rest)


def unitmem_median(acts_NU: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """UnitMem with mu_-max = median of the other N - 1 samples (official UnitMem code).

    Args:
      acts_NU: (N_all, U) full activation matrix (read in column chunks).
      rows: optional (N,) row indices selecting the dataset; N >= 2.

    Returns:
      (U,) float64 UnitMem.
    """
    n_rows = acts_NU.shape[0] if rows is None else len(rows)
    if n_rows < 2:
        raise ValueError(f"UnitMem needs at least 2 samples, got {n_rows}")
    mx = np.empty(acts_NU.shape[1], dtype=np.float64)
    rest = np.empty(acts_NU.shape[1], dtype=np.float64)
    for start in range(0, acts_NU.shape[1], _CHUNK):
        chunk = np.asarray(acts_NU[:, start:start + _CHUNK], dtype=np.float64)
        # Sorted ascending, the last row is the max: drop one occurrence, median the rest.
        chunk = np.sort(chunk if rows is None else chunk[rows], axis=0)
        mx[start:start + _CHUNK] = chunk[-1]
        rest[start:start + _CHUNK] = np.median(chunk[:-1], axis=0)
    return unitmem_from_parts(mx, rest)


def top_units(um: np.ndarray, q: float = 90.0) -> tuple[np.ndarray, np.ndarray]:
    """The most memorizing units: UnitMem >= the q-th percentile (U10 for q = 90).

    Args:
      um: (..., U) UnitMem; leading axes (e.g. scales) get their own threshold.
      q: percentile in [0, 100], numpy's default linear interpolation.

    Returns:
      mask (..., U) bool and threshold (...,) float64.
    """
    thr = np.percentile(um, q, axis=-1)
    return um >= np.expand_dims(thr, -1), np.asarray(thr, np.float64)


def sample_positions(sample_ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Positions of `query` ids within `sample_ids`; raises on an unknown id.

    Args:
      sample_ids: (N,) unique sample ids.
      query: (...) ids to look up.

    Returns:
      (...) int64 positions into sample_ids.
    """
    ids = np.asarray(sample_ids, np.int64)
    order = np.argsort(ids, kind="stable")
    q = np.asarray(query, np.int64)
    pos = np.searchsorted(ids[order], q)
    pos = np.clip(pos, 0, len(ids) - 1)
    found = ids[order][pos] == q
    if not np.all(found):
        raise ValueError(f"sample id {q[~found].flat[0]} is not among the dataset's samples")
    return order[pos]


def num_mem_units(argmax: np.ndarray, mask: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """NumMemUnits(x): how many selected units have x as their argmax.

    Args:
      argmax: (U,) sample id maximally activating each unit.
      mask: (U,) bool, the units counted (U10, or all units).
      sample_ids: (N,) the dataset's sample ids; every argmax must be one of them.

    Returns:
      (N,) int64 counts aligned with sample_ids (zeros included); they sum to mask.sum().
    """
    pos = sample_positions(sample_ids, np.asarray(argmax)[np.asarray(mask, bool)])
    return np.bincount(pos, minlength=len(sample_ids)).astype(np.int64)


def top_count(n: int, fraction: float) -> int:
    """floor(n * fraction), exact for decimal fractions (0.29 * 100 is 28.999... in floats)."""
    return math.floor(n * Fraction(repr(float(fraction))))


def rank_samples(nmu: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """Sample positions by NumMemUnits, highest first; ties by ascending sample id.

    Args:
      nmu: (N,) NumMemUnits.
      sample_ids: (N,) sample ids (the deterministic tie-break).

    Returns:
      (N,) int64 positions into nmu.
    """
    return np.lexsort((np.asarray(sample_ids), -np.asarray(nmu)))


@dataclasses.dataclass(frozen=True)
class CoverageAt:
    """The top `fraction` of samples by NumMemUnits: n = floor(N * fraction) samples hold
    `units` of U10, a `share` of it (0 when U10 is empty)."""

    fraction: float
    n_samples: int
    units: int
    share: float


@dataclasses.dataclass(frozen=True)
class Coverage:
    """Item 6 of the study: samples with NumMemUnits > 0, and U10 held by the top samples."""

    samples_with_memunits: int
    samples_with_memunits_frac: float
    top: tuple[CoverageAt, ...]


def coverage(nmu: np.ndarray, sample_ids: np.ndarray,
             fractions: tuple[float, ...] = (0.01, 0.05, 0.10)) -> Coverage:
    """Item 6 of the study: how concentrated memorization is among samples.

    Args:
      nmu: (N,) NumMemUnits over U10 (sums to |U10|).
      sample_ids: (N,) ids, the tie-break of the ranking (see rank_samples).
      fractions: top fractions p of samples; the top n = floor(N * p) are taken.

    Returns:
      Coverage, with one CoverageAt per fraction.
    """
    nmu = np.asarray(nmu, np.int64)
    total = int(nmu.sum())
    ranked = nmu[rank_samples(nmu, sample_ids)]
    top = []
    for p in fractions:
        n = top_count(len(nmu), p)
        units = int(ranked[:n].sum())
        top.append(CoverageAt(float(p), n, units, units / total if total else 0.0))
    with_units = int(np.count_nonzero(nmu))
    return Coverage(with_units, with_units / len(nmu) if len(nmu) else 0.0, tuple(top))


def coverage_curve(nmu: np.ndarray, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative share of U10 covered by the top n samples, n = 0..N.

    Returns:
      x (N+1,) fraction of samples n/N, y (N+1,) share of U10 covered.
    """
    ranked = np.asarray(nmu, np.float64)[rank_samples(nmu, sample_ids)]
    total = ranked.sum()
    y = np.concatenate([[0.0], np.cumsum(ranked) / (total if total else 1.0)])
    return np.arange(len(ranked) + 1) / max(len(ranked), 1), y


def _group(values: np.ndarray, keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and max of values per integer key in [0, n); empty groups give NaN."""
    count = np.bincount(keys, minlength=n)
    total = np.bincount(keys, weights=values, minlength=n)
    mx = np.full(n, -np.inf)
    np.maximum.at(mx, keys, values)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    return count, np.where(count > 0, mean, np.nan), np.where(count > 0, mx, np.nan)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSiteTable:
    """Items 1-5 of the study: U10 counts, mean and max UnitMem per block and layer type.

    Attributes:
      blocks: (blocks,) block ids; sites: site names.
      n_units, u10, mean, max: (blocks, sites) per block and site.
      block_u10, block_mean, block_max: (blocks,) over all of a block's units (so fc1
        weighs 4x in the mean, as in the study).
      site_units, site_u10, site_u10_adjusted, site_u10_frac, site_mean, site_max: (sites,);
        `site_u10_adjusted` scales each site to the smallest per-block site's size (fc1 / 4).
    """

    blocks: np.ndarray
    sites: tuple[str, ...]
    n_units: np.ndarray
    u10: np.ndarray
    mean: np.ndarray
    max: np.ndarray
    block_u10: np.ndarray
    block_mean: np.ndarray
    block_max: np.ndarray
    site_units: np.ndarray
    site_u10: np.ndarray
    site_u10_adjusted: np.ndarray
    site_u10_frac: np.ndarray
    site_mean: np.ndarray
    site_max: np.ndarray


def block_site_table(um: np.ndarray, mask: np.ndarray, layout: UnitLayout) -> BlockSiteTable:
    """Items 1-5 of the study from UnitMem (U,), U10 mask (U,) and where each unit sits."""
    blocks = layout.blocks
    b_idx = np.searchsorted(blocks, layout.block)
    n_b, n_s = len(blocks), len(layout.sites)
    key = b_idx * n_s + layout.site
    n_units, mean, mx = (a.reshape(n_b, n_s) for a in _group(um, key, n_b * n_s))
    u10 = np.bincount(key, weights=mask.astype(np.float64), minlength=n_b * n_s)
    u10 = u10.reshape(n_b, n_s).astype(np.int64)
    _, block_mean, block_max = _group(um, b_idx, n_b)
    site_units, site_mean, site_max = _group(um, layout.site, n_s)
    site_u10 = u10.sum(axis=0)
    # fc1 holds 4x the units of attn.proj / fc2: divide by the size ratio to the smallest
    # per-block site to compare layer types per unit (the study's "fc1 adjusted" bar); a top
    # site (one block's worth) is scaled up to that size the same way.
    inner = np.isin(np.arange(n_s), np.unique(layout.site[~layout.top])) & (site_units > 0)
    ratio = site_units / site_units[inner if inner.any() else site_units > 0].min()
    return BlockSiteTable(
        blocks=blocks, sites=layout.sites, n_units=n_units, u10=u10, mean=mean, max=mx,
        block_u10=u10.sum(axis=1), block_mean=block_mean, block_max=block_max,
        site_units=site_units, site_u10=site_u10, site_u10_adjusted=site_u10 / ratio,
        site_u10_frac=site_u10 / site_units, site_mean=site_mean, site_max=site_max)


def top_units_of_block(um: np.ndarray, layout: UnitLayout, block: int,
                       site: int | None = None, k: int = 10) -> np.ndarray:
    """The k highest-UnitMem units of one block (one site, or all when site is None).

    Returns:
      (<=k,) global unit indices, highest UnitMem first; ties by ascending unit index.
    """
    sel = layout.block == block
    if site is not None:
        sel &= layout.site == site
    units = np.flatnonzero(sel)
    return units[np.argsort(-um[units], kind="stable")[:k]]


@dataclasses.dataclass(frozen=True)
class SplitComparison:
    """NumMemUnits of the train vs the val samples: sums, per-sample means, their difference
    (train - val, the test statistic) and its two-sided permutation p-value (None: skipped)."""

    n_train: int
    n_val: int
    sum_train: float
    sum_val: float
    mean_train: float
    mean_val: float
    diff_mean: float
    p_value: float | None
    n_permutations: int
    seed: int


def split_comparison(nmu: np.ndarray, is_train: np.ndarray, n_permutations: int = 10_000,
                     seed: int = 0) -> SplitComparison:
    """Item 9: NumMemUnits summed over the train vs the val samples, with a permutation test.

    The split comes from each sample's own label, so unlike the study no validation sample
    is counted as training (it counted index N/2, the first val sample, as train).

    Permuting the split labels makes the train set a uniformly random n_train-subset, and
    its sum depends only on how many samples of each distinct NumMemUnits value it draws:
    a multivariate hypergeometric draw. Sampling those counts directly is exactly the
    permutation distribution, at a cost of (distinct values) instead of N per permutation
    (d16 D_all: 16,384 samples, a few hundred distinct counts).

    Args:
      nmu: (N,) NumMemUnits over D_all.
      is_train: (N,) bool, True for D' samples.
      n_permutations: random relabellings (split sizes kept); 0 skips the test.
      seed: numpy Generator seed, fixed for reproducibility.

    Returns:
      SplitComparison; p_value = (1 + #|d_perm| >= |d|) / (1 + n_permutations).
    """
    x = np.asarray(nmu, np.float64)
    t = np.asarray(is_train, bool)
    n_tr, n_va = int(t.sum()), int((~t).sum())
    if n_tr == 0 or n_va == 0:
        raise ValueError("split_comparison needs both train and val samples")
    s_tr, s_va = float(x[t].sum()), float(x[~t].sum())
    diff = s_tr / n_tr - s_va / n_va
    total = x.sum()
    p_value = None
    if n_permutations > 0:
        rng = np.random.default_rng(seed)
        values, counts = np.unique(x, return_counts=True)
        chunk = max(1, 2_000_000 // len(values))  # bounds the (chunk, values) count matrix
        hits, done = 0, 0
        while done < n_permutations:
            m = min(chunk, n_permutations - done)
            drawn = rng.multivariate_hypergeometric(counts, n_tr, size=m)
            s = drawn @ values
            d = s / n_tr - (total - s) / n_va
            # A relative tolerance so that exact ties (e.g. all counts equal) are counted.
            hits += int(np.count_nonzero(np.abs(d) >= abs(diff) * (1 - 1e-12) - 1e-12))
            done += m
        p_value = (1 + hits) / (1 + n_permutations)
    return SplitComparison(n_tr, n_va, s_tr, s_va, s_tr / n_tr, s_va / n_va, diff, p_value,
                           int(n_permutations), int(seed))


@dataclasses.dataclass(frozen=True)
class Correlation:
    """Spearman's rho, its p-value (NaN when undefined, e.g. constant input), samples used."""

    rho: float
    p_value: float
    n: int


def loss_correlation(loss: np.ndarray, nmu: np.ndarray) -> Correlation:
    """Spearman rank correlation of per-sample teacher-forced loss and NumMemUnits.

    Args:
      loss: (N,) loss per sample (NaN where unknown: those samples are dropped).
      nmu: (N,) NumMemUnits.

    Returns:
      Correlation.
    """
    from scipy import stats as sps

    loss = np.asarray(loss, np.float64)
    ok = np.isfinite(loss)
    n = int(ok.sum())
    if n < 3 or np.ptp(loss[ok]) == 0 or np.ptp(np.asarray(nmu)[ok]) == 0:
        return Correlation(float("nan"), float("nan"), n)
    res = sps.spearmanr(loss[ok], np.asarray(nmu)[ok])
    return Correlation(float(res.statistic), float(res.pvalue), n)


@dataclasses.dataclass(frozen=True, eq=False)
class PerScaleView:
    """UnitMem from each scale's tokens alone: `um` (K, U), `threshold` (K,), `u10` and
    `mean` (K, sites), `overlap` (K,) share of each scale's U_q also in the overall U_q (or None)."""

    um: np.ndarray
    threshold: np.ndarray
    u10: np.ndarray
    mean: np.ndarray
    overlap: np.ndarray | None


def per_scale_view(scale_stats: UnitStats, layout: UnitLayout, q: float = 90.0,
                   overall_mask: np.ndarray | None = None) -> PerScaleView:
    """UnitMem computed from each scale's tokens alone (per-resolution memorization).

    Args:
      scale_stats: UnitStats with arrays of shape (K, U).
      layout: where each unit sits.
      q: percentile defining each scale's U_q.
      overall_mask: optional (U,) bool U10 of the all-token UnitMem, for the overlap.

    Returns:
      PerScaleView.
    """
    um = unitmem_mean(scale_stats)
    mask, thr = top_units(um, q)
    n_s = len(layout.sites)
    u10 = np.stack([np.bincount(layout.site, weights=m.astype(float), minlength=n_s) for m in mask])
    mean = np.stack([_group(row, layout.site, n_s)[1] for row in um])
    overlap = None
    if overall_mask is not None:
        overlap = (mask & overall_mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
    return PerScaleView(um, thr, u10.astype(np.int64), mean, overlap)
