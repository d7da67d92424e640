"""Planted memorization: does UnitMem single out the canaries the model was trained on?

For a run recorded on the `planted` set (samples.csv sources `planted:canary/...`,
`planted:single/...`, `planted:heldout/...`; varjax/data/planted.py), compares canaries
(by duplication count), singletons and held-out images on
  - NumMemUnits over U10, UnitMem computed on D_all = members + held-out (the metric the
    pipeline reports, on the one dataset where every group is present),
  - the per-unit argmax counts (NumMemUnits over ALL units, D_all),
  - NumMemUnits over U10 of D' = the members alone (the study's dataset; no held-out),
  - the teacher-forced loss (per_sample.csv),
  - the UnitMem of the units each group singles out (the units whose D_all argmax is in it),
with two-sided Mann-Whitney U tests and permutation tests on the difference of means between
groups, the AUC (P(a canary's value > a singleton's), ties counted half), Spearman's rho of
each metric against the number of training copies (held-out 0, singleton 1, canaries 4..64),
and where the canaries rank by NumMemUnits. Metrics come from `varjax.unitmem`; this module
only groups and tests. `PlantedAnalysis.to_json()` is the content of `planted.json`.

Shape letters (varjax.names): N samples, U units.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from varjax import unitmem
from varjax.analysis.rundir import RunData
from varjax.data.planted import default_checkpoint, parse_role
from varjax.errors import AnalysisError

OUTPUT = "planted.json"
FIGURE = "figures/planted_separation.png"
# (metric key, label, which way memorization should push it)
METRICS = (("nmu_u10", "NumMemUnits, U10(D_all)", "higher"),
           ("nmu_all", "argmax count, all units (D_all)", "higher"),
           ("nmu_u10_members", "NumMemUnits, U10(D')", "higher"),
           ("loss", "teacher-forced loss (nats/token)", "lower"))
LABELS = {k: label for k, label, _ in METRICS}
PAIRS = (("canary", "single"), ("canary", "heldout"), ("single", "heldout"))
SINGLED_OUT = "unitmem_of_singled_out"  # the fifth test: UnitMem of the units a group singles out


@dataclasses.dataclass(frozen=True)
class GroupTest:
    """Group a vs group b: sizes, means, AUC = U / (n_a n_b), Mann-Whitney p, permutation p
    on the difference of means. The statistics are None when a group is empty."""

    n_a: int
    n_b: int
    mean_a: float | None
    mean_b: float | None
    auc: float | None
    u: float | None
    p_mannwhitney: float | None
    diff_mean: float | None
    p_permutation: float | None


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """One role (held-out, singletons, canaries by copies): size, copies, per metric
    (mean, median) (None where no value), and the units it singles out."""

    n: int
    training_copies: int
    metrics: dict[str, tuple[float | None, float | None]]
    units_singled_out: int
    units_singled_out_in_u10: int
    unitmem_of_singled_out: float | None


@dataclasses.dataclass(frozen=True)
class Canary:
    sample: int
    source: str
    label: int
    dup: int
    nmu_u10: int
    nmu_all: int
    rank: int  # by NumMemUnits over U10 (D_all), 1 = highest; ties by sample id
    loss: float | None


@dataclasses.dataclass(frozen=True, eq=False)
class PlantedArrays:
    """Per-sample values behind the figure: role names, each sample's group, metric values."""

    names: list[str]
    group: np.ndarray
    metric: dict[str, np.ndarray]
    um: np.ndarray
    unit_group: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class PlantedAnalysis:
    """The planted-memorization tests of one run (planted.json: `to_json`)."""

    quantile: float
    threshold: float
    u10_count: int
    n_units: int
    groups: dict[str, GroupStats]
    tests: dict[str, dict[str, GroupTest]]  # metric (or SINGLED_OUT) -> "a vs b" -> test
    dose_response: dict[str, dict[str, unitmem.Correlation]]  # metric -> all / members
    canaries: tuple[Canary, ...]
    canaries_in_top: tuple[int, float, float]  # k = canaries, found among the top k, by chance
    n_permutations: int
    seed: int
    model: dict | None  # the checkpoint's planted.json: what was planted, how it was trained
    arrays: PlantedArrays

    def label(self, key: str) -> str:
        return LABELS.get(key, "UnitMem of the units singled out")

    def to_json(self) -> dict[str, Any]:
        """planted.json's content (plain Python; NaN becomes None)."""
        k, found, chance = self.canaries_in_top
        out = {
            "what": "canaries (duplicated in training) vs singletons vs held-out images of the planted set",
            "quantile": self.quantile, "threshold": self.threshold, "u10_count": self.u10_count,
            "n_units": self.n_units,
            "datasets": {"d_all": "members + held-out (U10, NumMemUnits, argmax counts)",
                         "members": "members alone, the study's D' (nmu_u10_members)"},
            "metrics": {key: {"label": label, "memorization_makes_it": way} for key, label, way in METRICS},
            "groups": {g: {"n": v.n, "training_copies": v.training_copies,
                           **{m: {"mean": mean, "median": med} for m, (mean, med) in v.metrics.items()},
                           "units_singled_out": v.units_singled_out,
                           "units_singled_out_in_u10": v.units_singled_out_in_u10,
                           "unitmem_of_singled_out": v.unitmem_of_singled_out}
                       for g, v in self.groups.items()},
            "tests": {m: {pair: dataclasses.asdict(t) for pair, t in pairs.items()}
                      for m, pairs in self.tests.items()},
            "dose_response": {m: {w: dataclasses.asdict(c) for w, c in r.items()}
                              for m, r in self.dose_response.items()},
            "canaries": [dataclasses.asdict(c) for c in self.canaries],
            "canaries_in_top": {"k": k, "found": found, "expected_by_chance": chance},
            "n_permutations": self.n_permutations, "seed": self.seed, "model": self.model,
            "figure": FIGURE,
        }
        return json.loads(json.dumps(_plain(out), allow_nan=False))


def _plain(x: Any) -> Any:
    """numpy -> Python, NaN/inf -> None."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def is_planted(data: RunData) -> bool:
    """True when samples.csv names planted images."""
    return any(s.startswith("planted:") for s in data.source)


def _group_name(kind: str, dup: int) -> str:
    return f"canary dup{dup}" if kind == "canary" else kind


def _test(a: np.ndarray, b: np.ndarray, n_permutations: int, seed: int) -> GroupTest:
    """Two-sided Mann-Whitney U and permutation test of mean(a) - mean(b); AUC = U / (na nb)."""
    from scipy import stats as sps

    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    base = dict(n_a=len(a), n_b=len(b), mean_a=float(a.mean()) if len(a) else None,
                mean_b=float(b.mean()) if len(b) else None)
    if len(a) == 0 or len(b) == 0:
        return GroupTest(**base, auc=None, u=None, p_mannwhitney=None, diff_mean=None, p_permutation=None)
    if np.ptp(np.concatenate([a, b])) == 0:  # all equal: no evidence either way
        return GroupTest(**base, auc=0.5, u=len(a) * len(b) / 2, p_mannwhitney=1.0, diff_mean=0.0,
                         p_permutation=1.0)
    mw = sps.mannwhitneyu(a, b, alternative="two-sided")
    # split_comparison is the study's train-vs-val permutation test; any two groups fit it.
    perm = unitmem.split_comparison(np.concatenate([a, b]), np.arange(len(a) + len(b)) < len(a),
                                    n_permutations, seed)
    return GroupTest(**base, auc=float(mw.statistic) / (len(a) * len(b)), u=float(mw.statistic),
                     p_mannwhitney=float(mw.pvalue), diff_mean=perm.diff_mean, p_permutation=perm.p_value)


def _found_in_top(values: np.ndarray, hit: np.ndarray, k: int) -> float:
    """How many `hit` samples are among the k highest values, ties at the cut shared evenly.

    (A sample-id tie-break would make the count depend on where the canaries sit in id order
    whenever the k-th value is shared, e.g. by many zeros.)
    """
    if k == 0:
        return 0.0
    v_k = np.sort(values)[::-1][k - 1]
    above, at = values > v_k, values == v_k
    share = (k - above.sum()) / at.sum()
    return float(np.sum(hit & above) + share * np.sum(hit & at))


def training_info(run_info: dict | None, checkpoint: Path | None) -> dict | None:
    """planted.json of the model's checkpoint: --checkpoint, run.json's, or the shipped one."""
    candidates = [(checkpoint, "argument")] if checkpoint is not None else []
    stack = [run_info] if run_info else []
    while stack:  # a "checkpoint" key anywhere in run.json
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("checkpoint"), str):
                candidates.append((Path(node["checkpoint"]), "run.json"))
            stack.extend(node.values())
    # Last resort, and said so: the run names no checkpoint, so assume the shipped one.
    candidates.append((default_checkpoint(), "assumed: the shipped model (the run names no checkpoint)"))
    for c, how in candidates:
        if (Path(c) / OUTPUT).is_file():
            info = json.loads((Path(c) / OUTPUT).read_text())
            return {"checkpoint": str(c), "checkpoint_from": how, **{k: info.get(k) for k in (
                "data", "training", "model", "tokenizer", "augmentation", "params_sha256", "command")}}
    return None


def _roles(data: RunData) -> tuple[np.ndarray, np.ndarray]:
    """(kind, dup) per sample; refuses a run that mixes planted and other images."""
    roles = [parse_role(s) for s in data.source]
    bad = [s for s, r in zip(data.source, roles) if r is None]
    if bad:
        raise AnalysisError(f"samples.csv mixes planted and other sources (e.g. {bad[0]!r})")
    kind = np.array([r.kind for r in roles])
    if "train" not in data.stats:
        raise AnalysisError("a planted run needs the members (split train)")
    if np.any((kind == "heldout") != (data.split == "val")):
        raise AnalysisError("planted roles and splits disagree (held-out images must be the val split)")
    return kind, np.array([r.dup for r in roles], np.int64)


def _metrics(data: RunData, q: float):
    """D_all UnitMem, U10 and the four per-sample metrics."""
    st_all = unitmem.combine_stats(*[data.stats[s] for s in ("train", "val") if s in data.stats])
    um = unitmem.unitmem_mean(st_all)
    mask, thr = unitmem.top_units(um, q)
    ids = data.ids
    metric = {"nmu_u10": unitmem.num_mem_units(st_all.argmax, mask, ids).astype(np.float64),
              "nmu_all": unitmem.num_mem_units(st_all.argmax, np.ones_like(mask), ids).astype(np.float64)}
    members = data.split == "train"
    st_m = data.stats["train"]
    mask_m, _ = unitmem.top_units(unitmem.unitmem_mean(st_m), q)
    metric["nmu_u10_members"] = np.full(len(ids), np.nan)
    metric["nmu_u10_members"][members] = unitmem.num_mem_units(st_m.argmax, mask_m, ids[members])
    metric["loss"] = data.loss if data.loss is not None else np.full(len(ids), np.nan)
    return st_all, um, mask, float(thr), metric


def _group_stats(names, group, dup, metric, um, mask, unit_group) -> dict[str, GroupStats]:
    def mean_median(v: np.ndarray) -> tuple[float | None, float | None]:
        if not np.isfinite(v).any():
            return None, None
        return float(np.nanmean(v)), float(np.nanmedian(v))

    out = {}
    for g in names:
        sel = group == g
        if not sel.any():
            continue
        u = unit_group == g
        out[g] = GroupStats(int(sel.sum()), int(dup[sel][0]), {k: mean_median(v[sel]) for k, v in metric.items()},
                            int(u.sum()), int((u & mask).sum()), float(um[u].mean()) if u.any() else None)
    return out


def _canaries(data: RunData, kind, dup, metric) -> tuple[tuple[Canary, ...], tuple[int, float, float]]:
    """Where the canaries rank among all samples by NumMemUnits (ties: ascending sample id)."""
    ids = data.ids
    order = unitmem.rank_samples(metric["nmu_u10"].astype(np.int64), ids)
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(1, len(ids) + 1)
    canaries = np.flatnonzero(kind == "canary")
    n_c = len(canaries)
    loss = metric["loss"]
    rows = sorted((Canary(int(ids[i]), data.source[i], int(data.label[i]), int(dup[i]),
                          int(metric["nmu_u10"][i]), int(metric["nmu_all"][i]), int(rank[i]),
                          None if not np.isfinite(loss[i]) else float(loss[i])) for i in canaries),
                  key=lambda r: (r.dup, r.sample))
    return tuple(rows), (n_c, _found_in_top(metric["nmu_u10"], kind == "canary", n_c), n_c * n_c / len(ids))


def analyze_planted(data: RunData, checkpoint: Path | None = None, q: float = 90.0,
                    n_permutations: int = 10_000, seed: int = 0,
                    log: Callable[[str], None] | None = None) -> PlantedAnalysis | None:
    """Compares canaries, singletons and held-out images of a planted run.

    Args:
      data: the run's files (`load_run`).
      checkpoint: the model's checkpoint directory, for what was planted (default: a
        "checkpoint" path in run.json, else the shipped model's).
      q: percentile defining U10.
      n_permutations: permutations per permutation test (0 skips them).
      seed: seed of the permutation tests.
      log: optional progress callback.

    Returns:
      The tests, or None when samples.csv names no planted image.
    Raises:
      AnalysisError: planted and other sources mixed, or roles and splits disagree.
    """
    say = log or (lambda msg: None)
    if not is_planted(data):
        return None
    kind, dup = _roles(data)
    say("planted: UnitMem on D_all and D'")
    st_all, um, mask, thr, metric = _metrics(data, q)
    names = ["heldout", "single"] + [_group_name("canary", d) for d in sorted(set(dup[kind == "canary"]))]
    group = np.array([_group_name(k, d) for k, d in zip(kind, dup)])
    # The units each group singles out: D_all argmax in the group.
    argmax_pos = unitmem.sample_positions(data.ids, st_all.argmax)
    unit_group, unit_kind = group[argmax_pos], kind[argmax_pos]

    say(f"planted: tests ({n_permutations} permutations each)")
    tests = {key: {f"{a} vs {b}": _test(metric[key][kind == a], metric[key][kind == b], n_permutations, seed)
                   for a, b in PAIRS} for key, _, _ in METRICS}
    tests[SINGLED_OUT] = {f"{a} vs {b}": _test(um[unit_kind == a], um[unit_kind == b], n_permutations, seed)
                          for a, b in PAIRS}
    copies, members = dup.astype(np.float64), data.split == "train"
    # Spearman of each metric with the copies (samples where the metric is NaN dropped)
    dose = {key: {"all": unitmem.loss_correlation(metric[key], copies),
                  "members": unitmem.loss_correlation(metric[key][members], copies[members])}
            for key, _, _ in METRICS}
    canaries, in_top = _canaries(data, kind, dup, metric)
    return PlantedAnalysis(
        quantile=q, threshold=thr, u10_count=int(mask.sum()), n_units=int(len(um)),
        groups=_group_stats(names, group, dup, metric, um, mask, unit_group), tests=tests,
        dose_response=dose, canaries=canaries, canaries_in_top=in_top, n_permutations=n_permutations,
        seed=seed, model=training_info(data.run_info, checkpoint),
        arrays=PlantedArrays(names, group, metric, um, unit_group))


def summary_text(p: PlantedAnalysis) -> str:
    """A few lines: group means and the canary-vs-singleton and canary-vs-held-out tests."""
    def num(x: float | None, fmt: str) -> str | None:
        return None if x is None or not math.isfinite(x) else format(x, fmt)

    lines = [f"{'group':<14}{'n':>4}  " + "  ".join(f"{k:>16}" for k, _, _ in METRICS)]
    for g, v in p.groups.items():
        lines.append(f"{g:<14}{v.n:>4}  " + "  ".join(
            f"{num(v.metrics[k][0], '>16.3f') or format('n/a', '>16')}" for k, _, _ in METRICS))
    for k, _, _ in METRICS:
        for pair, t in p.tests[k].items():
            if t.auc is not None:
                perm = "n/a" if t.p_permutation is None else f"{t.p_permutation:.3g}"
                lines.append(f"{k:<16} {pair:<18} AUC {t.auc:.3f}  p_MW {t.p_mannwhitney:.3g}  p_perm {perm}")
    for k, r in p.dose_response.items():
        a, m = r["all"], r["members"]
        if math.isfinite(a.rho) and math.isfinite(m.rho):
            lines.append(f"{k:<16} Spearman vs training copies: all rho {a.rho:.3f} (p {a.p_value:.3g}), "
                         f"members rho {m.rho:.3f} (p {m.p_value:.3g})")
    k, found, chance = p.canaries_in_top
    lines.append(f"canaries among the top {k} by NumMemUnits: {found:.2f} (chance {chance:.2f})")
    return "\n".join(lines)


def seed_entry(p: PlantedAnalysis) -> dict[str, Any]:
    """One training seed's line of varjax/assets/planted/seeds.json: what the sensitivity
    test's margins (tests/conftest.py) are checked against, rounded for reading."""
    def test(t: GroupTest) -> dict[str, Any]:
        return {"auc": None if t.auc is None else round(t.auc, 4),
                "p_mannwhitney": None if t.p_mannwhitney is None else float(f"{t.p_mannwhitney:.3g}"),
                "p_permutation": t.p_permutation}

    def rho(c: unitmem.Correlation) -> dict[str, float | None]:
        ok = math.isfinite(c.rho)
        return {"rho": round(c.rho, 4) if ok else None, "p": float(f"{c.p_value:.3g}") if ok else None}

    k, found, _ = p.canaries_in_top
    return {
        "params_sha256": (p.model or {}).get("params_sha256"),
        "mean_nmu_u10": {g: v.metrics["nmu_u10"][0] for g, v in p.groups.items()},
        "mean_loss": {g: None if v.metrics["loss"][0] is None else round(v.metrics["loss"][0], 4)
                      for g, v in p.groups.items()},
        "canaries_nmu_u10": {c.source: c.nmu_u10 for c in p.canaries},
        f"canaries_in_top{k}": found,
        **{m: {pair: test(t) for pair, t in pairs.items() if t.auc is not None} for m, pairs in p.tests.items()},
        "spearman_vs_copies": {m: {w: rho(c) for w, c in r.items()} for m, r in p.dose_response.items()},
    }
