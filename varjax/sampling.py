"""Token sampling rules of the VAR sampler: classifier-free guidance, top-k, top-p, the draw,
and the Gumbel-softmax of `more_smooth`.

Ports upstream `models/helpers.py` (sample_with_top_k_top_p_, gumbel_softmax_with_rng) and
the CFG line of `models/var.py` (autoregressive_infer_cfg). The rules are upstream's, term by
term (docs/design.md, "Sampling rules"); the random numbers are JAX's, drawn from a key per
sample and scale (torch's generator cannot be reproduced, nor needs to be).

Shape letters: B images, l tokens of one scale, V vocabulary, Cv latent channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def cfg_coefficients(cfg: float, num_scales: int) -> np.ndarray:
    """float32 (K, 2): (1 + t, t) with t = cfg * s / (K - 1), computed in float64 and rounded
    once, as upstream's Python floats are when they multiply a float32 tensor."""
    K = num_scales
    t = np.array([cfg * (s / (K - 1) if K > 1 else 0.0) for s in range(K)], np.float64)
    return np.stack([1.0 + t, t], axis=1).astype(np.float32)


def guide(cond_BlV: jnp.ndarray, uncond_BlV: jnp.ndarray, coef_2: jnp.ndarray) -> jnp.ndarray:
    """(1 + t) * cond - t * uncond (upstream's expression and order)."""
    return coef_2[0] * cond_BlV - coef_2[1] * uncond_BlV


def filter_logits(logits_BlV: jnp.ndarray, top_k: int, top_p: jnp.ndarray | None) -> jnp.ndarray:
    """Upstream sample_with_top_k_top_p_'s masking: removed tokens become -inf.

    top_k > 0: every logit below the k-th largest (counted with multiplicity) is removed;
    ties with it survive. top_p (None: off): in ascending order, tokens whose cumulative
    softmax is <= 1 - top_p are removed, never the largest; applied after top-k. Equal logits
    are ordered by index (lower first) for top-p (upstream's torch.sort leaves their order
    to the implementation).

    Computed without a sort (at the last scale of a d16 batch of 8, with the draw: XLA:CPU's
    TopK and a sort 0.60 s, this 0.36 s, upstream's torch code 0.43 s; experiments/
    bench_cpu_kernels.py --part sampling --images 8): the k-th largest value and the top-p
    boundary are found by bisection on the logits' float bits (`_keys`: an integer in the
    same order), 32 halvings each, every one a count or a masked sum over the row. The k-th
    value is exact; the
    boundary is the smallest survivor value whose mass at or below it exceeds 1 - top_p (the
    same rule as the cumulative sum, summed in another order); among tokens tied at the
    boundary, the lower indices go first, as in the sorted order.
    """
    V = logits_BlV.shape[-1]
    neg_inf = jnp.array(-jnp.inf, logits_BlV.dtype)
    keys = _keys(logits_BlV)
    # Upstream: torch.topk raises for k > V; here k >= V keeps every token (as k = V does).
    if 0 < top_k < V:
        lowest = _kth_largest(keys, top_k)
    elif top_p is not None:
        lowest = jnp.min(keys, axis=-1, keepdims=True)
    else:
        return logits_BlV
    survive = keys >= lowest
    if top_p is None:
        return jnp.where(survive, logits_BlV, neg_inf)
    prob = jax.nn.softmax(jnp.where(survive, logits_BlV, neg_inf).astype(jnp.float32), axis=-1)
    return jnp.where(_top_p_keep(keys, prob, lowest, 1 - top_p), logits_BlV, neg_inf)


def _keys(x: jnp.ndarray) -> jnp.ndarray:
    """float32 -> uint32 in the same order (-0.0 and +0.0 one key): non-negative floats get
    the sign bit set, negative ones have every bit flipped."""
    u = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x).astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(1 << 31))


def _kth_largest(keys: jnp.ndarray, k: int) -> jnp.ndarray:
    """(..., 1) the k-th largest key of each row (with multiplicity): the largest t with at
    least k keys >= t, by bisection between the row's extremes (32 halvings cover uint32)."""
    def halve(_, bounds):
        lo, hi = bounds  # the answer is in [lo, hi]
        gap = hi - lo
        mid = lo + gap // 2 + gap % 2  # > lo unless lo == hi; no overflow
        ok = jnp.sum(keys >= mid, axis=-1, keepdims=True, dtype=jnp.int32) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    bounds = (jnp.min(keys, axis=-1, keepdims=True), jnp.max(keys, axis=-1, keepdims=True))
    return jax.lax.fori_loop(0, 32, halve, bounds)[0]


def _top_p_keep(keys, prob, lowest, limit) -> jnp.ndarray:
    """Which tokens top-p keeps: those after the first position, in ascending (value, index)
    order, whose cumulative probability exceeds `limit` (= 1 - top_p); the last is always
    kept; never a token below `lowest`. prob: the survivors' softmax (0 elsewhere); lowest:
    (..., 1) the smallest survivor key."""
    def mass_at_or_below(t):
        return jnp.sum(jnp.where(keys <= t, prob, 0.0), axis=-1, keepdims=True)

    def halve(_, bounds):
        lo, hi = bounds  # the first kept value's key is in [lo, hi]
        mid = lo + (hi - lo) // 2
        ok = mass_at_or_below(mid) > limit
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    bounds = (lowest, jnp.max(keys, axis=-1, keepdims=True))
    first = jax.lax.fori_loop(0, 32, halve, bounds)[0]  # the row's largest if no value passes
    tied = keys == first  # first >= lowest: survivors only
    n_tied = jnp.sum(tied, axis=-1, keepdims=True, dtype=jnp.int32)

    def drop_some_tied():  # tied tokens in index order: each adds the same probability
        below = jnp.sum(jnp.where(keys < first, prob, 0.0), axis=-1, keepdims=True)
        each = jnp.max(jnp.where(tied, prob, 0.0), axis=-1, keepdims=True)
        rank = jnp.cumsum(tied, axis=-1, dtype=jnp.int32) - 1
        return tied & (below + (rank + 1).astype(prob.dtype) * each <= limit) & (rank < n_tied - 1)

    drop = jax.lax.cond(jnp.any(n_tied > 1), drop_some_tied, lambda: jnp.zeros(keys.shape, bool))
    return (keys >= first) & ~drop


def draw(key: jax.Array, logits_lV: jnp.ndarray) -> jnp.ndarray:
    """int32 (l,): one token per row from softmax(logits_lV) (-inf rows never drawn)."""
    return jax.random.categorical(key, logits_lV, axis=-1).astype(jnp.int32)


def gumbel_soft(key: jax.Array, logits_lV: jnp.ndarray, tau: float) -> jnp.ndarray:
    """float32 (l, V): softmax((logits + Gumbel noise) / tau), upstream gumbel_softmax_with_rng
    with hard=False."""
    g = jax.random.gumbel(key, logits_lV.shape, jnp.float32)
    return jax.nn.softmax((logits_lV + g) / tau, axis=-1)


def smooth_params(scale: int, num_scales: int) -> tuple[float, float]:
    """more_smooth at scale s: (logit multiplier 1 + s/(K-1), tau = max(0.27 (1 - 0.95 s/(K-1)), 0.005))."""
    ratio = scale / (num_scales - 1) if num_scales > 1 else 0.0
    return 1.0 + ratio, max(0.27 * (1 - ratio * 0.95), 0.005)
