"""The study's figures (items 1-9 of docs/unitmem.md, "What the study reports") and extras:
the open questions' (class influence, diversity by depth, scale x depth) among them.

Every figure function draws one figure from already computed results (`varjax.unitmem`'s
dataclasses) and returns a matplotlib `Figure`, for a notebook as for the report; nothing
here computes a metric. `save` writes one PNG atomically. Figures are built with
`matplotlib.figure.Figure`, not pyplot, so no global state or interactive backend is
involved: PNGs render through Agg.

Shape letters (varjax.names): K scales, N samples, U units; blocks and sites spelled out.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from varjax.runfiles import atomic_write_bytes
from varjax.beyond import ClassInfluence, DiversityTest, ScaleDepthProfile
from varjax.unitmem import (
    BlockSiteTable,
    Correlation,
    Coverage,
    PerScaleView,
    SplitComparison,
)

DPI = 100
# One colour per layer type, the same in every figure; unknown sites cycle through the rest.
SITE_COLORS = {"attn.proj": "tab:blue", "ffn.fc1": "tab:orange", "ffn.fc2": "tab:green"}
_SPARE_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _color(site: str, i: int) -> str:
    return SITE_COLORS.get(site, _SPARE_COLORS[i % len(_SPARE_COLORS)])


def _figure(width: float = 6.4, height: float = 4.0) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _depth_axis(ax, blocks: np.ndarray) -> None:
    ax.set_xlabel("block (depth)")
    step = max(1, int(np.ceil(len(blocks) / 16)))
    ax.set_xticks(blocks[::step])
    ax.grid(alpha=0.3)


def save(fig: Figure, path: Path) -> None:
    """Writes `fig` as a PNG at `path`, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())


def _per_block_lines(table: BlockSiteTable, values: np.ndarray, ylabel: str, title: str,
                     total=None) -> tuple[Figure, object]:
    """One line over depth per layer type (`values`, (blocks, sites)); `total` is
    (values, style, label) for a black line over them all, or None."""
    fig = _figure()
    ax = fig.add_subplot()
    for s, site in enumerate(table.sites):
        ax.plot(table.blocks, values[:, s], "o-", ms=3, color=_color(site, s), label=site)
    if total is not None:
        values, style, label = total
        ax.plot(table.blocks, values, style, ms=3, color="black", label=label)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _depth_axis(ax, table.blocks)
    ax.legend(fontsize=8)
    return fig, ax


def u10_per_block(table: BlockSiteTable, title: str = "U10 units per block") -> Figure:
    """Item 1: U10 count per block for each layer type and in total (line over depth)."""
    fig, ax = _per_block_lines(table, table.u10, "units in U10", title, (table.block_u10, "s-", "total"))
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def mean_unitmem_per_block(table: BlockSiteTable, title: str = "Mean UnitMem per block") -> Figure:
    """Item 2: mean UnitMem per block and layer type; the block line weights fc1 x4."""
    return _per_block_lines(table, table.mean, "mean UnitMem", title,
                            (table.block_mean, "s--", "block (all units; fc1 weighs x4)"))[0]


def max_unitmem_per_block(table: BlockSiteTable, title: str = "Max UnitMem per block") -> Figure:
    """Item 5: max UnitMem per block and layer type over depth."""
    return _per_block_lines(table, table.max, "max UnitMem", title)[0]


def _annotated_bars(ax, names, values, colors, fmt: str) -> None:
    bars = ax.bar(range(len(names)), values, color=colors)
    ax.set_xticks(range(len(names)), names)
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8, padding=2)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def u10_per_type(table: BlockSiteTable, title: str = "U10 units per layer type") -> Figure:
    """Item 3: U10 count per layer type, plus each larger site scaled to the smallest's size."""
    sites = list(table.sites)
    names, values, colors = [], [], []
    for s, site in enumerate(sites):
        names.append(site)
        values.append(float(table.site_u10[s]))
        colors.append(_color(site, s))
    for s, site in enumerate(sites):
        ratio = table.site_units[s] / table.site_units.min()
        if ratio > 1:  # fc1: 4x the units of the other sites
            names.append(f"{site}\n(/ {ratio:g}, size-adjusted)")
            values.append(float(table.site_u10_adjusted[s]))
            colors.append(_color(site, s))
    fig = _figure()
    ax = fig.add_subplot()
    _annotated_bars(ax, names, values, colors, "{:.0f}")
    for patch, name in zip(ax.patches, names):
        if "adjusted" in name:
            patch.set_hatch("//")
            patch.set_alpha(0.6)
    ax.set_ylabel("units in U10")
    ax.set_title(title)
    return fig


def mean_unitmem_per_type(table: BlockSiteTable, title: str = "Mean UnitMem per layer type") -> Figure:
    """Item 4: mean UnitMem per layer type (bar)."""
    sites = list(table.sites)
    fig = _figure()
    ax = fig.add_subplot()
    _annotated_bars(ax, sites, table.site_mean, [_color(s, i) for i, s in enumerate(sites)], "{:.3f}")
    ax.set_ylabel("mean UnitMem")
    ax.set_title(title)
    return fig


def coverage(x: np.ndarray, y: np.ndarray, cov: Coverage, title: str = "Coverage of U10") -> Figure:
    """Item 6: cumulative share of U10 covered by the top fraction of samples.

    Args:
      x: (N+1,) fraction of samples (ranked by NumMemUnits, highest first).
      y: (N+1,) share of U10 whose argmax lies among them.
      cov: item 6's numbers; its top-p points are marked and labelled.
    """
    fig = _figure()
    ax = fig.add_subplot()
    # A step function: the share only grows when one more whole sample is taken.
    ax.plot(100 * x, 100 * y, color="tab:blue", drawstyle="steps-post", label="top samples by NumMemUnits")
    for t in cov.top:
        px, py = 100 * t.n_samples / max(len(x) - 1, 1), 100 * t.share
        ax.plot(px, py, "o", color="tab:red")
        ax.annotate(f"top {100 * t.fraction:g}%: {py:.1f}%", (px, py), xytext=(8, -12),
                    textcoords="offset points", fontsize=8)
    frac = 100 * cov.samples_with_memunits_frac
    ax.axvline(frac, color="gray", ls=":", label=f"samples with NumMemUnits > 0: {frac:.1f}%")
    _coverage_axes(ax, title)
    return fig


@dataclasses.dataclass(frozen=True)
class Tile:
    """One cell of an image grid: the image (None draws a placeholder) and its caption."""

    image: np.ndarray | None
    caption: str
    placeholder: str = "no image"


def image_grid(tiles: list[Tile | None], ncols: int, title: str,
               row_labels: list[str] | None = None) -> Figure:
    """Items 7 and 8: images with captions; missing images become labelled grey tiles.

    Args:
      tiles: row-major cells; `image` uint8 (H, W, 3) or None; a None cell stays empty.
      ncols: cells per row.
      title: figure title.
      row_labels: optional label per row (e.g. "block 5"), drawn left of the row.
    """
    nrows = max(1, int(np.ceil(len(tiles) / ncols)))
    # Fixed margins in inches instead of constrained layout: with 40 axes the layout solver
    # costs more than drawing. Cells are 1.45 in square plus 0.4 in for a two-line caption.
    left, top, cell, cap, gap = (0.35 if row_labels else 0.1), 0.45, 1.45, 0.4, 0.08
    width, height = left + ncols * (cell + gap), top + nrows * (cell + cap) + 0.1
    fig = Figure(figsize=(width, height), dpi=DPI)
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=dict(
        left=left / width, right=1 - gap / width, top=1 - (top + cap) / height, bottom=0.1 / height,
        wspace=gap / cell, hspace=cap / cell))
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(tiles) or tiles[i] is None:
            ax.axis("off")
            continue
        tile = tiles[i]
        if tile.image is not None:
            ax.imshow(tile.image)
        else:
            ax.imshow(np.full((8, 8, 3), 0.85))
            ax.text(0.5, 0.5, tile.placeholder, ha="center", va="center", fontsize=7,
                    transform=ax.transAxes, color="0.3")
        ax.set_title(tile.caption, fontsize=7)
    if row_labels:
        for r, label in enumerate(row_labels[:nrows]):
            axes[r, 0].set_ylabel(label, fontsize=9)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    return fig


def train_vs_val(comp_all: SplitComparison, comp_u10: SplitComparison,
                 title: str = "D_all: train (D') vs val") -> Figure:
    """Item 9: NumMemUnits summed over D' and over D_val, for all units and U10(D_all)."""
    fig = _figure(7.0, 4.0)
    axes = fig.subplots(1, 2)
    for ax, comp, name in ((axes[0], comp_all, "all units"), (axes[1], comp_u10, "U10(D_all)")):
        vals = [comp.sum_train, comp.sum_val]
        _annotated_bars(ax, [f"train\n(n={comp.n_train})", f"val\n(n={comp.n_val})"], vals,
                        ["tab:blue", "tab:gray"], "{:.0f}")
        p = comp.p_value
        ptxt = "no test" if p is None else f"permutation p = {p:.3g} (n={comp.n_permutations})"
        ax.set_title(f"{name}\n{ptxt}", fontsize=9)
        ax.set_ylabel("sum of NumMemUnits")
    fig.suptitle(title, fontsize=10)
    return fig


def per_scale(view: PerScaleView, sites: tuple[str, ...], scale_labels: list[str] | None = None) -> Figure:
    """Extra: U10 and mean UnitMem per scale (UnitMem from each scale's tokens alone).

    Args:
      view: the per-scale view (u10 and mean (K, sites), overlap (K,) or None).
      sites: site names.
      scale_labels: optional K tick labels (e.g. "1x1", ..., "16x16").
    """
    k = view.u10.shape[0]
    xs = np.arange(k)
    has_overlap = view.overlap is not None
    fig = _figure(12.0 if has_overlap else 9.0, 3.6)
    axes = fig.subplots(1, 3 if has_overlap else 2)
    for s, site in enumerate(sites):
        axes[0].plot(xs, view.u10[:, s], "o-", ms=3, color=_color(site, s), label=site)
        axes[1].plot(xs, view.mean[:, s], "o-", ms=3, color=_color(site, s), label=site)
    axes[0].set_ylabel("units in the scale's U10")
    axes[0].set_ylim(bottom=0)
    axes[0].set_title("U10 per scale", fontsize=10)
    axes[1].set_ylabel("mean UnitMem")
    axes[1].set_title("mean UnitMem per scale", fontsize=10)
    axes[1].legend(fontsize=7)
    if has_overlap:
        axes[2].plot(xs, 100 * np.asarray(view.overlap), "o-", ms=3, color="black")
        axes[2].set_ylim(0, 105)
        axes[2].set_ylabel("% of the scale's U10")
        axes[2].set_title("share also in the all-token U10", fontsize=10)
    for ax in axes:
        ax.set_xticks(xs, scale_labels if scale_labels else [str(i) for i in xs],
                      rotation=45 if scale_labels else 0, fontsize=8)
        ax.set_xlabel("scale")
        ax.grid(alpha=0.3)
    return fig


def loss_vs_memunits(loss: np.ndarray, nmu: np.ndarray, corr: Correlation) -> Figure:
    """Extra: per-sample teacher-forced loss against NumMemUnits, with Spearman's rho."""
    fig = _figure(5.5, 4.0)
    ax = fig.add_subplot()
    # Jitter the integer counts a little so that equal counts don't hide each other.
    jitter = np.random.default_rng(0).uniform(-0.2, 0.2, len(nmu))
    ax.scatter(np.asarray(nmu) + jitter, loss, s=6, alpha=0.5)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("NumMemUnits (symlog, jittered)")
    ax.set_ylabel("teacher-forced loss (nats)")
    ax.set_title(f"Loss vs NumMemUnits: Spearman rho = {corr.rho:.3f} "
                 f"(p = {corr.p_value:.2g}, n = {corr.n})", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def diversity_by_depth(tests: tuple[DiversityTest, ...], k: int) -> Figure:
    """Open question: the entropy of the argmax images and classes of each block's top-k
    units over depth, per site, with the permutation null's mean (all sites, grey).

    Args:
      tests: one DiversityTest per site, the last over all per-block sites.
      k: units per block (entropy at most log2 k).
    """
    fig = _figure(10.0, 3.8)
    axes = fig.subplots(1, 2)
    every = tests[-1]
    for ax, what, plural in zip(axes, ("image", "class"), ("images", "classes")):
        # All sites first, wide and pale: it often equals fc1's line, which stays visible on top.
        ax.plot(every.blocks, getattr(every, f"{what}_entropy"), "s-", lw=4, ms=5, color="black", alpha=0.3,
                label=every.site)
        for i, t in enumerate(tests[:-1]):
            if len(t.blocks) < 2:
                continue  # a top site (one "block"): its number is in the report's table
            ax.plot(t.blocks, getattr(t, f"{what}_entropy"), "o-", ms=3, color=_color(t.site, i), label=t.site)
        ax.plot(every.blocks, getattr(every, f"null_{what}_entropy"), ":", color="gray", label="null mean (all sites)")
        p = getattr(every, f"p_{what}_falls")
        ptxt = "no test" if p is None else f"slope {getattr(every, f'{what}_slope'):.2f} bits/depth, p(falls) = {p:.3g}"
        ax.set_title(f"{plural} of the top-{k} units' argmax (all sites)\n{ptxt}", fontsize=9)
        ax.set_ylabel("entropy (bits)")
        ax.set_ylim(-0.1, np.log2(max(k, 2)) + 0.2)
        _depth_axis(ax, every.blocks)
        ax.legend(fontsize=7)
    return fig


def class_influence(ci: ClassInfluence, nmu: np.ndarray, labels: np.ndarray) -> Figure:
    """Open question: each class's share of the samples against its share of U10's argmax,
    and NumMemUnits per class; the classes that stand out are starred.

    Args:
      ci: the class influence test; nmu: (N,) NumMemUnits; labels: (N,) each sample's class.
    """
    fig = _figure(max(7.0, 0.35 * len(ci.classes) + 3), 6.0)
    axes = fig.subplots(2, 1)
    x = np.arange(len(ci.classes))
    axes[0].bar(x - 0.2, 100 * ci.sample_share, 0.4, color="tab:gray", label="share of D' samples")
    axes[0].bar(x + 0.2, 100 * ci.u10_share, 0.4, color="tab:orange", label="share of U10 argmax")
    for c in ci.stand_out:
        i = int(np.flatnonzero(ci.classes == c)[0])
        axes[0].annotate("*", (i + 0.2, 100 * ci.u10_share[i]), ha="center", fontsize=14)
    ptxt = "no test" if ci.p_value is None else f"chi2 = {ci.chi2:.3g}, permutation p = {ci.p_value:.3g}"
    axes[0].set_title(f"Class influence: {ptxt}; * Holm p <= {ci.alpha:g}", fontsize=9)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=7)
    rng = np.random.default_rng(0)  # horizontal jitter only
    for i, c in enumerate(ci.classes):
        v = np.asarray(nmu)[np.asarray(labels) == c]
        axes[1].boxplot([v], positions=[i], widths=0.6, showfliers=False)
        axes[1].scatter(i + rng.uniform(-0.2, 0.2, len(v)), v, s=5, alpha=0.4, color="tab:orange")
    axes[1].set_yscale("symlog", linthresh=1.0)
    axes[1].yaxis.set_major_formatter(ScalarFormatter())
    axes[1].set_ylabel("NumMemUnits (symlog)")
    for ax in axes:
        step = max(1, int(np.ceil(len(x) / 40)))
        ax.set_xticks(x[::step], [str(c) for c in ci.classes[::step]], fontsize=7)
        ax.set_xlabel("class")
        ax.grid(alpha=0.3, axis="y")
    return fig


def scale_depth(p: ScaleDepthProfile, scale_labels: list[str] | None = None) -> Figure:
    """Where memorization sits by scale and depth: U10 share per (scale, block) for each site and
    over all sites (the centre of mass per scale drawn on the latter), mean UnitMem per site,
    and the centre of mass against the scale with Spearman's rho.

    Args:
      p: the profile (K scales x B blocks x sites).
      scale_labels: optional K labels (e.g. "1x1", ..., "16x16").
    """
    K, _, S = p.u10_share.shape
    labels = scale_labels or [str(k) for k in range(K)]
    fig = _figure(3.2 * (S + 1), 6.4)
    axes = fig.subplots(2, S + 1, squeeze=False)
    extent = (p.blocks[0] - 0.5, p.blocks[-1] + 0.5, K - 0.5, -0.5)
    panels = [(axes[0, s], p.u10_share[:, :, s], f"U10 share: {name}", "viridis") for s, name in enumerate(p.sites)]
    panels += [(axes[0, S], p.u10_share_all, "U10 share: all sites", "viridis")]
    panels += [(axes[1, s], p.mean[:, :, s], f"mean UnitMem: {name}", "magma") for s, name in enumerate(p.sites)]
    for ax, values, title, cmap in panels:
        im = ax.imshow(values, aspect="auto", cmap=cmap, extent=extent, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(K), labels, fontsize=7)
        ax.set_xlabel("block")
        ax.set_xticks(p.blocks[:: max(1, int(np.ceil(len(p.blocks) / 8)))])
    axes[0, S].plot(p.centre_block, np.arange(K), "w-o", ms=3, label="centre of mass")
    axes[0, S].legend(fontsize=7, loc="lower right")
    ax = axes[1, S]
    ax.plot(np.arange(K), p.centre, "s-", color="black", label="all sites")
    for s, name in enumerate(p.sites):
        ax.plot(np.arange(K), p.centre_by_site[:, s], "o--", ms=3, color=_color(name, s), label=name, alpha=0.7)
    ptxt = "no test" if p.p_deeper is None else f"rho = {p.rho:.2f}, p(deeper) = {p.p_deeper:.3g}"
    ax.set_title(f"U10 centre of mass by scale\n{ptxt}", fontsize=9)
    ax.set_xticks(range(K), labels, rotation=45, fontsize=7)
    ax.set_xlabel("scale")
    ax.set_ylabel("relative depth (block / depth)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return fig


def unitmem_histogram(um: np.ndarray, site: np.ndarray, sites: tuple[str, ...],
                      threshold: float, q: float) -> Figure:
    """Extra: the distribution of UnitMem per layer type, with the U10 threshold."""
    fig = _figure()
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 51)
    for s, name in enumerate(sites):
        ax.hist(um[site == s], bins=bins, histtype="step", color=_color(name, s), label=name, lw=1.5)
    ax.axvline(threshold, color="tab:red", ls="--", label=f"P{q:g} = {threshold:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("UnitMem")
    ax.set_ylabel("units")
    ax.set_title("UnitMem distribution")
    ax.legend(fontsize=8)
    return fig


def planted_separation(names: list[str], group: np.ndarray, metrics: list[tuple[np.ndarray, str]],
                       um: np.ndarray, unit_group: np.ndarray, threshold: float) -> Figure:
    """Planted memorization: one panel per metric (per-sample values by role), plus the
    UnitMem of the units each role singles out, with the U10 threshold.

    Args:
      names: roles in display order; group: (N,) each sample's role.
      metrics: [(values (N,), label)]; um: (U,) UnitMem; unit_group: (U,) role of each
        unit's argmax sample.
    """
    panels = list(metrics) + [(None, "UnitMem of the units it singles out")]
    fig = Figure(figsize=(3.2 * len(panels), 3.4), dpi=DPI, layout="constrained")
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
            ax.axhline(threshold, color="gray", ls="--", lw=0.8, label="U10 threshold")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), [n.replace("canary ", "") for n in names], rotation=30, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Planted memorization: held-out, singletons, canaries by training copies", fontsize=10)
    return fig


@dataclasses.dataclass(frozen=True, eq=False)
class RunCurves:
    """One run of a comparison: its label, block/site table, depth, coverage curve (x, y) and
    diversity tests (one per site)."""

    name: str
    table: BlockSiteTable
    depth: int
    curve: tuple[np.ndarray, np.ndarray]
    diversity: tuple[DiversityTest, ...]


def compare_depth(runs: list[RunCurves], sites: tuple[str, ...]) -> Figure:
    """Other depths: U10 share of each block's units (top row) and mean UnitMem (bottom) per
    layer type against relative depth (block / depth), one line per run."""
    fig = _figure(3.4 * len(sites), 6.0)
    axes = fig.subplots(2, len(sites), squeeze=False)
    for i, r in enumerate(runs):
        x = r.table.blocks / max(r.depth, 1)
        for s, site in enumerate(r.table.sites):
            with np.errstate(invalid="ignore", divide="ignore"):
                share = r.table.u10[:, s] / r.table.n_units[:, s]
            axes[0, s].plot(x, 100 * share, "o-", ms=3, color=f"C{i}", label=r.name)
            axes[1, s].plot(x, r.table.mean[:, s], "o-", ms=3, color=f"C{i}", label=r.name)
    for s, site in enumerate(sites):
        axes[0, s].set_title(f"U10 share: {site}", fontsize=9)
        axes[1, s].set_title(f"mean UnitMem: {site}", fontsize=9)
        for ax in axes[:, s]:
            ax.set_xlabel("relative depth (block / depth)")
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("% of the block's units in U10")
    axes[1, 0].set_ylabel("mean UnitMem")
    axes[0, 0].legend(fontsize=7)
    return fig


def _coverage_axes(ax, title: str) -> None:
    """A coverage plot's axes: top % of samples (symlog) against % of U10 covered."""
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(0, 100)
    ticks = [0, 0.5, 1, 2, 5, 10, 20, 50, 100]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_ylim(0, 102)
    ax.set_xlabel("top % of samples (symlog scale)")
    ax.set_ylabel("% of U10 units covered")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def compare_coverage(runs: list[RunCurves]) -> Figure:
    """Other depths: the coverage curves of the runs (share of U10 held by the top samples)."""
    fig = _figure()
    ax = fig.add_subplot()
    for i, r in enumerate(runs):
        x, y = r.curve
        ax.plot(100 * x, 100 * y, drawstyle="steps-post", color=f"C{i}", label=r.name)
    _coverage_axes(ax, "Coverage of U10")
    return fig


def compare_diversity(runs: list[RunCurves], k: int) -> Figure:
    """Other depths: entropy of the top-k units' argmax images per block against relative
    depth, one panel per layer type, one line per run."""
    sites = [d.site for d in runs[0].diversity]
    fig = _figure(3.4 * len(sites), 3.6)
    axes = fig.subplots(1, len(sites), squeeze=False)[0]
    for i, r in enumerate(runs):
        for ax, d in zip(axes, r.diversity):
            ax.plot(d.relative_depth, d.image_entropy, "o-", ms=3, color=f"C{i}", label=r.name)
    for ax, site in zip(axes, sites):
        ax.set_title(f"{site}: top-{k} units' argmax images", fontsize=9)
        ax.set_xlabel("relative depth (block / depth)")
        ax.set_ylim(-0.1, np.log2(max(k, 2)) + 0.2)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("entropy (bits)")
    axes[0].legend(fontsize=7)
    return fig
