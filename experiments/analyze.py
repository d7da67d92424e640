"""Analysis of one run directory: the study's numbers and figures, then report.md/summary.json.

Reads what the recording pass wrote (docs/design.md, "Run directory"): `units.csv`,
`samples.csv`, and either `stats_{split}.npz` (streamed statistics) or `activations.npy`
(the full (N, U) matrix; needed for the median variant), plus optional `per_sample.csv`
and `run.json`. Computes the metrics of `varjax/unitmem.py` on D' (split `train`, the
study's numbers) and, when val samples are present, on D_all = D' + D_val; draws the
figures of `figures.py` and renders the report of `report.py`.

Every output is written atomically (temp file in the same directory, then os.replace), and
a previous report.md/summary.json is removed first, so an interrupted analysis never leaves
a report that looks complete but is stale or truncated.

    python experiments/analyze.py RUN_DIR [--variant median] [--quantile 90]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

if __package__ in (None, ""):  # run as a script (or imported as `analyze`): find the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import figures, report  # noqa: E402
from varjax import unitmem  # noqa: E402
from varjax.runfiles import atomic_write_bytes, stderr_log  # noqa: E402

ImageLoader = Callable[[str], "np.ndarray | None"]
THUMB = 128  # pixels: grid tiles are ~150 px wide, larger images only cost memory
N_TOP_SAMPLES = 20  # item 7
N_FIG8_BLOCKS = 4  # item 8: blocks 0, 5, 10, 15 of d16


class AnalysisError(Exception):
    """A problem with the run directory's inputs; its message is one line for the user."""


@dataclasses.dataclass
class RunData:
    """The inputs of one run directory, validated against each other.

    Attributes:
      layout: where each of the U units sits.
      ids, split, label: (N,) per samples.csv row, less the rows listed in skipped.csv (the
        recording pass could not read those images; they are in no statistic); source: N strings.
      acts_rows: (N,) the row of each sample in activations.npy (= samples.csv row).
      stats: per split, UnitStats of shape (U,) (from stats_*.npz, else from the matrix).
      scale_stats: per split, UnitStats of shape (K, U) when the npz holds scale_* arrays.
      acts: (N_all, U) memmap of activations.npy, or None.
      loss: (N_all,) per-sample loss (NaN where unknown), or None without per_sample.csv.
      run_info: run.json, or None; record_info: record.json (the recording pass), or None.
      n_skipped: samples of samples.csv left out because skipped.csv lists them.
      stats_source: "stats_npz" or "activations".
    """

    layout: unitmem.UnitLayout
    ids: np.ndarray
    split: np.ndarray
    label: np.ndarray
    source: list[str]
    stats: dict[str, unitmem.UnitStats]
    scale_stats: dict[str, unitmem.UnitStats]
    acts: np.ndarray | None
    acts_rows: np.ndarray
    loss: np.ndarray | None
    run_info: dict | None
    record_info: dict | None
    n_skipped: int
    stats_source: str


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise AnalysisError(f"missing {path.name} in {path.parent}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise AnalysisError(f"{path.name} lacks column(s) {', '.join(missing)}")
        return list(reader)


def _int(text: str, what: str) -> int:
    try:
        return int(text) if text.strip() != "" else -1  # an unknown label is -1
    except ValueError:
        raise AnalysisError(f"{what}: {text!r} is not an integer") from None


def _load_npz_stats(path: Path, n_units: int,
                    n_samples: int) -> tuple[unitmem.UnitStats, unitmem.UnitStats | None]:
    """One stats_{split}.npz, checked against units.csv and samples.csv; scale stats or None."""
    with np.load(path) as z:
        missing = [k for k in ("max", "argmax", "sum", "count") if k not in z]
        if missing:
            raise AnalysisError(f"{path.name} lacks {', '.join(missing)}")
        st = unitmem.UnitStats(z["max"], z["argmax"].astype(np.int64), z["sum"].astype(np.float64),
                               int(z["count"]))
        scale = None
        if all(f"scale_{k}" in z for k in ("max", "argmax", "sum")):
            scale = unitmem.UnitStats(z["scale_max"], z["scale_argmax"].astype(np.int64),
                                      z["scale_sum"].astype(np.float64), st.count)
    for name, arr in (("max", st.max), ("argmax", st.argmax), ("sum", st.sum)):
        if arr.shape != (n_units,):
            raise AnalysisError(f"{path.name}: {name} has shape {arr.shape}, units.csv has {n_units} units")
    if st.count != n_samples:
        raise AnalysisError(f"{path.name}: count {st.count} but samples.csv has {n_samples} such samples")
    if scale is not None and (scale.max.ndim != 2 or scale.max.shape[1] != n_units
                              or scale.argmax.shape != scale.max.shape or scale.sum.shape != scale.max.shape):
        raise AnalysisError(f"{path.name}: scale_* arrays must be (K, {n_units}), got {scale.max.shape}")
    return st, scale


def load_run(run_dir: Path) -> RunData:
    """Reads and cross-checks a run directory; raises AnalysisError with a one-line message."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"run directory {run_dir} does not exist")
    units = _read_csv(run_dir / "units.csv", ("unit", "block", "site", "index"))
    if [_int(u["unit"], "units.csv unit") for u in units] != list(range(len(units))):
        raise AnalysisError("units.csv: row u must describe unit (column) u, in order 0..U-1")
    layout = unitmem.UnitLayout.from_columns(
        np.array([_int(u["block"], "units.csv block") for u in units]), [u["site"] for u in units])
    rows = _read_csv(run_dir / "samples.csv", ("sample", "split", "label", "source"))
    if not units or not rows:
        raise AnalysisError("units.csv and samples.csv must each have at least one row")
    ids = np.array([_int(r["sample"], "samples.csv sample") for r in rows], np.int64)
    if len(np.unique(ids)) != len(ids):
        raise AnalysisError("samples.csv: sample ids are not unique")
    n_units = len(units)
    acts = None
    if (run_dir / "activations.npy").is_file():
        acts = np.load(run_dir / "activations.npy", mmap_mode="r")
        if acts.shape != (len(ids), n_units):
            raise AnalysisError(f"activations.npy has shape {acts.shape} but samples.csv has "
                                f"{len(ids)} rows and units.csv {n_units} units")
    skipped = set()
    if (run_dir / "skipped.csv").is_file():
        skipped = {_int(r["sample"], "skipped.csv sample")
                   for r in _read_csv(run_dir / "skipped.csv", ("sample",))}
    acts_rows = np.array([r for r, i in enumerate(ids) if int(i) not in skipped], np.int64)
    n_all = len(ids)
    rows = [rows[r] for r in acts_rows]
    ids = ids[acts_rows]
    split = np.array([r["split"] for r in rows])
    label = np.array([_int(r["label"], "samples.csv label") for r in rows], np.int64)
    stats, scale_stats = {}, {}
    for path in sorted(run_dir.glob("stats_*.npz")):
        name = path.stem[len("stats_"):]
        n = int((split == name).sum())
        if n == 0:
            raise AnalysisError(f"{path.name} present but samples.csv has no '{name}' samples")
        stats[name], sc = _load_npz_stats(path, n_units, n)
        if sc is not None:
            scale_stats[name] = sc
    source = "stats_npz"
    if not stats:
        if acts is None:
            raise AnalysisError(f"{run_dir} has neither stats_*.npz nor activations.npy")
        source = "activations"
        stats = {s: unitmem.stats_from_matrix(acts, ids[split == s], acts_rows[split == s])
                 for s in dict.fromkeys(split.tolist())}
    missing = [s for s in dict.fromkeys(split.tolist()) if s not in stats]
    if missing:
        raise AnalysisError(f"samples.csv has split(s) {', '.join(missing)} without stats_*.npz")
    for name, st in stats.items():
        if st.count < 2:
            raise AnalysisError(f"split '{name}' has {st.count} sample(s); UnitMem needs at least 2")

    loss = None
    if (run_dir / "per_sample.csv").is_file():
        per = _read_csv(run_dir / "per_sample.csv", ("sample", "loss"))
        by_id = {_int(r["sample"], "per_sample.csv sample"): r["loss"] for r in per}
        loss = np.array([float(by_id[i]) if by_id.get(i, "") != "" else np.nan for i in ids])
    infos = {}
    for name in ("run.json", "record.json"):
        infos[name] = None
        if (run_dir / name).is_file():
            try:
                infos[name] = json.loads((run_dir / name).read_text())
            except json.JSONDecodeError as e:
                raise AnalysisError(f"{name} is not valid JSON: {e}") from None
    if infos["record.json"] is not None:
        from varjax.driver import check_sites
        from varjax.record import RecordError

        try:
            check_sites(infos["record.json"].get("fingerprint", {}), run_dir)
        except RecordError as e:
            raise AnalysisError(str(e)) from None
    return RunData(layout, ids, split, label, [r["source"] for r in rows], stats, scale_stats, acts,
                   acts_rows, loss, infos["run.json"], infos["record.json"], n_all - len(acts_rows), source)


def default_load_image(source: str, base: Path | None = None) -> np.ndarray | None:
    """Opens `source` with PIL if it names an existing file (as is, or relative to base)."""
    from PIL import Image

    for path in (Path(source), (base / source) if base else None):
        if path is not None and path.is_file():
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
    return None


def _tile_image(load_image: ImageLoader, source: str) -> np.ndarray | None:
    """The image of one sample as a small uint8 (h, w, 3) array, or None (-> placeholder)."""
    from PIL import Image

    try:
        img = load_image(source)
        if img is None:
            return None
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        if img.ndim != 3 or img.shape[-1] not in (3, 4):
            return None
        pil = Image.fromarray(img[..., :3].astype(np.uint8))
        pil.thumbnail((THUMB, THUMB))
        return np.asarray(pil)
    except Exception:  # a loader for someone else's source kind must never sink the report
        return None


def _dataset(stats: unitmem.UnitStats, um: np.ndarray, ids: np.ndarray, layout: unitmem.UnitLayout,
             q: float) -> dict:
    """Items 1-6 for one dataset: U10, NumMemUnits, coverage and the block/site table."""
    mask, thr = unitmem.top_units(um, q)
    try:
        nmu = unitmem.num_mem_units(stats.argmax, mask, ids)
    except ValueError as e:
        raise AnalysisError(f"stats argmax does not match samples.csv: {e}") from None
    return {"um": um, "mask": mask, "threshold": float(thr), "nmu": nmu,
            "coverage": unitmem.coverage(nmu, ids), "curve": unitmem.coverage_curve(nmu, ids),
            "table": unitmem.block_site_table(um, mask, layout)}


def _fig8_blocks(blocks: np.ndarray) -> np.ndarray:
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


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=figures.DPI)
    atomic_write_bytes(path, buf.getvalue())


def _compute(run_dir: Path, data: RunData, variant: str, q: float, top_k: int, n_permutations: int,
             seed: int, say: Callable[[str], None]) -> report.Context:
    """All the numbers: D' (items 1-8 and the extras) and, with val samples, D_all (item 9)."""
    primary = "train" if "train" in data.stats else next(iter(data.stats))
    rows = np.flatnonzero(data.split == primary)
    ids, layout = data.ids[rows], data.layout

    def um_of(v: str, st: unitmem.UnitStats, sel: np.ndarray) -> np.ndarray:
        if v == "mean":
            return unitmem.unitmem_mean(st)
        return unitmem.unitmem_median(data.acts, data.acts_rows[sel])

    say(f"D' ({primary}): {len(ids)} samples x {len(layout.block)} units, {variant} variant")
    st = data.stats[primary]
    main = _dataset(st, um_of(variant, st, rows), ids, layout, q)
    argmax_row = unitmem.sample_positions(data.ids, st.argmax)  # (U,) row of each unit's argmax
    label_of_unit = data.label[argmax_row]
    fc1 = layout.site_index("fc1")
    extra = {
        "fc1": fc1,
        "diversity_site": (unitmem.diversity_by_depth(main["um"], st.argmax, layout, label_of_unit,
                                                      fc1, top_k) if fc1 is not None else None),
        "diversity_all": unitmem.diversity_by_depth(main["um"], st.argmax, layout, label_of_unit,
                                                    None, top_k),
        "top_units": {int(b): unitmem.top_units_of_block(main["um"], layout, int(b), fc1, top_k)
                      for b in _fig8_blocks(layout.blocks)},
        "loss": None, "per_scale": None, "scale_labels": None, "other_variant": None,
    }
    if data.loss is not None:
        extra["loss"] = unitmem.loss_correlation(data.loss[rows], main["nmu"])
    if primary in data.scale_stats:
        extra["per_scale"] = unitmem.per_scale_view(data.scale_stats[primary], layout, q, main["mask"])
        extra["scale_labels"] = _scale_labels(data.run_info, extra["per_scale"]["u10"].shape[0])
    if data.acts is not None:
        other = "median" if variant == "mean" else "mean"
        say(f"D': {other} variant for comparison")
        extra["other_variant"] = (other, _dataset(st, um_of(other, st, rows), ids, layout, q))

    d_all = None
    if "val" in data.stats and primary == "train":
        say("D_all = D' + D_val")
        all_rows = np.flatnonzero(np.isin(data.split, ["train", "val"]))
        st_all = unitmem.combine_stats(data.stats["train"], data.stats["val"])
        d_all = _dataset(st_all, um_of(variant, st_all, all_rows), data.ids[all_rows], layout, q)
        is_train = data.split[all_rows] == "train"
        # "All units": NumMemUnits counted over every unit, not only U10(D_all).
        every = unitmem.num_mem_units(st_all.argmax, np.ones(len(layout.block), bool), data.ids[all_rows])
        say(f"D_all: permutation test, {n_permutations} permutations")
        d_all["comparison_all"] = unitmem.split_comparison(every, is_train, n_permutations, seed)
        d_all["comparison_u10"] = unitmem.split_comparison(d_all["nmu"], is_train, n_permutations, seed)
    return report.Context(run_dir=run_dir, variant=variant, q=q, top_k=top_k, primary=primary,
                          stats_source=data.stats_source, data=data, main=main, extra=extra, d_all=d_all,
                          figures={}, argmax_row=argmax_row, rows=rows)


def _draw_figures(ctx: report.Context, load: ImageLoader) -> dict[str, str]:
    """Draws and saves every figure under run_dir/figures; returns name -> relative path."""
    data, main, extra, rows, top_k = ctx.data, ctx.main, ctx.extra, ctx.rows, ctx.top_k
    layout, ids = data.layout, data.ids[rows]
    fig_dir = ctx.run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    paths: dict[str, str] = {}

    def save(name: str, fig) -> None:
        _save_figure(fig, fig_dir / f"{name}.png")
        paths[name] = f"figures/{name}.png"

    t = main["table"]
    save("fig1_u10_per_block", figures.u10_per_block(t, f"U10 units per block (D', {ctx.variant})"))
    save("fig2_mean_unitmem_per_block", figures.mean_unitmem_per_block(t, "Mean UnitMem per block (D')"))
    save("fig3_u10_per_type", figures.u10_per_type(t, "U10 units per layer type (D')"))
    save("fig4_mean_unitmem_per_type", figures.mean_unitmem_per_type(t, "Mean UnitMem per layer type (D')"))
    save("fig5_max_unitmem_per_block", figures.max_unitmem_per_block(t, "Max UnitMem per block (D')"))
    save("fig6_coverage", figures.coverage(*main["curve"], main["coverage"], "Coverage of U10 (D')"))
    top_pos = unitmem.rank_samples(main["nmu"], ids)[:N_TOP_SAMPLES]
    tiles = [figures.Tile(_tile_image(load, data.source[rows[p]]),
                          f"#{r + 1} id {ids[p]} c{data.label[rows[p]]}\nNumMemUnits {main['nmu'][p]}",
                          f"id {ids[p]}\nclass {data.label[rows[p]]}")
             for r, p in enumerate(top_pos)]
    save("fig7_top_samples",
         figures.image_grid(tiles, 5, f"The {len(tiles)} samples with the highest NumMemUnits"))
    tiles, row_labels = [], []
    ncols = max(1, max(len(units) for units in extra["top_units"].values()))  # < top_k in tiny models
    for b, units in extra["top_units"].items():
        row_labels.append(f"block {b}")
        for u in units:
            r = ctx.argmax_row[u]
            tiles.append(figures.Tile(_tile_image(load, data.source[r]),
                                      f"UM {main['um'][u]:.3f}\nid {data.ids[r]} c{data.label[r]}",
                                      f"id {data.ids[r]}\nclass {data.label[r]}"))
        tiles += [None] * (ncols - len(units))  # empty cells keep one block per row
    site_name = layout.sites[extra["fc1"]] if extra["fc1"] is not None else "all sites"
    save("fig8_top_units_images", figures.image_grid(
        tiles, ncols, f"Images maximally activating the top {top_k} {site_name} units per block",
        row_labels))
    if ctx.d_all is not None:
        d_all = ctx.d_all
        save("fig9_train_vs_val", figures.train_vs_val(d_all["comparison_all"], d_all["comparison_u10"]))
        save("d_all_u10_per_block", figures.u10_per_block(d_all["table"], "U10(D_all) units per block"))
    save("extra_unitmem_histogram", figures.unitmem_histogram(main["um"], layout.site, layout.sites,
                                                              main["threshold"], ctx.q))
    save("extra_diversity_by_depth", figures.diversity_by_depth(
        extra["diversity_site"], extra["diversity_all"], site_name, top_k))
    if extra["loss"] is not None:
        save("extra_loss_vs_memunits", figures.loss_vs_memunits(data.loss[rows], main["nmu"], extra["loss"]))
    if extra["per_scale"] is not None:
        save("extra_per_scale", figures.per_scale(extra["per_scale"], layout.sites, extra["scale_labels"]))
    return paths


def analyze(run_dir: Path, load_image: ImageLoader | None = None, variant: str = "mean",
            q: float = 90.0, top_k: int = 10, n_permutations: int = 10_000, seed: int = 0,
            log: Callable[[str], None] | None = None) -> dict:
    """Computes everything the study reports for one run directory and writes the report.

    Args:
      run_dir: the run directory (docs/design.md, "Run directory").
      load_image: source string -> uint8 (H, W, 3) or None, for the image grids; the default
        opens existing files with PIL. Failures and None give placeholder tiles.
      variant: "mean" (the study's mu_-max) or "median" (needs activations.npy).
      q: percentile defining U10 (90 in the study).
      top_k: units per block for the item-8-style lists and the diversity measure.
      n_permutations: permutations of the train/val test on D_all (0 skips it).
      seed: seed of that test.
      log: optional progress callback (one line per step).

    Returns:
      The summary dict, as written to summary.json (see report.py for the keys).
    """
    run_dir = Path(run_dir)
    say = log or (lambda msg: None)
    if variant not in ("mean", "median"):
        raise AnalysisError(f"variant must be 'mean' or 'median', got {variant!r}")
    data = load_run(run_dir)
    if variant == "median" and data.acts is None:
        raise AnalysisError("the median variant needs activations.npy (the full matrix)")
    for stale in ("report.md", "summary.json"):
        (run_dir / stale).unlink(missing_ok=True)
    from experiments.planted import analyze_planted  # here: planted.py builds on this module

    # a planted run's canary tests (planted.json), with this analysis's settings; None otherwise
    planted = analyze_planted(run_dir, q=q, n_permutations=n_permutations, seed=seed, log=say, data=data)
    ctx = _compute(run_dir, data, variant, q, top_k, n_permutations, seed, say)
    ctx.planted = planted
    say("figures")
    ctx.figures = _draw_figures(ctx, load_image or functools.partial(default_load_image, base=run_dir))
    say("report")
    summary = report.build_summary(ctx)
    # summary.json first, report.md last: a present report.md means the analysis finished.
    atomic_write_bytes(run_dir / "summary.json", report.to_json(summary).encode())
    atomic_write_bytes(run_dir / "report.md", report.render_markdown(ctx, summary).encode())
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="UnitMem analysis of a run directory.")
    parser.add_argument("run_dir", type=Path, help="directory written by the recording pass")
    parser.add_argument("--variant", choices=("mean", "median"), default="mean",
                        help="mu_-max: mean of the other samples (the study's) or their median")
    parser.add_argument("--quantile", type=float, default=90.0, help="percentile defining U10")
    parser.add_argument("--top-k", type=int, default=10, help="top units per block (item 8)")
    parser.add_argument("--permutations", type=int, default=10_000, help="train/val permutation test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutation test")
    args = parser.parse_args(argv)
    log = stderr_log()

    try:
        summary = analyze(args.run_dir, variant=args.variant, q=args.quantile, top_k=args.top_k,
                          n_permutations=args.permutations, seed=args.seed, log=log)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {args.run_dir / 'report.md'}: |U10| = {summary['u10_count']}, "
        f"{100 * summary['samples_with_memunits_frac']:.2f}% of samples with NumMemUnits > 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
