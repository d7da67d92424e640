"""The sampling rules: top-k, top-p, CFG and the draw, against the rules written out in numpy,
and in distribution through the whole sampler on a small model (chi-square at fixed seeds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from varjax import sampling
from varjax.config import micro
from varjax.generate import Sampling, generate
from varjax.model import Model, init_params

# A chi-square p-value below this fails (fixed seeds: the outcome is deterministic; a wrong
# rule, e.g. sampling from softmax(logits / 2) or the arg-max, gives p < 1e-30 here).
P_MIN = 1e-3


def _np_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The rules of docs/design.md, row by row in numpy (float64 softmax)."""
    out = logits.astype(np.float64).copy()
    for row in out.reshape(-1, out.shape[-1]):
        if 0 < top_k < row.size:
            kth = np.sort(row)[::-1][top_k - 1]
            row[row < kth] = -np.inf
        if top_p > 0:
            order = np.argsort(row, kind="stable")
            srt = row[order]
            p = np.exp(srt - srt.max())
            cum = np.cumsum(p / p.sum())
            drop = cum <= 1 - top_p
            drop[-1] = False
            row[order[drop]] = -np.inf
    return out


def test_filter_matches_the_rules_with_ties():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 5, 37)).astype(np.float32)
    logits[0, 0, :6] = 10.0  # six tie for the largest: every one survives top-k = 4
    logits[1, 1] = np.round(logits[1, 1])  # many ties, inside and at the k-th value
    cases = [(4, 0.0), (1, 0.0), (0, 0.9), (0, 0.3), (10, 0.5), (37, 0.0), (50, 0.0), (0, 1.0),
             (4, 0.5), (4, 0.9), (12, 0.7)]  # (4, p): more survivors than k, top-p sorts every token
    for top_k, top_p in cases:
        got = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k, None if top_p == 0 else jnp.float32(top_p)))
        want = _np_filter(logits, top_k, top_p)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=f"top_k={top_k} top_p={top_p}")
        np.testing.assert_array_equal(got[~np.isinf(got)], logits[~np.isinf(got)])
    kept = ~np.isinf(np.asarray(sampling.filter_logits(jnp.asarray(logits), 4, None)))
    assert kept[0, 0].sum() == 6 and kept[0, 0, :6].all()  # ties with the 4th largest survive
    # six equal survivors, each 1/6 of the mass: top-p 0.5 drops the three of lowest index
    kept = ~np.isinf(np.asarray(sampling.filter_logits(jnp.asarray(logits), 4, jnp.float32(0.5))))
    np.testing.assert_array_equal(np.flatnonzero(kept[0, 0]), [3, 4, 5])
    # top-p never removes the largest, even when it alone holds less than the mass asked for
    flat = np.zeros((1, 1, 8), np.float32)
    got = np.asarray(sampling.filter_logits(jnp.asarray(flat), 0, jnp.float32(0.01)))
    assert np.isfinite(got).sum() == 1


@pytest.mark.parametrize("top_k,top_p", [(900, 0.96), (50, 0.0), (0, 0.8), (3, 0.5), (1, 0.9)])
def test_filter_matches_the_rules_on_many_rows(top_k, top_p):
    """Rows of the sampler's size with a coarse grid of values (many ties, at the k-th value
    and at the top-p boundary) and fine ones: the bisection finds what sorting finds."""
    rng = np.random.default_rng(1)
    fine = rng.normal(0, 2, (40, 1024)).astype(np.float32)
    coarse = np.round(rng.normal(0, 2, (40, 1024)) * 4).astype(np.float32) / 4
    logits = np.stack([fine, coarse])
    got = np.asarray(jax.jit(lambda x: sampling.filter_logits(x, top_k, None if top_p == 0 else jnp.float32(top_p)))(
        jnp.asarray(logits)))
    want = _np_filter(logits, top_k, top_p)
    # (float32 mass against numpy's float64 cumulative sum could differ at a boundary within
    # rounding; at this seed none does)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))


def test_cfg_coefficients_are_upstreams_floats():
    coef = sampling.cfg_coefficients(1.5, 10)
    for s in range(10):
        t = 1.5 * (s / 9)  # Python float64, rounded once to float32 when it meets a tensor
        assert coef[s, 0] == np.float32(1 + t) and coef[s, 1] == np.float32(t)
    assert (sampling.cfg_coefficients(0.0, 10)[:, 1] == 0).all()


@pytest.fixture(scope="module")
def micro_model():
    cfg = micro()
    return Model(cfg, init_params(cfg, seed=0))


N_DRAWS = 4096  # samples per distribution test (one batch: one compile each)


def _draws(model, top_k=0, top_p=0.0, cfg=0.0, labels=None):
    labels = np.full(N_DRAWS, 3) if labels is None else labels
    with jax.default_matmul_precision("highest"):
        gen = generate(model, labels, Sampling(cfg=cfg, top_k=top_k, top_p=top_p), seed=7, return_logits=True)
    tokens = np.concatenate([np.asarray(t) for t in gen.tokens], axis=1)  # (N, L)
    return tokens, np.asarray(gen.logits)  # (N, L, V), CFG-combined


def _chi2_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square of counts against expected counts, bins with < 5 expected pooled."""
    order = np.argsort(expected)
    obs, exp = observed[order], expected[order]
    small = np.cumsum(exp) < 5.0  # pool the rarest tokens into one bin
    if small.any():
        obs = np.concatenate([[obs[small].sum()], obs[~small]])
        exp = np.concatenate([[exp[small].sum()], exp[~small]])
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_scale0_frequencies_match_softmax(micro_model):
    """Scale 0's logits depend on the label only, so N samples are N draws from one softmax."""
    tokens, logits = _draws(micro_model)
    p = _softmax(logits[0, 0].astype(np.float64))
    np.testing.assert_allclose(logits[:, 0], np.broadcast_to(logits[0, 0], logits[:, 0].shape), rtol=0, atol=1e-6)
    counts = np.bincount(tokens[:, 0], minlength=p.size)
    assert _chi2_pvalue(counts, p * N_DRAWS) > P_MIN
    # the test can fail: the arg-max, or a softmax at another temperature, is rejected
    assert _chi2_pvalue(np.bincount(np.full(N_DRAWS, p.argmax()), minlength=p.size), p * N_DRAWS) < P_MIN
    assert _chi2_pvalue(counts, _softmax(2 * logits[0, 0].astype(np.float64)) * N_DRAWS) < P_MIN


def test_later_scales_draw_from_their_own_softmax(micro_model):
    """Every later token is drawn from the softmax of its own logits: pooled over positions,
    the token counts match the summed probabilities (a Pearson statistic per scale)."""
    tokens, logits = _draws(micro_model, cfg=1.5, labels=np.arange(N_DRAWS) % 4)
    pn = micro_model.config.patch_nums
    begin = 1
    for s in range(1, len(pn)):
        end = begin + pn[s] ** 2
        p = _softmax(logits[:, begin:end].astype(np.float64)).reshape(-1, logits.shape[-1])
        counts = np.bincount(tokens[:, begin:end].reshape(-1), minlength=p.shape[1])
        assert _chi2_pvalue(counts, p.sum(0)) > P_MIN, f"scale {s}"
        begin = end


def test_top_k_draws_only_from_the_k_best(micro_model):
    tokens, logits = _draws(micro_model, top_k=5)
    rank = (logits > np.take_along_axis(logits, tokens[..., None], -1)).sum(-1)  # tokens above the drawn one
    assert rank.max() < 5
    p = _softmax(_np_filter(logits[0, 0], 5, 0.0))  # renormalised over the 5 best
    counts = np.bincount(tokens[:, 0], minlength=p.size)
    assert (counts > 0).sum() == 5  # every one of the k is drawn, not only the best
    assert _chi2_pvalue(counts[p > 0], p[p > 0] * N_DRAWS) > P_MIN


def test_top_p_draws_only_from_the_nucleus(micro_model):
    tokens, logits = _draws(micro_model, top_p=0.6)
    allowed = np.isfinite(_np_filter(logits, 0, 0.6))
    assert np.take_along_axis(allowed, tokens[..., None], -1).all()
    assert allowed[:, 0].sum(-1).min() > 1  # the nucleus is more than the arg-max here
    p = _softmax(_np_filter(logits[0, 0], 0, 0.6))
    counts = np.bincount(tokens[:, 0], minlength=p.size)
    assert _chi2_pvalue(counts[p > 0], p[p > 0] * N_DRAWS) > P_MIN


def test_top_k_1_is_the_arg_max(micro_model):
    labels = np.arange(64) % 5
    with jax.default_matmul_precision("highest"):
        gen = generate(micro_model, labels, Sampling(cfg=1.5, top_k=1), seed=3, return_logits=True)
        other = generate(micro_model, labels, Sampling(cfg=1.5, top_k=1), seed=4)
    tokens = np.concatenate([np.asarray(t) for t in gen.tokens], axis=1)
    np.testing.assert_array_equal(tokens, np.asarray(gen.logits).argmax(-1))
    for a, b in zip(gen.tokens, other.tokens):  # no randomness left
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
