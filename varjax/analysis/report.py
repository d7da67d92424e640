"""summary.json and report.md of one analysis: an `Analysis` in, JSON and markdown out.

`build_summary` gives the JSON-ready dict of summary.json; its keys:
- `variant` ("mean"/"median"), `quantile` (q; U10 = UnitMem >= the q-th percentile),
  `primary_split` (the study's D': "train"), `stats_source` ("stats_npz"/"activations"),
  `n_skipped` (samples of samples.csv that skipped.csv lists: unreadable, in no statistic),
  `variants_available`, `n_samples`, `n_units`, `n_blocks`, `sites`.
- The study's numbers on D' (fractions in [0, 1]): `p90` (the q-th percentile of UnitMem),
  `u10_count`, `samples_with_memunits`, `samples_with_memunits_frac`, `top1pct_coverage`,
  `top5pct_coverage`, `top10pct_coverage`, `coverage` (n samples and units per top-p),
  `unitmem` (mean/median/min/max), `per_site`, `per_block`, `top_samples`, `top_units`.
- Beyond the study: `loss_correlation`, `per_scale`, `other_variant` (null when not computed).
- The study's open questions (varjax.analysis.questions; each test with its `null`,
  `statistic`, p-values, permutations and seed): `class_influence`, `diversity` (`k`,
  `by_site`: one entry per site and "all sites"), `scale_depth` (null without per-scale
  statistics).
- `d_all` (only when val samples are present): the same dataset numbers on D' + D_val, and
  `all_units` / `u10` train-vs-val comparisons with permutation p-values.
- `membership` (null without membership.csv or val samples; varjax.analysis.mia): members
  (train) vs non-members (val) per score: `auc`, `tpr` (at 1% FPR) on all samples and
  `auc_mean`/`auc_std`/`tpr_mean`/`tpr_std` over the repeats; `best` Min-K% per family;
  `roles` (score means per planted role).
- `extraction` (null without extraction.csv; varjax.analysis.extraction): per prefix k the
  extraction rate, mean SSIM and generated-token agreement by split (candidates, all
  continued), by NumMemUnits bins and per planted role; `canaries`; `info` (extraction.json).
- `figures`: figure name -> path relative to the run directory.
`render_markdown` writes the human-readable report from the same results. Neither touches
the file system.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from varjax.analysis import extraction, mia, questions
from varjax.analysis.compute import Analysis, DatasetResult
from varjax.analysis.fmt import jsonable, to_json  # noqa: F401 (to_json: re-exported)
from varjax.analysis.fmt import num as _f
from varjax.analysis.fmt import pct as _pct
from varjax.analysis.fmt import table as _table
from varjax.analysis.planted import FIGURE as PLANTED_FIGURE
from varjax.analysis.planted import METRICS as PLANTED_METRICS
from varjax.analysis.planted import PlantedAnalysis
from varjax.unitmem import SplitComparison

# The study's d16 values (docs/unitmem.md, item 6), printed beside this run's numbers.
STUDY_D16 = {"n_samples": 8192, "n_units": 98304, "u10_count": 9831,
             "samples_with_memunits": "27.19% (2227/8192)",
             "top1pct_coverage": "49.28%", "top5pct_coverage": "70.92%", "top10pct_coverage": "82.77%"}
# The numbers of the other-variant comparison, in the report's order.
VARIANT_KEYS = ("p90", "u10_count", "samples_with_memunits_frac", "top1pct_coverage", "top5pct_coverage",
                "top10pct_coverage")


def _top_key(fraction: float) -> str:
    return f"top{100 * fraction:g}pct_coverage"


def dataset_summary(ds: DatasetResult) -> dict:
    """The study's numbers (items 1-6) for one dataset."""
    t, cov, um = ds.table, ds.coverage, ds.um
    out = {"n_samples": len(ds.nmu), "p90": ds.threshold, "u10_count": ds.u10_count,
           "samples_with_memunits": cov.samples_with_memunits,
           "samples_with_memunits_frac": cov.samples_with_memunits_frac}
    out.update({_top_key(c.fraction): c.share for c in cov.top})
    out["coverage"] = [dataclasses.asdict(c) for c in cov.top]
    out["unitmem"] = {"mean": um.mean(), "median": np.median(um), "min": um.min(), "max": um.max()}
    out["per_site"] = {site: {"n_units": t.site_units[s], "u10_count": t.site_u10[s],
                              "u10_count_size_adjusted": t.site_u10_adjusted[s],
                              "u10_frac_of_site": t.site_u10_frac[s], "mean_unitmem": t.site_mean[s],
                              "max_unitmem": t.site_max[s]} for s, site in enumerate(t.sites)}
    out["per_block"] = {"blocks": t.blocks, "u10_total": t.block_u10, "mean_all_units": t.block_mean,
                        "max_all_units": t.block_max,
                        **{f"{k}_by_site": {site: getattr(t, k)[:, s] for s, site in enumerate(t.sites)}
                           for k in ("u10", "mean", "max")}}
    return out


def build_summary(a: Analysis, figures: dict[str, str]) -> dict:
    """The JSON summary (keys in the module docstring)."""
    d, main, lay = a.data, a.d_prime, a.data.layout
    ids = main.ids
    out = {"variant": a.variant, "quantile": a.q, "primary_split": a.primary,
           "stats_source": d.stats_source, "n_skipped": d.n_skipped,
           "variants_available": ["mean", "median"] if d.acts is not None else ["mean"],
           "n_units": lay.n_units, "n_blocks": len(lay.blocks), "sites": list(lay.sites)}
    out.update(dataset_summary(main))
    out["top_samples"] = [
        {"rank": r + 1, "sample": ids[p], "label": d.label[a.rows[p]], "num_mem_units": main.nmu[p],
         "source": d.source[a.rows[p]]}
        for r, p in enumerate(main.top_samples())]
    st = d.stats[a.primary]
    out["top_units"] = {str(b): [{"unit": u, "site": lay.sites[lay.site[u]], "unitmem": main.um[u],
                                  "argmax": st.argmax[u], "label": d.label[a.argmax_row[u]]}
                                 for u in units] for b, units in a.top_units.items()}
    out["loss_correlation"] = dataclasses.asdict(a.loss) if a.loss is not None else None
    ps = a.per_scale
    out["per_scale"] = None if ps is None else {
        "labels": a.scale_labels or [str(k) for k in range(len(ps.threshold))],
        "threshold": ps.threshold, "overlap_with_u10": ps.overlap,
        "u10_by_site": {s: ps.u10[:, i] for i, s in enumerate(lay.sites)},
        "mean_by_site": {s: ps.mean[:, i] for i, s in enumerate(lay.sites)}}
    out["other_variant"] = None
    if a.other_variant is not None:
        name, ds = a.other_variant
        o = dataset_summary(ds)
        both = (ds.mask & main.mask).sum()
        either = (ds.mask | main.mask).sum()
        out["other_variant"] = {"variant": name, **{k: o[k] for k in VARIANT_KEYS},
                                "u10_jaccard_with_main": both / either if either else 1.0}
    if a.d_all is not None:
        da = a.d_all
        out["d_all"] = {**dataset_summary(da.dataset), "all_units": dataclasses.asdict(da.comparison_all),
                        "u10": dataclasses.asdict(da.comparison_u10),
                        "note": "splits from samples.csv (the study's off-by-one, counting the first "
                                "val sample as train, is not reproduced)"}
    out.update(questions.summary(a))
    out.update(mia.summary(a.membership))
    out.update(extraction.summary(a.extraction))
    out["figures"] = dict(figures)
    return out


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            items += _flatten(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


class _Writer:
    """The report's sections, each a list of lines, from one analysis and its figures."""

    def __init__(self, a: Analysis, figures: dict[str, str]):
        self.a, self.figures = a, figures

    def fig(self, name: str, alt: str) -> list[str]:
        return [f"![{alt}]({self.figures[name]})", ""] if name in self.figures else []

    def headline(self, ds: DatasetResult, study: bool) -> list[str]:
        """The headline numbers of one dataset, beside the study's d16 values for D'."""
        n, q, cov = len(ds.nmu), f"{self.a.q:g}", ds.coverage

        def row(name: str, value: str, key: str = "") -> list[str]:
            if not study:
                return [name, value]
            ref = STUDY_D16.get(key, "")
            return [name, value, _f(ref) if isinstance(ref, int) else ref]

        rows = [row("samples N", _f(n), "n_samples"),
                row("units U", _f(self.a.data.layout.n_units), "n_units"),
                row(f"P{q} of UnitMem", _f(ds.threshold)),
                row(f"U10 units (UnitMem >= P{q})", _f(ds.u10_count), "u10_count"),
                row("samples with NumMemUnits > 0",
                    f"{_pct(cov.samples_with_memunits_frac)} ({cov.samples_with_memunits}/{n})",
                    "samples_with_memunits")]
        for c in cov.top:
            name = f"U10 covered by the top {100 * c.fraction:g}% (n = floor(N*p) = {c.n_samples})"
            rows.append(row(name, f"{_pct(c.share)} ({c.units}/{ds.u10_count})", _top_key(c.fraction)))
        um = ds.um
        rows.append(row("UnitMem mean / median / max",
                        f"{_f(um.mean())} / {_f(np.median(um))} / {_f(um.max())}"))
        return _table(["quantity", "this run"] + (["study (d16)"] if study else []), rows)

    def dataset(self, ds: DatasetResult, study: bool) -> list[str]:
        """Headline numbers, per layer type and per block tables of one dataset."""
        t = ds.table
        lines = self.headline(ds, study) + ["", "Per layer type (items 3, 4):", ""]
        lines += _table(["site", "units", "U10", "U10 size-adjusted", "% of site in U10", "mean UnitMem",
                         "max UnitMem"],
                        [[site, _f(t.site_units[s]), _f(t.site_u10[s]), _f(t.site_u10_adjusted[s], 5),
                          _pct(t.site_u10_frac[s]), _f(t.site_mean[s]), _f(t.site_max[s])]
                         for s, site in enumerate(t.sites)])
        sites = list(t.sites)
        header = (["block"] + [f"U10 {x}" for x in sites] + ["U10 total"] + [f"mean {x}" for x in sites]
                  + ["block mean"] + [f"max {x}" for x in sites])
        rows = [[_f(b)] + [_f(t.u10[i, s]) for s in range(len(sites))] + [_f(t.block_u10[i])]
                + [_f(t.mean[i, s], 3) for s in range(len(sites))] + [_f(t.block_mean[i], 3)]
                + [_f(t.max[i, s], 3) for s in range(len(sites))] for i, b in enumerate(t.blocks)]
        lines += ["", "Per block (items 1, 2, 5; the block mean is over all its units, so fc1 weighs x4):", ""]
        return lines + _table(header, rows) + [""]

    def run(self) -> list[str]:
        """Method line, run.json and record.json as key tables, sample counts."""
        a, d = self.a, self.a.data
        mu_rest = ("the mean of the other N-1 samples, (sum - max)/(N-1), as in the study"
                   if a.variant == "mean" else "the median of the other N-1 samples, as in the official "
                   "UnitMem code")
        source = "stats_*.npz" if d.stats_source == "stats_npz" else "activations.npy"
        available = ["mean", "median"] if d.acts is not None else ["mean"]
        lines = [f"# UnitMem analysis of `{d.run_dir.name}`", "",
                 f"- Variant: **{a.variant}** (mu_-max = {mu_rest}); variants available: "
                 f"{', '.join(available)}.",
                 f"- Statistics from {source}; U10 = units with UnitMem >= P{a.q:g} (numpy percentile, "
                 "linear interpolation); a unit zero on every sample has UnitMem 0.",
                 "- NumMemUnits(x) = U10 units whose argmax is x (argmax: smallest sample id on ties); "
                 "samples are ranked by NumMemUnits, ties by ascending sample id.",
                 _sites_line(d.record_info), "", "## Run", ""]

        def val(v: Any) -> str:
            text = v if isinstance(v, str) else json.dumps(jsonable(v))
            return text if len(text) <= 120 else text[:117] + "..."

        for name, info in (("run.json", d.run_info), ("record.json", d.record_info)):
            if info:
                lines += [f"From `{name}`:", ""]
                lines += _table(["key", "value"], [[k, val(v)] for k, v in _flatten(info)]) + [""]
            elif name == "run.json":
                lines += ["No run.json in the run directory.", ""]
        counts = {sp: int((d.split == sp).sum()) for sp in dict.fromkeys(d.split.tolist())}
        skipped = (f" ({d.n_skipped} unreadable samples listed in skipped.csv left out)"
                   if d.n_skipped else "")
        return lines + ["Samples per split: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                        + f"{skipped}; units: {d.layout.n_units} in {len(d.layout.blocks)} blocks "
                        f"({', '.join(d.layout.sites)}).", ""]

    def d_prime(self) -> list[str]:
        """The study's items 1-8 on D'."""
        a, d, main = self.a, self.a.data, self.a.d_prime
        lines = [f"## D' (split `{a.primary}`): the study's numbers", ""] + self.dataset(main, True)
        for name, alt in (("fig1_u10_per_block", "U10 per block"),
                          ("fig2_mean_unitmem_per_block", "mean UnitMem per block"),
                          ("fig3_u10_per_type", "U10 per layer type"),
                          ("fig4_mean_unitmem_per_type", "mean UnitMem per type"),
                          ("fig5_max_unitmem_per_block", "max UnitMem per block"), ("fig6_coverage", "coverage")):
            lines += self.fig(name, alt)
        lines += ["### The samples with the highest NumMemUnits (item 7)", ""]
        lines += _table(["rank", "sample", "class", "NumMemUnits", "source"],
                        [[r + 1, main.ids[p], d.label[a.rows[p]], main.nmu[p], f"`{d.source[a.rows[p]]}`"]
                         for r, p in enumerate(main.top_samples())])
        lines += [""] + self.fig("fig7_top_samples", "top samples")
        lines += [f"### Images maximally activating the top {a.top_k} units of evenly spread blocks (item 8)",
                  ""]
        st, lay = d.stats[a.primary], d.layout
        lines += _table(["block", "units (UnitMem) -> argmax sample (class)"],
                        [[str(b), "; ".join(f"{lay.sites[lay.site[u]]}[{u}] ({main.um[u]:.3f}) -> {st.argmax[u]} "
                                            f"({d.label[a.argmax_row[u]]})" for u in us)]
                         for b, us in a.top_units.items()])
        return lines + [""] + self.fig("fig8_top_units_images", "top units' images")

    def d_all(self) -> list[str]:
        """Item 9 and the dataset numbers on D_all = D' + D_val."""
        da = self.a.d_all
        lines = ["## D_all = D' + D_val", "",
                 "UnitMem, U10(D_all) and NumMemUnits recomputed on all samples. Each sample's split comes "
                 "from samples.csv: unlike the study, the first val sample is not counted as train, and the "
                 "split difference is tested by permuting split labels among samples (sizes kept; two-sided "
                 "p on the difference of per-sample means).", ""]
        lines += self.dataset(da.dataset, study=False) + ["Train vs val (item 9):", ""]

        def row(name: str, c: SplitComparison) -> list[str]:
            return [name, _f(c.sum_train), _f(c.sum_val), _f(c.mean_train), _f(c.mean_val),
                    _f(c.diff_mean), _f(c.p_value, 3), c.n_permutations]

        lines += _table(["units", "sum over D'", "sum over D_val", "mean D'", "mean D_val", "diff of means",
                         "p (permutation)", "permutations"],
                        [row("all units", da.comparison_all), row("U10(D_all)", da.comparison_u10)])
        return ([*lines, ""] + self.fig("fig9_train_vs_val", "train vs val")
                + self.fig("d_all_u10_per_block", "U10(D_all) per block"))

    def beyond(self, summary: dict) -> list[str]:
        """Variant comparison, loss correlation, per-scale view, distribution."""
        a = self.a
        lines = ["## Beyond the study", ""]
        o = summary["other_variant"]
        if o:
            fmt = lambda k, d: _pct(d[k]) if "frac" in k or "pct" in k else _f(d[k])  # noqa: E731
            lines += [f"### {a.variant} vs {o['variant']} variant (D')", ""]
            lines += _table(["quantity", a.variant, o["variant"]],
                            [[k, fmt(k, summary), fmt(k, o)] for k in VARIANT_KEYS])
            lines += ["", f"U10 overlap (Jaccard) between the variants: {o['u10_jaccard_with_main']:.4f}.", ""]
        lc = a.loss
        if lc is not None:
            lines += ["### Teacher-forced loss vs NumMemUnits", "",
                      f"Spearman rho = {_f(lc.rho)} (p = {_f(lc.p_value, 3)}, n = {lc.n} samples "
                      "of D').", ""] + self.fig("extra_loss_vs_memunits", "loss vs NumMemUnits")
        ps = a.per_scale
        if ps is not None:
            sites = list(a.data.layout.sites)
            labels = a.scale_labels or [str(k) for k in range(len(ps.threshold))]
            lines += ["### Per scale (mean-variant UnitMem from each scale's tokens alone)", ""]
            header = (["scale", f"P{a.q:g}"] + [f"U10 {x}" for x in sites] + [f"mean {x}" for x in sites]
                      + ["% in overall U10"])
            rows = [[labels[k], _f(ps.threshold[k])] + [_f(ps.u10[k, s]) for s in range(len(sites))]
                    + [_f(ps.mean[k, s], 3) for s in range(len(sites))]
                    + [_pct(ps.overlap[k]) if ps.overlap is not None else "n/a"] for k in range(len(ps.threshold))]
            lines += _table(header, rows)
            lines += [""] + self.fig("extra_per_scale", "per scale")
        return [*lines, "### UnitMem distribution", ""] + self.fig("extra_unitmem_histogram", "UnitMem histogram")

    def planted(self) -> list[str]:
        """What was planted and the measured separation, on a planted run."""
        p: PlantedAnalysis | None = self.a.planted
        if p is None:
            return []
        lines = ["## Planted memorization", ""]
        m = p.model or {}
        d, t = m.get("data") or {}, m.get("training") or {}
        if d:
            lines += [f"The model (`{m.get('checkpoint')}`, from {m.get('checkpoint_from')}) was trained on the "
                      f"`planted` set (seed {d.get('seed')}): {d.get('canaries')} canaries, one per class at each "
                      f"of {d.get('duplicates')} training copies per epoch, {d.get('singletons')} singletons (1 "
                      f"copy) and {d.get('heldout')} held-out images never trained on; canaries are random draws "
                      "from the same generator as the rest.", ""]
        if t:
            lines += [f"Training: {t.get('steps')} steps of batch {t.get('batch_size')} ({t.get('epochs')} epochs), "
                      f"AdamW lr {t.get('lr')}, class dropout {t.get('class_dropout')}, seed {t.get('seed')}; final "
                      f"loss {_f(t.get('final_loss'))}. Tokenizer: {m.get('tokenizer')}. Views: "
                      f"{m.get('augmentation')}. Rebuild: `{m.get('command')}`.", ""]
        keys = [k for k, _, _ in PLANTED_METRICS]
        lines += [f"UnitMem (mean variant) on D_all = members + held-out; U10 = the {p.u10_count} of "
                  f"{p.n_units} units with UnitMem >= P{p.quantile:g} = {_f(p.threshold)}. "
                  "Group means (medians):", ""]
        lines += _table(["group", "n", "copies"] + [p.label(k) for k in keys]
                        + ["units singled out (in U10)", "their mean UnitMem"],
                        [[g, v.n, v.training_copies]
                         + [f"{_f(v.metrics[k][0], 3)} ({_f(v.metrics[k][1], 3)})" for k in keys]
                         + [f"{v.units_singled_out} ({v.units_singled_out_in_u10})",
                            _f(v.unitmem_of_singled_out, 3)] for g, v in p.groups.items()])
        lines += ["", "Two-sided tests between roles (all canaries pooled; AUC = P(value in the first group > "
                  "value in the second), ties half; permutation test on the difference of means):", ""]
        rows = [[p.label(k), pair, f"{_f(r.mean_a, 3)} vs {_f(r.mean_b, 3)}", _f(r.auc, 3),
                 _f(r.p_mannwhitney, 3), _f(r.p_permutation, 3)]
                for k, pairs in p.tests.items() for pair, r in pairs.items()
                if r.auc is not None]  # a group without samples (held-out in D', or no units)
        lines += _table(["metric", "groups", "means", "AUC", "p (Mann-Whitney)", "p (permutation)"], rows)
        lines += ["", "Dose-response: Spearman's rho of each metric against the training copies (held-out 0, "
                  "singletons 1, canaries their count):", ""]
        lines += _table(["metric", "rho (all images)", "p", "rho (members)", "p"],
                        [[p.label(k), _f(r["all"].rho, 3), _f(r["all"].p_value, 3),
                          _f(r["members"].rho, 3), _f(r["members"].p_value, 3)]
                         for k, r in p.dose_response.items()])
        k, found, chance = p.canaries_in_top
        lines += ["", f"Canaries among the top {k} images by NumMemUnits (U10, D_all; ties at the cut "
                  f"shared evenly): {found:.2f} (chance: {chance:.2f}). Per canary (rank: "
                  "ties by sample id):", ""]
        lines += _table(["source", "class", "copies", "NumMemUnits", "argmax count", "rank", "loss"],
                        [[f"`{r.source}`", r.label, r.dup, r.nmu_u10, r.nmu_all, r.rank, _f(r.loss, 3)]
                         for r in p.canaries])
        return lines + ["", f"![planted memorization]({PLANTED_FIGURE})", ""]


def _sites_line(record_info: dict | None) -> str:
    """What the recorded units are, from the definitions the recording pass stored."""
    sites = (record_info or {}).get("fingerprint", {}).get("sites")
    if not sites:
        return ("- Units: as units.csv names them (no record.json: what each site measures is "
                "the recording tool's definition).")
    return ("- Units: the per-unit mean over tokens of |value| at " +
            "; ".join(f"`{k}` = {v}" for k, v in sites.items()) + ".")


def render_markdown(a: Analysis, summary: dict, figures: dict[str, str]) -> str:
    """The report: run configuration, planted memorization, D' (the study's numbers), D_all,
    beyond the study, the study's open questions. Figures are linked by paths relative to the run directory."""
    w = _Writer(a, figures)
    lines = w.run() + w.planted() + w.d_prime()
    if a.d_all is not None:
        lines += w.d_all()
    lines += mia.markdown(a.membership, w.fig) + extraction.markdown(a.extraction)
    lines += w.beyond(summary) + questions.markdown(a, w.fig)
    return "\n".join(lines).rstrip() + "\n"
