"""The VAR transformer: teacher-forced next-scale prediction, with recording sites.

Ports upstream `models/var.py` (VAR.forward, the teacher-forced training forward) and
`models/basic_var.py` (AdaLNSelfAttn, SelfAttention, FFN, AdaLNBeforeHead). Module and
parameter names mirror the PyTorch ones (`blocks_3/attn/mat_qkv`, `ffn/fc1`), see
docs/design.md for the key rule.

Shape letters: B batch, L tokens (sum of pn^2 over scales), C width, D condition width (= C),
H heads, c head width (64), V vocabulary, Cv latent channels, K scales.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from varjax import attention as attention_lib
from varjax.config import VARConfig
from varjax.taps import TapConfig, tap

_MAX_SCALE_MUL = float(np.log(np.float32(100.0)))  # upstream clamps scale_mul_1H11 at ln 100


def level_ids(patch_nums: tuple[int, ...]) -> np.ndarray:
    """(L,) int32: the scale index of every token (upstream buffer `lvl_1L`)."""
    return np.concatenate([np.full(pn * pn, k, np.int32) for k, pn in enumerate(patch_nums)])


def block_causal_mask(patch_nums: tuple[int, ...]) -> np.ndarray:
    """(L, L) bool: token i may attend to j iff level(j) <= level(i) (`attn_bias_for_masking`)."""
    lvl = level_ids(patch_nums)
    return lvl[None, :] <= lvl[:, None]


def _layer_norm(eps: float, dtype) -> nn.LayerNorm:
    # Upstream `ln_wo_grad`: no affine. Two-pass variance, as PyTorch.
    return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, use_fast_variance=False,
                        dtype=dtype)


def _dense(features: int, dtype, use_bias: bool = True, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                    kernel_init=nn.initializers.truncated_normal(0.02), name=name)


ATTENTION = ("einsum", "blocked", "fused", "cudnn", "auto")


class SelfAttention(nn.Module):
    """Multi-head attention with the block-causal mask.

    `attention`: "einsum" spells the softmax out (float32 logits; the parity path), "fused"
    calls `jax.nn.dot_product_attention` with XLA's own lowering (the same algebra, the
    softmax in the input dtype), "cudnn" the same function through cuDNN's fused flash kernel
    (an NVIDIA GPU and bfloat16 `dtype` only; the mask goes in as an additive bias), "blocked"
    the einsum path by scale groups and one head at a time (the CPU's kernel,
    varjax/attention.py). All compute the same function; "auto" picks one per backend.
    """

    config: VARConfig
    taps: TapConfig
    block: int
    dtype: jnp.dtype = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x_BLC: jnp.ndarray, mask_LL: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        B, L, C = x_BLC.shape
        H, hd = c.num_heads, c.head_dim
        q_bias = self.param("q_bias", nn.initializers.zeros, (C,))
        v_bias = self.param("v_bias", nn.initializers.zeros, (C,))
        # No k bias: upstream concatenates a zero buffer (`zero_k_bias`) between q and v.
        qkv = _dense(3 * C, self.dtype, use_bias=False, name="mat_qkv")(x_BLC)
        qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        q, k, v = jnp.moveaxis(qkv.reshape(B, L, 3, H, hd), 2, 0)  # each (B, L, H, c)
        if c.attn_l2_norm:
            scale_mul = self.param("scale_mul_1H11", nn.initializers.constant(np.log(4.0)), (1, H, 1, 1))
            scale_mul = jnp.exp(jnp.minimum(scale_mul, _MAX_SCALE_MUL)).reshape(1, 1, H, 1)
            q = _l2_normalize(q) * scale_mul.astype(q.dtype)
            k = _l2_normalize(k)
            scale = 1.0  # Upstream: softmax scale 1 with attn_l2_norm, NOT 1/sqrt(c).
        else:
            scale = 0.25 / np.sqrt(hd)
        kind = attention_lib.resolve(self.attention, self.dtype, c.patch_nums)
        if kind in ("fused", "cudnn"):
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask_LL[None, None], scale=scale,
                implementation="cudnn" if kind == "cudnn" else None).reshape(B, L, C)
        elif kind == "blocked":
            out = attention_lib.blocked(q, k, v, mask_LL, c.patch_nums, scale, self.dtype)
        else:
            logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) * scale
            logits = jnp.where(mask_LL, logits, -jnp.inf)
            attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
            out = jnp.einsum("bhqk,bkhc->bqhc", attn, v).reshape(B, L, C)
        out = _dense(C, self.dtype, name="proj")(out)
        # The study's site: the layer's own output, before the block multiplies it by gamma1.
        tap(self, self.taps, "attn.proj", out, c.patch_nums, self.block)
        return out


def _l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    # F.normalize: x / max(||x||, 1e-12), over the head dimension.
    n = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(n, 1e-12)).astype(x.dtype)


class FFN(nn.Module):
    config: VARConfig
    taps: TapConfig
    block: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLC: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        h = jax.nn.gelu(_dense(c.mlp_dim, self.dtype, name="fc1")(x_BLC), approximate=True)
        # The study's hook applied the tanh-GELU to fc1's output: record after the GELU.
        tap(self, self.taps, "ffn.fc1", h, c.patch_nums, self.block)
        out = _dense(c.embed_dim, self.dtype, name="fc2")(h)
        tap(self, self.taps, "ffn.fc2", out, c.patch_nums, self.block)
        return out


class AdaLNSelfAttn(nn.Module):
    """One block: adaptive-LN-modulated attention and FFN, each scaled by a gate gamma."""

    config: VARConfig
    taps: TapConfig
    block: int
    dtype: jnp.dtype = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x_BLC, cond, mask_LL):
        c = self.config
        C = c.embed_dim
        if c.shared_aln:
            # cond is shared_ada_lin(cond_BD) viewed (B, 1, 6, C), computed once for all blocks.
            ada_gss = self.param("ada_gss", nn.initializers.normal(C**-0.5), (1, 1, 6, C))
            mods = ada_gss + cond
        else:
            mods = _dense(6 * C, jnp.float32, name="ada_lin_1")(nn.silu(cond))
            mods = mods.reshape(-1, 1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = [mods[:, :, i].astype(self.dtype) for i in range(6)]
        ln = _layer_norm(c.norm_eps, self.dtype)
        attn = SelfAttention(c, self.taps, self.block, self.dtype, self.attention, name="attn")
        ffn = FFN(c, self.taps, self.block, self.dtype, name="ffn")
        attn_out = attn(ln(x_BLC) * (1 + scale1) + shift1, mask_LL) * gamma1
        # Upstream: `.mul_(gamma1)`, in place on attn.proj's output tensor; a hook that keeps
        # that tensor sees this product, which the study did not record (taps.py explains).
        tap(self, self.taps, "attn.proj_times_gamma1", attn_out, c.patch_nums, self.block,
            name="attn.proj_times_gamma1")
        x_BLC = x_BLC + attn_out
        x_BLC = x_BLC + ffn(ln(x_BLC) * (1 + scale2) + shift2) * gamma2
        tap(self, self.taps, "resid", x_BLC, c.patch_nums, self.block)
        return x_BLC


class VAR(nn.Module):
    """Teacher-forced VAR: (labels, teacher-forcing input) -> logits (B, L, V).

    `dtype` is the compute dtype of the blocks (float32, or bfloat16 as upstream's autocast);
    parameters, embeddings, the head and every recorded reduction stay float32. `attention`
    chooses the attention kernel (see SelfAttention).
    """

    config: VARConfig
    taps: TapConfig = TapConfig()
    dtype: jnp.dtype = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, label_B: jnp.ndarray, x_BLCv_wo_first_l: jnp.ndarray,
                 drop_B: jnp.ndarray | None = None) -> jnp.ndarray:
        """Args:
          label_B: int (B,) class ids in [0, num_classes]; num_classes is the null class.
          x_BLCv_wo_first_l: float32 (B, L - 1, Cv), from `VQVAE.var_input`.
          drop_B: optional bool (B,): replace these labels by the null class (class dropout).
            Upstream draws this at random on every forward (rate 0.1, eval mode included);
            here it is an explicit input and nothing is dropped by default.
        Returns:
          float32 logits (B, L, V). Recorded units go to the `taps` collection.
        """
        c = self.config
        B = label_B.shape[0]
        C, L = c.embed_dim, c.seq_len
        if drop_B is not None:
            label_B = jnp.where(drop_B, c.num_classes, label_B)
        init = nn.initializers.truncated_normal(0.02)
        cond_BD = nn.Embed(c.num_classes + 1, C, embedding_init=init, name="class_emb")(label_B)
        pos_start = self.param("pos_start", init, (1, 1, C))
        pos_1LC = self.param("pos_1LC", init, (1, L, C))
        lvl = nn.Embed(len(c.patch_nums), C, embedding_init=init, name="lvl_embed")(
            jnp.asarray(level_ids(c.patch_nums)))
        word = _dense(C, jnp.float32, name="word_embed")(x_BLCv_wo_first_l.astype(jnp.float32))
        sos = cond_BD[:, None, :] + pos_start
        x_BLC = jnp.concatenate([sos, word], axis=1) + lvl[None] + pos_1LC

        if c.shared_aln:
            cond = _dense(6 * C, jnp.float32, name="shared_ada_lin_1")(nn.silu(cond_BD))
            cond = cond.reshape(B, 1, 6, C)
        else:
            cond = cond_BD
        mask = jnp.asarray(block_causal_mask(c.patch_nums))
        x_BLC = x_BLC.astype(self.dtype)
        for i in range(c.depth):
            x_BLC = AdaLNSelfAttn(c, self.taps, i, self.dtype, self.attention, name=f"blocks_{i}")(
                x_BLC, cond, mask)

        # Upstream get_logits runs the head in float32 (`h.float()`), autocast or not.
        x_BLC = x_BLC.astype(jnp.float32)
        scale, shift = _HeadNorm(c, name="head_nm")(cond_BD)
        h = _layer_norm(c.norm_eps, jnp.float32)(x_BLC) * (1 + scale) + shift
        tap(self, self.taps, "head_nm", h, c.patch_nums)  # AdaLNBeforeHead's output, the head's input
        logits = _dense(c.vocab_size, jnp.float32, name="head")(h)
        tap(self, self.taps, "head", logits, c.patch_nums)
        return logits


class _HeadNorm(nn.Module):
    """AdaLNBeforeHead's modulation: (scale, shift) from head_nm.ada_lin(cond), each (B, 1, C)."""

    config: VARConfig

    @nn.compact
    def __call__(self, cond_BD):
        C = self.config.embed_dim
        m = _dense(2 * C, jnp.float32, name="ada_lin_1")(nn.silu(cond_BD)).reshape(-1, 1, 2, C)
        return m[:, :, 0], m[:, :, 1]
