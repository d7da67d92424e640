"""What an intervention did: per-sample effects, group means, tests, and the files it writes.

`summarize` turns the measured conditions of `varjax.intervene` (baseline, chosen units,
control draws) into an `InterventionResult`; `write` writes `intervention.json` (settings,
units, per condition and group means, tests), `intervention.csv` (one row per sample and
condition), `figures/intervention.png`, `intervention.md` (the report section) and puts that
section into `report.md` (`varjax.analysis.outputs.add_section`).

Groups: on a planted run the roles (canaries by copies, singletons, held-out); "memorized"
is the canaries. On any other run "memorized" is the D' samples with NumMemUnits > 0 over
U10(D') (the study's samples with memorizing units), "other" the rest of D', "held-out" D_val.
Effects are after - before per sample (loss in nats/token, token accuracy, extraction).
Extracted: SSIM >= 0.75 between the decodes of the continuation and of the true tokens, the
extraction job's offline stand-in for the published SSCD rule (identical tokens are reported
beside it). Tests (`varjax.intervention`): chosen vs control per group, paired by sample
(sign flips of chosen minus the mean of the control draws); memorized vs other under the
chosen units, and the same on that chosen-minus-control difference (selectivity: does the
chosen set hit the memorized samples harder than random units do, relative to the rest?).

Shape letters (varjax.names): N samples, U units.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from varjax import intervention as iv
from varjax import unitmem
from varjax.analysis.fmt import to_json
from varjax.analysis.rundir import RunData
from varjax.data.planted import parse_role
from varjax.extraction_job import SSIM_THRESHOLD
from varjax.runfiles import atomic_write_text, write_csv

JSON, CSV, SECTION = "intervention.json", "intervention.csv", "intervention.md"
FIGURE = "figures/intervention.png"
MAIN_GROUPS = ("memorized", "other", "held-out")


@dataclasses.dataclass(frozen=True, eq=False)
class InterventionResult:
    """One intervention on one run (intervention.json: `summary`).

    Attributes:
      ids, split, source, group: (N,) per sample of the run; memorized: (N,) bool.
      main: (N,) which of MAIN_GROUPS each sample is in ("" for none).
      arrays: condition name -> measured arrays (`varjax.intervene.measure_all`).
      kinds: condition name -> "baseline", "chosen" or "control".
      prefixes: the k of the extraction.
      summary: the JSON-ready numbers.
    """

    ids: np.ndarray
    split: np.ndarray
    label: np.ndarray
    source: list[str]
    group: np.ndarray
    main: np.ndarray
    memorized: np.ndarray
    arrays: dict[str, dict[str, np.ndarray]]
    kinds: dict[str, str]
    prefixes: tuple[int, ...]
    summary: dict[str, Any]

    @property
    def controls(self) -> list[str]:
        return [n for n, k in self.kinds.items() if k == "control"]


def groups(data: RunData, um: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(group name per sample, memorized flag per sample, planted?)."""
    roles = [parse_role(s) for s in data.source]
    if all(r is not None for r in roles):
        names = np.array([f"canary dup{r.dup}" if r.kind == "canary" else r.kind for r in roles])
        return names, np.array([r.kind == "canary" for r in roles]), True
    rows = data.rows_of(data.primary)
    mask, _ = unitmem.top_units(um)
    nmu = np.zeros(len(data.ids), np.int64)
    nmu[rows] = unitmem.num_mem_units(data.stats[data.primary].argmax, mask, data.ids[rows])
    mem = (nmu > 0) & (data.split == data.primary)
    names = np.where(mem, "memorized", np.where(data.split == data.primary, "other", data.split))
    return names, mem, False


def _role_order(group: np.ndarray) -> list[str]:
    """Canaries by copies (most first), then the rest in a fixed order, then any other name."""
    names = set(group.tolist())
    canaries = sorted((g for g in names if g.startswith("canary dup")), key=lambda g: -int(g[len("canary dup"):]))
    rest = [g for g in ("single", "heldout", "memorized", "other", "val") if g in names]
    return canaries + rest + sorted(names - set(canaries) - set(rest))


def extracted(arrays: dict[str, np.ndarray], k: int) -> np.ndarray:
    """(N,) float: 1 where the continuation from k true scales is extracted, by the extraction
    job's offline rule (SSIM of the two decodes >= varjax.extraction_job.SSIM_THRESHOLD)."""
    return (arrays[f"ssim_k{k}"] >= SSIM_THRESHOLD).astype(np.float64)


def _has_extraction(res_arrays: dict[str, np.ndarray], k: int) -> bool:
    return f"identical_share_k{k}" in res_arrays


def _means(arrays, base, sel: np.ndarray, ks) -> dict[str, Any]:
    """Group means before and after (and the change) of loss, accuracy and extraction."""
    m = lambda x: float(np.nanmean(x[sel])) if sel.any() else None  # noqa: E731
    out = {"n": int(sel.sum()), "loss_before": m(base["loss"]), "loss_after": m(arrays["loss"]),
           "delta_loss": m(arrays["loss"] - base["loss"]), "acc_before": m(base["acc"]),
           "acc_after": m(arrays["acc"]), "delta_acc": m(arrays["acc"] - base["acc"])}
    for k in ks:
        if _has_extraction(arrays, k):
            out[f"k{k}"] = {"extracted_before": m(extracted(base, k)), "extracted_after": m(extracted(arrays, k)),
                            "identical_share_before": m(base[f"identical_share_k{k}"]),
                            "identical_share_after": m(arrays[f"identical_share_k{k}"]),
                            "ssim_before": m(base[f"ssim_k{k}"]), "ssim_after": m(arrays[f"ssim_k{k}"])}
    return out


def _condition_summary(name, kind, arrays, base, layout, chosen, group, main, ks) -> dict[str, Any]:
    units = arrays["units"]
    out = {"kind": kind, "n_units": int(len(units)),
           "cells": {f"{s} block {b}": n for (s, b), n in iv.cell_counts(layout, units).items()},
           "unitmem_of_scaled_before": float(base["um"][units].mean()) if len(units) else None,
           "unitmem_of_scaled_after": float(arrays["um"][units].mean()) if len(units) else None}
    if kind == "control":
        out["shared_with_chosen"] = int(np.isin(units, chosen).sum())
    out["groups"] = {g: _means(arrays, base, main == g, ks) for g in MAIN_GROUPS if (main == g).any()}
    out["roles"] = {g: _means(arrays, base, group == g, ks) for g in _role_order(group)}
    return out


def _tests(res_arrays, kinds, main, ks, n_perm: int, seed: int) -> dict[str, Any]:
    """Chosen vs control (paired per sample), memorized vs other, selectivity."""
    base, chosen = res_arrays["baseline"], res_arrays["chosen"]
    controls = [res_arrays[n] for n, k in kinds.items() if k == "control"]
    d_chosen = chosen["loss"] - base["loss"]
    d_control = np.mean([c["loss"] - base["loss"] for c in controls], axis=0)
    excess = d_chosen - d_control
    t = lambda x: dataclasses.asdict(x)  # noqa: E731
    out: dict[str, Any] = {"delta_loss": {
        "chosen_vs_control": {g: t(iv.paired_test(excess[main == g], n_perm, seed)) for g in MAIN_GROUPS},
        "memorized_vs_other_chosen": t(iv.two_sample_test(d_chosen[main == "memorized"], d_chosen[main == "other"],
                                                           n_perm, seed)),
        "memorized_vs_other_excess": t(iv.two_sample_test(excess[main == "memorized"], excess[main == "other"],
                                                          n_perm, seed))}}
    for g in MAIN_GROUPS:  # the chosen set's mean effect against the control draws alone
        sel = main == g
        if sel.any():
            out["delta_loss"].setdefault("rank_among_controls", {})[g] = iv.rank_among_controls(
                float(d_chosen[sel].mean()), np.array([(c["loss"] - base["loss"])[sel].mean() for c in controls]))
    for k in ks:
        if not _has_extraction(chosen, k):
            continue
        e_chosen = extracted(chosen, k) - extracted(base, k)
        e_control = np.mean([extracted(c, k) - extracted(base, k) for c in controls], axis=0)
        s_chosen = chosen[f"ssim_k{k}"] - base[f"ssim_k{k}"]
        s_control = np.mean([c[f"ssim_k{k}"] - base[f"ssim_k{k}"] for c in controls], axis=0)
        out[f"extraction_k{k}"] = {
            "extracted_chosen_vs_control": {g: t(iv.paired_test((e_chosen - e_control)[main == g], n_perm, seed))
                                            for g in MAIN_GROUPS},
            "ssim_chosen_vs_control": {g: t(iv.paired_test((s_chosen - s_control)[main == g], n_perm, seed))
                                       for g in MAIN_GROUPS}}
    return out


def _own_entry(data: RunData, x: int, own, ctrl, base, group, main, ks) -> dict[str, Any]:
    """One target sample: its own units scaled vs controls of the same size."""
    p = int(np.flatnonzero(data.ids == x)[0])
    others = (main == "other") | (main == "memorized")
    others[p] = False
    d = lambda a, key: a[key] - base[key]  # noqa: E731
    entry = {"sample": x, "source": data.source[p], "group": str(group[p]), "n_units": int(len(own["units"])),
             "cells": {f"{s} block {b}": n for (s, b), n in iv.cell_counts(data.layout, own["units"]).items()},
             "unitmem_of_own_before": float(base["um"][own["units"]].mean()),
             "unitmem_of_own_after": float(own["um"][own["units"]].mean()),
             "loss_before": float(base["loss"][p]), "delta_loss_own": float(d(own, "loss")[p]),
             "delta_loss_controls": [float(d(c, "loss")[p]) for c in ctrl],
             "delta_loss_other_members_own": float(d(own, "loss")[others].mean()),
             "delta_loss_other_members_controls": [float(d(c, "loss")[others].mean()) for c in ctrl],
             "delta_loss_heldout_own": float(d(own, "loss")[main == "held-out"].mean()) if (main == "held-out").any()
             else None}
    for k in ks:
        if _has_extraction(own, k):
            entry[f"k{k}"] = {"ssim_before": float(base[f"ssim_k{k}"][p]), "ssim_own": float(own[f"ssim_k{k}"][p]),
                              "ssim_controls": [float(c[f"ssim_k{k}"][p]) for c in ctrl],
                              "extracted_before": float(extracted(base, k)[p]),
                              "extracted_own": float(extracted(own, k)[p]),
                              "extracted_controls": [float(extracted(c, k)[p]) for c in ctrl]}
    return entry


def _per_sample(data: RunData, conds, res_arrays, group, main, ks, n_perm: int, seed: int) -> dict[str, Any] | None:
    """Each target's own units against its controls; paired tests over the targets."""
    targets = [c for c in conds if c.kind == "own"]
    if not targets:
        return None
    base = res_arrays["baseline"]
    entries = []
    for c in targets:
        ctrl = [res_arrays[o.name] for o in conds if o.kind == "own_control" and o.target == c.target]
        entries.append(_own_entry(data, c.target, res_arrays[c.name], ctrl, base, group, main, ks))
    excess = np.array([e["delta_loss_own"] - np.mean(e["delta_loss_controls"]) for e in entries])
    tests = {"delta_loss_own_vs_control": dataclasses.asdict(iv.paired_test(excess, n_perm, seed))}
    for k in ks:
        if all(f"k{k}" in e for e in entries):
            ds = np.array([e[f"k{k}"]["ssim_own"] - np.mean(e[f"k{k}"]["ssim_controls"]) for e in entries])
            tests[f"ssim_k{k}_own_vs_control"] = dataclasses.asdict(iv.paired_test(ds, n_perm, seed))
    return {"targets": entries, "tests": tests}


def summarize(data: RunData, conds, res_arrays: dict[str, dict[str, np.ndarray]], cfg, ks) -> InterventionResult:
    """Group means per condition and the tests (see the module docstring)."""
    group, mem, planted = groups(data, res_arrays["baseline"]["um"])
    is_member = data.split == data.primary
    main = np.where(mem, "memorized", np.where(is_member, "other", np.where(data.split == "val", "held-out", "")))
    kinds = {c.name: c.kind for c in conds}
    base, chosen = res_arrays["baseline"], res_arrays["chosen"]["units"]
    summary = {
        "settings": {**dataclasses.asdict(cfg), "prefix_scales": list(ks)},
        "definitions": {"memorized": "canaries" if planted else "D' samples with NumMemUnits > 0 over U10(D')",
                        "extracted": f"SSIM >= {SSIM_THRESHOLD} between the decodes of the greedy continuation "
                                     "and of the true tokens (the extraction job's offline rule)",
                        "effects": "after - before, per sample; loss in nats/token"},
        "planted": planted,
        "chosen_units": [{"unit": int(u), "block": int(data.layout.block[u]),
                          "site": data.layout.sites[int(data.layout.site[u])], "index": int(data.layout.index[u]),
                          "unitmem": float(base["um"][u])} for u in chosen],
        "conditions": {c.name: _condition_summary(c.name, c.kind, res_arrays[c.name], base, data.layout, chosen,
                                                  group, main, ks) for c in conds if c.kind in ("chosen", "control")},
        "tests": _tests(res_arrays, kinds, main, ks, cfg.n_permutations, cfg.seed),
        "per_sample": _per_sample(data, conds, res_arrays, group, main, ks, cfg.n_permutations, cfg.seed),
    }
    return InterventionResult(data.ids, data.split, data.label, list(data.source), group, main, mem, res_arrays,
                              kinds, tuple(ks), summary)


def csv_rows(r: InterventionResult):
    """intervention.csv: one row per sample and non-baseline condition."""
    base = r.arrays["baseline"]
    ks = [k for k in r.prefixes if _has_extraction(base, k)]
    header = ["sample", "split", "label", "source", "group", "memorized", "condition", "kind",
              "loss_before", "loss_after", "acc_before", "acc_after"]
    for k in ks:
        header += [f"{m}_k{k}_{w}" for m in ("identical_share", "ssim", "extracted") for w in ("before", "after")]
    rows = []
    for name, kind in r.kinds.items():
        if kind == "baseline":
            continue
        a = r.arrays[name]
        for i in range(len(r.ids)):
            row = [int(r.ids[i]), r.split[i], int(r.label[i]), r.source[i], r.group[i], int(r.memorized[i]), name,
                   kind] + [f"{v:.7g}" for v in (base["loss"][i], a["loss"][i], base["acc"][i], a["acc"][i])]
            for k in ks:
                for m in ("identical_share", "ssim"):
                    row += [f"{base[f'{m}_k{k}'][i]:.6g}", f"{a[f'{m}_k{k}'][i]:.6g}"]
                row += [int(extracted(base, k)[i]), int(extracted(a, k)[i])]
            rows.append(row)
    return header, rows


def write(run_dir: Path, r: InterventionResult) -> None:
    """intervention.json, intervention.csv, the figure, intervention.md and report.md's section."""
    from varjax.analysis.figures import save
    from varjax.analysis.intervention_report import figure, section
    from varjax.analysis.outputs import add_section

    write_csv(run_dir / CSV, *csv_rows(r))
    atomic_write_text(run_dir / JSON, to_json(r.summary))
    (run_dir / "figures").mkdir(exist_ok=True)
    save(figure(r), run_dir / FIGURE)
    text = section(r)
    atomic_write_text(run_dir / SECTION, text)
    add_section(run_dir, SECTION, text)

