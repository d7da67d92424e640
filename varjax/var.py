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
from varjax import cpu_gemm
from varjax.config import VARConfig
from varjax.scaling import UnitScaling, scale_output
from varjax.taps import TapConfig, tap

_MAX_SCALE_MUL = float(np.log(np.float32(100.0)))  # upstream clamps scale_mul_1H11 at ln 100
CACHE = "cache"  # the variable collection of the sampler's key/value cache (docs/design.md)


def level_ids(patch_nums: tuple[int, ...]) -> np.ndarray:
    """(L,) int32: the scale index of every token (upstream buffer `lvl_1L`)."""
    return np.concatenate([np.full(pn * pn, k, np.int32) for k, pn in enumerate(patch_nums)])


def block_causal_mask(patch_nums: tuple[int, ...]) -> np.ndarray:
    """(L, L) bool: token i may attend to j iff level(j) <= level(i) (`attn_bias_for_masking`)."""
    lvl = level_ids(patch_nums)
    return lvl[None, :] <= lvl[:, None]


def scale_begin(patch_nums: tuple[int, ...], scale: int) -> int:
    """Position of scale `scale`'s first token in the sequence (sum of the earlier pn^2)."""
    return sum(pn * pn for pn in patch_nums[:scale])


def _layer_norm(eps: float, dtype) -> nn.LayerNorm:
    # Upstream `ln_wo_grad`: no affine. Two-pass variance, as PyTorch.
    return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, use_fast_variance=False,
                        dtype=dtype)


def _dense(features: int, dtype, use_bias: bool = True, name: str | None = None) -> nn.Dense:
    # cpu_gemm.dot_general: MKL's product on a one-device CPU in varjax's jits, else XLA's.
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=nn.initializers.truncated_normal(0.02),
                    name=name, dot_general=cpu_gemm.dot_general)


ATTENTION = ("einsum", "blocked", "fused", "cudnn", "auto")


class SelfAttention(nn.Module):
    """Multi-head attention with the block-causal mask.

    `attention`: "einsum" spells the softmax out (float32 logits; the parity path), "fused"
    calls `jax.nn.dot_product_attention` with XLA's own lowering (the same algebra, the
    softmax in the input dtype), "cudnn" the same function through cuDNN's fused flash kernel
    (an NVIDIA GPU and bfloat16 `dtype` only; the mask goes in as an additive bias), "blocked"
    the einsum path by scale groups and one head at a time (the CPU's kernel,
    varjax/attention.py). All compute the same function; "auto" picks one per backend.

    With `cache_at` (the sampler, one scale at a time) x_BLC holds the l tokens of one scale,
    starting at sequence position `cache_at`; their keys and values are written into the
    preallocated, full-length `cache` variables and they attend to every cached position
    before cache_at + l, which is the block-causal rule, so no mask is needed (layouts:
    docs/design.md).
    """

    config: VARConfig
    taps: TapConfig
    block: int
    dtype: jnp.dtype = jnp.float32
    attention: str = "einsum"
    scaling: UnitScaling | None = None

    @nn.compact
    def __call__(self, x_BLC: jnp.ndarray, mask_LL: jnp.ndarray | None,
                 cache_at: int | None = None) -> jnp.ndarray:
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
        if cache_at is not None:
            out = self._attend_cached(q, k, v, cache_at, scale, kind).reshape(B, L, C)
        elif kind in ("fused", "cudnn"):
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
        out = scale_output(self.scaling, "attn.proj", self.block, out)
        # The study's site: the layer's own output, before the block multiplies it by gamma1.
        tap(self, self.taps, "attn.proj", out, c.patch_nums, self.block)
        return out

    def _attend_cached(self, q_BlHc, k_BlHc, v_BlHc, start: int, scale: float, kind: str) -> jnp.ndarray:
        """One scale's attention through the cache: write its keys and values at `start`,
        attend to every cached position before start + l. `kind`: the resolved kernel; one
        scale needs no mask, so "blocked" is `attention.cached`, the einsum path in chunks
        sized for a CPU's cache. Returns (B, l, H, c)."""
        B, l, H, hd = q_BlHc.shape
        end, L = start + l, self.config.seq_len
        put = jax.lax.dynamic_update_slice
        if kind in ("einsum", "blocked"):
            # Keys as (B, H, c, L) and values as (B, H, L, c): the layouts the two products
            # read, so the cache is written in place and never transposed.
            ck = self.variable(CACHE, "k", jnp.zeros, (B, H, hd, L), k_BlHc.dtype)
            cv = self.variable(CACHE, "v", jnp.zeros, (B, H, L, hd), v_BlHc.dtype)
            ck.value = put(ck.value, jnp.transpose(k_BlHc, (0, 2, 3, 1)), (0, 0, 0, start))
            cv.value = put(cv.value, jnp.transpose(v_BlHc, (0, 2, 1, 3)), (0, 0, start, 0))
            if kind == "blocked":
                return attention_lib.cached(q_BlHc, ck.value[..., :end], cv.value[:, :, :end], scale, self.dtype)
            logits = jnp.einsum("bqhc,bhck->bhqk", q_BlHc, ck.value[..., :end]).astype(jnp.float32) * scale
            attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
            return jnp.einsum("bhqk,bhkc->bqhc", attn, cv.value[:, :, :end])
        ck = self.variable(CACHE, "k", jnp.zeros, (B, L, H, hd), k_BlHc.dtype)
        cv = self.variable(CACHE, "v", jnp.zeros, (B, L, H, hd), v_BlHc.dtype)
        ck.value = put(ck.value, k_BlHc, (0, start, 0, 0))
        cv.value = put(cv.value, v_BlHc, (0, start, 0, 0))
        return jax.nn.dot_product_attention(q_BlHc, ck.value[:, :end], cv.value[:, :end], scale=scale,
                                            implementation="cudnn" if kind == "cudnn" else None)


def _l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    # F.normalize: x / max(||x||, 1e-12), over the head dimension.
    n = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(n, 1e-12)).astype(x.dtype)


class FFN(nn.Module):
    config: VARConfig
    taps: TapConfig
    block: int
    dtype: jnp.dtype = jnp.float32
    scaling: UnitScaling | None = None

    @nn.compact
    def __call__(self, x_BLC: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        h = jax.nn.gelu(_dense(c.mlp_dim, self.dtype, name="fc1")(x_BLC), approximate=True)
        h = scale_output(self.scaling, "ffn.fc1", self.block, h)
        # The study's hook applied the tanh-GELU to fc1's output: record after the GELU.
        tap(self, self.taps, "ffn.fc1", h, c.patch_nums, self.block)
        out = _dense(c.embed_dim, self.dtype, name="fc2")(h)
        out = scale_output(self.scaling, "ffn.fc2", self.block, out)
        tap(self, self.taps, "ffn.fc2", out, c.patch_nums, self.block)
        return out


class AdaLNSelfAttn(nn.Module):
    """One block: adaptive-LN-modulated attention and FFN, each scaled by a gate gamma."""

    config: VARConfig
    taps: TapConfig
    block: int
    dtype: jnp.dtype = jnp.float32
    attention: str = "einsum"
    scaling: UnitScaling | None = None

    @nn.compact
    def __call__(self, x_BLC, cond, mask_LL, cache_at: int | None = None):
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
        attn = SelfAttention(c, self.taps, self.block, self.dtype, self.attention, self.scaling, name="attn")
        ffn = FFN(c, self.taps, self.block, self.dtype, self.scaling, name="ffn")
        attn_out = attn(ln(x_BLC) * (1 + scale1) + shift1, mask_LL, cache_at) * gamma1
        # Upstream: `.mul_(gamma1)`, in place on attn.proj's output tensor; a hook that keeps
        # that tensor sees this product, which the study did not record (taps.py explains).
        tap(self, self.taps, "attn.proj_times_gamma1", attn_out, c.patch_nums, self.block,
            name="attn.proj_times_gamma1")
        x_BLC = x_BLC + attn_out
        x_BLC = x_BLC + ffn(ln(x_BLC) * (1 + scale2) + shift2) * gamma2
        tap(self, self.taps, "resid", x_BLC, c.patch_nums, self.block)
        return x_BLC


class VAR(nn.Module):
    """Teacher-forced VAR: (labels, teacher-forcing input) -> logits (B, L, V); and `step`,
    one scale of the sampler with a key/value cache (varjax.generate).

    `dtype` is the compute dtype of the blocks (float32, or bfloat16 as upstream's autocast);
    parameters, embeddings, the head and every recorded reduction stay float32. `attention`
    chooses the attention kernel (see SelfAttention). `scaling` multiplies chosen units' output
    values (a `varjax.scaling.UnitScaling` in mode "output"; mode "weights" is a parameter
    edit, `UnitScaling.apply`).
    """

    config: VARConfig
    taps: TapConfig = TapConfig()
    dtype: jnp.dtype = jnp.float32
    attention: str = "einsum"
    scaling: UnitScaling | None = None

    def setup(self):
        c = self.config
        C = c.embed_dim
        init = nn.initializers.truncated_normal(0.02)
        # Attribute names are the param names (`blocks` becomes blocks_0, blocks_1, ...).
        self.class_emb = nn.Embed(c.num_classes + 1, C, embedding_init=init)
        self.pos_start = self.param("pos_start", init, (1, 1, C))
        self.pos_1LC = self.param("pos_1LC", init, (1, c.seq_len, C))
        self.lvl_embed = nn.Embed(len(c.patch_nums), C, embedding_init=init)
        self.word_embed = _dense(C, jnp.float32)
        if c.shared_aln:
            self.shared_ada_lin_1 = _dense(6 * C, jnp.float32)
        self.blocks = [AdaLNSelfAttn(c, self.taps, i, self.dtype, self.attention, self.scaling)
                       for i in range(c.depth)]
        self.head_nm = _HeadNorm(c)
        self.head_ln = _layer_norm(c.norm_eps, jnp.float32)
        self.head = _dense(c.vocab_size, jnp.float32)

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
        if drop_B is not None:
            label_B = jnp.where(drop_B, c.num_classes, label_B)
        cond_BD = self.class_emb(label_B)
        lvl = self.lvl_embed(jnp.asarray(level_ids(c.patch_nums)))
        word = self.word_embed(x_BLCv_wo_first_l.astype(jnp.float32))
        sos = cond_BD[:, None, :] + self.pos_start
        x_BLC = jnp.concatenate([sos, word], axis=1) + lvl[None] + self.pos_1LC
        cond = self._block_cond(cond_BD)
        mask = jnp.asarray(block_causal_mask(c.patch_nums))
        x_BLC = x_BLC.astype(self.dtype)
        for block in self.blocks:
            x_BLC = block(x_BLC, cond, mask)
        return self._logits(x_BLC, cond_BD)

    def step(self, label_B: jnp.ndarray, x_BlCv: jnp.ndarray | None, scale: int) -> jnp.ndarray:
        """One scale of the sampler (upstream autoregressive_infer_cfg's loop body).

        Args:
          label_B: int (B,) class ids (the sampler's rows: conditional and null labels).
          x_BlCv: float32 (B, pn^2, Cv), this scale's input (the accumulated f_hat
            area-downsampled to pn, `VectorQuantizer.add_scale`); None at scale 0.
          scale: the scale's index s (static); scales 0..s-1 must already be in the `cache`.
        Returns:
          float32 logits (B, pn^2, V). Writes this scale's keys and values into the `cache`
          collection (created, zero, at scale 0) and sows the `taps` its TapConfig asks for.
        """
        c = self.config
        begin = scale_begin(c.patch_nums, scale)
        end = begin + c.patch_nums[scale] ** 2
        cond_BD = self.class_emb(label_B)
        # Upstream: lvl_pos = lvl_embed(lvl_1L) + pos_1LC, added after word_embed (or sos + pos_start).
        lvl_pos = self.lvl_embed(jnp.asarray(level_ids(c.patch_nums)[begin:end]))[None] + self.pos_1LC[:, begin:end]
        if scale == 0:
            x_BlC = cond_BD[:, None, :] + self.pos_start + lvl_pos
        else:
            x_BlC = self.word_embed(x_BlCv.astype(jnp.float32)) + lvl_pos
        cond = self._block_cond(cond_BD)
        x_BlC = x_BlC.astype(self.dtype)
        for block in self.blocks:
            x_BlC = block(x_BlC, cond, None, cache_at=begin)
        return self._logits(x_BlC, cond_BD)

    def _block_cond(self, cond_BD: jnp.ndarray) -> jnp.ndarray:
        if self.config.shared_aln:
            # shared_ada_lin(cond_BD) viewed (B, 1, 6, C), computed once for all blocks.
            cond = self.shared_ada_lin_1(nn.silu(cond_BD))
            return cond.reshape(cond_BD.shape[0], 1, 6, self.config.embed_dim)
        return cond_BD

    def _logits(self, x_BLC: jnp.ndarray, cond_BD: jnp.ndarray) -> jnp.ndarray:
        # Upstream get_logits runs the head in float32 (`h.float()`), autocast or not.
        x_BLC = x_BLC.astype(jnp.float32)
        scale, shift = self.head_nm(cond_BD)
        h = self.head_ln(x_BLC) * (1 + scale) + shift
        tap(self, self.taps, "head_nm", h, self.config.patch_nums)  # AdaLNBeforeHead's output, the head's input
        logits = self.head(h)
        tap(self, self.taps, "head", logits, self.config.patch_nums)
        return logits


class _HeadNorm(nn.Module):
    """AdaLNBeforeHead's modulation: (scale, shift) from head_nm.ada_lin(cond), each (B, 1, C)."""

    config: VARConfig

    @nn.compact
    def __call__(self, cond_BD):
        C = self.config.embed_dim
        m = _dense(2 * C, jnp.float32, name="ada_lin_1")(nn.silu(cond_BD)).reshape(-1, 1, 2, C)
        return m[:, :, 0], m[:, :, 1]
