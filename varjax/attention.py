"""Block-causal attention kernels of the VAR transformer, and which one runs where.

Ports the attention core of upstream `models/basic_var.py` (SelfAttention: softmax(q k^T *
scale + mask) v, with `attn_bias_for_masking`: token i sees token j iff level(j) <= level(i)).

The kernels (`VAR(attention=...)`): `einsum` (varjax/var.py) spells the softmax out over the
whole (L, L) logits with the mask applied, float32 logits, one product for all heads: what an
accelerator wants. `fused` and `cudnn` call `jax.nn.dot_product_attention`. `blocked` (here)
is the `einsum` function computed the way a CPU wants it. Queries are split into groups
by scale; a group that holds one scale sees exactly the keys up to the end of its scale, so it
needs no mask and skips the masked keys (about a third of the products at 256 px); the small
first scales form one group with the mask. Then `lax.map` runs one (image, head) at a time,
so each group's logits (at most 256 x 680 floats, under 1 MB) stay in cache between the two
products and the softmax, instead of streaming B x H x L x L floats through memory (why the
spelled-out attention ran at a third to a fifth of the speed of PyTorch's fused CPU kernel).
Softmax over fewer keys is the same softmax: the skipped keys have weight exp(-inf) = 0.
`auto` takes `blocked` on a CPU when the pyramid has scales worth a group (`resolve`).

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

    def one(qkv):  # one (image, head): q, k, v each (L, c)
        q_Lc, k_Lc, v_Lc = qkv
        out = []
        for first, end, masked in groups:  # logits (end - first, end): the group's queries x keys
            logits = jnp.einsum("qc,kc->qk", q_Lc[first:end], k_Lc[:end]).astype(jnp.float32) * scale
            if masked:
                logits = jnp.where(mask_LL[first:end, :end], logits, -jnp.inf)
            attn = jax.nn.softmax(logits, axis=-1).astype(dtype)
            out.append(jnp.einsum("qk,kc->qc", attn, v_Lc[:end]))
        return jnp.concatenate(out, axis=0)

    per_head = [jnp.transpose(x, (0, 2, 1, 3)).reshape(B * H, L, c) for x in (q_BLHc, k_BLHc, v_BLHc)]
    out = jax.lax.map(one, tuple(per_head))  # (B * H, L, c)
    return jnp.transpose(out.reshape(B, H, L, c), (0, 2, 1, 3)).reshape(B, L, H * c)
