"""The report's section on the study's open questions: summary.json entries and markdown.

docs/unitmem.md ends with the questions the study left open; `varjax.beyond` turns three of
them into tests and this module reports them for one run (`Analysis`): the influence of the
class, the diversity of memorized samples by depth, and where memorization sits by scale and
depth (the published per-scale finding). The fourth, other depths side by side, is
`varjax.analysis.compare`; other sites (`head`, residual stream) are recorded with
`run.py --sites` and appear in every table. Nothing here touches the file system.
"""

from __future__ import annotations

import math

import numpy as np

from varjax.analysis.compute import Analysis
from varjax.analysis.fmt import jsonable, num, pct, table
from varjax.beyond import ClassInfluence, DiversityTest, ScaleDepthProfile

ALPHA = 0.05  # the level the report's sentences use; every p-value is printed beside them
MAX_CLASS_ROWS = 50  # the class table lists at most this many classes (the lowest p first)

CLASS_NULL = ("class labels exchangeable among the samples, each keeping its NumMemUnits (U10 units pick "
              "classes in proportion to their samples)")
CLASS_STATISTIC = "chi2 = sum over classes of (O_c - E_c)^2 / E_c, O_c the U10 argmax count, E_c = |U10| n_c / N"
DIVERSITY_NULL = ("the top-k units of all blocks are exchangeable across blocks (block labels permuted, "
                  "each block keeping its number of units): depth does not matter")
DIVERSITY_STATISTIC = ("Shannon entropy (bits) of the argmax images (classes) of a block's top-k units; "
                       "trend: least-squares slope of that entropy on relative depth (block / depth)")
SCALE_NULL = "the per-scale U10 centres of mass are exchangeable over scales (no order)"
SCALE_STATISTIC = "Spearman's rho of the U10 centre of mass (mean block / depth of the scale's U10) vs the scale index"


def summary(a: Analysis) -> dict:
    """summary.json's `class_influence`, `diversity` and `scale_depth` entries."""
    sd = a.scale_depth
    return {
        "class_influence": {"null": CLASS_NULL, "statistic": CLASS_STATISTIC, **jsonable(a.classes)},
        "diversity": {"k": a.top_k, "null": DIVERSITY_NULL, "statistic": DIVERSITY_STATISTIC,
                      "by_site": {t.site: jsonable(t) for t in a.diversity}},
        "scale_depth": None if sd is None else {
            "null": SCALE_NULL, "statistic": SCALE_STATISTIC,
            "labels": a.scale_labels or [str(k) for k in range(len(sd.centre))], **jsonable(sd)},
    }


def _p(x: float | None) -> str:
    return num(x, 3)


def class_heading(ci: ClassInfluence) -> str:
    """The heading names the classes that stand out (or says none does)."""
    if ci.p_value is None:
        return "### Class influence: classes not tested"
    if not ci.stand_out:
        return "### Class influence: no class stands out"
    words = []
    for c in ci.stand_out:
        i = int(np.flatnonzero(ci.classes == c)[0])
        words.append(f"{c} ({'more' if ci.u10_argmax[i] > ci.expected[i] else 'fewer'})")
    return "### Class influence: classes standing out: " + ", ".join(words)


def classes_section(a: Analysis, fig) -> list[str]:
    ci = a.classes
    n_u10 = int(ci.u10_argmax.sum())
    lines = [class_heading(ci), "",
             f"Which classes the {n_u10} U10 units' argmax samples (D') belong to, against each class's share of "
             f"D'. Null: {CLASS_NULL}. Statistic: {CLASS_STATISTIC}; per class the two-sided |O_c - E_c| under "
             "the same permutations, Holm-adjusted over the classes.", ""]
    if ci.p_value is None:
        lines += ["No test: it needs two classes, a non-empty U10 and permutations.", ""]
    else:
        verdict = (f"the U10 argmax classes depart from the classes' shares (p <= {ALPHA:g})" if ci.p_value <= ALPHA
                   else f"no departure from the classes' shares at the {ALPHA:g} level")
        lines += [f"chi2 = {num(ci.chi2)}, permutation p = {_p(ci.p_value)} ({ci.n_permutations} permutations, "
                  f"seed {ci.seed}): {verdict}. Classes with Holm p <= {ci.alpha:g}: "
                  f"{', '.join(map(str, ci.stand_out)) or 'none'}.", ""]
    order = np.argsort(np.nan_to_num(ci.p_class, nan=2.0), kind="stable")[:MAX_CLASS_ROWS]
    if len(ci.classes) > MAX_CLASS_ROWS:
        lines += [f"The {MAX_CLASS_ROWS} of {len(ci.classes)} classes with the lowest p (all in summary.json):", ""]
    else:
        order = np.arange(len(ci.classes))
    lines += table(["class", "samples (share)", "NumMemUnits > 0", "NumMemUnits mean / median / max",
                    "U10 argmax (share)", "expected", "lift", "p", "Holm p"],
                   [[int(ci.classes[i]), f"{ci.n_samples[i]} ({pct(ci.sample_share[i])})", ci.with_memunits[i],
                     f"{num(ci.nmu_mean[i], 3)} / {num(ci.nmu_median[i], 3)} / {num(ci.nmu_max[i])}",
                     f"{ci.u10_argmax[i]} ({pct(ci.u10_share[i])})", num(ci.expected[i], 3), num(ci.lift[i], 3),
                     _p(ci.p_class[i]), _p(ci.p_class_holm[i])] for i in order])
    return lines + [""] + fig("open_class_influence", "class influence")


def _trend_sentence(t: DiversityTest) -> str:
    if t.p_image_falls is None:
        return f"{t.site}: no trend test (one block)."
    verdict = ("diversity falls with depth" if t.p_image_falls <= ALPHA else
               f"no fall of diversity with depth detected at the {ALPHA:g} level")
    return (f"{t.site}: the image entropy goes from {num(t.image_entropy[0], 3)} bits (block {t.blocks[0]}) to "
            f"{num(t.image_entropy[-1], 3)} bits (block {t.blocks[-1]}), slope {num(t.image_slope, 3)} bits per "
            f"unit of relative depth, p(falls) = {_p(t.p_image_falls)}, two-sided p = {_p(t.p_image_two_sided)}: "
            f"{verdict}.")


def diversity_section(a: Analysis, fig) -> list[str]:
    tests, k = a.diversity, a.top_k
    every = a.diversity_all
    lines = [f"### Diversity of memorized samples by depth, quantified (top {k} units per block)", "",
             f"For each block, its {k} highest-UnitMem units (per site, and over all per-block sites) and their "
             "argmax samples on D': distinct images and classes, and the entropy of each (log2 "
             f"{k} = {math.log2(max(k, 1)):.3g} bits when all differ, 0 when one image takes all). Null: "
             f"{DIVERSITY_NULL}. Statistic: {DIVERSITY_STATISTIC}. Per block, p = P(null entropy <= observed); "
             f"the trend's p(falls) is one-sided (the study's claim: diverse early, one image late). "
             f"{every.n_permutations} permutations, seed {every.seed}.", ""]
    lines += [f"- {_trend_sentence(t)}" for t in tests] + [""]
    lines += table(["site", "image slope", "p(falls)", "two-sided p", "class slope", "p(falls)", "two-sided p"],
                   [[t.site, num(t.image_slope, 3), _p(t.p_image_falls), _p(t.p_image_two_sided),
                     num(t.class_slope, 3), _p(t.p_class_falls), _p(t.p_class_two_sided)] for t in tests])
    for what in ("image", "class"):
        plural = "images" if what == "image" else "classes"
        lines += ["", f"Per block, {plural}: distinct / entropy in bits (null mean; p):", ""]
        blocks = sorted({int(b) for t in tests for b in t.blocks})

        def cell(t: DiversityTest, b: int) -> str:
            i = np.flatnonzero(t.blocks == b)
            if not len(i):
                return ""
            i = int(i[0])
            distinct = t.distinct_images if what == "image" else t.distinct_classes
            h, null, p = (getattr(t, f"{what}_entropy"), getattr(t, f"null_{what}_entropy"), getattr(t, f"p_{what}_low"))
            return f"{distinct[i]} / {num(h[i], 3)} ({num(null[i], 3)}; {_p(p[i])})"

        lines += table(["block", "block / depth"] + [t.site for t in tests],
                       [[b, num(b / max(a.data.layout.depth, 1), 3)] + [cell(t, b) for t in tests] for b in blocks])
    return lines + [""] + fig("extra_diversity_by_depth", "diversity by depth")


def _scale_sentence(sd: ScaleDepthProfile) -> str:
    if sd.p_deeper is None:
        return "No test of movement: it needs at least 3 scales with U10 units in the blocks."
    how = "exact over all orders" if sd.exact else f"{sd.n_permutations} random orders, seed {sd.seed}"
    if sd.p_deeper <= ALPHA:
        verdict = "it moves deeper as the scales get finer, as Kasliwal et al. report"
    elif sd.p_two_sided <= ALPHA and sd.rho < 0:
        verdict = "it moves shallower as the scales get finer: the opposite of Kasliwal et al."
    else:
        verdict = f"no movement detected at the {ALPHA:g} level"
    floor = 1 / math.factorial(len(sd.centre)) if len(sd.centre) <= 12 else 0.0
    return (f"U10 centre of mass from {num(sd.centre[0], 3)} (coarsest scale) to {num(sd.centre[-1], 3)} (finest) "
            f"in relative depth; Spearman rho = {num(sd.rho, 3)}, slope {num(sd.slope, 3)} per scale step, "
            f"p(deeper) = {_p(sd.p_deeper)}, two-sided p = {_p(sd.p_two_sided)} ({how}; with {len(sd.centre)} "
            f"scales no one-sided p is below {num(floor, 3)}): {verdict}. The test takes the {len(sd.centre)} "
            "centres as given: it asks whether their order follows the scales, not how precisely each is known.")


def scale_depth_section(a: Analysis, fig) -> list[str]:
    sd = a.scale_depth
    if sd is None:
        return []
    labels = a.scale_labels or [str(k) for k in range(len(sd.centre))]
    lines = ["### Where memorization sits by scale and depth", "",
             "Kasliwal et al. (2025) report that in VAR memorization sits in early blocks at coarse scales and "
             "moves deeper as the scales get finer. Here UnitMem is computed from each scale's tokens alone "
             f"(mean variant, D'); a scale's U10 = its units with UnitMem >= its own P{a.q:g}. U10 share of a "
             "(block, site) = the share of its units in that U10; the centre of mass = the mean relative depth "
             f"(block / depth) of the scale's U10 units in the blocks. Null: {SCALE_NULL}. Statistic: "
             f"{SCALE_STATISTIC}.", "", _scale_sentence(sd), ""]
    lines += table(["scale", "centre (block / depth)", "centre (block)"] + [f"centre {s}" for s in sd.sites],
                   [[labels[k], num(sd.centre[k], 3), num(sd.centre_block[k], 3)]
                    + [num(sd.centre_by_site[k, s], 3) for s in range(len(sd.sites))] for k in range(len(labels))])
    lines += ["", "U10 share per scale (rows) and block (columns), all per-block sites:", ""]
    lines += table(["scale"] + [str(b) for b in sd.blocks],
                   [[labels[k]] + [pct(v) for v in sd.u10_share_all[k]] for k in range(len(labels))])
    return lines + [""] + fig("open_scale_depth", "scale x depth")


def markdown(a: Analysis, fig) -> list[str]:
    """The open questions' sections; `fig(name, alt)` links a figure (or gives nothing)."""
    lines = ["## The study's open questions", "",
             "Other depths side by side: `python experiments/compare.py RUN_DIR... --out DIR`. Other sites "
             "(`head`, `head_nm`, the residual stream `resid`): `python experiments/run.py --sites ...`; "
             f"this run recorded {', '.join(a.data.layout.sites)}.", ""]
    return lines + classes_section(a, fig) + diversity_section(a, fig) + scale_depth_section(a, fig)
