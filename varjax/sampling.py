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
    """
    V = logits_BlV.shape[-1]
    neg_inf = jnp.array(-jnp.inf, logits_BlV.dtype)
    # Upstream: torch.topk raises for k > V; here k >= V keeps every token (as k = V does).
    if 0 < top_k < V:
        # The barrier keeps XLA from rewriting top_k into a full sort when only its last
        # value is used (3x slower on a CPU).
        vals, idx = jax.lax.optimization_barrier(jax.lax.top_k(logits_BlV, top_k))
        kth = vals[..., -1:]
        logits_BlV = jnp.where(logits_BlV < kth, neg_inf, logits_BlV)
        if top_p is None:
            return logits_BlV
        # top-p needs the survivors in order: the k that top_k returned, unless some row has
        # more (ties with the k-th); then every token is sorted.
        extra_ties = jnp.any(jnp.sum(logits_BlV >= kth, axis=-1) > top_k)
        full = logits_BlV
        v, i = jax.lax.cond(extra_ties, lambda: _boundary(*_ascending(full), top_p),
                            lambda: _boundary(*_ascending(vals, idx), top_p))
    elif top_p is not None:
        v, i = _boundary(*_ascending(logits_BlV), top_p)
    else:
        return logits_BlV
    tok = jax.lax.broadcasted_iota(jnp.int32, logits_BlV.shape, logits_BlV.ndim - 1)
    keep = (logits_BlV > v) | ((logits_BlV == v) & (tok >= i))  # at or after the boundary
    return jnp.where(keep, logits_BlV, neg_inf)


def _ascending(values: jnp.ndarray, index: jnp.ndarray | None = None):
    """(values, their token indices) sorted ascending by value, then index."""
    if index is None:
        index = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    return jax.lax.sort((values, index.astype(jnp.int32)), dimension=values.ndim - 1, num_keys=2)


def _boundary(srt: jnp.ndarray, order: jnp.ndarray, top_p) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(value, index) (..., 1) of the first token top-p keeps: the first sorted position whose
    cumulative softmax exceeds 1 - top_p; the last position is never dropped. Upstream's mask
    (cumsum <= 1 - top_p) drops exactly the positions before it, as a cumulative sum of
    non-negative terms only grows."""
    drop = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1) <= 1 - top_p
    drop = drop.at[..., -1].set(False)
    first = jnp.argmin(drop, axis=-1)[..., None]
    return jnp.take_along_axis(srt, first, -1), jnp.take_along_axis(order, first, -1)


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
