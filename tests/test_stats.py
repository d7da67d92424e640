"""Tests of varjax/stats.py: the streaming statistics, fed batches by hand.

The recording tests compare whole runs; these pin the update rule itself, in particular the
tie-break (the smallest sample id wins, whatever the order in which rows arrive), which a
run only exercises by chance.
"""

import jax
import numpy as np
import pytest

from varjax import stats as stats_lib
from varjax.stats import TIE_RTOL

update = jax.jit(stats_lib.update)


def _feed(batches, num_units: int, num_splits: int = 1, num_scales: int = 0):
    """Folds [(mu (B, U), ids (B,), splits (B,), valid (B,), scale_mu or None)] into a fresh state."""
    state = stats_lib.init_state(num_splits, num_units, num_scales)
    for mu, ids, splits, valid, scale_mu in batches:
        state = update(state, np.asarray(mu, np.float32), np.asarray(ids, np.int32),
                       np.asarray(splits, np.int32), np.asarray(valid, bool),
                       None if scale_mu is None else np.asarray(scale_mu, np.float32))
    return stats_lib.to_host(state)


def _batch(mu, ids, splits=None, valid=None, scale_mu=None):
    n = len(ids)
    return (mu, ids, np.zeros(n) if splits is None else splits, np.ones(n, bool) if valid is None else valid,
            scale_mu)


# Four units, rows arriving in DESCENDING id order (9, then 5 and 7, then 2):
#   u0: exact tie at 1.0 on every row                   -> id 2, max 1.0
#   u1: 9 and 5 tie within TIE_RTOL (9 a hair larger)   -> id 5 with its own value 1.0
#   u2: a clear maximum on the largest id               -> id 9, max 2.0
#   u3: tie inside one batch (ids 7, 5) at the max      -> id 5, max 3.0
HAIR = 1 + TIE_RTOL / 4
DESCENDING = [
    _batch([[1.0, HAIR, 2.0, 0.5]], [9]),
    _batch([[1.0, 0.5, 1.0, 3.0], [1.0, 1.0, 1.0, 3.0]], [7, 5]),
    _batch([[1.0, 0.2, 1.0, 3.0 * (1 - 2 * TIE_RTOL)]], [2]),
]
WANT_ARGMAX = [2, 5, 9, 5]
WANT_MAX = np.array([1.0, 1.0, 2.0, 3.0], np.float32)


def test_ties_go_to_the_smallest_id_whatever_the_arrival_order():
    st = _feed(DESCENDING, 4)
    np.testing.assert_array_equal(st["argmax"][0], WANT_ARGMAX)
    np.testing.assert_array_equal(st["max"][0], WANT_MAX)
    # The same rows in ascending id order, one per batch, and all in one batch: the same result.
    rows = [(mu_row, i) for mu, ids, *_ in DESCENDING for mu_row, i in zip(mu, ids)]
    for batches in ([_batch([m], [i]) for m, i in sorted(rows, key=lambda r: r[1])],
                    [_batch([m for m, _ in rows], [i for _, i in rows])]):
        again = _feed(batches, 4)
        np.testing.assert_array_equal(again["argmax"][0], WANT_ARGMAX)
        np.testing.assert_array_equal(again["max"][0], WANT_MAX)


def test_per_scale_statistics_break_ties_the_same_way():
    # Scale k of unit u sees the value of unit u, times (k + 1): the same ties on every scale.
    batches = [(mu, ids, s, v, np.stack([np.asarray(mu) * (k + 1) for k in range(3)], axis=1))
               for mu, ids, s, v, _ in DESCENDING]
    st = _feed(batches, 4, num_scales=3)
    np.testing.assert_array_equal(st["scale_argmax"][0], [WANT_ARGMAX] * 3)
    np.testing.assert_allclose(st["scale_max"][0], [WANT_MAX * (k + 1) for k in range(3)], rtol=1e-7)


def test_invalid_rows_and_other_splits_never_touch_a_split():
    mu = [[5.0, 1.0], [1.0, 2.0], [9.0, 9.0], [1.0, 3.0]]
    # Row 2 (id 1) is padding or an unreadable image: the largest values, the smallest id.
    st = _feed([_batch(mu, [4, 3, 1, 6], splits=[0, 1, 0, 1], valid=[True, True, False, True])], 2, num_splits=2)
    np.testing.assert_array_equal(st["count"], [1, 2])
    np.testing.assert_array_equal(st["argmax"], [[4, 4], [3, 6]])
    np.testing.assert_array_equal(st["max"], [[5.0, 1.0], [1.0, 3.0]])
    out = stats_lib.split_arrays(st, 1)
    np.testing.assert_array_equal(out["sum"], [2.0, 5.0])
    assert out["sum"].dtype == np.float64 and out["argmax"].dtype == np.int64 and int(out["count"]) == 2


def test_sum_is_compensated_across_batches():
    # 1 + 1000 x 1e-8, one row per batch: an uncompensated float32 sum stays at 1.0 (each term
    # is below half an ulp of 1, so the result is off by 1e-5); the Kahan sum keeps every term.
    batches = [_batch([[1.0]], [0])] + [_batch([[1e-8]], [t + 1]) for t in range(1000)]
    st = _feed(batches, 1)
    total = stats_lib.split_arrays(st, 0)["sum"][0]
    assert total == pytest.approx(1 + 1000e-8, rel=1e-7), total
    assert int(st["count"][0]) == 1001
