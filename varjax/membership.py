"""Membership-inference scores per sample and their evaluation (AUC, TPR at 1% FPR).

Ports the published attack code on VAR (sprintml/privacy_attacks_against_iars:
`src/attacks/llm_mia.py` for the scores, `src/attacks/mem_info.py` and
`gen_memorized.py` for the extraction candidates' rule, `analysis/evaluate.py` and
`analysis/mia_performance.py` for the evaluation; docs/memorization.md). From the
teacher-forced logits of one view of a sample, with the true tokens:
  - logp: per-token log-probability of the true token under log_softmax(logits);
  - loss: -mean(logp);
  - Min-K% (k = 10..50): the mean of the int(k/100 * L) largest -logp (their `get_min_k_logprobas`);
  - zlib ratio: loss / len(zlib.compress(str(tokens).encode())), the tokens written as
    Python writes a list of ints, "[1, 2, 3]" (their `get_zlib_ratios`);
  - the last-scale accuracy: the share of the last scale's tokens whose arg-max is the true
    token (their candidate rule: `mem_info` feature 1, `get_memorization_scores`' last scale).
Each score comes from the conditional logits ("cond") and, as in the published `llm_mia_cfg`
run, from the conditional minus the unconditional (null-class) logits ("diff"). All scores
are oriented as theirs: lower means member (`members_lower`), except the accuracy.

Shape letters: B samples, L tokens of all scales, V vocabulary, N samples, K scales.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MIN_K = (10, 20, 30, 40, 50)  # percent; their ks: [0.1, 0.2, 0.3, 0.4, 0.5]
SCORE_NAMES = ("loss",) + tuple(f"mink{k}" for k in MIN_K) + ("zlib",)
MODES = ("none", "conditional", "both")  # what the recording pass computes (record.Options.membership)
N_REPEATS = 250  # their repeats of the subsampled evaluation
FPR = 0.01
SEED = 42  # their np.random.seed(42)


def device_scores(logits_BLV: jnp.ndarray, target_BL: jnp.ndarray) -> jnp.ndarray:
    """(B, 1 + len(MIN_K)) float32: loss and Min-K% per sample (zlib needs the host).

    Args:
      logits_BLV: the logits (any float dtype; computed in float32).
      target_BL: int, the true tokens.
    """
    logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, target_BL[..., None], axis=-1)[..., 0]  # (B, L)
    L = tok.shape[1]
    counts = [max(int(k / 100 * L), 1) for k in MIN_K]  # Upstream: int(k * L); 0 would be NaN
    top = jax.lax.top_k(-tok, max(counts))[0]  # (B, kmax), descending
    return jnp.stack([-tok.mean(axis=1)] + [top[:, :c].mean(axis=1) for c in counts], axis=1)


def last_scale_accuracy(logits_BLV: jnp.ndarray, target_BL: jnp.ndarray, last: int) -> jnp.ndarray:
    """(B,) share of the last `last` tokens (the last scale) whose arg-max is the true token."""
    hit = jnp.argmax(logits_BLV[:, -last:], axis=-1) == target_BL[:, -last:]
    return hit.astype(jnp.float32).mean(axis=1)


def zlib_length(tokens_L: Sequence[int]) -> int:
    """Bytes of zlib.compress of the tokens written as a Python list ("[1, 2, 3]"), as theirs."""
    return len(zlib.compress(str([int(t) for t in tokens_L]).encode("utf-8")))


def scores_from_tokens(logits_BLV: np.ndarray, target_BL: np.ndarray) -> np.ndarray:
    """(B, len(SCORE_NAMES)): loss, Min-K%, zlib ratio; numpy (for checks and small runs)."""
    dev = np.asarray(device_scores(jnp.asarray(logits_BLV), jnp.asarray(target_BL)), np.float64)
    z = np.array([zlib_length(t) for t in np.asarray(target_BL)], np.float64)
    return np.concatenate([dev, (dev[:, 0] / z)[:, None]], axis=1)


# -- evaluation -----------------------------------------------------------------------------

def roc(members: np.ndarray, nonmembers: np.ndarray, members_lower: bool) -> tuple[np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr) as sklearn's `roc_curve` gives them (the published code calls it
    with its defaults): one point per distinct score from high to low on the member-oriented
    score, ties counted together, (0, 0) first, and `drop_intermediate`: a point whose false-
    and true-positive counts both change by the same steps before and after it is dropped.
    Dropping a point on a diagonal run (tie groups holding members and non-members) can lower
    the TPR at 1% FPR, so it is reproduced.

    Args:
      members, nonmembers: (n,), (m,) scores; NaN counts as 0 (as theirs).
      members_lower: True when members have the lower scores.
    """
    m = np.nan_to_num(np.asarray(members, np.float64))
    n = np.nan_to_num(np.asarray(nonmembers, np.float64))
    if members_lower:
        m, n = -m, -n
    # Upstream: scale_and_order divides by the max and takes 1 - x, which orders the same
    # (for a positive max; for a max <= 0 theirs would flip the order).
    score = np.concatenate([m, n])
    is_member = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    order = np.argsort(-score, kind="stable")
    score, is_member = score[order], is_member[order]
    last = np.r_[np.flatnonzero(np.diff(score) != 0), len(score) - 1]  # end of each tie group
    tp = np.cumsum(is_member)[last]
    fp = 1 + last - tp
    if len(fp) > 2:
        keep = np.r_[True, (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), True]
        tp, fp = tp[keep], fp[keep]
    return np.r_[0.0, fp / max(len(n), 1)], np.r_[0.0, tp / max(len(m), 1)]


def auc(members: np.ndarray, nonmembers: np.ndarray, members_lower: bool) -> float:
    """Area under the ROC curve (trapezoids: ties count one half)."""
    fpr, tpr = roc(members, nonmembers, members_lower)
    return float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, members_lower: bool, fpr_max: float = FPR) -> float:
    """Their rule: `tpr[sum(fpr <= fpr_max) - 1]` on the ROC curve, the highest TPR at FPR <= fpr_max."""
    fpr, tpr = roc(members, nonmembers, members_lower)
    return float(tpr[np.sum(fpr <= fpr_max) - 1])


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One score's membership inference: members vs non-members.

    auc, tpr: on all samples; auc_mean/std, tpr_mean/std: over `repeats` draws of `size`
    members and `size` non-members without replacement (their rule: 250 x 5,000 of 10,000).
    """

    name: str
    members_lower: bool
    n_members: int
    n_nonmembers: int
    auc: float
    tpr: float
    size: int
    repeats: int
    auc_mean: float
    auc_std: float
    tpr_mean: float
    tpr_std: float


def evaluate(name: str, members: np.ndarray, nonmembers: np.ndarray, members_lower: bool,
             repeats: int = N_REPEATS, size: int | None = None, seed: int = SEED) -> Evaluation:
    """AUC and TPR at 1% FPR on all samples, and their mean +- std over subsampled repeats.

    size defaults to half the smaller group (theirs: 5,000 of 10,000 each).
    # Upstream: one permutation indexes both groups (they have equal sizes); here each group
    # draws its own, so groups of different sizes (the planted run's 172 vs 64) work.
    """
    m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    size = size or max(min(len(m), len(n)) // 2, 1)
    rng = np.random.default_rng(seed)
    aucs, tprs = [], []
    for _ in range(repeats):
        a, b = m[rng.permutation(len(m))[:size]], n[rng.permutation(len(n))[:size]]
        aucs.append(auc(a, b, members_lower))
        tprs.append(tpr_at_fpr(a, b, members_lower))
    return Evaluation(name, members_lower, len(m), len(n), auc(m, n, members_lower),
                      tpr_at_fpr(m, n, members_lower), size, repeats, float(np.mean(aucs)),
                      float(np.std(aucs)), float(np.mean(tprs)), float(np.std(tprs)))


def columns(both: bool) -> tuple[str, ...]:
    """membership.csv's score columns (after `sample`): the last-scale accuracy, then each
    score from the conditional logits (`cond_*`) and, when recorded, from conditional minus
    unconditional logits (`diff_*`)."""
    families = ("cond", "diff") if both else ("cond",)
    return ("acc_last",) + tuple(f"{f}_{name}" for f in families for name in SCORE_NAMES)


def host_row(acc_last: float, tokens_L: np.ndarray, device_rows: Sequence[np.ndarray]) -> list[float]:
    """One membership.csv row from the step's outputs: device_rows are `device_scores` rows
    (loss, Min-K%) per family; the zlib ratio is computed here from the tokens."""
    z = zlib_length(tokens_L)
    row = [float(acc_last)]
    for dev in device_rows:
        row += [float(v) for v in dev] + [float(dev[0]) / z]
    return row
