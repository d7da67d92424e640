"""Unit interventions: which units to scale down, their random control, and the tests.

No upstream counterpart (upstream VAR has no interventions). The published intervention
(Kasliwal, Boenisch, Dziedzic 2025; docs/memorization.md) computes UnitMem on the `ffn.fc1`
units, multiplies the incoming weights of the top-k% by 0.5 (biases kept) and measures
extraction and FID before and after. The paper does not say whether top-k% is taken over
all fc1 units at once or within each layer; both are here (`SCOPES`): "global" (the
default: one ranking over every unit of the chosen sites, as the run's U10 is one
percentile over all units) and "layer" (the top k% of each (site, block) separately).

An honest result needs a control: `control_draws` gives random units with the same count
per (site, block) as the chosen set, drawn uniformly from all units of that cell (a draw may
share units with the chosen set: it is the null "any units of these layers").

Everything here is numpy on small arrays (UnitMem per unit, per-sample effects); running the
scaled model lives in `varjax.intervene`. Shape letters (varjax.names): N samples, U units.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from varjax.errors import InterventionError
from varjax.names import UnitLayout
from varjax.unitmem import top_count

SCOPES = ("global", "layer")


def candidates(layout: UnitLayout, sites: tuple[str, ...]) -> np.ndarray:
    """(n,) ids of the units at `sites` (in unit order); InterventionError if a site is missing."""
    missing = [s for s in sites if s not in layout.sites]
    if missing:
        raise InterventionError(f"site(s) {', '.join(missing)} not recorded in this run "
                                f"(it has {', '.join(layout.sites)})")
    return np.flatnonzero(layout.select(tuple(sites))[1])


def _cells(layout: UnitLayout, units: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """(site, block) -> the ids among `units` in that cell, ascending."""
    units = np.sort(np.asarray(units, np.int64))
    keys = np.stack([layout.site[units], layout.block[units]], axis=1)
    out: dict[tuple[int, int], np.ndarray] = {}
    for key in sorted({(int(s), int(b)) for s, b in keys}):
        out[key] = units[(keys[:, 0] == key[0]) & (keys[:, 1] == key[1])]
    return out


def _top(um: np.ndarray, units: np.ndarray, n: int) -> np.ndarray:
    """The n units of `units` with the highest UnitMem; ties to the lower unit id."""
    order = np.lexsort((units, -um[units]))
    return np.sort(units[order[:n]])


def choose_top(um: np.ndarray, layout: UnitLayout, sites: tuple[str, ...], percent: float,
               scope: str = "global") -> np.ndarray:
    """The top `percent` % of the units at `sites` by UnitMem.

    Args:
      um: (U,) UnitMem of every unit of the run.
      layout: the run's unit layout; sites: the sites to choose from.
      percent: in (0, 100]; floor(n * percent / 100) units (at least one).
      scope: "global" (one ranking over all candidate units) or "layer" (the top percent of
        each (site, block) separately, at least one each).
    Returns:
      (n,) ascending unit ids.
    """
    if not 0 < percent <= 100:
        raise InterventionError(f"top percent must be in (0, 100], got {percent}")
    if scope not in SCOPES:
        raise InterventionError(f"scope {scope!r}: expected one of {', '.join(SCOPES)}")
    cand = candidates(layout, sites)
    if scope == "global":
        return _top(um, cand, max(1, top_count(len(cand), percent / 100)))
    return np.concatenate([_top(um, cell, max(1, top_count(len(cell), percent / 100)))
                           for cell in _cells(layout, cand).values()])


def own_units(argmax: np.ndarray, chosen: np.ndarray, sample_id: int) -> np.ndarray:
    """The chosen units whose argmax is this sample (its memorizing units among them)."""
    chosen = np.asarray(chosen, np.int64)
    return chosen[np.asarray(argmax)[chosen] == sample_id]


def cell_counts(layout: UnitLayout, units: np.ndarray) -> dict[tuple[str, int], int]:
    """(site name, block) -> how many of `units` sit there."""
    return {(layout.sites[s], b): len(u) for (s, b), u in _cells(layout, units).items()}


def own_targets(argmax: np.ndarray, chosen: np.ndarray, sample_ids: np.ndarray, n: int) -> list[tuple[int, np.ndarray]]:
    """The n samples owning the most chosen units (argmax = the sample; ties to the lower id),
    each with its own units; samples owning none are never targets.

    Args:
      argmax: (U,) sample id maximally activating each unit (D'); chosen: unit ids;
      sample_ids: the candidate samples (D'); n: how many targets.
    Returns:
      [(sample id, its own unit ids ascending), ...], most units first.
    """
    ids = np.asarray(sample_ids, np.int64)
    owners = np.asarray(argmax)[np.asarray(chosen, np.int64)]
    counts = np.array([(owners == i).sum() for i in ids])
    order = [p for p in np.lexsort((ids, -counts)) if counts[p] > 0][:n]
    return [(int(ids[p]), own_units(argmax, chosen, int(ids[p]))) for p in order]


def control_draws(layout: UnitLayout, chosen: np.ndarray, n_draws: int, seed: int = 0,
                  stream: tuple[int, ...] = ()) -> list[np.ndarray]:
    """Random unit sets with the chosen set's count in every (site, block).

    Draw d takes, in each cell, that many units uniformly without replacement from all the
    cell's units, from `np.random.default_rng([seed, *stream, d])` alone (draw d is the same
    whatever n_draws is; `stream` keeps the draws of different targets apart).
    Returns:
      n_draws arrays of ascending unit ids, each as long as `chosen`.
    """
    if n_draws < 0:
        raise InterventionError(f"control draws must be >= 0, got {n_draws}")
    cells = _cells(layout, chosen)
    out = []
    for d in range(n_draws):
        rng = np.random.default_rng([seed, *stream, d])
        picks = []
        for (s, b), units in cells.items():
            pool = np.flatnonzero((layout.site == s) & (layout.block == b))
            picks.append(rng.choice(pool, size=len(units), replace=False))
        out.append(np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64))
    return out


def scaling_units(layout: UnitLayout, units: np.ndarray, factor: float) -> tuple[tuple[str, int, int, float], ...]:
    """(site, block, index, factor) of each unit: the argument of varjax.scaling.UnitScaling."""
    return tuple((layout.sites[int(layout.site[u])], int(layout.block[u]), int(layout.index[u]), float(factor))
                 for u in np.asarray(units, np.int64))


@dataclasses.dataclass(frozen=True)
class PermutationTest:
    """A difference of means and its two-sided permutation p-value (None: not testable).

    statistic: mean(a) - mean(b) (two-sample) or mean(d) (paired, sign flips).
    p_value: (1 + #{|permuted| >= |observed|}) / (1 + permutations); None when a group is empty.
    """

    kind: str
    n_a: int
    n_b: int
    statistic: float | None
    p_value: float | None
    n_permutations: int
    seed: int


def _p_two_sided(null: np.ndarray, obs: float) -> float:
    # A relative tolerance so that exact ties (e.g. every value equal) count as extreme.
    return float((1 + np.count_nonzero(np.abs(null) >= abs(obs) * (1 - 1e-12) - 1e-12)) / (1 + len(null)))


def two_sample_test(a: np.ndarray, b: np.ndarray, n_permutations: int = 10_000, seed: int = 0) -> PermutationTest:
    """mean(a) - mean(b), group labels permuted (sizes kept)."""
    a, b = (np.asarray(x, np.float64) for x in (a, b))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return PermutationTest("two-sample", len(a), len(b), None, None, n_permutations, seed)
    obs = float(a.mean() - b.mean())
    p = None
    if n_permutations > 0:
        pooled = np.concatenate([a, b])
        rng = np.random.default_rng(seed)
        perm = rng.permuted(np.tile(pooled, (n_permutations, 1)), axis=1)
        null = perm[:, :len(a)].mean(axis=1) - perm[:, len(a):].mean(axis=1)
        p = _p_two_sided(null, obs)
    return PermutationTest("two-sample", len(a), len(b), obs, p, n_permutations, seed)


def paired_test(d: np.ndarray, n_permutations: int = 10_000, seed: int = 0) -> PermutationTest:
    """mean(d) of paired differences against 0, by random sign flips."""
    d = np.asarray(d, np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return PermutationTest("paired", 0, 0, None, None, n_permutations, seed)
    obs = float(d.mean())
    p = None
    if n_permutations > 0:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_permutations, len(d)))
        p = _p_two_sided((signs * d).mean(axis=1), obs)
    return PermutationTest("paired", len(d), len(d), obs, p, n_permutations, seed)


def rank_among_controls(chosen: float, controls: np.ndarray) -> float | None:
    """(1 + #{control >= chosen}) / (1 + draws): the one-sided p-value of the chosen set's
    effect against the control draws (None without draws or a value)."""
    c = np.asarray(controls, np.float64)
    c = c[np.isfinite(c)]
    if len(c) == 0 or chosen is None or not np.isfinite(chosen):
        return None
    return float((1 + np.count_nonzero(c >= chosen)) / (1 + len(c)))
