"""What an analysis writes into the run directory: figures, planted.json, summary.json, report.md.

`analyze(run_dir)` reads the run (`load_run`), computes every number (`compute`), draws the
figures and writes the files. Every output is written atomically (temp file in the same
directory, then os.replace), and a previous report.md/summary.json is removed first, so an
interrupted analysis never leaves a report that looks complete but is stale or truncated;
report.md is written last.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np

from varjax.analysis import figures as F
from varjax.analysis import memfigures, mia
from varjax.analysis import report
from varjax.analysis.compute import Analysis, compute
from varjax.analysis.planted import FIGURE as PLANTED_FIGURE
from varjax.analysis.planted import METRICS as PLANTED_METRICS
from varjax.analysis.planted import OUTPUT as PLANTED_JSON
from varjax.analysis.planted import PlantedAnalysis, analyze_planted
from varjax.analysis.rundir import default_load_image, load_run
from varjax.runfiles import atomic_write_bytes, atomic_write_text

ImageLoader = Callable[[str], "np.ndarray | None"]
# Sections that other jobs write beside the report (experiments/intervene.py: intervention.md);
# report.md carries each one that is present, after the analysis, in this order.
SECTION_FILES = ("intervention.md",)
THUMB = 128  # pixels: grid tiles are ~150 px wide, larger images only cost memory


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


def _image_figures(a: Analysis, load: ImageLoader) -> dict[str, object]:
    """Items 7 and 8: the top samples, and the images maximally activating top units."""
    d, main = a.data, a.d_prime
    tiles = [F.Tile(_tile_image(load, d.source[a.rows[p]]),
                    f"#{r + 1} id {main.ids[p]} c{d.label[a.rows[p]]}\nNumMemUnits {main.nmu[p]}",
                    f"id {main.ids[p]}\nclass {d.label[a.rows[p]]}")
             for r, p in enumerate(main.top_samples())]
    out = {"fig7_top_samples": F.image_grid(tiles, 5, f"The {len(tiles)} samples with the highest NumMemUnits")}
    tiles, row_labels = [], []
    ncols = max(1, max(len(units) for units in a.top_units.values()))  # < top_k in tiny models
    for b, units in a.top_units.items():
        row_labels.append(f"block {b}")
        for u in units:
            r = a.argmax_row[u]
            tiles.append(F.Tile(_tile_image(load, d.source[r]), f"UM {main.um[u]:.3f}\nid {d.ids[r]} c{d.label[r]}",
                                f"id {d.ids[r]}\nclass {d.label[r]}"))
        tiles += [None] * (ncols - len(units))  # empty cells keep one block per row
    out["fig8_top_units_images"] = F.image_grid(
        tiles, ncols, f"Images maximally activating the top {a.top_k} {a.fc1_name} units per block", row_labels)
    return out


def figures(a: Analysis, load_image: ImageLoader) -> dict[str, object]:
    """Every figure of the report, by name (matplotlib Figures; nothing is written)."""
    main, t = a.d_prime, a.d_prime.table
    out = {
        "fig1_u10_per_block": F.u10_per_block(t, f"U10 units per block (D', {a.variant})"),
        "fig2_mean_unitmem_per_block": F.mean_unitmem_per_block(t, "Mean UnitMem per block (D')"),
        "fig3_u10_per_type": F.u10_per_type(t, "U10 units per layer type (D')"),
        "fig4_mean_unitmem_per_type": F.mean_unitmem_per_type(t, "Mean UnitMem per layer type (D')"),
        "fig5_max_unitmem_per_block": F.max_unitmem_per_block(t, "Max UnitMem per block (D')"),
        "fig6_coverage": F.coverage(*main.curve, main.coverage, "Coverage of U10 (D')"),
        **_image_figures(a, load_image),
    }
    if a.d_all is not None:
        out["fig9_train_vs_val"] = F.train_vs_val(a.d_all.comparison_all, a.d_all.comparison_u10)
        out["d_all_u10_per_block"] = F.u10_per_block(a.d_all.dataset.table, "U10(D_all) units per block")
    lay = a.data.layout
    out["extra_unitmem_histogram"] = F.unitmem_histogram(main.um, lay.site, lay.sites, main.threshold, a.q)
    out["extra_diversity_by_depth"] = F.diversity_by_depth(a.diversity, a.top_k)
    out["open_class_influence"] = F.class_influence(a.classes, main.nmu, a.data.label[a.rows])
    if a.loss is not None:
        out["extra_loss_vs_memunits"] = F.loss_vs_memunits(a.data.loss[a.rows], main.nmu, a.loss)
    if a.per_scale is not None:
        out["extra_per_scale"] = F.per_scale(a.per_scale, lay.sites, a.scale_labels)
        out["open_scale_depth"] = F.scale_depth(a.scale_depth, a.scale_labels)
    if a.membership is not None:
        out["mia_roc"] = _roc_figure(a.membership)
    return out


def _roc_figure(m):
    """ROC curves of the headline scores: loss, the best Min-K% and zlib of each family, the
    last-scale accuracy and NumMemUnits."""
    names = [n for n in ("cond_loss", m.best.get("cond_mink"), "cond_zlib", "diff_loss", m.best.get("diff_mink"),
                         "diff_zlib", "acc_last", mia.NMU) if n in m.scores]
    return memfigures.roc_curves({n: m.scores[n] for n in names}, {n: m.get(n).members_lower for n in names},
                                 {n: mia.label(n) for n in names})


def planted_figure(p: PlantedAnalysis):
    """The planted-memorization figure."""
    arr = p.arrays
    return F.planted_separation(arr.names, arr.group, [(arr.metric[k], label) for k, label, _ in PLANTED_METRICS],
                                arr.um, arr.unit_group, p.threshold)


def write_planted(run_dir: Path, p: PlantedAnalysis) -> None:
    """planted.json and figures/planted_separation.png."""
    (run_dir / "figures").mkdir(exist_ok=True)
    F.save(planted_figure(p), run_dir / PLANTED_FIGURE)
    atomic_write_text(run_dir / PLANTED_JSON, report.to_json(p.to_json()))


def analyze_planted_run(run_dir: Path | str, checkpoint: Path | None = None, q: float = 90.0,
                        n_permutations: int = 10_000, seed: int = 0,
                        log: Callable[[str], None] | None = None) -> PlantedAnalysis | None:
    """The planted tests of a run directory alone, written as planted.json and its figure;
    None when the run is not planted."""
    run_dir = Path(run_dir)
    p = analyze_planted(load_run(run_dir), checkpoint, q, n_permutations, seed, log)
    if p is not None:
        write_planted(run_dir, p)
    return p


def analyze(run_dir: Path | str, load_image: ImageLoader | None = None, variant: str = "mean",
            q: float = 90.0, top_k: int = 10, n_permutations: int = 10_000, seed: int = 0,
            log: Callable[[str], None] | None = None) -> dict:
    """Computes everything the study reports for one run directory and writes the report.

    Args:
      run_dir: the run directory (docs/design.md, "Run directory").
      load_image: source string -> uint8 (H, W, 3) or None, for the image grids; the default
        opens existing files with PIL. Failures and None give placeholder tiles.
      variant, q, top_k, n_permutations, seed: as `compute`.
      log: optional progress callback (one line per step).

    Returns:
      The summary dict, as written to summary.json (see varjax.analysis.report for the keys).
    Raises:
      AnalysisError: missing or inconsistent files, a bad variant.
    """
    run_dir = Path(run_dir)
    say = log or (lambda msg: None)
    data = load_run(run_dir)
    a = compute(data, variant, q, top_k, n_permutations, seed, log=say)
    for stale in ("report.md", "summary.json"):
        (run_dir / stale).unlink(missing_ok=True)
    fig_dir = run_dir / "figures"
    if a.planted is not None:
        say("planted: figure")
        write_planted(run_dir, a.planted)
    say("figures")
    fig_dir.mkdir(exist_ok=True)
    paths = {}
    for name, fig in figures(a, load_image or functools.partial(default_load_image, base=run_dir)).items():
        F.save(fig, fig_dir / f"{name}.png")
        paths[name] = f"figures/{name}.png"
    say("report")
    summary = report.build_summary(a, paths)
    # summary.json first, report.md last: a present report.md means the analysis finished.
    atomic_write_bytes(run_dir / "summary.json", report.to_json(summary).encode())
    text = report.render_markdown(a, summary, paths)
    for name in SECTION_FILES:
        if (run_dir / name).is_file():
            text = with_section(text, name, (run_dir / name).read_text())
    atomic_write_bytes(run_dir / "report.md", text.encode())
    return summary


def with_section(report_md: str, name: str, section: str) -> str:
    """report_md with `section` between the markers of `name`: replacing an earlier copy, else appended."""
    begin, end = f"<!-- section {name} -->", f"<!-- end of section {name} -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    if begin in report_md and end in report_md.split(begin, 1)[1]:
        head, rest = report_md.split(begin, 1)
        return head + block + rest.split(end, 1)[1].lstrip("\n")
    return report_md.rstrip() + "\n\n" + block


def add_section(run_dir: Path, name: str, section: str) -> None:
    """Puts `section` (the content of `name`, one of SECTION_FILES) into run_dir's report.md, atomically."""
    path = Path(run_dir) / "report.md"
    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, with_section(old, name, section))
