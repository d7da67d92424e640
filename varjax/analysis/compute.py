"""Every number of the report, computed once from a run's files: `compute(run) -> Analysis`.

The study's items 1-8 on D' (split `train`), item 9 and the dataset numbers on D_all =
D' + D_val when val samples are present, and what goes beyond the study (the other mu_-max
variant, loss vs NumMemUnits, the per-scale view, the planted-memorization tests on a
planted run, and the study's open questions: class influence, diversity by depth with its
test, where U10 sits by scale and depth). Metrics come from `varjax.unitmem` and
`varjax.beyond`; this module picks the datasets and keeps the results as frozen dataclasses.

Shape letters (varjax.names): N samples, U units, K scales.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from varjax import beyond, unitmem
from varjax.analysis.extraction import ExtractionAnalysis, analyze_extraction, nmu_of
from varjax.analysis.mia import MembershipAnalysis, analyze_membership
from varjax.analysis.planted import PlantedAnalysis, analyze_planted
from varjax.analysis.rundir import RunData
from varjax.errors import AnalysisError

VARIANTS = ("mean", "median")
N_FIG8_BLOCKS = 4  # item 8: blocks 0, 5, 10, 15 of d16
N_TOP_SAMPLES = 20  # item 7


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetResult:
    """Items 1-6 on one dataset (D' or D_all).

    Attributes:
      ids: (N,) its sample ids; um: (U,) UnitMem; mask: (U,) U10; threshold: the P_q value.
      nmu: (N,) NumMemUnits over U10; coverage: item 6; curve: (x, y) the coverage curve.
      table: items 1-5 per block and site.
    """

    ids: np.ndarray
    um: np.ndarray
    mask: np.ndarray
    threshold: float
    nmu: np.ndarray
    coverage: unitmem.Coverage
    curve: tuple[np.ndarray, np.ndarray]
    table: unitmem.BlockSiteTable

    @property
    def u10_count(self) -> int:
        return int(self.mask.sum())

    def top_samples(self, n: int = N_TOP_SAMPLES) -> np.ndarray:
        """Positions (into ids) of the n samples with the highest NumMemUnits (ties: lower id)."""
        return unitmem.rank_samples(self.nmu, self.ids)[:n]


@dataclasses.dataclass(frozen=True, eq=False)
class DAllResult:
    """Item 9: D_all = D' + D_val, and NumMemUnits of D' vs D_val (all units and U10(D_all))."""

    dataset: DatasetResult
    comparison_all: unitmem.SplitComparison
    comparison_u10: unitmem.SplitComparison


@dataclasses.dataclass(frozen=True, eq=False)
class Analysis:
    """What the report says about one run directory.

    Attributes:
      data: the run's files; variant: "mean" or "median"; q: the U10 percentile; top_k:
        units per block for item 8 and the diversity measure.
      primary: the split taken as D'; rows: (N,) its positions in `data`.
      d_prime: items 1-6 on D'; argmax_row: (U,) position in `data` of each unit's argmax.
      fc1: index of the `ffn.fc1` site (item 8 uses it), or None.
      top_units: {block: (<= top_k,) unit ids}, the highest-UnitMem fc1 units of evenly
        spread blocks (item 8).
      diversity: diversity by depth of the top_k units per block with its permutation test,
        one per site and the last over all per-block sites ("all sites").
      classes: class influence on D' (U10 argmax classes vs the classes' share of samples).
      loss: Spearman of per-sample loss and NumMemUnits on D' (None without per_sample.csv).
      per_scale, scale_labels: the per-scale view (None without per-scale statistics).
      scale_depth: U10 by scale and depth and its centre of mass per scale (None as per_scale).
      other_variant: (name, D' result) of the other mu_-max variant (None without the matrix).
      d_all: item 9 (None without val samples).
      planted: the planted-memorization tests (None unless the run is planted).
      membership: members vs non-members by every per-sample score (None without
        membership.csv or without val samples).
      extraction: the extraction job's rates (None without extraction.csv).
    """

    data: RunData
    variant: str
    q: float
    top_k: int
    primary: str
    rows: np.ndarray
    d_prime: DatasetResult
    argmax_row: np.ndarray
    fc1: int | None
    top_units: dict[int, np.ndarray]
    diversity: tuple[beyond.DiversityTest, ...]
    classes: beyond.ClassInfluence
    loss: unitmem.Correlation | None
    per_scale: unitmem.PerScaleView | None
    scale_labels: list[str] | None
    scale_depth: beyond.ScaleDepthProfile | None
    other_variant: tuple[str, DatasetResult] | None
    d_all: DAllResult | None
    planted: PlantedAnalysis | None
    membership: MembershipAnalysis | None = None
    extraction: ExtractionAnalysis | None = None

    @property
    def diversity_all(self) -> beyond.DiversityTest:
        """Diversity by depth over every per-block site."""
        return self.diversity[-1]

    @property
    def fc1_name(self) -> str:
        """The site item 8 draws from: fc1, or "all sites" without it."""
        return self.data.layout.sites[self.fc1] if self.fc1 is not None else "all sites"


def dataset_result(stats: unitmem.UnitStats, um: np.ndarray, ids: np.ndarray, layout, q: float) -> DatasetResult:
    """Items 1-6 for one dataset: U10, NumMemUnits, coverage and the block/site table."""
    mask, thr = unitmem.top_units(um, q)
    try:
        nmu = unitmem.num_mem_units(stats.argmax, mask, ids)
    except ValueError as e:
        raise AnalysisError(f"stats argmax does not match samples.csv: {e}") from None
    return DatasetResult(ids, um, mask, float(thr), nmu, unitmem.coverage(nmu, ids),
                         unitmem.coverage_curve(nmu, ids), unitmem.block_site_table(um, mask, layout))


def fig8_blocks(blocks: np.ndarray) -> np.ndarray:
    """Evenly spread blocks for item 8: 0, 5, 10, 15 for d16; fewer when there are fewer."""
    idx = np.unique(np.round(np.linspace(0, len(blocks) - 1, N_FIG8_BLOCKS)).astype(int))
    return blocks[idx]


def _scale_labels(run_info: dict | None, k: int) -> list[str] | None:
    """'pn x pn' tick labels when run.json names patch_nums of the right length."""
    stack = [run_info] if run_info else []
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            pn = node.get("patch_nums")
            if isinstance(pn, list) and len(pn) == k:
                return [f"{p}x{p}" for p in pn]
            stack.extend(node.values())
    return None


def _unitmem_of(data: RunData, variant: str, stats: unitmem.UnitStats, rows: np.ndarray) -> np.ndarray:
    if variant == "mean":
        return unitmem.unitmem_mean(stats)
    return unitmem.unitmem_median(data.acts, data.acts_rows[rows])


def _d_all(data: RunData, variant: str, q: float, n_permutations: int, seed: int,
           say: Callable[[str], None]) -> DAllResult:
    say("D_all = D' + D_val")
    rows = np.flatnonzero(np.isin(data.split, ["train", "val"]))
    stats = unitmem.combine_stats(data.stats["train"], data.stats["val"])
    ds = dataset_result(stats, _unitmem_of(data, variant, stats, rows), data.ids[rows], data.layout, q)
    is_train = data.split[rows] == "train"
    # "All units": NumMemUnits counted over every unit, not only U10(D_all).
    every = unitmem.num_mem_units(stats.argmax, np.ones(data.layout.n_units, bool), data.ids[rows])
    say(f"D_all: permutation test, {n_permutations} permutations")
    return DAllResult(ds, unitmem.split_comparison(every, is_train, n_permutations, seed),
                      unitmem.split_comparison(ds.nmu, is_train, n_permutations, seed))


def _beyond(data: RunData, main: DatasetResult, argmax: np.ndarray, label_of_unit: np.ndarray,
            per_scale: unitmem.PerScaleView | None, q: float, top_k: int, n_permutations: int, seed: int,
            say: Callable[[str], None]):
    """The open questions on D': diversity tests per site, class influence, scale x depth."""
    layout = data.layout
    say(f"D': diversity by depth, class influence ({n_permutations} permutations each)")
    diversity = tuple(beyond.diversity_test(main.um, argmax, label_of_unit, layout, s, top_k, n_permutations, seed)
                      for s in [*range(len(layout.sites)), None])
    classes = beyond.class_influence(main.nmu, data.label[data.rows_of(data.primary)], n_permutations, seed)
    scale_depth = (beyond.scale_depth_profile(per_scale.um, layout, q, n_permutations, seed)
                   if per_scale is not None else None)
    return diversity, classes, scale_depth


def compute(data: RunData, variant: str = "mean", q: float = 90.0, top_k: int = 10,
            n_permutations: int = 10_000, seed: int = 0, planted: bool = True,
            log: Callable[[str], None] | None = None) -> Analysis:
    """All the numbers of the report for one run.

    Args:
      data: the run's files (`load_run`).
      variant: "mean" (the study's mu_-max) or "median" (needs activations.npy).
      q: percentile defining U10 (90 in the study).
      top_k: units per block for item 8 and the diversity measure.
      n_permutations: permutations of every permutation test (train/val on D_all, diversity,
        class influence, scale x depth, the planted tests); 0 skips them.
      seed: seed of those tests.
      planted: run the planted-memorization tests when the run is planted.
      log: optional progress callback (one line per step).
    """
    say = log or (lambda msg: None)
    if variant not in VARIANTS:
        raise AnalysisError(f"variant must be 'mean' or 'median', got {variant!r}")
    if variant == "median" and data.acts is None:
        raise AnalysisError("the median variant needs activations.npy (the full matrix)")
    planted_result = (analyze_planted(data, q=q, n_permutations=n_permutations, seed=seed, log=say)
                      if planted else None)
    primary = data.primary
    rows = data.rows_of(primary)
    ids, layout = data.ids[rows], data.layout
    say(f"D' ({primary}): {len(ids)} samples x {layout.n_units} units, {variant} variant")
    st = data.stats[primary]
    main = dataset_result(st, _unitmem_of(data, variant, st, rows), ids, layout, q)
    argmax_row = unitmem.sample_positions(data.ids, st.argmax)  # (U,) row of each unit's argmax
    label_of_unit = data.label[argmax_row]
    fc1 = layout.site_index("fc1")
    per_scale = labels = None
    if primary in data.scale_stats:
        per_scale = unitmem.per_scale_view(data.scale_stats[primary], layout, q, main.mask)
        labels = _scale_labels(data.run_info, per_scale.u10.shape[0])
    other = None
    if data.acts is not None:
        name = "median" if variant == "mean" else "mean"
        say(f"D': {name} variant for comparison")
        other = (name, dataset_result(st, _unitmem_of(data, name, st, rows), ids, layout, q))
    d_all = None
    if "val" in data.stats and primary == "train":
        d_all = _d_all(data, variant, q, n_permutations, seed, say)
    if data.membership is not None:
        say("membership inference")
    membership = analyze_membership(data, d_all.dataset.nmu if d_all else None,
                                    np.flatnonzero(np.isin(data.split, ["train", "val"])) if d_all else None)
    diversity, classes, scale_depth = _beyond(data, main, st.argmax, label_of_unit, per_scale, q, top_k,
                                              n_permutations, seed, say)
    a = Analysis(
        data=data, variant=variant, q=q, top_k=top_k, primary=primary, rows=rows, d_prime=main,
        argmax_row=argmax_row, fc1=fc1,
        top_units={int(b): unitmem.top_units_of_block(main.um, layout, int(b), fc1, top_k)
                   for b in fig8_blocks(layout.blocks_of(fc1))},
        diversity=diversity, classes=classes,
        loss=unitmem.loss_correlation(data.loss[rows], main.nmu) if data.loss is not None else None,
        per_scale=per_scale, scale_labels=labels, scale_depth=scale_depth, other_variant=other, d_all=d_all,
        planted=planted_result, membership=membership)
    return dataclasses.replace(a, extraction=analyze_extraction(data, nmu_of(a)))
