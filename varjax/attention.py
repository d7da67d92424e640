"""Block-causal attention kernels of the VAR transformer, and which one runs where.

Ports the attention core of upstream `models/basic_var.py` (SelfAttention: softmax(q k^T *
scale + mask) v, with `attn_bias_for_masking`: token i sees token j iff level(j) <= level(i)).

The kernels (`VAR(attention=...)`): `einsum` (varjax/var.py) spells the softmax out over the
whole (L, L) logits with the mask applied, float32 logits, one product for all heads: what an
accelerator wants. `fused` and `cudnn` call `jax.nn.dot_product_attention`. `blocked` (here)
is the `einsum` function computed the way a CPU wants it. Queries are split into groups
by scale; a group that holds one scale sees exactly the keys up to the end of its scale, so it
needs no mask and skips the masked keys (about a third of the products at 256 px); the small
first scales form one group with the mask. Then `lax.map` runs a few (image, head) pairs at
a time (as many as keep the largest group's logits under CHUNK_BYTES), so each step's logits
stay in cache between the two products and the softmax, instead of streaming B x H x L x L
floats through memory (why the spelled-out attention ran at a third to a fifth of the speed
of PyTorch's fused CPU kernel).
Softmax over fewer keys is the same softmax: the skipped keys have weight exp(-inf) = 0.
`auto` takes `blocked` on a CPU when the pyramid has scales worth a group (`resolve`).

Both CPU kernels normalise late: exp(logits - max) times the values, divided by the sum of
the exponentials afterwards, so the (queries x keys) block is read once less than by
softmax-then-product (the same sums, rounded in another order: within 1e-6 of `einsum`).

`cached` is the sampler's kernel (one scale's queries against the keys cached so far, no
mask, varjax.generate): one batched product while the logits stay small, else the same
`lax.map` over chunks of (row, head) pairs whose logits fit in a few MB.

Shape letters (varjax.names): B batch, L tokens, H heads, c head width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Scales with at least this many tokens get a query group of their own (no mask); the
# smaller first scales share one masked group.
MIN_GROUP_TOKENS = 64
# Logits (float32 bytes) that one step of the CPU kernels' lax.map may hold, and below which
# the sampler's kernel takes one batched product instead (measured on a 2-core AVX-512 CPU
# with 2 MB of L2 per core, experiments/bench_cpu_kernels.py --part cached_attention).
CHUNK_BYTES = 6 << 20
WHOLE_BYTES = 32 << 20


@functools.lru_cache(maxsize=None)
def query_groups(patch_nums: tuple[int, ...]) -> tuple[tuple[int, int, bool], ...]:
    """[(first query, end query, masked)]: queries [first, end) attend to keys [0, end).

    Each scale with >= MIN_GROUP_TOKENS tokens is a group without mask; the scales before
    the first such scale form one group that keeps the mask.
    """
    sizes = [pn * pn for pn in patch_nums]
    ends = np.cumsum(sizes).tolist()
    split = len(sizes)  # scales [split, K) have groups of their own
    while split > 0 and sizes[split - 1] >= MIN_GROUP_TOKENS:
        split -= 1
    groups = [(0, ends[split - 1], split > 1)] if split else []
    groups += [(ends[k - 1] if k else 0, ends[k], False) for k in range(split, len(sizes))]
    return tuple(groups)


def resolve(kind: str, dtype, patch_nums: tuple[int, ...]) -> str:
    """The kernel `kind` names. "auto" (known at trace time): cuDNN's for bf16 on a GPU; on a
    CPU `blocked` where some scale has a group of its own, else `einsum` (small pyramids such
    as `micro`'s, whose whole logits fit in cache, gain nothing from it); elsewhere `einsum`."""
    if kind != "auto":
        return kind
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) == jnp.bfloat16:
        return "cudnn"
    if backend == "cpu" and len(query_groups(tuple(patch_nums))) > 1:
        return "blocked"
    return "einsum"


def blocked(q_BLHc, k_BLHc, v_BLHc, mask_LL, patch_nums: tuple[int, ...], scale: float,
            dtype) -> jnp.ndarray:
    """varjax/var.py's `einsum` attention, by scale groups and one (image, head) at a time.

    Args:
      q_BLHc, k_BLHc, v_BLHc: (B, L, H, c) queries, keys, values in the compute dtype.
      mask_LL: (L, L) bool, the block-causal mask (`varjax.var.block_causal_mask`).
      patch_nums: the pyramid, which sets the groups (`query_groups`).
      scale: of the logits; dtype: the compute dtype (logits and softmax are float32).
    Returns:
      (B, L, H * c) in `dtype`, heads concatenated as the einsum path's.
    """
    B, L, H, c = q_BLHc.shape
    groups = query_groups(patch_nums)

    def one(qkv):  # n (image, head) pairs: q, k, v each (n, L, c)
        q_nLc, k_nLc, v_nLc = qkv
        out = []
        for first, end, masked in groups:  # logits (n, end - first, end): the group's queries x keys
            logits = jnp.einsum("nqc,nkc->nqk", q_nLc[:, first:end], k_nLc[:, :end]).astype(jnp.float32) * scale
            if masked:
                logits = jnp.where(mask_LL[first:end, :end], logits, -jnp.inf)
            out.append(_late_softmax_product(logits, v_nLc[:, :end], dtype))
        return jnp.concatenate(out, axis=1)

    largest = max((end - first) * end for first, end, _ in groups) * 4
    n = _pairs_per_step(B * H, largest)
    per_head = [jnp.transpose(x, (0, 2, 1, 3)).reshape(B * H // n, n, L, c) for x in (q_BLHc, k_BLHc, v_BLHc)]
    out = jax.lax.map(one, tuple(per_head))  # (B * H / n, n, L, c)
    return jnp.transpose(out.reshape(B, H, L, c), (0, 2, 1, 3)).reshape(B, L, H * c)


def cached(q_BlHc, k_BHcE, v_BHEc, scale: float, dtype) -> jnp.ndarray:
    """One scale's attention to the E keys cached so far (all visible: no mask), as the
    sampler's `einsum` path computes it: softmax(q k^T * scale) v, float32 logits.

    Args:
      q_BlHc: (B, l, H, c) the scale's queries; k_BHcE: (B, H, c, E) and v_BHEc: (B, H, E, c)
        the cached keys and values (the layouts of varjax.var's cache), E >= l.
      scale: of the logits; dtype: the compute dtype.
    Returns:
      (B, l, H, c) in `dtype`.
    """
    B, l, H, c = q_BlHc.shape
    E = k_BHcE.shape[-1]
    N = B * H

    def core(qkv):  # n (row, head) pairs: (n, l, c), (n, c, E), (n, E, c)
        q_nlc, k_ncE, v_nEc = qkv
        logits = jnp.einsum("nqc,nck->nqk", q_nlc, k_ncE).astype(jnp.float32) * scale
        return _late_softmax_product(logits, v_nEc, dtype)

    q_Nlc = jnp.transpose(q_BlHc, (0, 2, 1, 3)).reshape(N, l, c)
    k_NcE, v_NEc = k_BHcE.reshape(N, c, E), v_BHEc.reshape(N, E, c)
    if N * l * E * 4 <= WHOLE_BYTES:
        out = core((q_Nlc, k_NcE, v_NEc))
    else:
        n = _pairs_per_step(N, l * E * 4)
        out = jax.lax.map(core, (q_Nlc.reshape(N // n, n, l, c), k_NcE.reshape(N // n, n, c, E),
                                 v_NEc.reshape(N // n, n, E, c)))
    return jnp.transpose(out.reshape(B, H, l, c), (0, 2, 1, 3))


def _late_softmax_product(logits, v, dtype):
    """softmax(logits, -1) @ v with the normalisation after the product: (..., q, k) float32
    logits and (..., k, c) values -> (..., q, c) in `dtype`."""
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.einsum("...qk,...kc->...qc", p.astype(dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(p, axis=-1, keepdims=True)).astype(dtype)


def _pairs_per_step(pairs: int, bytes_per_pair: int) -> int:
    """The largest power of two dividing `pairs` whose logits fit CHUNK_BYTES (at least 1)."""
    n = 1
    while pairs % (2 * n) == 0 and 2 * n * bytes_per_pair <= CHUNK_BYTES:
        n *= 2
    return n
