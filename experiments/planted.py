"""Planted memorization: does UnitMem single out the canaries the model was trained on?

For a run directory recorded on the `planted` set (samples.csv sources `planted:canary/...`,
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
and where the canaries rank by NumMemUnits. Metrics come from `varjax.unitmem`; this file
only groups and tests.

Writes `planted.json` and `figures/planted_separation.png` atomically. experiments/analyze.py
runs this on every planted run with its own settings, and its report has a "Planted
memorization" section.

    python experiments/planted.py RUN_DIR [--checkpoint DIR]           # a recorded run
    python experiments/planted.py RUN_DIR --record [--checkpoint DIR]  # record it first
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import report  # noqa: E402
from experiments.analyze import AnalysisError, _save_figure, load_run  # noqa: E402
from varjax import unitmem  # noqa: E402
from varjax.checkpoint import CheckpointError  # noqa: E402
from varjax.data.planted import default_checkpoint, parse_role  # noqa: E402
from varjax.record import RecordError  # noqa: E402
from varjax.runfiles import atomic_write_text, stderr_log  # noqa: E402

OUTPUT = "planted.json"
FIGURE = "figures/planted_separation.png"
# (metric key, label, which way memorization should push it)
METRICS = (("nmu_u10", "NumMemUnits, U10(D_all)", "higher"),
           ("nmu_all", "argmax count, all units (D_all)", "higher"),
           ("nmu_u10_members", "NumMemUnits, U10(D')", "higher"),
           ("loss", "teacher-forced loss (nats/token)", "lower"))
PAIRS = (("canary", "single"), ("canary", "heldout"), ("single", "heldout"))


def is_planted(run_dir: Path) -> bool:
    """True when samples.csv names planted images (read without loading anything else)."""
    path = Path(run_dir) / "samples.csv"
    if not path.is_file():
        return False
    with open(path, newline="") as f:
        return any(row.get("source", "").startswith("planted:") for row in csv.DictReader(f))


def _group_name(kind: str, dup: int) -> str:
    return f"canary dup{dup}" if kind == "canary" else kind


def _test(a: np.ndarray, b: np.ndarray, n_permutations: int, seed: int) -> dict:
    """Two-sided Mann-Whitney U and permutation test of mean(a) - mean(b); AUC = U / (na nb)."""
    from scipy import stats as sps

    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out = {"n_a": len(a), "n_b": len(b), "mean_a": float(a.mean()) if len(a) else None,
           "mean_b": float(b.mean()) if len(b) else None, "auc": None, "u": None, "p_mannwhitney": None,
           "diff_mean": None, "p_permutation": None}
    if len(a) == 0 or len(b) == 0:
        return out
    if np.ptp(np.concatenate([a, b])) == 0:  # all equal: no evidence either way
        return {**out, "auc": 0.5, "u": len(a) * len(b) / 2, "p_mannwhitney": 1.0, "diff_mean": 0.0,
                "p_permutation": 1.0}
    mw = sps.mannwhitneyu(a, b, alternative="two-sided")
    # split_comparison is the study's train-vs-val permutation test; any two groups fit it.
    perm = unitmem.split_comparison(np.concatenate([a, b]), np.arange(len(a) + len(b)) < len(a),
                                    n_permutations, seed)
    return {**out, "u": float(mw.statistic), "auc": float(mw.statistic) / (len(a) * len(b)),
            "p_mannwhitney": float(mw.pvalue), "diff_mean": perm["diff_mean"], "p_permutation": perm["p_value"]}


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


def _training_info(run_dir: Path, run_info: dict | None, checkpoint: Path | None) -> dict | None:
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


def analyze_planted(run_dir: Path, checkpoint: Path | None = None, q: float = 90.0,
                    n_permutations: int = 10_000, seed: int = 0,
                    log: Callable[[str], None] | None = None, data=None) -> dict | None:
    """Compares canaries, singletons and held-out images of a planted run; writes planted.json.

    Args:
      run_dir: a run directory recorded on the planted source (docs/design.md).
      checkpoint: the model's checkpoint directory, for what was planted (default: a
        "checkpoint" path in run.json, else the shipped model's).
      q: percentile defining U10.
      n_permutations: permutations per permutation test (0 skips them).
      seed: seed of the permutation tests.
      log: optional progress callback.
      data: the run's files as `analyze.load_run` reads them, if the caller has them already.

    Returns:
      The planted.json content, or None when samples.csv names no planted image.
    Raises:
      AnalysisError: unreadable run files, or planted and other sources mixed.
    """
    run_dir = Path(run_dir)
    say = log or (lambda msg: None)
    if not is_planted(run_dir):
        return None
    data = load_run(run_dir) if data is None else data
    roles = [parse_role(s) for s in data.source]
    bad = [s for s, r in zip(data.source, roles) if r is None]
    if bad:
        raise AnalysisError(f"samples.csv mixes planted and other sources (e.g. {bad[0]!r})")
    kind = np.array([r.kind for r in roles])
    dup = np.array([r.dup for r in roles], np.int64)
    if "train" not in data.stats:
        raise AnalysisError("a planted run needs the members (split train)")
    if np.any((kind == "heldout") != (data.split == "val")):
        raise AnalysisError("planted roles and splits disagree (held-out images must be the val split)")

    say("planted: UnitMem on D_all and D'")
    parts = [data.stats[s] for s in ("train", "val") if s in data.stats]
    st_all = unitmem.combine_stats(*parts)
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

    names = ["heldout", "single"] + [_group_name("canary", d) for d in sorted(set(dup[kind == "canary"]))]
    group = np.array([_group_name(k, d) for k, d in zip(kind, dup)])
    # The units each group singles out: D_all argmax in the group.
    unit_group = group[unitmem.sample_positions(ids, st_all.argmax)]
    unit_kind = kind[unitmem.sample_positions(ids, st_all.argmax)]
    groups = {}
    for g in names:
        sel = group == g
        if not sel.any():
            continue
        u = unit_group == g
        groups[g] = {"n": int(sel.sum()), "training_copies": int(dup[sel][0]),
                     **{k: {"mean": float(np.nanmean(v[sel])) if np.isfinite(v[sel]).any() else None,
                            "median": float(np.nanmedian(v[sel])) if np.isfinite(v[sel]).any() else None}
                        for k, v in metric.items()},
                     "units_singled_out": int(u.sum()), "units_singled_out_in_u10": int((u & mask).sum()),
                     "unitmem_of_singled_out": float(um[u].mean()) if u.any() else None}

    say(f"planted: tests ({n_permutations} permutations each)")
    tests = {}
    for key, _, _ in METRICS:
        tests[key] = {f"{a} vs {b}": _test(metric[key][kind == a], metric[key][kind == b], n_permutations, seed)
                      for a, b in PAIRS}
    tests["unitmem_of_singled_out"] = {f"{a} vs {b}": _test(um[unit_kind == a], um[unit_kind == b],
                                                            n_permutations, seed) for a, b in PAIRS}
    copies = dup.astype(np.float64)
    # Spearman of each metric with the copies (samples where the metric is NaN dropped)
    dose = {key: {"all": unitmem.loss_correlation(metric[key], copies),
                  "members": unitmem.loss_correlation(metric[key][members], copies[members])}
            for key, _, _ in METRICS}

    # Where the canaries rank among all samples by NumMemUnits (ties: ascending sample id).
    order = unitmem.rank_samples(metric["nmu_u10"].astype(np.int64), ids)
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(1, len(ids) + 1)
    canaries = np.flatnonzero(kind == "canary")
    n_c = len(canaries)
    found = _found_in_top(metric["nmu_u10"], kind == "canary", n_c)
    canary_rows = sorted(({"sample": int(ids[i]), "source": data.source[i], "label": int(data.label[i]),
                           "dup": int(dup[i]), "nmu_u10": int(metric["nmu_u10"][i]),
                           "nmu_all": int(metric["nmu_all"][i]), "rank": int(rank[i]),
                           "loss": None if not np.isfinite(metric["loss"][i]) else float(metric["loss"][i])}
                          for i in canaries), key=lambda r: (r["dup"], r["sample"]))
    out = {
        "what": "canaries (duplicated in training) vs singletons vs held-out images of the planted set",
        "quantile": q, "threshold": float(thr), "u10_count": int(mask.sum()), "n_units": int(len(um)),
        "datasets": {"d_all": "members + held-out (U10, NumMemUnits, argmax counts)",
                     "members": "members alone, the study's D' (nmu_u10_members)"},
        "metrics": {k: {"label": label, "memorization_makes_it": way} for k, label, way in METRICS},
        "groups": groups, "tests": tests, "dose_response": dose,
        "canaries": canary_rows,
        "canaries_in_top": {"k": n_c, "found": found, "expected_by_chance": n_c * n_c / len(ids)},
        "n_permutations": n_permutations, "seed": seed,
        "model": _training_info(run_dir, data.run_info, checkpoint),
        "figure": FIGURE,
    }
    say("planted: figure")
    (run_dir / "figures").mkdir(exist_ok=True)
    _save_figure(_figure(names, group, metric, um, unit_group, thr), run_dir / FIGURE)
    text = report.to_json(out)
    atomic_write_text(run_dir / OUTPUT, text)
    return json.loads(text)  # what the file says (numpy -> Python, NaN -> None)


def record_planted(checkpoint: Path, run_dir: Path, views: int = 8, seed: int = 0, batch_size: int = 16) -> None:
    """Records a planted checkpoint on the whole planted set, as the default run does.

    For checks without experiments/run.py (multi-seed studies, the tests): every member and
    held-out image, `views` random crops each (the study's augmentation at 64 px, crop seed
    `seed`), activations saved; then samples.csv. Resumes or returns at once like the driver.
    """
    import varjax
    from varjax.data import AugmentConfig, open_source, select, write_samples_csv
    from varjax.driver import record
    from varjax.record import Options, Plan

    model = varjax.load(checkpoint)
    source = open_source("planted")
    samples = select(source)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = Plan.from_samples(source, samples, AugmentConfig(resolution=model.config.resolution, views=views),
                             seed=seed)
    record(model, plan, run_dir, num_views=views, opts=Options(batch_size=batch_size, save_activations=True))
    write_samples_csv(str(run_dir / "samples.csv"), samples)


def _figure(names, group, metric, um, unit_group, thr):
    """One panel per metric, plus the UnitMem of the units each group singles out."""
    from matplotlib.figure import Figure

    panels = [(metric[k], label) for k, label, _ in METRICS] + [(None, "UnitMem of the units it singles out")]
    fig = Figure(figsize=(3.2 * len(panels), 3.4), dpi=100, layout="constrained")
    rng = np.random.default_rng(0)  # horizontal jitter only
    for p, (values, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        cols = [(values[group == g] if values is not None else um[unit_group == g]) for g in names]
        cols = [c[np.isfinite(c)] for c in cols]
        for i, c in enumerate(cols):
            if len(c):
                ax.boxplot([c], positions=[i], widths=0.6, showfliers=False)
                ax.scatter(i + rng.uniform(-0.2, 0.2, len(c)), c, s=8, alpha=0.5, color=f"C{i}")
        if values is None:
            ax.axhline(thr, color="gray", ls="--", lw=0.8, label="U10 threshold")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), [n.replace("canary ", "") for n in names], rotation=30, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Planted memorization: held-out, singletons, canaries by training copies", fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Canaries vs singletons vs held-out in a planted run.")
    parser.add_argument("run_dir", type=Path, help="run directory recorded on --data planted")
    parser.add_argument("--checkpoint", type=Path, default=None, help="the model (for what was planted)")
    parser.add_argument("--record", action="store_true",
                        help="first record --checkpoint (default: the shipped model) on the planted set "
                             "into RUN_DIR (8 views, crop seed 0), then analyze")
    parser.add_argument("--quantile", type=float, default=90.0, help="percentile defining U10")
    parser.add_argument("--permutations", type=int, default=10_000, help="per permutation test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutation tests")
    args = parser.parse_args(argv)
    log = stderr_log()

    try:
        if args.record:
            args.checkpoint = args.checkpoint or default_checkpoint()
            log(f"recording {args.checkpoint} on the planted set into {args.run_dir}")
            record_planted(args.checkpoint, args.run_dir)
        out = analyze_planted(args.run_dir, args.checkpoint, args.quantile, args.permutations, args.seed, log)
    except (AnalysisError, CheckpointError, RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out is None:
        print(f"error: {args.run_dir} was not recorded on the planted set", file=sys.stderr)
        return 2
    print(summary_text(out))
    return 0


def summary_text(p: dict) -> str:
    """A few lines: group means and the canary-vs-singleton and canary-vs-held-out tests."""
    lines = [f"{'group':<14}{'n':>4}  " + "  ".join(f"{k:>16}" for k, _, _ in METRICS)]
    for g, v in p["groups"].items():
        lines.append(f"{g:<14}{v['n']:>4}  " + "  ".join(
            f"{v[k]['mean']:>16.3f}" if v[k]["mean"] is not None else f"{'n/a':>16}" for k, _, _ in METRICS))
    for k, _, _ in METRICS:
        for pair, t in p["tests"][k].items():
            if t["auc"] is not None:
                perm = "n/a" if t["p_permutation"] is None else f"{t['p_permutation']:.3g}"
                lines.append(f"{k:<16} {pair:<18} AUC {t['auc']:.3f}  p_MW {t['p_mannwhitney']:.3g}  p_perm {perm}")
    for k, r in p["dose_response"].items():
        a, m = r["all"], r["members"]
        if a["rho"] is not None and m["rho"] is not None:
            lines.append(f"{k:<16} Spearman vs training copies: all rho {a['rho']:.3f} (p {a['p_value']:.3g}), "
                         f"members rho {m['rho']:.3f} (p {m['p_value']:.3g})")
    c = p["canaries_in_top"]
    lines.append(f"canaries among the top {c['k']} by NumMemUnits: {c['found']:.2f} "
                 f"(chance {c['expected_by_chance']:.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
