"""Several runs side by side (the study's open question "other depths"): `compare(run_dirs, out)`.

For runs of models of other depths (d16 .. d36), or one model at several precisions, it puts
against relative depth (block / depth): the U10 share of each block's units and its mean
UnitMem per layer type, and the diversity of the top units; beside them the coverage curves,
samples with NumMemUnits > 0, and, for runs over the same samples, how much they agree (U10
Jaccard when the units are the same, top-sample overlap, NumMemUnits rank correlation).

Every run is restricted to the layer types all runs recorded and its UnitMem, U10 and
NumMemUnits recomputed on those units (a run that also recorded `head` would otherwise move
its P90). Runs that cannot be compared are refused before anything is written, with one
line naming the reason: fewer than two, one given twice, a run that is not finished (no
record.json, or a progress.npz left by an interrupted pass), a site defined otherwise than
today (`load_run` refuses it, so the runs compared share every site's definition),
no common layer type, runs analysed with different UnitMem variants (or the median variant
asked of a run without activations.npy), `--out` inside a run directory.

Writes `comparison.json` (`to_json`), `figures/` and `report.md` (last) into the out directory.
Shape letters (varjax.names): N samples, U units; blocks and sites spelled out.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from varjax import beyond, unitmem
from varjax.analysis.figures import RunCurves, compare_coverage, compare_depth, compare_diversity, save
from varjax.analysis.compute import VARIANTS, DatasetResult, dataset_result
from varjax.analysis.fmt import jsonable, num, pct, table, to_json
from varjax.analysis.rundir import RunData, load_run
from varjax.errors import AnalysisError
from varjax.names import UnitLayout
from varjax.runfiles import atomic_write_bytes


class CompareError(AnalysisError):
    """Runs that cannot be compared (the message says why)."""


@dataclasses.dataclass(frozen=True, eq=False)
class RunEntry:
    """One run of a comparison, restricted to the common layer types.

    Attributes:
      name: its label (the directory name, made unique); run_dir: where it was read.
      depth: transformer blocks; precision: the recording precision (None if unknown).
      data: the run's files; layout: its units at the common sites; units: (U,) their
        columns in the run's own layout; dataset: items 1-6 on D' over those units.
      argmax: (U,) each unit's argmax sample id on D'.
      diversity: diversity by depth per common site (top_k units per block).
      centre: (sites,) U10 centre of mass over depth per site (relative depth).
    """

    name: str
    run_dir: Path
    depth: int
    precision: str | None
    data: RunData
    layout: UnitLayout
    units: np.ndarray
    dataset: DatasetResult
    argmax: np.ndarray
    diversity: tuple[beyond.DiversityTest, ...]
    centre: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Comparison:
    """Runs side by side: their entries, the common sites, and the overlaps of runs that share samples."""

    runs: tuple[RunEntry, ...]
    sites: tuple[str, ...]
    variant: str
    q: float
    top_k: int
    overlaps: dict[tuple[str, str], beyond.RunOverlap]
    n_permutations: int
    seed: int


def _finished(d: Path) -> None:
    if not d.is_dir():
        raise CompareError(f"{d} is not a run directory")
    if (d / "progress.npz").exists() or not (d / "record.json").is_file():
        raise CompareError(f"{d} is not a finished run (no record.json, or an interrupted pass's progress.npz); "
                           "run its command again to finish it")


def _variant(runs: list[RunData], asked: str | None) -> str:
    """The UnitMem variant of the comparison: asked, else the one every run was analysed with."""
    if asked is not None:
        if asked not in VARIANTS:
            raise CompareError(f"variant must be 'mean' or 'median', got {asked!r}")
        missing = [str(r.run_dir) for r in runs if asked == "median" and r.acts is None]
        if missing:
            raise CompareError(f"{missing[0]} has no activations.npy: the median variant needs it")
        return asked
    used = {}
    for r in runs:
        path = r.run_dir / "summary.json"
        try:
            used[r.run_dir.name] = json.loads(path.read_text()).get("variant", "mean") if path.is_file() else "mean"
        except (json.JSONDecodeError, AttributeError):
            raise CompareError(f"{path} is not a summary.json varjax wrote") from None
    if len(set(used.values())) > 1:
        raise CompareError("the runs were analysed with different UnitMem variants ("
                           + ", ".join(f"{k}: {v}" for k, v in used.items()) + "); pass --variant")
    return next(iter(used.values()))


def _common_sites(runs: list[RunData]) -> tuple[str, ...]:
    """The layer types every run recorded. (Their definitions agree: `load_run` refuses a run
    that recorded a site under another definition than today's.)"""
    common = [s for s in runs[0].layout.sites if all(s in r.layout.sites for r in runs[1:])]
    if not common:
        raise CompareError("the runs share no layer type (" + "; ".join(
            f"{r.run_dir.name}: {', '.join(r.layout.sites)}" for r in runs) + ")")
    return tuple(common)


def _names(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]


def _entry(name: str, data: RunData, sites: tuple[str, ...], variant: str, q: float, top_k: int,
           n_permutations: int, seed: int) -> RunEntry:
    """One run restricted to `sites`: UnitMem on all its units, U10 and the rest on those."""
    rows = data.rows_of(data.primary)
    st = data.stats[data.primary]
    um = (unitmem.unitmem_mean(st) if variant == "mean"
          else unitmem.unitmem_median(data.acts, data.acts_rows[rows]))
    layout, mask = data.layout.select(sites)
    sub = unitmem.UnitStats(st.max[mask], st.argmax[mask], st.sum[mask], st.count)
    ds = dataset_result(sub, um[mask], data.ids[rows], layout, q)
    label_of_unit = data.label[unitmem.sample_positions(data.ids, sub.argmax)]
    diversity = tuple(beyond.diversity_test(ds.um, sub.argmax, label_of_unit, layout, s, top_k, n_permutations, seed)
                      for s in range(len(sites)))
    fp = (data.record_info or {}).get("fingerprint", {})
    depth = ((fp.get("model") or {}).get("var") or {}).get("depth") or layout.depth
    return RunEntry(name, data.run_dir, int(depth), fp.get("precision"), data, layout, np.flatnonzero(mask), ds,
                    sub.argmax, diversity, beyond.u10_centre(ds.table.u10, ds.table.blocks, int(depth)))


def _positions(r: RunEntry) -> dict[tuple[int, str], int]:
    """(sample id, source) -> position among the run's D' samples."""
    rows = r.data.rows_of(r.data.primary)
    return {(int(x), r.data.source[row]): p for p, (x, row) in enumerate(zip(r.dataset.ids, rows))}


def _overlaps(runs: tuple[RunEntry, ...]) -> dict[tuple[str, str], beyond.RunOverlap]:
    """Every pair of runs that shares samples (same id and source)."""
    out = {}
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            key_a, key_b = _positions(a), _positions(b)
            common = sorted(set(key_a) & set(key_b))
            if len(common) < 2:
                continue
            pa = np.array([key_a[k] for k in common])
            pb = np.array([key_b[k] for k in common])
            same_units = a.layout.sites == b.layout.sites and all(
                np.array_equal(getattr(a.layout, f), getattr(b.layout, f)) for f in ("block", "site", "index"))
            masks = (a.dataset.mask, b.dataset.mask, a.argmax, b.argmax) if same_units else (None,) * 4
            out[(a.name, b.name)] = beyond.run_overlap(np.array([k[0] for k in common]), a.dataset.nmu[pa],
                                                        b.dataset.nmu[pb], *masks)
    return out


def compare(run_dirs: list[Path | str], variant: str | None = None, q: float = 90.0, top_k: int = 10,
            n_permutations: int = 10_000, seed: int = 0, log: Callable[[str], None] | None = None) -> Comparison:
    """Loads, checks and compares runs (nothing is written).

    Args:
      run_dirs: two or more finished run directories.
      variant: "mean" or "median"; None: the variant every run was analysed with.
      q, top_k, n_permutations, seed: as `varjax.analysis.compute`.
      log: optional progress callback.

    Raises:
      CompareError: runs that cannot be compared (one line saying why).
    """
    say = log or (lambda msg: None)
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise CompareError("compare needs at least two run directories")
    seen = set()
    for d in dirs:
        if d.resolve() in seen:
            raise CompareError(f"{d} is given twice")
        seen.add(d.resolve())
        _finished(d)
    runs = []
    for d in dirs:
        try:
            runs.append(load_run(d))
        except AnalysisError as e:
            raise CompareError(f"{d}: {e}") from None
    sites = _common_sites(runs)
    variant = _variant(runs, variant)
    entries = []
    for name, data in zip(_names(dirs), runs):
        say(f"{name}: {variant} UnitMem on {', '.join(sites)}; diversity ({n_permutations} permutations)")
        entries.append(_entry(name, data, sites, variant, q, top_k, n_permutations, seed))
    entries = tuple(entries)
    return Comparison(entries, sites, variant, q, top_k, _overlaps(entries), n_permutations, seed)


def summary(c: Comparison) -> dict:
    """comparison.json's content: per run its numbers and per-block curves; the overlaps."""
    runs = []
    for r in c.runs:
        t, cov = r.dataset.table, r.dataset.coverage
        with np.errstate(invalid="ignore", divide="ignore"):
            share = t.u10 / t.n_units
        runs.append({
            "name": r.name, "run_dir": str(r.run_dir), "depth": r.depth, "precision": r.precision,
            "n_samples": len(r.dataset.ids), "n_units": r.layout.n_units, "p90": r.dataset.threshold,
            "u10_count": r.dataset.u10_count, "samples_with_memunits": cov.samples_with_memunits,
            "samples_with_memunits_frac": cov.samples_with_memunits_frac, "coverage": cov.top,
            "u10_centre_by_site": dict(zip(c.sites, r.centre)),
            "per_block": {"blocks": t.blocks, "relative_depth": t.blocks / r.depth,
                          "u10_share_by_site": {s: share[:, i] for i, s in enumerate(t.sites)},
                          "mean_by_site": {s: t.mean[:, i] for i, s in enumerate(t.sites)}},
            "diversity": {d.site: d for d in r.diversity}})
    return jsonable({"variant": c.variant, "quantile": c.q, "top_k": c.top_k, "sites": c.sites,
                     "n_permutations": c.n_permutations, "seed": c.seed, "runs": runs,
                     "overlaps": [{"a": a, "b": b, **dataclasses.asdict(o)} for (a, b), o in c.overlaps.items()]})


def render_markdown(c: Comparison, figures: dict[str, str]) -> str:
    """The comparison's report: the runs, curves against relative depth, diversity, overlaps."""
    fig = lambda name, alt: [f"![{alt}]({figures[name]})", ""] if name in figures else []  # noqa: E731
    lines = [f"# {len(c.runs)} runs side by side", "",
             f"- Layer types compared (recorded by every run): {', '.join(c.sites)}. Each run's UnitMem "
             f"({c.variant} variant), U10 (UnitMem >= P{c.q:g}) and NumMemUnits are computed on those units alone.",
             "- Relative depth = block / depth (a top site such as `head` sits at 1.0). U10 share of a (block, "
             f"site) = the share of its units in the run's U10 ({100 - c.q:g}% of all units on average).", "",
             "## The runs", ""]
    lines += table(["run", "depth", "precision", "samples", "units", f"P{c.q:g}", "U10", "NumMemUnits > 0"]
                   + [f"top {100 * t.fraction:g}%" for t in c.runs[0].dataset.coverage.top],
                   [[r.name, r.depth, r.precision or "n/a", num(len(r.dataset.ids)), num(r.layout.n_units),
                     num(r.dataset.threshold), num(r.dataset.u10_count),
                     f"{pct(r.dataset.coverage.samples_with_memunits_frac)} "
                     f"({r.dataset.coverage.samples_with_memunits})"]
                    + [pct(t.share) for t in r.dataset.coverage.top] for r in c.runs])
    lines += ["", "## Where U10 sits over depth", "",
              "U10 centre of mass (mean relative depth of the U10 units) per layer type:", ""]
    lines += table(["run"] + list(c.sites), [[r.name] + [num(x, 3) for x in r.centre] for r in c.runs])
    lines += [""] + fig("compare_depth", "U10 share and mean UnitMem against relative depth")
    lines += ["## Coverage", ""] + fig("compare_coverage", "coverage curves")
    lines += [f"## Diversity by depth (top {c.top_k} units per block)", "",
              "Per run and layer type: the slope of the argmax images' entropy on relative depth (bits per unit of "
              "depth) and its one-sided permutation p that it falls this steeply (null: the top units are "
              "exchangeable across blocks; varjax/beyond.py); images at the first and the last block.", ""]
    lines += table(["run", "site", "image slope", "p(falls)", "two-sided p", "distinct images first / last block"],
                   [[r.name, d.site, num(d.image_slope, 3), num(d.p_image_falls, 3), num(d.p_image_two_sided, 3),
                     f"{d.distinct_images[0]} / {d.distinct_images[-1]}"] for r in c.runs for d in r.diversity])
    lines += [""] + fig("compare_diversity", "diversity by depth")
    lines += ["## Runs over the same samples", ""]
    if not c.overlaps:
        lines += ["No two runs share samples (same sample id and source).", ""]
    else:
        lines += ["Samples in both runs (same id and source); U10 Jaccard and argmax agreement only where the runs "
                  "have the same units; top samples ranked by NumMemUnits (ties: lower id) on the common samples.", ""]
        lines += table(["runs", "common samples", "U10 Jaccard", "argmax agrees (U10 in both)", "top-n overlap",
                        "top 10% overlap", "NumMemUnits Spearman"],
                       [[f"{a} vs {b}", num(o.n_common), num(o.u10_jaccard), pct(o.argmax_agree),
                         f"{pct(o.top_overlap)} (n = {o.top_n})", f"{pct(o.top10pct_overlap)} (n = {o.top10pct_n})",
                         num(o.nmu_spearman, 3)] for (a, b), o in c.overlaps.items()])
    return "\n".join(lines).rstrip() + "\n"


def figures(c: Comparison) -> dict[str, object]:
    """The comparison's figures, by name (nothing written)."""
    curves = [RunCurves(r.name, r.dataset.table, r.depth, r.dataset.curve, r.diversity) for r in c.runs]
    return {"compare_depth": compare_depth(curves, c.sites), "compare_coverage": compare_coverage(curves),
            "compare_diversity": compare_diversity(curves, c.top_k)}


def _check_out(out: Path, run_dirs: list[Path]) -> None:
    for d in run_dirs:
        if out.resolve() == d.resolve() or d.resolve() in out.resolve().parents:
            raise CompareError(f"--out {out} is inside the run directory {d}; choose another")


def write(c: Comparison, out: Path | str) -> dict:
    """comparison.json, figures/ and report.md (last) into `out`; returns the summary."""
    out = Path(out)
    _check_out(out, [r.run_dir for r in c.runs])
    (out / "report.md").unlink(missing_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, f in figures(c).items():
        save(f, out / "figures" / f"{name}.png")
        paths[name] = f"figures/{name}.png"
    s = {**summary(c), "figures": paths}
    atomic_write_bytes(out / "comparison.json", to_json(s).encode())
    atomic_write_bytes(out / "report.md", render_markdown(c, paths).encode())
    return s


def compare_runs(run_dirs: list[Path | str], out: Path | str, variant: str | None = None, q: float = 90.0,
                 top_k: int = 10, n_permutations: int = 10_000, seed: int = 0,
                 log: Callable[[str], None] | None = None) -> dict:
    """`compare` then `write`: what experiments/compare.py does. Returns comparison.json's content."""
    _check_out(Path(out), [Path(d) for d in run_dirs])
    return write(compare(run_dirs, variant, q, top_k, n_permutations, seed, log), out)
