"""Membership inference in a run's analysis: members vs non-members by every per-sample score.

Members are D' (split `train`; on the planted run the images the model trained on) and
non-members D_val (split `val`; the held-out images). The scores are the recording pass's
(membership.csv, varjax.membership: loss, Min-K% k = 10..50, zlib ratio from the conditional
logits and from conditional minus unconditional logits, the last-scale accuracy) and
NumMemUnits over U10(D_all) (UnitMem's answer to the same question). Each gets the AUC and
TPR at 1% FPR on all samples and with the published repeat-and-subsample rule (mean +- std,
`varjax.membership.evaluate`). On a planted run the scores' means per role (canaries by
copies, singletons, held-out) show what drives them.

Shape letters: N samples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from varjax import membership as mia
from varjax.analysis.rundir import RunData

# Families whose best k is reported apart, as the published table does (best k per family).
FAMILIES = ("mink",)
NMU = "num_mem_units"  # NumMemUnits over U10(D_all)
LABELS = {"acc_last": "last-scale accuracy", NMU: "NumMemUnits, U10(D_all)"}


def label(name: str) -> str:
    """A score's name as the report prints it: `cond_mink20` -> 'Min-20% (cond)'."""
    if name in LABELS:
        return LABELS[name]
    family, _, score = name.partition("_")
    what = {"loss": "loss", "zlib": "zlib ratio"}.get(score, f"Min-{score[4:]}%" if score.startswith("mink") else score)
    return f"{what} ({'conditional' if family == 'cond' else 'cond - uncond'})"


@dataclasses.dataclass(frozen=True, eq=False)
class MembershipAnalysis:
    """Members vs non-members by every score.

    Attributes:
      members, nonmembers: the splits compared.
      evaluations: one `varjax.membership.Evaluation` per score, in membership.csv's order, then NumMemUnits.
      best: {family: the score with the highest mean TPR at 1% FPR} for Min-K% per logits family.
      scores: {name: (values of members, values of non-members)}, for the ROC figure.
      roles: on a planted run, {role: {score: mean}} (None otherwise).
    """

    members: str
    nonmembers: str
    evaluations: tuple[mia.Evaluation, ...]
    best: dict[str, str]
    scores: dict[str, tuple[np.ndarray, np.ndarray]]
    roles: dict[str, dict[str, float]] | None

    def get(self, name: str) -> mia.Evaluation:
        return next(e for e in self.evaluations if e.name == name)


def _roles(data: RunData, values: dict[str, np.ndarray]) -> dict[str, dict[str, float]] | None:
    from varjax.data.planted import parse_role

    roles = [parse_role(s) for s in data.source]
    if any(r is None for r in roles):
        return None
    names = [f"canary dup{r.dup}" if r.kind == "canary" else r.kind for r in roles]
    dup = dict(zip(names, (r.dup for r in roles)))
    order = sorted(dup, key=lambda n: -dup[n])  # 64, 16, 4 copies, singletons, held-out
    return {g: {k: float(np.nanmean(v[[n == g for n in names]])) for k, v in values.items()} for g in order}


def analyze_membership(data: RunData, nmu_d_all: np.ndarray | None, d_all_rows: np.ndarray | None,
                       repeats: int = mia.N_REPEATS, seed: int = mia.SEED) -> MembershipAnalysis | None:
    """Members (train) vs non-members (val); None without membership.csv or without both splits.

    Args:
      data: the run; nmu_d_all: NumMemUnits over U10(D_all) at `d_all_rows` (positions in data), or None.
      repeats, seed: the repeat-and-subsample rule (published: 250, seed 42).
    """
    if data.membership is None or not {"train", "val"} <= set(data.split.tolist()):
        return None
    values = dict(data.membership)
    if nmu_d_all is not None:
        full = np.full(len(data.ids), np.nan)
        full[d_all_rows] = nmu_d_all
        values[NMU] = full
    is_m, is_n = data.split == "train", data.split == "val"
    evaluations, scores = [], {}
    for name, v in values.items():
        lower = name not in ("acc_last", NMU)  # the published orientation: members lower
        m, n = v[is_m & np.isfinite(v)], v[is_n & np.isfinite(v)]
        if len(m) == 0 or len(n) == 0:
            continue
        evaluations.append(mia.evaluate(name, m, n, lower, repeats=repeats, seed=seed))
        scores[name] = (m, n)
    best = {}
    for fam in ("cond", "diff"):
        cands = [e for e in evaluations if e.name.startswith(f"{fam}_mink")]
        if cands:
            best[f"{fam}_mink"] = max(cands, key=lambda e: (e.tpr_mean, e.auc_mean)).name
    return MembershipAnalysis("train", "val", tuple(evaluations), best, scores, _roles(data, values))


def summary(m: MembershipAnalysis | None) -> dict:
    """summary.json's `membership` entry (None when not computed)."""
    if m is None:
        return {"membership": None}
    first = m.evaluations[0]
    return {"membership": {
        "members": m.members, "nonmembers": m.nonmembers, "n_members": first.n_members,
        "n_nonmembers": first.n_nonmembers, "fpr": mia.FPR, "repeats": first.repeats, "subsample": first.size,
        "rule": "AUC and TPR at FPR <= 1% (tpr[sum(fpr <= 0.01) - 1]) on all samples, and mean +- std over "
                "`repeats` draws of `subsample` members and `subsample` non-members without replacement",
        "best": m.best,
        "scores": {e.name: {k: v for k, v in dataclasses.asdict(e).items() if k != "name"} for e in m.evaluations},
        "roles": m.roles}}


def markdown(m: MembershipAnalysis | None, fig) -> list[str]:
    """The report's membership-inference section (empty when not computed)."""
    from varjax.analysis.fmt import num, pct, table

    if m is None:
        return []
    e0 = m.evaluations[0]
    lines = ["## Membership inference", "",
             f"Members: split `{m.members}` ({e0.n_members}), non-members: split `{m.nonmembers}` "
             f"({e0.n_nonmembers}). Scores per sample from the recording pass on upstream's validation view "
             "(resize to round(1.125 S), center crop), ported from the published attack code "
             "(varjax/membership.py); NumMemUnits over U10(D_all). AUC and TPR at 1% FPR on all samples, then "
             f"mean +- std over {e0.repeats} draws of {e0.size} members and {e0.size} non-members (the published "
             "rule draws 5,000 of 10,000; with fewer than 100 non-members in a draw, 1% FPR means no false "
             "positive). Published on VAR-d30 (10,000 vs 10,000, cond - uncond logits, best score): TPR 86.38%.",
             ""]
    rows = [[label(e.name) + (" **(best k)**" if e.name in m.best.values() else ""), num(e.auc, 3),
             f"{num(e.auc_mean, 3)} +- {num(e.auc_std, 2)}", pct(e.tpr),
             f"{pct(e.tpr_mean)} +- {pct(e.tpr_std)}"] for e in m.evaluations]
    lines += table(["score", "AUC", "AUC (repeats)", "TPR@1%FPR", "TPR@1%FPR (repeats)"], rows)
    if m.roles:
        keys = [k for k in ("cond_loss", "diff_loss", "acc_last", NMU) if k in next(iter(m.roles.values()))]
        lines += ["", "Means per planted role:", ""]
        lines += table(["role"] + [label(k) for k in keys], [[g] + [num(v[k], 4) for k in keys]
                                                             for g, v in m.roles.items()])
    return lines + [""] + fig("mia_roc", "ROC curves") + [""]
