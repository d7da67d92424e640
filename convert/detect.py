"""Detect the model config from a state_dict's shapes alone (key -> shape).

Works on loaded checkpoints and on the key listings in tests/data/checkpoint_keys/*.tsv.
Sizes are read from 1-D tensors (biases) where possible, so that a transposed weight is
reported by the shape check against the Flax tree rather than silently changing the config.
Upstream constructors: `VAR(...)` in models/var.py, `VQVAE(...)` in models/vqvae.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from convert.errors import ConvertError
from varjax.config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig

Shapes = Mapping[str, tuple[int, ...]]

# Scale pyramids of upstream's training script (`--pn 256 / 512 / 1024`), found by
# (number of scales, total tokens L); L alone is ambiguous in general.
KNOWN_PATCH_NUMS = (
    PATCH_NUMS_256,  # L = 680
    PATCH_NUMS_512,  # L = 2240
    (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),  # L = 9451
)


def part_of(shapes: Shapes) -> str | None:
    """'var', 'vqvae' or None, from the key names."""
    if "word_embed.weight" in shapes or any(k.startswith("blocks.") for k in shapes):
        return "var"
    if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in shapes):
        return "vqvae"
    return None


def _get(shapes: Shapes, key: str, ndim: int, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConvertError(f"missing key {key} (needed to detect {what})")
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise ConvertError(f"{key} has shape {shape}, expected {ndim}-D (reading {what})")
    return shape


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """The integers i for which some key starts with `{prefix}{i}.`, checked to be 0..n-1."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})
    if found != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise ConvertError(f"{prefix}* indices are not contiguous: no {prefix}{missing[0]}")
    return found


def patch_nums_for(seq_len: int, num_scales: int) -> tuple[int, ...]:
    """The known pyramid with this many scales and tokens."""
    for pns in KNOWN_PATCH_NUMS:
        if len(pns) == num_scales and sum(p * p for p in pns) == seq_len:
            return pns
    known = ", ".join(f"L={sum(p * p for p in pns)}" for pns in KNOWN_PATCH_NUMS)
    raise ConvertError(
        f"unknown scale pyramid: {num_scales} scales, L={seq_len} tokens (known: {known}); "
        "pass --patch-nums"
    )


def detect_var(shapes: Shapes, patch_nums: tuple[int, ...] | None = None) -> VARConfig:
    """The VARConfig of a VAR state_dict.

    Args:
      shapes: key -> shape of every tensor (params and buffers).
      patch_nums: the scale pyramid, if known; otherwise looked up by (scales, L).
    """
    blocks = _indices(shapes, "blocks.")
    if not blocks:
        raise ConvertError("no transformer blocks (blocks.0.*)")
    width, z_channels = _get(shapes, "word_embed.weight", 2, "width and Cvae")
    (vocab,) = _get(shapes, "head.bias", 1, "the vocabulary size")
    num_classes = _get(shapes, "class_emb.weight", 2, "the class count")[0] - 1
    (hidden,) = _get(shapes, "blocks.0.ffn.fc1.bias", 1, "the MLP width")
    scale_mul = "blocks.0.attn.scale_mul_1H11"
    attn_l2_norm = scale_mul in shapes
    if not attn_l2_norm:
        # Upstream keeps no per-head parameter without attn_l2_norm: the head count is lost.
        raise ConvertError(f"no {scale_mul}: the head count of a model without attn_l2_norm is unknown")
    heads = _get(shapes, scale_mul, 4, "the head count")[1]
    if width % heads:
        raise ConvertError(f"width {width} is not a multiple of {heads} heads")
    shared_aln = "shared_ada_lin.1.weight" in shapes or "blocks.0.ada_gss" in shapes
    seq_len = _get(shapes, "pos_1LC", 3, "the token count")[1]
    num_scales = _get(shapes, "lvl_embed.weight", 2, "the scale count")[0]
    if patch_nums is None:
        patch_nums = patch_nums_for(seq_len, num_scales)
    elif (len(patch_nums), sum(p * p for p in patch_nums)) != (num_scales, seq_len):
        raise ConvertError(
            f"--patch-nums {','.join(map(str, patch_nums))} does not fit the checkpoint "
            f"({num_scales} scales, L={seq_len} tokens)"
        )
    return VARConfig(
        depth=len(blocks),
        embed_dim=width,
        num_heads=heads,
        mlp_ratio=hidden / width,
        num_classes=num_classes,
        shared_aln=shared_aln,
        attn_l2_norm=attn_l2_norm,
        vocab_size=vocab,
        z_channels=z_channels,
        patch_nums=tuple(patch_nums),
    )


def detect_vqvae(shapes: Shapes) -> VQVAEConfig:
    """The VQVAEConfig of a VQVAE state_dict (key -> shape)."""
    (ch,) = _get(shapes, "encoder.conv_in.bias", 1, "the base channel count ch")
    levels = _indices(shapes, "encoder.down.")
    if not levels:
        raise ConvertError("no encoder levels (encoder.down.0.*)")
    ch_mult = []
    for i in levels:
        (out,) = _get(shapes, f"encoder.down.{i}.block.0.conv1.bias", 1, f"ch_mult[{i}]")
        if out % ch:
            raise ConvertError(f"encoder level {i} has {out} channels, not a multiple of ch={ch}")
        ch_mult.append(out // ch)
    num_res_blocks = len(_indices(shapes, "encoder.down.0.block."))
    (z_channels,) = _get(shapes, "encoder.conv_out.bias", 1, "z_channels")
    vocab = _get(shapes, "quantize.embedding.weight", 2, "the codebook size")[0]
    resi = _indices(shapes, "quantize.quant_resi.qresi_ls.")
    if not resi:
        # Upstream PhiShared (share_quant_resi=1) / PhiNonShared (0) use other key layouts.
        raise ConvertError("no quantize.quant_resi.qresi_ls.*: only partially shared Phi is supported")
    last = levels[-1]
    return VQVAEConfig(
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        vocab_size=vocab,
        share_quant_resi=len(resi),
        using_sa=any(k.startswith(f"encoder.down.{last}.attn.") for k in shapes),
        using_mid_sa=any(k.startswith("encoder.mid.attn_1.") for k in shapes),
    )
