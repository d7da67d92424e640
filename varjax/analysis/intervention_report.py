"""The intervention's report section (markdown) and figure, from an `InterventionResult`.

Nothing here computes a metric (varjax.analysis.intervention does); the section says what was
scaled, the effect per group for the chosen units against each control draw, the extraction
before and after, and the permutation tests, in numbers and in one plain paragraph.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from varjax.analysis.fmt import num as _f
from varjax.analysis.fmt import pct as _pct
from varjax.analysis.fmt import table as _table
from varjax.analysis.intervention import FIGURE, MAIN_GROUPS, InterventionResult


def _g(cond: dict, group: str, key: str, k: int | None = None) -> Any:
    g = cond["groups"].get(group)
    if g is None:
        return None
    return g.get(f"k{k}", {}).get(key) if k is not None else g.get(key)


def _spread(values: list) -> str:
    v = np.array([x for x in values if x is not None], np.float64)
    if len(v) == 0:
        return "n/a"
    return f"{_f(v.mean(), 3)} (sd {_f(v.std(ddof=1), 2)})" if len(v) > 1 else _f(v[0], 3)


def _main_k(r: InterventionResult) -> int | None:
    """The k whose extraction the headline uses: the largest k where anything is extracted at
    baseline (else the smallest)."""
    conds = r.summary["conditions"]
    ks = [k for k in r.prefixes if f"k{k}" in next(iter(conds.values()))["groups"].get("memorized", {})]
    hit = [k for k in ks if (_g(conds["chosen"], "memorized", "extracted_before", k) or 0) > 0]
    return hit[-1] if hit else (ks[0] if ks else None)


def _condition_table(r: InterventionResult, k: int | None) -> list[str]:
    conds = r.summary["conditions"]
    header = ["condition", "units", "their UnitMem before -> after"] + [f"Δloss {g}" for g in MAIN_GROUPS]
    header += ["held-out loss before -> after"]
    if k is not None:
        header += [f"extracted (memorized, k={k}) before -> after"]
    rows = []
    for name, c in conds.items():
        row = [name, c["n_units"], f"{_f(c['unitmem_of_scaled_before'], 3)} -> {_f(c['unitmem_of_scaled_after'], 3)}"]
        row += [_f(_g(c, g, "delta_loss"), 3) for g in MAIN_GROUPS]
        row += [f"{_f(_g(c, 'held-out', 'loss_before'), 4)} -> {_f(_g(c, 'held-out', 'loss_after'), 4)}"]
        if k is not None:
            row += [f"{_pct(_g(c, 'memorized', 'extracted_before', k))} -> "
                    f"{_pct(_g(c, 'memorized', 'extracted_after', k))}"]
        rows.append(row)
    return _table(header, rows)


def _role_table(r: InterventionResult) -> list[str]:
    conds = r.summary["conditions"]
    ctrl = [conds[n] for n in r.controls]
    roles = list(conds["chosen"]["roles"])
    header = ["group", "n", "loss before", "Δloss chosen", "Δloss control (mean, sd)", "Δacc chosen",
              "Δacc control"]
    ks = [k for k in r.prefixes if f"k{k}" in conds["chosen"]["roles"][roles[0]]]
    header += [f"extracted k={k}: before / chosen / control" for k in ks]
    rows = []
    for g in roles:
        ch = conds["chosen"]["roles"][g]
        row = [g, ch["n"], _f(ch["loss_before"], 4), _f(ch["delta_loss"], 3),
               _spread([c["roles"][g]["delta_loss"] for c in ctrl]), _f(ch["delta_acc"], 3),
               _spread([c["roles"][g]["delta_acc"] for c in ctrl])]
        for k in ks:
            e = ch[f"k{k}"]
            cm = np.mean([c["roles"][g][f"k{k}"]["extracted_after"] for c in ctrl])
            row += [f"{_pct(e['extracted_before'])} / {_pct(e['extracted_after'])} / {_pct(cm)}"]
        rows.append(row)
    return _table(header, rows)


def _test_lines(r: InterventionResult, k: int | None) -> list[str]:
    t = r.summary["tests"]
    dl = t["delta_loss"]
    rows = [[f"Δloss, chosen - control, {g} (paired sign flips)", dl["chosen_vs_control"][g]["n_a"],
             _f(dl["chosen_vs_control"][g]["statistic"], 3), _f(dl["chosen_vs_control"][g]["p_value"], 3)]
            for g in MAIN_GROUPS]
    for key, what in (("memorized_vs_other_chosen", "Δloss chosen, memorized - other"),
                      ("memorized_vs_other_excess", "(chosen - control) Δloss, memorized - other")):
        rows.append([what + " (labels permuted)", f"{dl[key]['n_a']} vs {dl[key]['n_b']}",
                     _f(dl[key]["statistic"], 3), _f(dl[key]["p_value"], 3)])
    if k is not None and f"extraction_k{k}" in t:
        for key, what in (("extracted_chosen_vs_control", "extracted"), ("ssim_chosen_vs_control", "SSIM")):
            for g in MAIN_GROUPS:
                x = t[f"extraction_k{k}"][key][g]
                rows.append([f"Δ{what} (k={k}), chosen - control, {g} (paired)", x["n_a"], _f(x["statistic"], 3),
                             _f(x["p_value"], 3)])
    ranks = dl.get("rank_among_controls", {})
    lines = _table(["test", "n", "statistic", "p (two-sided)"], rows)
    lines += ["", "The chosen set's mean Δloss against the control draws alone (one-sided, (1 + #draws at "
              "least as large) / (1 + draws)): " + ", ".join(f"{g} {_f(p, 3)}" for g, p in ranks.items()) + "."]
    return lines


def _paragraph(r: InterventionResult, k: int | None) -> str:
    """What the numbers say, in words (no claim beyond them)."""
    conds, t = r.summary["conditions"], r.summary["tests"]["delta_loss"]
    ch, ctrl = conds["chosen"], [conds[n] for n in r.controls]
    mem = "canaries" if r.summary["planted"] else "memorized samples"
    d_ch, d_ct = _g(ch, "memorized", "delta_loss"), [_g(c, "memorized", "delta_loss") for c in ctrl]
    p = t["chosen_vs_control"]["memorized"]["p_value"]
    s = (f"Scaling the chosen units changes the {mem}' loss by {_f(d_ch, 3)} nats/token, against "
         f"{_spread(d_ct)} for random units of the same layers (paired p = {_f(p, 3)}); the held-out loss "
         f"(utility) changes by {_f(_g(ch, 'held-out', 'delta_loss'), 3)} against "
         f"{_spread([_g(c, 'held-out', 'delta_loss') for c in ctrl])}. ")
    sel = t["memorized_vs_other_excess"]
    s += (f"Beyond the control, the {mem} lose {_f(sel['statistic'], 3)} nats/token more than the other members "
          f"(p = {_f(sel['p_value'], 3)}).")
    if k is not None:
        b, a = _g(ch, "memorized", "extracted_before", k), _g(ch, "memorized", "extracted_after", k)
        c = [_g(x, "memorized", "extracted_after", k) for x in ctrl]
        s += (f" Extraction from k = {k} true scales: {_pct(b)} of the {mem} regenerated before, {_pct(a)} "
              f"after scaling the chosen units, {_pct(float(np.mean(c)))} after the control draws (mean).")
    return s


def _per_sample_lines(r: InterventionResult) -> list[str]:
    ps = r.summary.get("per_sample")
    if not ps:
        return []
    ks = [k for k in r.prefixes if all(f"k{k}" in e for e in ps["targets"])]
    k = ks[-1] if ks else None
    header = ["sample", "group", "own units", "their UnitMem before -> after", "loss before", "Δloss own",
              "Δloss control (mean, sd)", "Δloss other members: own / control"]
    if k is not None:
        header += [f"SSIM k={k}: before / own / control", f"extracted k={k}: before / own / control"]
    rows = []
    for e in ps["targets"]:
        row = [f"{e['sample']} `{e['source']}`", e["group"], e["n_units"],
               f"{_f(e['unitmem_of_own_before'], 3)} -> {_f(e['unitmem_of_own_after'], 3)}", _f(e["loss_before"], 4),
               _f(e["delta_loss_own"], 3), _spread(e["delta_loss_controls"]),
               f"{_f(e['delta_loss_other_members_own'], 3)} / {_f(np.mean(e['delta_loss_other_members_controls']), 3)}"]
        if k is not None:
            x = e[f"k{k}"]
            row += [f"{_f(x['ssim_before'], 3)} / {_f(x['ssim_own'], 3)} / {_f(np.mean(x['ssim_controls']), 3)}",
                    f"{_pct(x['extracted_before'])} / {_pct(x['extracted_own'])} / "
                    f"{_pct(float(np.mean(x['extracted_controls'])))}"]
        rows.append(row)
    t = ps["tests"]["delta_loss_own_vs_control"]
    lines = ["", f"Per sample (`--per-sample {len(ps['targets'])}`): the D' samples owning the most chosen units "
             "(their argmax), each with only its own units scaled, against random units of the same count per "
             "site and block:", "", *_table(header, rows), "",
             f"Δloss own - control over these samples: mean {_f(t['statistic'], 3)}, paired sign-flip p = "
             f"{_f(t['p_value'], 3)} (n = {t['n_a']})"]
    if k is not None:
        ts = ps["tests"][f"ssim_k{k}_own_vs_control"]
        lines[-1] += f"; ΔSSIM (k={k}) own - control: {_f(ts['statistic'], 3)}, p = {_f(ts['p_value'], 3)}"
    lines[-1] += "."
    return lines


def section(r: InterventionResult) -> str:
    """The report section (markdown)."""
    st, conds = r.summary["settings"], r.summary["conditions"]
    k = _main_k(r)
    how = ("incoming weights multiplied (biases kept; Kasliwal et al.)" if st["mode"] == "weights"
           else "outputs multiplied")
    scope = ("over all of them at once" if st["scope"] == "global" else "within each (site, block)")
    lines = ["## Interventions: scaling the memorizing units down", "",
             f"Chosen: the top {st['percent']:g}% of the `{', '.join(st['sites'])}` units by UnitMem on D' "
             f"(mean variant), ranked {scope}: {conds['chosen']['n_units']} units, {how} by {st['factor']:g}. "
             f"Control: {st['draws']} draws of random units with the same count per site and block (seed "
             f"{st['seed']}; a draw may share units with the chosen set). Each condition re-runs the recording "
             "pass with the run's views (the baseline: the run's own files; per-sample teacher-forced loss and "
             "token accuracy, UnitMem on D') and the extraction attack (the true tokens of the first k scales "
             "of upstream's validation view forced, greedy continuation; extracted: "
             f"{r.summary['definitions']['extracted']}). Memorized: "
             f"{r.summary['definitions']['memorized']}. Δ = after - before, per sample, then averaged.", "",
             _paragraph(r, k), "", *_condition_table(r, k), "", *_role_table(r), "", *_test_lines(r, k),
             *_per_sample_lines(r)]
    lines += ["", f"![intervention]({FIGURE})", "",
              "Files: `intervention.json` (settings, units, every number above), `intervention.csv` (per sample "
              "and condition), `intervention/` (each condition's recording and arrays).", ""]
    return "\n".join(lines)


def figure(r: InterventionResult) -> Figure:
    """Δloss per group (chosen vs each control draw), extraction before/after, UnitMem of the
    scaled units before/after."""
    conds = r.summary["conditions"]
    roles = list(conds["chosen"]["roles"])
    k = _main_k(r)
    fig = Figure(figsize=(13, 4), dpi=100, layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    x = np.arange(len(roles))
    for j, n in enumerate(r.controls):
        ax1.scatter(x + 0.15, [conds[n]["roles"][g]["delta_loss"] for g in roles], color="0.6", s=14,
                    label="control draws" if j == 0 else None)
    ax1.scatter(x - 0.15, [conds["chosen"]["roles"][g]["delta_loss"] for g in roles], color="tab:red", s=30,
                label="chosen units")
    ax1.axhline(0, color="k", lw=0.6)
    ax1.set_xticks(x, roles, rotation=30, ha="right")
    ax1.set_ylabel("mean Δ teacher-forced loss (nats/token)")
    ax1.set_title("Effect on the loss")
    ax1.legend(fontsize=8)
    if k is not None:
        w = 0.27
        before = [conds["chosen"]["roles"][g][f"k{k}"]["extracted_before"] for g in roles]
        after = [conds["chosen"]["roles"][g][f"k{k}"]["extracted_after"] for g in roles]
        ctrl = [np.mean([conds[n]["roles"][g][f"k{k}"]["extracted_after"] for n in r.controls]) for g in roles]
        ax2.bar(x - w, before, w, color="0.3", label="before")
        ax2.bar(x, after, w, color="tab:red", label="chosen")
        ax2.bar(x + w, ctrl, w, color="0.7", label="control (mean)")
        ax2.set_xticks(x, roles, rotation=30, ha="right")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("share extracted")
        ax2.set_title(f"Extraction from k = {k} true scales")
        ax2.legend(fontsize=8)
    names = [n for n in conds]
    ax3.bar(np.arange(len(names)) - 0.2, [conds[n]["unitmem_of_scaled_before"] for n in names], 0.4,
            color="0.4", label="before")
    ax3.bar(np.arange(len(names)) + 0.2, [conds[n]["unitmem_of_scaled_after"] for n in names], 0.4,
            color="tab:orange", label="after")
    ax3.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax3.set_ylabel("mean UnitMem (D') of the scaled units")
    ax3.set_title("UnitMem of the scaled units")
    ax3.legend(fontsize=8)
    return fig
