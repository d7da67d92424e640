"""The kernel-level measurements behind varjax's CPU choices (varjax/xla_options.py,
varjax/attention.py, the GroupNorm of varjax/vqvae.py), each against PyTorch's CPU kernel.

    python experiments/bench_cpu_kernels.py                    # everything, 2 images
    python experiments/bench_cpu_kernels.py --part conv --reps 7

One JSON line per (part, shape, implementation): min and median wall seconds over `--reps`
runs after a warm-up, the least CPU seconds of this process, the largest difference from the
first implementation of the row's part, and the speed ratio to it per repetition with its 95%
interval (`ratio_paired_*`, > 1: faster than the first). All float32 at highest precision,
implementations interleaved (the order reversed every other repetition) so they share the
machine's load. The option sets (`XLA` below) are varjax's (varjax/xla_options.py) with one
choice changed, or XLA's defaults. The parts:
- conv: the d16 VQVAE encoder's 3x3 convolutions under XLA's default kernels (YNNPACK),
  varjax's options (Eigen), and torch.nn.Conv2d (oneDNN);
- dot: the transformer's products (2 images x 680 tokens; fc1 at three of the sampler's
  row counts) under YNNPACK (XLA's product under varjax's options), Eigen, oneDNN, MKL
  through varjax.cpu_gemm (varjax's product on a one-device CPU), and torch.mm;
- attention: one d16 block's attention core, `einsum` and `blocked` (varjax/attention.py) and
  torch's scaled_dot_product_attention with the mask as an additive bias;
- groupnorm: GroupNorm(32) + SiLU at the encoder's largest activation, flax's GroupNorm and
  varjax's (also under `ynn_eltwise`, not taken, and `vector_width_256`, XLA's default
  width), and torch's;
- conv_form (when named): the largest convolution as NCHW, as 9 shifted products and as one
  im2col product, against the NHWC convolution;
- cached_attention (when named): the sampler's attention in one d16 block, each scale's
  queries against the keys cached so far (`--images` images with CFG: twice the rows), the
  spelled-out `einsum` path (varjax/var.py) and `cached` (varjax/attention.py), and torch's
  scaled_dot_product_attention as upstream's sampler calls it (no mask); one row per scale
  and one for all ten;
- sampling (when named): top-k 900 and top-p 0.96 at the last d16 scale (`--images` images
  x 256 tokens x 4096 logits): varjax.sampling.filter_logits (bisection), the same rule
  through XLA's TopK and a sort of the survivors (varjax's before), and upstream's
  sample_with_top_k_top_p_ masking written out in torch (topk, full sort, cumsum), each
  followed by the draw (jax.random.categorical; torch.multinomial);
- resnet_blocks (when named): two of the VQVAE's ResnetBlocks at each encoder level's shape
  (`--images` images), varjax's against upstream's forward written out in torch;
- tokenize, teacher_forced (when named): the whole d16 call (2 images) under varjax's
  options, XLA's defaults, Eigen for everything, YNNPACK's element-wise fusions and XLA's
  default 256-bit loops (tokenize) or (teacher_forced, varjax's attention kernel in all)
  varjax's Dense products on MKL (varjax.cpu_gemm), then XLA's products under varjax's
  options (YNNPACK), Eigen's and oneDNN's, and varjax's with 256-bit loops.
torch is optional (its rows are left out without it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from varjax import attention as attention_lib
from varjax import cpu_gemm
from varjax.config import PATCH_NUMS_256
from varjax.var import block_causal_mask
from varjax.vqvae import GroupNorm
from varjax.xla_options import compiler_options

_LIB = "LIBRARY_FUSION_TYPE_"
XLA = {  # name -> how its compile options differ from varjax's (varjax/xla_options.py's, as
    # this jaxlib takes them); None: XLA's own defaults, none of varjax's options
    "xla_default": None,
    "varjax": {},
    "ynnpack_dot": {},  # varjax's options with XLA's (YNNPACK's) products, not MKL's
    "eigen_dot": {"xla_cpu_experimental_ynn_fusion_type": f"{_LIB}REDUCE"},  # products on Eigen
    "onednn_dot": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_onednn": True,
                   "xla_cpu_experimental_onednn_fusion_type": f"{_LIB}INDIVIDUAL_DOT"},
    "eigen_all": {"xla_cpu_experimental_ynn_fusion_type": ""},
    # YNNPACK's element-wise fusions too (it then also takes the convolutions next to them)
    "ynn_eltwise": {"xla_cpu_experimental_ynn_fusion_type": f"{_LIB}INDIVIDUAL_DOT,{_LIB}REDUCE,{_LIB}ELTWISE"},
    # XLA's default vector width for its own loops (varjax prefers 512 bits since 2026-12-02)
    "vector_width_256": {"xla_cpu_prefer_vector_width": 256},
}


def _options(name: str) -> dict:
    """The compile options of XLA[name]."""
    return {} if XLA[name] is None else {**compiler_options(), **XLA[name]}


PARTS = ("conv", "dot", "attention", "groupnorm", "conv_form", "tokenize", "teacher_forced", "cached_attention",
         "sampling", "resnet_blocks")
# (images, side, in channels, out channels, stride): conv_in, each level's 3x3 convs, the
# first downsampling (upstream pads right/bottom, then stride 2 without padding)
CONVS = [(2, 256, 3, 160, 1), (2, 256, 160, 160, 1), (2, 256, 160, 160, 2), (2, 128, 160, 160, 1),
         (2, 64, 320, 320, 1), (2, 32, 320, 320, 1), (2, 16, 640, 640, 1)]
DOTS = [(1360, 1024, 3072), (1360, 1024, 4096), (1360, 4096, 1024),  # qkv, fc1, fc2 (M, K, N)
        (16, 1024, 4096), (256, 1024, 4096), (4096, 1024, 4096)]  # fc1 in the sampler (batch 8, CFG)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _time(fns: dict, reps: int) -> dict:
    """name -> (wall runs, cpu runs, last output), interleaved after one warm-up each, in
    reverse order every other repetition (what ran just before can change a call's time)."""
    walls = {k: [] for k in fns}
    cpus = {k: [] for k in fns}
    outs = {}
    for rep in range(reps + 1):
        for k, fn in (list(fns.items())[::-1] if rep % 2 else fns.items()):
            t0, c0 = time.perf_counter(), time.process_time()
            outs[k] = fn()
            if rep:
                walls[k].append(time.perf_counter() - t0)
                cpus[k].append(time.process_time() - c0)
    return {k: (walls[k], cpus[k], outs[k]) for k in fns}


def _rows(part: str, shape, fns: dict, reps: int, to_numpy) -> list[dict]:
    """One row per implementation; `max_abs_diff` and `ratio_paired_*` (the first
    implementation's time over this one's per repetition: > 1, this one is faster; see
    bench_upstream.paired_ratio) against the first."""
    if __package__:
        from experiments.bench_upstream import paired_ratio
    else:  # run as a script: experiments/ is on the path
        from bench_upstream import paired_ratio
    res = _time(fns, reps)
    first_walls, _, first_out = next(iter(res.values()))
    ref = to_numpy(first_out)
    return [{"part": part, "shape": list(shape), "impl": k, "min_s": round(min(w), 4),
             "median_s": round(statistics.median(w), 4), "cpu_min_s": round(min(c), 4),
             "max_abs_diff": float(np.max(np.abs(to_numpy(o) - ref))),
             **{f"ratio_{key}": v for key, v in paired_ratio(first_walls, w).items()}}
            for k, (w, c, o) in res.items()]


def _compiled(f, args, name: str):
    """f compiled for args under the option set XLA[name], timed by calling it."""
    with jax.default_matmul_precision("highest"):
        c = jax.jit(f).lower(*args).compile(_options(name))
    return lambda: jax.block_until_ready(c(*args))


def conv_rows(reps: int) -> list[dict]:
    torch, rows = _torch(), []
    for shape in CONVS:
        B, H, ci, co, stride = shape
        rng = np.random.default_rng(0)
        x_np = rng.normal(size=(B, H, H, ci)).astype(np.float32)
        w_np = (rng.normal(size=(3, 3, ci, co)) / np.sqrt(9 * ci)).astype(np.float32)

        def conv(x, w):
            pad = "SAME" if stride == 1 else "VALID"
            if stride == 2:
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return jax.lax.conv_general_dilated(x, w, (stride, stride), pad,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

        args = (jnp.asarray(x_np), jnp.asarray(w_np))
        fns = {k: _compiled(conv, args, k) for k in ("xla_default", "varjax")}
        if torch is not None:
            layer = torch.nn.Conv2d(ci, co, 3, stride=stride, padding=1 if stride == 1 else 0, bias=False)
            layer.weight.data = torch.from_numpy(w_np.transpose(3, 2, 0, 1).copy())
            tx = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())

            def run(layer=layer, tx=tx):
                with torch.inference_mode():
                    y = layer(tx if stride == 1 else torch.nn.functional.pad(tx, (0, 1, 0, 1)))
                return y.permute(0, 2, 3, 1)
            fns["torch"] = run
        rows += _rows("conv", shape, fns, reps, np.asarray)
    return rows


def conv_form_rows(reps: int) -> list[dict]:
    """The largest convolution in other forms: NCHW layout, 9 shifted products, one im2col
    product (all with varjax's options), against Eigen's NHWC convolution."""
    B, H, C = 2, 256, 160
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, H, H, C)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, C, C)) / np.sqrt(9 * C), jnp.float32)

    def nhwc(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def nchw(x, w):
        y = jax.lax.conv_general_dilated(jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1)), (1, 1),
                                         "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return jnp.transpose(y, (0, 2, 3, 1))

    def taps(x):  # the 9 shifted views of the zero-padded input
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return [xp[:, dy:dy + H, dx:dx + H] for dy in range(3) for dx in range(3)]

    def shifted(x, w):
        return sum(jnp.einsum("bhwc,cd->bhwd", t, w.reshape(9, C, C)[i]) for i, t in enumerate(taps(x)))

    def im2col(x, w):
        return jnp.einsum("bhwc,cd->bhwd", jnp.concatenate(taps(x), axis=-1), w.reshape(9 * C, C))

    fns = {name: _compiled(f, (x, w), "varjax") for name, f in
           (("nhwc", nhwc), ("nchw", nchw), ("shifted_products", shifted), ("im2col_product", im2col))}
    return _rows("conv_form", (B, H, C, C), fns, reps, np.asarray)


def model_rows(call: str, reps: int, images: int) -> list[dict]:
    """A whole d16 call (tokenize, or the transformer with the study's 48 sites) under each
    XLA option set; varjax's attention kernel (auto) in all."""
    if __package__:
        from experiments.bench import _synthetic_images
    else:  # run as a script: experiments/ is on the path
        from bench import _synthetic_images
    from varjax import config as config_lib
    from varjax.model import Model, _teacher_forced, _tokenize, init_params

    cfg = config_lib.released(16)
    model = Model(cfg, init_params(cfg, seed=0))
    imgs = _synthetic_images(images, 1, cfg.resolution, seed=1)[:, 0]
    names = (("varjax", "xla_default", "eigen_all", "ynn_eltwise", "vector_width_256") if call == "tokenize" else
             ("varjax", "ynnpack_dot", "eigen_dot", "xla_default", "onednn_dot", "vector_width_256"))
    fns = {}
    with jax.default_matmul_precision("highest"):
        if call == "tokenize":
            args = (model.params["vqvae"], imgs)
            lowered = _tokenize.xla_defaults.lower(model.vqvae, cfg.patch_nums, *args)
        else:
            x = model.var_input(model.tokenize(imgs))
            args = (model.params["var"], jnp.arange(images, dtype=jnp.int32), x, None)
            lowered = _teacher_forced.xla_defaults.lower(model.var, *args)
            with_mkl = _teacher_forced.lower(model.var, *args)  # varjax's: Dense products on MKL where it can
        for name in names:
            low = with_mkl if call == "teacher_forced" and name in ("varjax", "vector_width_256") else lowered
            c = low.compile(_options(name))
            fns[name] = lambda c=c: jax.block_until_ready(c(*args))
    flat = (lambda out: np.concatenate([np.asarray(t) for t in out], axis=1)) if call == "tokenize" \
        else (lambda out: np.asarray(out[0]))
    return _rows(call, (images, cfg.resolution), fns, reps, flat)


def dot_rows(reps: int) -> list[dict]:
    torch, rows = _torch(), []
    for shape in DOTS:
        M, K, N = shape
        rng = np.random.default_rng(0)
        a_np, b_np = rng.normal(size=(M, K)).astype(np.float32), rng.normal(size=(K, N)).astype(np.float32)
        args = (jnp.asarray(a_np), jnp.asarray(b_np))
        fns = {k: _compiled(jnp.dot, args, k) for k in ("ynnpack_dot", "eigen_dot", "onednn_dot")}
        if cpu_gemm.status()[0]:
            fns["mkl"] = _compiled(cpu_gemm.traced(lambda a, b: cpu_gemm.dot_general(a, b, (((1,), (0,)), ((), ())))),
                                   args, "varjax")
        if torch is not None:
            ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
            fns["torch"] = lambda ta=ta, tb=tb: torch.mm(ta, tb)
        rows += _rows("dot", shape, fns, reps, np.asarray)
    return rows


def attention_rows(reps: int, images: int) -> list[dict]:
    torch = _torch()
    pn, heads, width = PATCH_NUMS_256, 16, 64
    L = sum(p * p for p in pn)
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(images, L, heads, width)).astype(np.float32) for _ in range(3))
    q = 4 * q / np.linalg.norm(q, axis=-1, keepdims=True)  # as attn_l2_norm leaves them
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    mask = jnp.asarray(block_causal_mask(pn))
    args = tuple(jnp.asarray(a) for a in (q, k, v))

    def einsum(q, k, v):  # varjax/var.py's spelled-out path
        logits = jnp.where(mask, jnp.einsum("bqhc,bkhc->bhqk", q, k), -jnp.inf)
        return jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v).reshape(images, L, -1)

    def blocked(q, k, v):
        return attention_lib.blocked(q, k, v, mask, pn, 1.0, jnp.float32)

    fns = {"einsum": _compiled(einsum, args, "varjax"), "blocked": _compiled(blocked, args, "varjax")}
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()) for a in (q, k, v))
        bias = torch.where(torch.from_numpy(np.asarray(mask)), 0.0, -torch.inf)

        def sdpa():
            with torch.inference_mode():
                o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias, scale=1.0)
            return o.transpose(1, 2).reshape(images, L, -1)
        fns["torch_sdpa"] = sdpa
    return _rows("attention", (images, L, heads, width), fns, reps, np.asarray)


def groupnorm_rows(reps: int, images: int) -> list[dict]:
    torch = _torch()
    shape = (images, 256, 256, 160)
    rng = np.random.default_rng(0)
    x_np = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, 160).astype(np.float32), rng.normal(size=160).astype(np.float32)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    x = jnp.asarray(x_np)
    flax_gn = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False)
    fns = {"flax": _compiled(lambda x: nn.silu(flax_gn.apply(params, x)), (x,), "varjax"),
           "varjax": _compiled(lambda x: nn.silu(GroupNorm().apply(params, x)), (x,), "varjax")}
    for name in ("ynn_eltwise", "vector_width_256"):  # the same under two other option sets
        fns[f"varjax_{name}"] = _compiled(lambda x: nn.silu(GroupNorm().apply(params, x)), (x,), name)
    if torch is not None:
        layer = torch.nn.GroupNorm(32, 160, eps=1e-6)
        layer.weight.data, layer.bias.data = torch.from_numpy(scale), torch.from_numpy(bias)
        tx = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())

        def run():
            with torch.inference_mode():
                return torch.nn.functional.silu(layer(tx)).permute(0, 2, 3, 1)
        fns["torch"] = run
    return _rows("groupnorm", shape, fns, reps, np.asarray)


def resnet_block_rows(reps: int, images: int) -> list[dict]:
    """Two ResnetBlocks at each encoder level's shape: varjax's module against upstream's
    ResnetBlock.forward written out in torch (GroupNorm, in-place SiLU, Conv2d with bias;
    dropout is off at inference), the same random weights."""
    from varjax.vqvae import ResnetBlock

    torch, rows = _torch(), []
    for side, C in ((256, 160), (128, 160), (64, 320), (32, 320), (16, 640)):
        rng = np.random.default_rng(0)
        x_np = rng.normal(size=(images, side, side, C)).astype(np.float32)

        def block_params():
            def norm():
                return {"scale": rng.uniform(0.5, 1.5, C).astype(np.float32), "bias": rng.normal(size=C).astype(np.float32) * 0.1}

            def conv():
                return {"kernel": (rng.normal(size=(3, 3, C, C)) / np.sqrt(9 * C)).astype(np.float32),
                        "bias": rng.normal(size=C).astype(np.float32) * 0.1}
            return {"norm1": norm(), "conv1": conv(), "norm2": norm(), "conv2": conv()}

        blocks = [block_params(), block_params()]
        params = {"params": {f"b{i}": jax.tree_util.tree_map(jnp.asarray, p) for i, p in enumerate(blocks)}}

        class Two(nn.Module):
            @nn.compact
            def __call__(self, x):
                return ResnetBlock(C, name="b1")(ResnetBlock(C, name="b0")(x))

        x = jnp.asarray(x_np)
        fns = {"varjax": _compiled(lambda p, x: Two().apply(p, x), (params, x), "varjax")}
        if torch is not None:
            F = torch.nn.functional
            tb = [{k: {n: torch.from_numpy(v.transpose(3, 2, 0, 1).copy() if n == "kernel" else v) for n, v in d.items()}
                   for k, d in p.items()} for p in blocks]
            tx = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())

            def upstream_block(x, p):
                def norm(h, q):
                    return F.group_norm(h, 32, q["scale"], q["bias"], eps=1e-6)
                h = F.conv2d(F.silu(norm(x, p["norm1"]), inplace=True), p["conv1"]["kernel"], p["conv1"]["bias"], padding=1)
                h = F.conv2d(F.silu(norm(h, p["norm2"]), inplace=True), p["conv2"]["kernel"], p["conv2"]["bias"], padding=1)
                return x + h

            def run(tx=tx, tb=tb):
                with torch.inference_mode():
                    return upstream_block(upstream_block(tx, tb[0]), tb[1]).permute(0, 2, 3, 1)
            fns["torch"] = run
        rows += _rows("resnet_blocks", (images, side, side, C), fns, reps, np.asarray)
    return rows


def cached_attention_rows(reps: int, images: int) -> list[dict]:
    torch, rows = _torch(), []
    pn, heads, width = PATCH_NUMS_256, 16, 64
    R, rng = 2 * images, np.random.default_rng(0)
    totals: dict[str, list] = {}
    end = 0
    for p in pn:
        l, end = p * p, end + p * p
        q = rng.normal(size=(R, l, heads, width)).astype(np.float32)
        q = 4 * q / np.linalg.norm(q, axis=-1, keepdims=True)  # as attn_l2_norm leaves them
        k = rng.normal(size=(R, heads, width, end)).astype(np.float32)
        k = k / np.linalg.norm(k, axis=2, keepdims=True)
        v = rng.normal(size=(R, heads, end, width)).astype(np.float32)
        args = tuple(jnp.asarray(a) for a in (q, k, v))

        def einsum(q, k, v):  # varjax/var.py's cached einsum path
            logits = jnp.einsum("bqhc,bhck->bhqk", q, k)
            return jnp.einsum("bhqk,bhkc->bqhc", jax.nn.softmax(logits, axis=-1), v)

        fns = {"einsum": _compiled(einsum, args, "varjax"),
               "cached": _compiled(lambda q, k, v: attention_lib.cached(q, k, v, 1.0, jnp.float32), args,
                                   "varjax")}
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(a) for a in (q.transpose(0, 2, 1, 3).copy(), k.transpose(0, 1, 3, 2).copy(), v))

            def sdpa(tq=tq, tk=tk, tv=tv):
                with torch.inference_mode():
                    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=1.0)
                return o.transpose(1, 2)
            fns["torch_sdpa"] = sdpa
        part = _rows("cached_attention", (R, l, end, heads, width), fns, reps, np.asarray)
        rows += part
        for row in part:
            totals.setdefault(row["impl"], []).append(row)
    rows.append({"part": "cached_attention", "shape": "all scales", **{
        f"{impl}_min_s": round(sum(r["min_s"] for r in rs), 4) for impl, rs in totals.items()}})
    return rows


def sampling_rows(reps: int, images: int) -> list[dict]:
    from varjax import sampling

    torch = _torch()
    top_k, top_p = 900, 0.96
    rng = np.random.default_rng(0)
    x_np = (rng.normal(size=(images, 256, 4096)) * 2).astype(np.float32)
    x = jnp.asarray(x_np)
    key = jax.random.key(0)

    def bisection(x):
        kept = sampling.filter_logits(x, top_k, jnp.float32(top_p))
        return jax.random.categorical(key, kept, axis=-1), jnp.isfinite(kept)

    def topk_sort(x):  # the same rule through TopK and a sort of the k survivors (no ties here)
        vals, idx = jax.lax.top_k(x, top_k)
        srt, order = jax.lax.sort((vals[..., ::-1], idx[..., ::-1]), dimension=2, num_keys=2)
        drop = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1) <= 1 - top_p
        first = jnp.argmin(drop.at[..., -1].set(False), axis=-1)[..., None]
        v = jnp.take_along_axis(srt, first, -1)
        kept = jnp.where(x >= v, x, -jnp.inf)
        return jax.random.categorical(key, kept, axis=-1), jnp.isfinite(kept)

    fns = {"bisection": _compiled(bisection, (x,), "varjax"), "topk_sort": _compiled(topk_sort, (x,), "varjax")}
    if torch is not None:
        tx = torch.from_numpy(x_np)

        def upstream():  # models/helpers.py sample_with_top_k_top_p_, written out
            with torch.inference_mode():
                logits = tx.clone()
                kth = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
                logits.masked_fill_(logits < kth, -torch.inf)
                srt, order = logits.sort(dim=-1, descending=False)
                drop = srt.softmax(dim=-1).cumsum_(dim=-1) <= 1 - top_p
                drop[..., -1:] = False
                logits.masked_fill_(drop.scatter(drop.ndim - 1, order, drop), -torch.inf)
                draw = torch.multinomial(logits.softmax(dim=-1).view(-1, logits.shape[-1]), num_samples=1)
            return draw, torch.isfinite(logits)
        fns["torch_upstream"] = upstream
    # compared: which tokens survive (the draws use different generators)
    return _rows("sampling", (images, 256, 4096), fns, reps, lambda out: np.asarray(out[1]).astype(np.float32))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", action="append", choices=PARTS,
                    help="what to time (repeatable; default: conv, dot, attention, groupnorm; "
                         "conv_form, tokenize, teacher_forced, cached_attention, sampling and "
                         "resnet_blocks only when named)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs after one warm-up")
    ap.add_argument("--images", type=int, default=2, help="images for attention, cached_attention, sampling, groupnorm and "
                    "resnet_blocks")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.images < 1:
        print("bench_cpu_kernels: error: --reps and --images must be >= 1", file=sys.stderr)
        return 2
    parts = {"conv": lambda: conv_rows(args.reps), "dot": lambda: dot_rows(args.reps),
             "attention": lambda: attention_rows(args.reps, args.images),
             "groupnorm": lambda: groupnorm_rows(args.reps, args.images),
             "conv_form": lambda: conv_form_rows(args.reps),
             "tokenize": lambda: model_rows("tokenize", args.reps, args.images),
             "teacher_forced": lambda: model_rows("teacher_forced", args.reps, args.images),
             "cached_attention": lambda: cached_attention_rows(args.reps, args.images),
             "sampling": lambda: sampling_rows(args.reps, args.images),
             "resnet_blocks": lambda: resnet_block_rows(args.reps, args.images)}
    torch = _torch()
    env = {"jax": jax.__version__, "torch": torch.__version__ if torch else None,
           "torch_threads": torch.get_num_threads() if torch else None, "device": jax.devices()[0].device_kind}
    for name in args.part or PARTS[:4]:
        for row in parts[name]():
            print(json.dumps({**row, **env}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
