"""The multi-scale VQVAE: encoder, decoder and the residual quantizer (tokens <-> latents).

Ports upstream `models/basic_vae.py` (Encoder, Decoder, ResnetBlock, AttnBlock, Downsample,
Upsample), `models/quant.py` (VectorQuantizer2, Phi, PhiPartiallyShared) and
`models/vqvae.py` (VQVAE). Layout is NHWC throughout (upstream is NCHW).

Shape letters: B batch, H/W spatial, C channels, Cv latent channels (Cvae), V vocabulary,
pn side of one scale's token map, K number of scales.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp
import numpy as np

from varjax import resize
from varjax.config import VQVAEConfig


class GroupNorm(nn.Module):
    """Upstream `Normalize`: GroupNorm(32 groups, eps=1e-6, affine), statistics in float32.

    Two-pass variance, as PyTorch (flax's fast E[x^2]-E[x]^2 loses digits on large
    activations). Each statistic is summed per channel over all positions first, then over
    the channels of a group: the reduction keeps the contiguous channel axis, which XLA's CPU
    reductions run faster than one over (positions, group channels). The output is x * s + t
    per channel, as PyTorch applies it (s = gamma / std, t = beta - mean * s), cast to `dtype`.

    `pending_bias_C`: normalise x + pending_bias_C without that sum being written out; the
    convolution before hands its bias over (`Conv(..., add_bias=False)`).

    On the CPU, x is read three times and the output written once: the per-channel sums; the
    squared deviations, the centring added in by YNNPACK's reduction as it reads (it takes
    the per-channel offset as one (B, C) operand); the normalising pass, with SiLU after it
    fused in. `experiments/bench_cpu_kernels.py --part groupnorm` times it against flax's and
    PyTorch's.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray, pending_bias_C: jnp.ndarray | None = None) -> jnp.ndarray:
        B, H, W, C = x_BHWC.shape
        G = self.num_groups
        scale_C = self.param("scale", nn.initializers.ones, (C,))
        bias_C = self.param("bias", nn.initializers.zeros, (C,))
        x = x_BHWC.astype(jnp.float32)
        n = H * W * (C // G)

        member_GC = jnp.repeat(jnp.eye(G, dtype=jnp.float32), C // G, axis=1)  # 1 where channel c is in group g

        def group_mean(sums_BC):  # per-channel sums over positions -> each channel's group mean
            # A product with the 0/1 membership matrix (exact: one term each) rather than a
            # broadcast, so the result is written out once instead of recomputed, through an
            # index gather, at every position by the normalising pass that reads it.
            return jnp.dot(sums_BC.reshape(B, G, C // G).sum(axis=-1) / n, member_GC,
                           precision=jax.lax.Precision.HIGHEST)

        sums_BC = jnp.sum(x, axis=(1, 2))
        b_C = jnp.zeros((C,), jnp.float32) if pending_bias_C is None else pending_bias_C.astype(jnp.float32)
        offset_BC = b_C - group_mean(sums_BC + H * W * b_C)  # x + offset is (x + b) centred
        d = x + offset_BC[:, None, None, :]
        mul_BC = jax.lax.rsqrt(group_mean(jnp.sum(jnp.square(d), axis=(1, 2))) + self.epsilon) * scale_C
        add_BC = offset_BC * mul_BC + bias_C
        return (x * mul_BC[:, None, None, :] + add_BC[:, None, None, :]).astype(self.dtype)


def _norm(name: str | None = None, dtype=jnp.float32) -> GroupNorm:
    return GroupNorm(dtype=dtype, name=name)


class Conv(nn.Module):
    """`nn.Conv(features, (k, k), padding=k // 2)` with the same parameters (kernel (k, k, Cin,
    Cout) and bias (Cout,): names, shapes, initialisers) and the same computation, which can
    hand its bias back instead of adding it: `add_bias=False` returns (output without bias,
    bias) for a GroupNorm (`pending_bias_C`) or residual add that takes it in where it reads
    the output."""

    features: int
    kernel: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray, add_bias: bool = True):
        k = self.kernel
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x_BHWC.shape[-1], self.features))
        bias_C = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias_C = promote_dtype(x_BHWC, kernel, bias_C, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(k // 2, k // 2)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias_C if add_bias else (y, bias_C)


def _conv(features: int, kernel: int = 3, name: str | None = None, dtype=jnp.float32) -> Conv:
    return Conv(features, kernel, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    out_channels: int
    dtype: jnp.dtype = jnp.float32  # compute dtype (parameters stay float32)

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray, pending_bias_C: jnp.ndarray | None = None) -> jnp.ndarray:
        """x (+ pending_bias_C, a bias the convolution before handed over) -> the block's output."""
        d = self.dtype
        h, b_C = _conv(self.out_channels, name="conv1", dtype=d)(
            nn.silu(_norm("norm1", d)(x_BHWC, pending_bias_C)), add_bias=False)
        h = _conv(self.out_channels, name="conv2", dtype=d)(nn.silu(_norm("norm2", d)(h, b_C)))
        x = x_BHWC.astype(d)
        if pending_bias_C is not None:
            x = x + pending_bias_C.astype(d)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, name="nin_shortcut", dtype=d)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (q, k, v from one 1x1 conv)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray) -> jnp.ndarray:
        B, H, W, C = x_BHWC.shape
        d = self.dtype
        qkv = _conv(3 * C, 1, name="qkv", dtype=d)(_norm("norm", d)(x_BHWC)).reshape(B, H * W, 3 * C)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # upstream splits channels in the order q, k, v
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * C**-0.5
        w = jax.nn.softmax(logits, axis=-1).astype(d)
        h = jnp.einsum("bqk,bkc->bqc", w, v).reshape(B, H, W, C)
        return x_BHWC.astype(d) + _conv(C, 1, name="proj_out", dtype=d)(h)


class Downsample(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray) -> jnp.ndarray:
        # Upstream pads right and bottom by one zero, then a 3x3 stride-2 conv without padding.
        x = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x.shape[-1], (3, 3), strides=2, padding="VALID", dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray) -> jnp.ndarray:
        x = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)  # nearest, x2
        return _conv(x.shape[-1], name="conv")(x)


class _Level(nn.Module):
    """One resolution level: ResnetBlocks, each followed by an AttnBlock where `attn`."""

    out_channels: int
    num_blocks: int
    attn: bool
    resample: str | None  # "down", "up" or None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jnp.ndarray, pending_bias_C: jnp.ndarray | None = None) -> jnp.ndarray:
        for i in range(self.num_blocks):
            h = ResnetBlock(self.out_channels, self.dtype, name=f"block_{i}")(h, pending_bias_C if i == 0 else None)
            if self.attn:
                h = AttnBlock(self.dtype, name=f"attn_{i}")(h)
        if pending_bias_C is not None and self.num_blocks == 0:  # no block took it over
            h = h + pending_bias_C.astype(h.dtype)
        if self.resample == "down":
            h = Downsample(self.dtype, name="downsample")(h)
        elif self.resample == "up":
            h = Upsample(name="upsample")(h)
        return h


class _Mid(nn.Module):
    channels: int
    attn: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        h = ResnetBlock(self.channels, self.dtype, name="block_1")(h)
        if self.attn:
            h = AttnBlock(self.dtype, name="attn_1")(h)
        return ResnetBlock(self.channels, self.dtype, name="block_2")(h)


class Encoder(nn.Module):
    config: VQVAEConfig
    dtype: jnp.dtype = jnp.float32  # compute dtype; the output is float32 either way

    @nn.compact
    def __call__(self, x_BHW3: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        d = self.dtype
        n = len(c.ch_mult)
        h, b_C = _conv(c.ch, name="conv_in", dtype=d)(x_BHW3, add_bias=False)  # b_C: added in down_0
        for i, mult in enumerate(c.ch_mult):
            last = i == n - 1
            h = _Level(c.ch * mult, c.num_res_blocks, attn=last and c.using_sa,
                       resample=None if last else "down", dtype=d, name=f"down_{i}")(h, b_C if i == 0 else None)
        h = _Mid(c.ch * c.ch_mult[-1], c.using_mid_sa, d, name="mid")(h)
        return _conv(c.z_channels, name="conv_out", dtype=d)(nn.silu(_norm("norm_out", d)(h))).astype(jnp.float32)


class Decoder(nn.Module):
    config: VQVAEConfig

    @nn.compact
    def __call__(self, z_BhwCv: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        n = len(c.ch_mult)
        h = _conv(c.ch * c.ch_mult[-1], name="conv_in")(z_BhwCv)
        h = _Mid(c.ch * c.ch_mult[-1], c.using_mid_sa, name="mid")(h)
        # Upstream builds `up` in reverse and inserts at 0, so up.{n-1} runs first.
        for i in reversed(range(n)):
            h = _Level(c.ch * c.ch_mult[i], c.num_res_blocks + 1, attn=i == n - 1 and c.using_sa,
                       resample="up" if i != 0 else None, name=f"up_{i}")(h)
        h = _conv(3, name="conv_out")(nn.silu(_norm("norm_out")(h)))
        return jnp.clip(h, -1.0, 1.0)


class Phi(nn.Conv):
    """Phi(h) = (1 - r) * h + r * conv3x3(h): the residual refiner of each scale.

    A Conv subclass, as upstream's `Phi(nn.Conv2d)`, so its kernel sits at `qresi_ls_i/kernel`.
    """

    ratio: float = 0.5

    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        return h * (1 - self.ratio) + super().__call__(h) * self.ratio


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Which of the partially shared Phi convs scale `si` uses (upstream PhiPartiallyShared)."""
    k = num_phi
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    at = si / (num_scales - 1) if num_scales > 1 else 1.0
    return int(np.argmin(np.abs(ticks - at)))  # first on ties, as numpy's argmin


class VectorQuantizer(nn.Module):
    """Codebook and Phi convs; methods map latents <-> per-scale token indices."""

    config: VQVAEConfig

    def setup(self):
        c = self.config
        self.embedding = nn.Embed(c.vocab_size, c.z_channels)
        self.quant_resi = _PhiList(c.share_quant_resi, c.z_channels, c.quant_resi)

    def _phi(self, h: jnp.ndarray, si: int, num_scales: int) -> jnp.ndarray:
        return self.quant_resi(h, phi_index(si, num_scales, self.config.share_quant_resi))

    def _scale_map(self, idx_Bl: jnp.ndarray, pn: int, hw: int, last: bool, si: int, K: int):
        """Codebook vectors of one scale, bicubic-upsampled to the latent size, through Phi."""
        return self._lift(self.embedding(idx_Bl).reshape(idx_Bl.shape[0], pn, pn, -1), hw, last, si, K)

    def _lift(self, h_BpnpnCv: jnp.ndarray, hw: int, last: bool, si: int, K: int):
        if not last:  # upstream skips the resize at the last scale (already at full size)
            h_BpnpnCv = resize.bicubic(h_BpnpnCv, hw)
        return self._phi(h_BpnpnCv, si, K)

    def codebook(self) -> jnp.ndarray:
        """(V, Cv) the codebook vectors (the sampler's soft embedding with more_smooth)."""
        return self.embedding.embedding

    def add_scale(self, f_hat: jnp.ndarray, h_BlCv: jnp.ndarray, si: int, patch_nums: Sequence[int]):
        """One sampler step of the f_hat accumulation (upstream get_next_autoregressive_input).

        Args:
          f_hat: float32 (B, h, w, Cv), the sum over scales < si (zeros before scale 0).
          h_BlCv: (B, pn_si^2, Cv) scale si's codebook vectors (`embedding(idx)`), row-major.
        Returns:
          (f_hat + phi_si(bicubic_up(h)), next): next is f_hat area-downsampled to the next
          scale, (B, pn_{si+1}^2, Cv), the next scale's input; None after the last scale.
        """
        K, pn, hw = len(patch_nums), patch_nums[si], patch_nums[-1]
        h = h_BlCv.reshape(h_BlCv.shape[0], pn, pn, -1)
        f_hat = f_hat + self._lift(h, hw, si == K - 1, si, K)
        if si == K - 1:
            return f_hat, None
        nxt = patch_nums[si + 1]
        return f_hat, resize.area(f_hat, nxt).reshape(f_hat.shape[0], nxt * nxt, -1)

    def f_to_idx(self, f_BhwCv: jnp.ndarray, patch_nums: Sequence[int]) -> list[jnp.ndarray]:
        """Latent f -> list of K int32 arrays (B, pn*pn), row-major (f_to_idxBl_or_fhat)."""
        B, hw, _, Cv = f_BhwCv.shape
        K = len(patch_nums)
        e_VC = self.embedding.embedding
        e_sq = jnp.sum(jnp.square(e_VC), axis=1)
        f_rest = f_BhwCv
        out = []
        for si, pn in enumerate(patch_nums):
            last = si == K - 1
            z = f_rest if last else resize.area(f_rest, pn)
            z_NC = z.reshape(-1, Cv)
            # Same expression and order as upstream: (|z|^2 + |e|^2) - 2 z.e, argmin first on ties.
            d = jnp.sum(jnp.square(z_NC), axis=1, keepdims=True) + e_sq[None, :]
            d = d - 2.0 * (z_NC @ e_VC.T)
            idx = jnp.argmin(d, axis=1).astype(jnp.int32).reshape(B, pn * pn)
            h = self._scale_map(idx, pn, hw, last, si, K)
            f_rest = f_rest - h
            out.append(idx)
        return out

    def idx_to_fhat(self, idx: Sequence[jnp.ndarray], patch_nums: Sequence[int]) -> jnp.ndarray:
        """Token indices of all scales -> f_hat (B, h, w, Cv), the decoder's input."""
        K = len(patch_nums)
        hw = patch_nums[-1]
        f_hat = 0.0
        for si, pn in enumerate(patch_nums):
            f_hat = f_hat + self._scale_map(idx[si], pn, hw, si == K - 1, si, K)
        return f_hat

    def idx_to_var_input(self, idx: Sequence[jnp.ndarray], patch_nums: Sequence[int]) -> jnp.ndarray:
        """Teacher-forcing input x_BLCv_wo_first_l (B, L - 1, Cv) (idxBl_to_var_input).

        Not each scale's own embedding: the accumulated f_hat after scales 0..si, area-
        downsampled to the next scale's size. This is what the model was trained on.
        """
        K = len(patch_nums)
        hw = patch_nums[-1]
        B = idx[0].shape[0]
        f_hat = 0.0
        nxt = []
        for si in range(K - 1):
            # Upstream always bicubic-resizes here, even at the last-but-one scale.
            f_hat = f_hat + self._scale_map(idx[si], patch_nums[si], hw, False, si, K)
            pn = patch_nums[si + 1]
            nxt.append(resize.area(f_hat, pn).reshape(B, pn * pn, -1))
        return jnp.concatenate(nxt, axis=1)

    def __call__(self, f_BhwCv: jnp.ndarray, patch_nums: Sequence[int]):
        idx = self.f_to_idx(f_BhwCv, patch_nums)
        return idx, self.idx_to_fhat(idx, patch_nums), self.idx_to_var_input(idx, patch_nums)


class _PhiList(nn.Module):
    """quant_resi.qresi_ls.{0..n-1}: the partially shared Phi convs."""

    num: int
    channels: int
    ratio: float

    def setup(self):
        self.qresi_ls = [Phi(self.channels, (3, 3), padding=1, ratio=self.ratio) for _ in range(self.num)]

    def __call__(self, h: jnp.ndarray, i: int) -> jnp.ndarray:
        return self.qresi_ls[i](h)


class VQVAE(nn.Module):
    """Encoder + quant_conv + quantizer + post_quant_conv + decoder (upstream VQVAE)."""

    config: VQVAEConfig
    # The encoder's compute dtype (bfloat16 in the `bf16_full` recording mode). quant_conv,
    # the quantizer (area/bicubic resizing, codebook search, phi) and the decoder stay float32.
    encoder_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.encoder_dtype)
        self.decoder = Decoder(c)
        self.quant_conv = _conv(c.z_channels)
        self.post_quant_conv = _conv(c.z_channels)
        self.quantize = VectorQuantizer(c)

    def encode(self, images_BHW3: jnp.ndarray) -> jnp.ndarray:
        """uint8 or [-1, 1] float images (B, H, W, 3) -> latent f (B, h, w, Cv)."""
        x = images_BHW3
        if x.dtype == jnp.uint8:
            x = x.astype(jnp.float32) / 127.5 - 1.0
        return self.quant_conv(self.encoder(x))

    def tokenize(self, images_BHW3: jnp.ndarray, patch_nums: Sequence[int]) -> list[jnp.ndarray]:
        return self.quantize.f_to_idx(self.encode(images_BHW3), patch_nums)

    def var_input(self, idx: Sequence[jnp.ndarray], patch_nums: Sequence[int]) -> jnp.ndarray:
        return self.quantize.idx_to_var_input(idx, patch_nums)

    def decode_fhat(self, f_hat: jnp.ndarray) -> jnp.ndarray:
        """f_hat (B, h, w, Cv) -> image (B, H, W, 3) in [-1, 1] (clamped, as upstream)."""
        return self.decoder(self.post_quant_conv(f_hat))

    def decode(self, idx: Sequence[jnp.ndarray], patch_nums: Sequence[int]) -> jnp.ndarray:
        return self.decode_fhat(self.quantize.idx_to_fhat(idx, patch_nums))

    def __call__(self, images_BHW3: jnp.ndarray, patch_nums: Sequence[int]):
        """Touches every parameter (for init): tokens, teacher-forcing input, reconstruction."""
        idx, f_hat, x_in = self.quantize(self.encode(images_BHW3), patch_nums)
        return idx, x_in, self.decode_fhat(f_hat)
