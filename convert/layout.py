"""The upstream state_dict layout (key -> shape, in upstream order) for a given config.

A port of the module registration order of upstream `models/var.py` (VAR, AdaLNSelfAttn)
and `models/basic_vae.py` + `models/quant.py` (Encoder, Decoder, VectorQuantizer2), as
shapes only. Used to build synthetic upstream checkpoints of any config (tests, benchmarks)
and checked against the released key listings in tests/data/checkpoint_keys/*.tsv.
"""

from __future__ import annotations

from varjax.config import VARConfig, VQVAEConfig

Layout = dict[str, tuple[int, ...]]

# Buffers and their dtypes (everything else is a float32 parameter).
INT_BUFFERS = ("lvl_1L",)


def var_layout(cfg: VARConfig) -> Layout:
    """Every key of an upstream VAR state_dict, params and buffers."""
    C, L, H = cfg.embed_dim, cfg.seq_len, cfg.num_heads
    out: Layout = {
        "pos_start": (1, 1, C),
        "pos_1LC": (1, L, C),
        "lvl_1L": (1, L),
        "attn_bias_for_masking": (1, 1, L, L),
        "word_embed.weight": (C, cfg.z_channels),
        "word_embed.bias": (C,),
        "class_emb.weight": (cfg.num_classes + 1, C),
        "lvl_embed.weight": (len(cfg.patch_nums), C),
    }
    if cfg.shared_aln:
        out |= {"shared_ada_lin.1.weight": (6 * C, C), "shared_ada_lin.1.bias": (6 * C,)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        if cfg.shared_aln:
            out[b + "ada_gss"] = (1, 1, 6, C)
        if cfg.attn_l2_norm:
            out[b + "attn.scale_mul_1H11"] = (1, H, 1, 1)
        out |= {
            b + "attn.q_bias": (C,),
            b + "attn.v_bias": (C,),
            b + "attn.zero_k_bias": (C,),
            b + "attn.mat_qkv.weight": (3 * C, C),
            b + "attn.proj.weight": (C, C),
            b + "attn.proj.bias": (C,),
            b + "ffn.fc1.weight": (cfg.mlp_dim, C),
            b + "ffn.fc1.bias": (cfg.mlp_dim,),
            b + "ffn.fc2.weight": (C, cfg.mlp_dim),
            b + "ffn.fc2.bias": (C,),
        }
        if not cfg.shared_aln:
            out |= {b + "ada_lin.1.weight": (6 * C, C), b + "ada_lin.1.bias": (6 * C,)}
    return out | {
        "head_nm.ada_lin.1.weight": (2 * C, C),
        "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (cfg.vocab_size, C),
        "head.bias": (cfg.vocab_size,),
    }


def _conv(name: str, c_out: int, c_in: int, k: int) -> Layout:
    return {f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)}


def _norm(name: str, c: int) -> Layout:
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def _resnet(name: str, c_in: int, c_out: int) -> Layout:
    out = _norm(f"{name}.norm1", c_in) | _conv(f"{name}.conv1", c_out, c_in, 3)
    out |= _norm(f"{name}.norm2", c_out) | _conv(f"{name}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        out |= _conv(f"{name}.nin_shortcut", c_out, c_in, 1)
    return out


def _attn(name: str, c: int) -> Layout:
    return _norm(f"{name}.norm", c) | _conv(f"{name}.qkv", 3 * c, c, 1) | _conv(f"{name}.proj_out", c, c, 1)


def _mid(name: str, c: int, attn: bool) -> Layout:
    out = _resnet(f"{name}.block_1", c, c)
    if attn:
        out |= _attn(f"{name}.attn_1", c)
    return out | _resnet(f"{name}.block_2", c, c)


def vqvae_layout(cfg: VQVAEConfig, num_scales: int = 10) -> Layout:
    """Every key of an upstream VQVAE state_dict (num_scales: rows of ema_vocab_hit_SV)."""
    chs = [cfg.ch * m for m in cfg.ch_mult]
    last = len(chs) - 1
    out: Layout = _conv("encoder.conv_in", cfg.ch, 3, 3)
    c_in = cfg.ch
    for i, c in enumerate(chs):
        for j in range(cfg.num_res_blocks):
            out |= _resnet(f"encoder.down.{i}.block.{j}", c_in, c)
            c_in = c
        for j in range(cfg.num_res_blocks if cfg.using_sa and i == last else 0):
            out |= _attn(f"encoder.down.{i}.attn.{j}", c)
        if i != last:
            out |= _conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    out |= _mid("encoder.mid", c_in, cfg.using_mid_sa)
    out |= _norm("encoder.norm_out", c_in) | _conv("encoder.conv_out", cfg.z_channels, c_in, 3)

    out |= _conv("decoder.conv_in", chs[-1], cfg.z_channels, 3)
    out |= _mid("decoder.mid", chs[-1], cfg.using_mid_sa)
    # Upstream builds the decoder levels from the top and inserts each at index 0, so
    # `decoder.up.{i}` is level i (up.0 at full resolution); state_dict order is up.0 first.
    ins = {i: (chs[i + 1] if i < last else chs[-1]) for i in range(len(chs))}
    for i, c in enumerate(chs):
        c_in = ins[i]
        for j in range(cfg.num_res_blocks + 1):
            out |= _resnet(f"decoder.up.{i}.block.{j}", c_in, c)
            c_in = c
        for j in range(cfg.num_res_blocks + 1 if cfg.using_sa and i == last else 0):
            out |= _attn(f"decoder.up.{i}.attn.{j}", c)
        if i != 0:
            out |= _conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    out |= _norm("decoder.norm_out", chs[0]) | _conv("decoder.conv_out", 3, chs[0], 3)

    out["quantize.ema_vocab_hit_SV"] = (num_scales, cfg.vocab_size)
    for i in range(cfg.share_quant_resi):
        out |= _conv(f"quantize.quant_resi.qresi_ls.{i}", cfg.z_channels, cfg.z_channels, 3)
    out["quantize.embedding.weight"] = (cfg.vocab_size, cfg.z_channels)
    out |= _conv("quant_conv", cfg.z_channels, cfg.z_channels, 3)
    return out | _conv("post_quant_conv", cfg.z_channels, cfg.z_channels, 3)
