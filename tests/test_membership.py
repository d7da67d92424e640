"""Membership-inference scores: the definitions against a hand computation, the TPR rule,
and the recording pass's per-sample scores against numpy on `teacher_forced`."""

from __future__ import annotations

import json
import zlib

import jax
import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from tests import record_worker as rw
from varjax import membership as mia
from varjax.driver import record
from varjax.record import Options, Plan, RecordError

# membership.csv holds 7 significant digits of float32 values; measured against numpy in
# float64 on `teacher_forced`: 2e-7 relative (printed by the test below with -s).
CSV_RTOL = 1e-5


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_scores_equal_a_hand_computation():
    """Loss, Min-K% (k = 10..50 of L = 10 tokens: the 1..5 worst) and the zlib ratio."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 10, 7)) * 3
    target = rng.integers(0, 7, (3, 10))
    got = mia.scores_from_tokens(logits.astype(np.float32), target)
    assert got.shape == (3, len(mia.SCORE_NAMES))
    for b in range(3):
        nll = [-_log_softmax(logits[b, t])[target[b, t]] for t in range(10)]
        worst = sorted(nll, reverse=True)
        want = [np.mean(nll)] + [np.mean(worst[:n]) for n in (1, 2, 3, 4, 5)]
        text = "[" + ", ".join(str(int(t)) for t in target[b]) + "]"  # Python's str of a list
        want.append(np.mean(nll) / len(zlib.compress(text.encode())))
        np.testing.assert_allclose(got[b], want, rtol=1e-5)


def test_last_scale_accuracy_counts_arg_max_hits_of_the_last_tokens():
    logits = np.zeros((1, 5, 3), np.float32)
    logits[0, np.arange(5), [0, 1, 2, 2, 1]] = 1.0  # arg-max per token
    target = np.array([[0, 0, 2, 0, 1]])  # last 3: hit, miss, hit
    assert float(mia.last_scale_accuracy(logits, target, 3)[0]) == pytest.approx(2 / 3)


def test_tpr_at_one_percent_fpr_follows_the_published_rule():
    """One non-member below the members' scores: FPR 1/100 <= 1% is allowed, a second is not."""
    members = np.array([1.0, 2.0, 3.0, 4.0, 50.5])
    nonmembers = np.concatenate([[2.5], np.arange(10.0, 109.0)])  # 100 values
    assert mia.tpr_at_fpr(members, nonmembers, members_lower=True) == pytest.approx(4 / 5)
    # members higher: the orientation flips
    assert mia.tpr_at_fpr(-members, -nonmembers, members_lower=False) == pytest.approx(4 / 5)
    # two non-members below (1.5 and 2.5): one false positive is allowed, so the members
    # below the second one count (1 and 2)
    two = nonmembers.copy()
    two[1] = 1.5
    assert mia.tpr_at_fpr(members, two, members_lower=True) == pytest.approx(2 / 5)


def test_tpr_follows_sklearn_dropping_points_on_a_diagonal_run():
    """Tie groups (1 member + 1 non-member) at 9 and 8 make a diagonal run; roc_curve's
    drop_intermediate removes its middle point (FPR 1%, TPR 3/5), so the published rule reads
    TPR 2/5 at the point before it."""
    members = np.array([10.0, 10.0, 9.0, 8.0, 0.0])
    nonmembers = np.concatenate([[9.0, 8.0], np.full(98, -1.0)])
    fpr, tpr = mia.roc(members, nonmembers, members_lower=False)
    assert fpr.tolist() == [0, 0, 0.02, 0.02, 1] and tpr.tolist() == [0, 0.4, 0.8, 1, 1]
    assert mia.tpr_at_fpr(members, nonmembers, members_lower=False) == pytest.approx(2 / 5)


def test_auc_equals_mann_whitney_with_ties():
    rng = np.random.default_rng(1)
    m, n = rng.integers(0, 6, 40).astype(float), rng.integers(2, 9, 30).astype(float)
    u = mannwhitneyu(-m, -n).statistic  # members lower: count pairs with member < non-member
    assert mia.auc(m, n, members_lower=True) == pytest.approx(u / (len(m) * len(n)))


def test_evaluate_repeats_subsamples_and_reports_the_spread():
    rng = np.random.default_rng(2)
    m, n = rng.normal(0, 1, 200), rng.normal(1, 1, 100)
    ev = mia.evaluate("x", m, n, members_lower=True, repeats=20)
    assert ev.size == 50 and ev.repeats == 20
    assert 0.6 < ev.auc < 0.9 and abs(ev.auc_mean - ev.auc) < 0.05 and ev.auc_std > 0
    # separable: every draw is perfect
    sep = mia.evaluate("y", m - 100, n, members_lower=True, repeats=5)
    assert (sep.auc_mean, sep.auc_std, sep.tpr_mean, sep.tpr_std) == (1.0, 0.0, 1.0, 0.0)


def _center(row: int) -> np.ndarray:
    return np.roll(rw.image(row), 13, axis=0)


def _views_plus_center(row: int) -> np.ndarray:
    return np.concatenate([rw.views(row), _center(row)[None]])


def _plan(with_center: bool) -> Plan:
    base = rw.plan()
    if not with_center:
        return base
    return Plan.from_views(base.ids, base.labels, base.splits, base.split_names, _views_plus_center,
                           (rw.NUM_VIEWS + 1, 64, 64, 3), threads=2, center_view=rw.NUM_VIEWS)


def test_record_pass_membership_scores_equal_numpy_and_leave_the_unit_statistics_alone(tmp_path):
    model = rw.model()
    with jax.default_matmul_precision("highest"):
        record(model, _plan(False), tmp_path / "plain", rw.NUM_VIEWS,
               Options(batch_size=4, save_activations=True), image_shape=(64, 64))
        record(model, _plan(True), tmp_path / "mia", rw.NUM_VIEWS,
               Options(batch_size=4, save_activations=True, membership="both"), image_shape=(64, 64))
        tokens = [model.tokenize(_center(r)[None]) for r in range(rw.N_ROWS)]
        labels = rw.plan().labels
        rows = []
        for r, t in enumerate(tokens):
            target = np.concatenate([np.asarray(x) for x in t], axis=1)
            cond = np.asarray(model.teacher_forced(labels[r:r + 1], t)[0], np.float64)
            uncond = np.asarray(model.teacher_forced(np.array([model.config.var.num_classes]), t)[0], np.float64)
            last = model.config.patch_nums[-1] ** 2
            acc = (cond[0, -last:].argmax(-1) == target[0, -last:]).mean()
            rows.append([acc] + list(mia.scores_from_tokens(cond, target)[0])
                        + list(mia.scores_from_tokens(cond - uncond, target)[0]))
    # The appended view enters no unit statistic, loss or accuracy of the study's views (the
    # same numbers up to XLA blocking a batch of another shape differently; equal here).
    np.testing.assert_allclose(np.load(tmp_path / "mia" / "activations.npy"),
                               np.load(tmp_path / "plain" / "activations.npy"), rtol=1e-5, atol=1e-7)
    per_sample = [np.loadtxt(tmp_path / d / "per_sample.csv", delimiter=",", skiprows=1) for d in ("mia", "plain")]
    np.testing.assert_allclose(*per_sample, rtol=1e-5)
    header, *body = (tmp_path / "mia" / "membership.csv").read_text().splitlines()
    assert header.split(",") == ["sample"] + list(mia.columns(True))
    got = np.array([[float(v) for v in line.split(",")[1:]] for line in body])
    assert [int(line.split(",")[0]) for line in body] == rw.plan().ids.tolist()
    np.testing.assert_allclose(got, np.array(rows), rtol=CSV_RTOL, atol=1e-7)
    view_tokens = np.load(tmp_path / "mia" / "view_tokens.npy")
    assert view_tokens.tolist() == [np.concatenate([np.asarray(x) for x in t], 1)[0].tolist() for t in tokens]
    fp = json.loads((tmp_path / "mia" / "record.json").read_text())["fingerprint"]
    assert fp["membership"]["mode"] == "both" and "membership" not in json.loads(
        (tmp_path / "plain" / "record.json").read_text())["fingerprint"]
    print(f"\nlargest relative difference from numpy: {np.max(np.abs(got - rows) / np.maximum(np.abs(rows), 1e-6)):.2g}")


def test_membership_without_a_center_view_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(RecordError, match="validation view"):
        record(rw.model(), _plan(False), tmp_path / "run", rw.NUM_VIEWS, Options(batch_size=4, membership="both"),
               image_shape=(64, 64))
    assert not (tmp_path / "run").exists()
    with pytest.raises(RecordError, match="membership"):
        Options(membership="all")
