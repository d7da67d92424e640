"""summary.json and report.md of one analysis: numbers in, text out (no file system access).

`build_summary` turns the arrays computed by analyze.py into a JSON-ready dict; its keys:
- `variant` ("mean"/"median"), `quantile` (q; U10 = UnitMem >= the q-th percentile),
  `primary_split` (the study's D': "train"), `stats_source` ("stats_npz"/"activations"),
  `n_skipped` (samples of samples.csv that skipped.csv lists: unreadable, in no statistic),
  `variants_available`, `n_samples`, `n_units`, `n_blocks`, `sites`.
- The study's numbers on D' (fractions in [0, 1]): `p90` (the q-th percentile of UnitMem),
  `u10_count`, `samples_with_memunits`, `samples_with_memunits_frac`, `top1pct_coverage`,
  `top5pct_coverage`, `top10pct_coverage`, `coverage` (n samples and units per top-p),
  `unitmem` (mean/median/min/max), `per_site`, `per_block`, `top_samples`, `top_units`.
- Beyond the study: `diversity`, `loss_correlation`, `per_scale`, `other_variant` (null when
  not computed).
- `d_all` (only when val samples are present): the same dataset numbers on D' + D_val, and
  `all_units` / `u10` train-vs-val comparisons with permutation p-values.
- `figures`: figure name -> path relative to the run directory.
`render_markdown` writes the human-readable report from the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from varjax.unitmem import rank_samples

# The study's d16 values (spec/unitmem.md, item 6), printed beside this run's numbers.
STUDY_D16 = {"n_samples": 8192, "n_units": 98304, "u10_count": 9831,
             "samples_with_memunits": "27.19% (2227/8192)",
             "top1pct_coverage": "49.28%", "top5pct_coverage": "70.92%", "top10pct_coverage": "82.77%"}


@dataclasses.dataclass
class Context:
    """What analyze.py computed: inputs (`data`, a RunData), per-dataset results, figures."""

    run_dir: Path
    variant: str
    q: float
    top_k: int
    primary: str
    stats_source: str
    data: Any
    main: dict
    extra: dict
    d_all: dict | None
    figures: dict[str, str]
    argmax_row: np.ndarray  # (U,) data row of each unit's argmax sample on the primary split
    rows: np.ndarray
    planted: dict | None = None  # experiments/planted.py's result on a planted run


def _top_key(fraction: float) -> str:
    return f"top{100 * fraction:g}pct_coverage"


def _dataset_summary(ds: dict) -> dict:
    """The study's numbers (items 1-6) for one dataset."""
    t, cov, um = ds["table"], ds["coverage"], ds["um"]
    out = {"n_samples": len(ds["nmu"]), "p90": ds["threshold"], "u10_count": int(ds["mask"].sum()),
           "samples_with_memunits": cov["samples_with_memunits"],
           "samples_with_memunits_frac": cov["samples_with_memunits_frac"]}
    out.update({_top_key(c["fraction"]): c["share"] for c in cov["top"]})
    out["coverage"] = cov["top"]
    out["unitmem"] = {"mean": um.mean(), "median": np.median(um), "min": um.min(), "max": um.max()}
    out["per_site"] = {site: {"n_units": t["site_units"][s], "u10_count": t["site_u10"][s],
                              "u10_count_size_adjusted": t["site_u10_adjusted"][s],
                              "u10_frac_of_site": t["site_u10_frac"][s], "mean_unitmem": t["site_mean"][s],
                              "max_unitmem": t["site_max"][s]} for s, site in enumerate(t["sites"])}
    out["per_block"] = {"blocks": t["blocks"], "u10_total": t["block_u10"], "mean_all_units": t["block_mean"],
                        "max_all_units": t["block_max"],
                        **{f"{k}_by_site": {site: t[k][:, s] for s, site in enumerate(t["sites"])}
                           for k in ("u10", "mean", "max")}}
    return out


def build_summary(ctx: Context) -> dict:
    """The JSON summary (keys in the module docstring)."""
    d, main, extra, lay = ctx.data, ctx.main, ctx.extra, ctx.data.layout
    ids = d.ids[ctx.rows]
    out = {"variant": ctx.variant, "quantile": ctx.q, "primary_split": ctx.primary,
           "stats_source": ctx.stats_source, "n_skipped": d.n_skipped,
           "variants_available": ["mean", "median"] if d.acts is not None else ["mean"],
           "n_units": len(lay.block), "n_blocks": len(lay.blocks), "sites": list(lay.sites)}
    out.update(_dataset_summary(main))
    out["top_samples"] = [
        {"rank": r + 1, "sample": ids[p], "label": d.label[ctx.rows[p]], "num_mem_units": main["nmu"][p],
         "source": d.source[ctx.rows[p]]}
        for r, p in enumerate(rank_samples(main["nmu"], ids)[:20])]
    st = d.stats[ctx.primary]
    out["top_units"] = {str(b): [{"unit": u, "site": lay.sites[lay.site[u]], "unitmem": main["um"][u],
                                  "argmax": st.argmax[u], "label": d.label[ctx.argmax_row[u]]}
                                 for u in units] for b, units in extra["top_units"].items()}
    div = {"k": ctx.top_k}
    for key, name in (("diversity_site", "site"), ("diversity_all", "all_sites")):
        if extra[key] is not None:
            div[name] = {k: v for k, v in extra[key].items()}
    out["diversity"] = div
    out["loss_correlation"] = extra["loss"]
    ps = extra["per_scale"]
    out["per_scale"] = None if ps is None else {
        "labels": extra.get("scale_labels") or [str(k) for k in range(len(ps["threshold"]))],
        "threshold": ps["threshold"], "overlap_with_u10": ps["overlap"],
        "u10_by_site": {s: ps["u10"][:, i] for i, s in enumerate(lay.sites)},
        "mean_by_site": {s: ps["mean"][:, i] for i, s in enumerate(lay.sites)}}
    out["other_variant"] = None
    if extra["other_variant"] is not None:
        name, ds = extra["other_variant"]
        o = _dataset_summary(ds)
        both = (ds["mask"] & main["mask"]).sum()
        either = (ds["mask"] | main["mask"]).sum()
        out["other_variant"] = {"variant": name, **{k: o[k] for k in (
            "p90", "u10_count", "samples_with_memunits_frac", "top1pct_coverage", "top5pct_coverage",
            "top10pct_coverage")}, "u10_jaccard_with_main": both / either if either else 1.0}
    if ctx.d_all is not None:
        da = ctx.d_all
        out["d_all"] = {**_dataset_summary(da), "all_units": da["comparison_all"],
                        "u10": da["comparison_u10"],
                        "note": "splits from samples.csv (the study's off-by-one, counting the first "
                                "val sample as train, is not reproduced)"}
    out["figures"] = dict(ctx.figures)
    return out


def _jsonable(x: Any) -> Any:
    """numpy -> Python; NaN and inf -> None (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def to_json(summary: dict) -> str:
    return json.dumps(_jsonable(summary), indent=1, allow_nan=False) + "\n"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}%"


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    return "n/a" if not math.isfinite(x) else f"{x:.{digits}g}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            items += _flatten(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def _fig(ctx: Context, name: str, alt: str) -> list[str]:
    return [f"![{alt}]({ctx.figures[name]})", ""] if name in ctx.figures else []


def _headline(ctx: Context, s: dict, study: bool) -> list[str]:
    """The headline numbers of one dataset, beside the study's d16 values for D'."""
    n, q = s["n_samples"], f"{ctx.q:g}"

    def row(name: str, value: str, key: str = "") -> list[str]:
        if not study:
            return [name, value]
        ref = STUDY_D16.get(key, "")
        return [name, value, _f(ref) if isinstance(ref, int) else ref]

    um = s["unitmem"]
    rows = [row("samples N", _f(n), "n_samples"),
            row("units U", _f(s.get("n_units", len(ctx.data.layout.block))), "n_units"),
            row(f"P{q} of UnitMem", _f(s["p90"])),
            row(f"U10 units (UnitMem >= P{q})", _f(s["u10_count"]), "u10_count"),
            row("samples with NumMemUnits > 0",
                f"{_pct(s['samples_with_memunits_frac'])} ({s['samples_with_memunits']}/{n})",
                "samples_with_memunits")]
    for c in s["coverage"]:
        name = f"U10 covered by the top {100 * c['fraction']:g}% (n = floor(N*p) = {c['n_samples']})"
        rows.append(row(name, f"{_pct(c['share'])} ({c['units']}/{s['u10_count']})", _top_key(c["fraction"])))
    rows.append(row("UnitMem mean / median / max",
                    f"{_f(um['mean'])} / {_f(um['median'])} / {_f(um['max'])}"))
    return _table(["quantity", "this run"] + (["study (d16)"] if study else []), rows)


def _dataset_section(ctx: Context, s: dict, study: bool) -> list[str]:
    """Headline numbers, per layer type and per block tables of one dataset."""
    lines = _headline(ctx, s, study) + ["", "Per layer type (items 3, 4):", ""]
    lines += _table(["site", "units", "U10", "U10 size-adjusted", "% of site in U10", "mean UnitMem",
                     "max UnitMem"],
                    [[k, _f(v["n_units"]), _f(v["u10_count"]), _f(v["u10_count_size_adjusted"], 5),
                      _pct(v["u10_frac_of_site"]), _f(v["mean_unitmem"]), _f(v["max_unitmem"])]
                     for k, v in s["per_site"].items()])
    pb, sites = s["per_block"], list(s["per_site"])
    header = (["block"] + [f"U10 {x}" for x in sites] + ["U10 total"] + [f"mean {x}" for x in sites]
              + ["block mean"] + [f"max {x}" for x in sites])
    rows = [[_f(b)] + [_f(pb["u10_by_site"][x][i]) for x in sites] + [_f(pb["u10_total"][i])]
            + [_f(pb["mean_by_site"][x][i], 3) for x in sites] + [_f(pb["mean_all_units"][i], 3)]
            + [_f(pb["max_by_site"][x][i], 3) for x in sites] for i, b in enumerate(pb["blocks"])]
    lines += ["", "Per block (items 1, 2, 5; the block mean is over all its units, so fc1 weighs x4):", ""]
    return lines + _table(header, rows) + [""]


def _sites_line(record_info: dict | None) -> str:
    """What the recorded units are, from the definitions the recording pass stored."""
    sites = (record_info or {}).get("fingerprint", {}).get("sites")
    if not sites:
        return ("- Units: as units.csv names them (no record.json: what each site measures is "
                "the recording tool's definition).")
    return ("- Units: the per-unit mean over tokens of |value| at " +
            "; ".join(f"`{k}` = {v}" for k, v in sites.items()) + ".")


def _run_section(ctx: Context, s: dict) -> list[str]:
    """Method line, run.json and record.json as key tables, sample counts."""
    mu_rest = ("the mean of the other N-1 samples, (sum - max)/(N-1), as in the study"
               if ctx.variant == "mean" else "the median of the other N-1 samples, as in the official "
               "UnitMem code")
    source = "stats_*.npz" if ctx.stats_source == "stats_npz" else "activations.npy"
    lines = [f"# UnitMem analysis of `{ctx.run_dir.name}`", "",
             f"- Variant: **{ctx.variant}** (mu_-max = {mu_rest}); variants available: "
             f"{', '.join(s['variants_available'])}.",
             f"- Statistics from {source}; U10 = units with UnitMem >= P{ctx.q:g} (numpy percentile, "
             "linear interpolation); a unit zero on every sample has UnitMem 0.",
             "- NumMemUnits(x) = U10 units whose argmax is x (argmax: smallest sample id on ties); "
             "samples are ranked by NumMemUnits, ties by ascending sample id.",
             _sites_line(ctx.data.record_info), "", "## Run", ""]

    def val(v: Any) -> str:
        text = v if isinstance(v, str) else json.dumps(_jsonable(v))
        return text if len(text) <= 120 else text[:117] + "..."

    for name, info in (("run.json", ctx.data.run_info), ("record.json", ctx.data.record_info)):
        if info:
            lines += [f"From `{name}`:", ""]
            lines += _table(["key", "value"], [[k, val(v)] for k, v in _flatten(info)]) + [""]
        elif name == "run.json":
            lines += ["No run.json in the run directory.", ""]
    counts = {sp: int((ctx.data.split == sp).sum()) for sp in dict.fromkeys(ctx.data.split.tolist())}
    skipped = (f" ({ctx.data.n_skipped} unreadable samples listed in skipped.csv left out)"
               if ctx.data.n_skipped else "")
    return lines + ["Samples per split: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                    + f"{skipped}; units: {s['n_units']} in {s['n_blocks']} blocks "
                    f"({', '.join(s['sites'])}).", ""]


def _d_prime_section(ctx: Context, s: dict) -> list[str]:
    """The study's items 1-8 on D'."""
    lines = [f"## D' (split `{ctx.primary}`): the study's numbers", ""] + _dataset_section(ctx, s, True)
    for name, alt in (("fig1_u10_per_block", "U10 per block"),
                      ("fig2_mean_unitmem_per_block", "mean UnitMem per block"),
                      ("fig3_u10_per_type", "U10 per layer type"),
                      ("fig4_mean_unitmem_per_type", "mean UnitMem per type"),
                      ("fig5_max_unitmem_per_block", "max UnitMem per block"), ("fig6_coverage", "coverage")):
        lines += _fig(ctx, name, alt)
    lines += ["### The samples with the highest NumMemUnits (item 7)", ""]
    lines += _table(["rank", "sample", "class", "NumMemUnits", "source"],
                    [[t["rank"], t["sample"], t["label"], t["num_mem_units"], f"`{t['source']}`"]
                     for t in s["top_samples"]])
    lines += [""] + _fig(ctx, "fig7_top_samples", "top samples")
    lines += [f"### Images maximally activating the top {ctx.top_k} units of evenly spread blocks (item 8)",
              ""]
    lines += _table(["block", "units (UnitMem) -> argmax sample (class)"],
                    [[b, "; ".join(f"{u['site']}[{u['unit']}] ({u['unitmem']:.3f}) -> {u['argmax']} "
                                   f"({u['label']})" for u in us)] for b, us in s["top_units"].items()])
    return lines + [""] + _fig(ctx, "fig8_top_units_images", "top units' images")


def _d_all_section(ctx: Context, da: dict) -> list[str]:
    """Item 9 and the dataset numbers on D_all = D' + D_val."""
    lines = ["## D_all = D' + D_val", "",
             "UnitMem, U10(D_all) and NumMemUnits recomputed on all samples. Each sample's split comes "
             "from samples.csv: unlike the study, the first val sample is not counted as train, and the "
             "split difference is tested by permuting split labels among samples (sizes kept; two-sided "
             "p on the difference of per-sample means).", ""]
    lines += _dataset_section(ctx, da, study=False) + ["Train vs val (item 9):", ""]
    rows = [[name, _f(c["sum_train"]), _f(c["sum_val"]), _f(c["mean_train"]), _f(c["mean_val"]),
             _f(c["diff_mean"]), _f(c["p_value"], 3), c["n_permutations"]]
            for name, c in (("all units", da["all_units"]), ("U10(D_all)", da["u10"]))]
    lines += _table(["units", "sum over D'", "sum over D_val", "mean D'", "mean D_val", "diff of means",
                     "p (permutation)", "permutations"], rows)
    return ([*lines, ""] + _fig(ctx, "fig9_train_vs_val", "train vs val")
            + _fig(ctx, "d_all_u10_per_block", "U10(D_all) per block"))


def _beyond_section(ctx: Context, s: dict) -> list[str]:
    """Variant comparison, diversity by depth, loss correlation, per-scale view, distribution."""
    lines = ["## Beyond the study", ""]
    o = s["other_variant"]
    if o:
        keys = ("p90", "u10_count", "samples_with_memunits_frac", "top1pct_coverage", "top5pct_coverage",
                "top10pct_coverage")
        fmt = lambda k, d: _pct(d[k]) if "frac" in k or "pct" in k else _f(d[k])  # noqa: E731
        lines += [f"### {ctx.variant} vs {o['variant']} variant (D')", ""]
        lines += _table(["quantity", ctx.variant, o["variant"]], [[k, fmt(k, s), fmt(k, o)] for k in keys])
        lines += ["", f"U10 overlap (Jaccard) between the variants: {o['u10_jaccard_with_main']:.4f}.", ""]
    div = s["diversity"]
    cols = [(k, v) for k, v in (("site", div.get("site")), ("all sites", div.get("all_sites"))) if v]
    lines += [f"### Diversity of the top-{div['k']} units' argmax samples by depth", ""]
    lines += _table(["block"] + [f"{k}: images / classes" for k, _ in cols],
                    [[_f(b)] + [f"{v['distinct_images'][i]} / {v['distinct_classes'][i]}" for _, v in cols]
                     for i, b in enumerate(div["all_sites"]["blocks"])])
    lines += [""] + _fig(ctx, "extra_diversity_by_depth", "diversity by depth")
    lc = s["loss_correlation"]
    if lc:
        lines += ["### Teacher-forced loss vs NumMemUnits", "",
                  f"Spearman rho = {_f(lc['rho'])} (p = {_f(lc['p_value'], 3)}, n = {lc['n']} samples "
                  "of D').", ""] + _fig(ctx, "extra_loss_vs_memunits", "loss vs NumMemUnits")
    ps = s["per_scale"]
    if ps:
        sites, overlap = list(ps["u10_by_site"]), ps["overlap_with_u10"]
        lines += ["### Per scale (mean-variant UnitMem from each scale's tokens alone)", ""]
        header = (["scale", f"P{ctx.q:g}"] + [f"U10 {x}" for x in sites] + [f"mean {x}" for x in sites]
                  + ["% in overall U10"])
        rows = [[ps["labels"][k], _f(ps["threshold"][k])] + [_f(ps["u10_by_site"][x][k]) for x in sites]
                + [_f(ps["mean_by_site"][x][k], 3) for x in sites]
                + [_pct(overlap[k]) if overlap is not None else "n/a"] for k in range(len(ps["threshold"]))]
        lines += _table(header, rows)
        lines += [""] + _fig(ctx, "extra_per_scale", "per scale")
    return [*lines, "### UnitMem distribution", ""] + _fig(ctx, "extra_unitmem_histogram", "UnitMem histogram")


# -- Planted memorization (experiments/planted.py's result, computed by analyze.py) --
def _planted_section(ctx: Context) -> list[str]:
    """What was planted and the measured separation, on a planted run."""
    p = ctx.planted
    if p is None:
        return []
    lines = ["## Planted memorization", ""]
    m = p.get("model") or {}
    d, t = m.get("data") or {}, m.get("training") or {}
    if d:
        lines += [f"The model (`{m.get('checkpoint')}`, from {m.get('checkpoint_from')}) was trained on the `planted` set (seed {d.get('seed')}): "
                  f"{d.get('canaries')} canaries, one per class at each of {d.get('duplicates')} training "
                  f"copies per epoch, {d.get('singletons')} singletons (1 copy) and {d.get('heldout')} held-out "
                  "images never trained on; canaries are random draws from the same generator as the rest.", ""]
    if t:
        lines += [f"Training: {t.get('steps')} steps of batch {t.get('batch_size')} ({t.get('epochs')} epochs), "
                  f"AdamW lr {t.get('lr')}, class dropout {t.get('class_dropout')}, seed {t.get('seed')}; final "
                  f"loss {_f(t.get('final_loss'))}. Tokenizer: {m.get('tokenizer')}. Views: "
                  f"{m.get('augmentation')}. Rebuild: `{m.get('command')}`.", ""]
    keys = list(p["metrics"])
    lines += [f"UnitMem (mean variant) on D_all = members + held-out; U10 = the {p['u10_count']} of "
              f"{p['n_units']} units with UnitMem >= P{p['quantile']:g} = {_f(p['threshold'])}. "
              "Group means (medians):", ""]
    lines += _table(["group", "n", "copies"] + [p["metrics"][k]["label"] for k in keys]
                    + ["units singled out (in U10)", "their mean UnitMem"],
                    [[g, v["n"], v["training_copies"]]
                     + [f"{_f(v[k]['mean'], 3)} ({_f(v[k]['median'], 3)})" for k in keys]
                     + [f"{v['units_singled_out']} ({v['units_singled_out_in_u10']})",
                        _f(v["unitmem_of_singled_out"], 3)] for g, v in p["groups"].items()])
    lines += ["", "Two-sided tests between roles (all canaries pooled; AUC = P(value in the first group > "
              "value in the second), ties half; permutation test on the difference of means):", ""]
    rows = []
    for k, pairs in p["tests"].items():
        label = p["metrics"][k]["label"] if k in p["metrics"] else "UnitMem of the units singled out"
        for pair, r in pairs.items():
            if r["auc"] is None:  # a group without samples (held-out in D', or no units)
                continue
            rows.append([label, pair, f"{_f(r['mean_a'], 3)} vs {_f(r['mean_b'], 3)}", _f(r["auc"], 3),
                         _f(r["p_mannwhitney"], 3), _f(r["p_permutation"], 3)])
    lines += _table(["metric", "groups", "means", "AUC", "p (Mann-Whitney)", "p (permutation)"], rows)
    lines += ["", "Dose-response: Spearman's rho of each metric against the training copies (held-out 0, "
              "singletons 1, canaries their count):", ""]
    lines += _table(["metric", "rho (all images)", "p", "rho (members)", "p"],
                    [[p["metrics"][k]["label"], _f(r["all"]["rho"], 3), _f(r["all"]["p_value"], 3),
                      _f(r["members"]["rho"], 3), _f(r["members"]["p_value"], 3)]
                     for k, r in p["dose_response"].items()])
    c = p["canaries_in_top"]
    lines += ["", f"Canaries among the top {c['k']} images by NumMemUnits (U10, D_all; ties at the cut "
              f"shared evenly): {c['found']:.2f} (chance: {c['expected_by_chance']:.2f}). Per canary (rank: "
              "ties by sample id):", ""]
    lines += _table(["source", "class", "copies", "NumMemUnits", "argmax count", "rank", "loss"],
                    [[f"`{r['source']}`", r["label"], r["dup"], r["nmu_u10"], r["nmu_all"], r["rank"],
                      _f(r["loss"], 3)] for r in p["canaries"]])
    fig = p.get("figure")
    return lines + ([""] + [f"![planted memorization]({fig})", ""] if fig else [""])
# -- end planted memorization --


def render_markdown(ctx: Context, s: dict) -> str:
    """The report: run configuration, D' (the study's numbers), D_all, beyond the study.

    Args:
      ctx: what analyze.py computed.
      s: the summary of `build_summary(ctx)` (numbers are taken from it, so both files agree).

    Returns:
      The markdown text; figures are linked by paths relative to the run directory.
    """
    lines = _run_section(ctx, s) + _planted_section(ctx) + _d_prime_section(ctx, s)
    if "d_all" in s:
        lines += _d_all_section(ctx, s["d_all"])
    lines += _beyond_section(ctx, s)
    return "\n".join(lines).rstrip() + "\n"
