"""Benchmark of the recording pass, and what each precision costs; with --generate, of the
sampler (decode included), optionally side by side with upstream's.

Times the whole compiled step of `varjax.record` (tokenization, teacher-forced transformer,
unit reductions, loss, streaming statistics) at steady state on synthetic images, for a
config (random weights; default d16 with the released VQVAE shape) and each precision mode,
on whatever devices JAX finds. Prints one JSON line per measurement:

    python experiments/bench.py                         # d16, all precisions
    python experiments/bench.py --config tiny --images-per-step 2 --steps 3
    python experiments/bench.py --precision-cost --config d16 --images 64
    python experiments/bench.py --variant bf16:fused:32 --variant tf32:einsum:16
    python experiments/bench.py --config tiny --images-per-step 2 --against-xla-defaults
    python experiments/bench.py --generate --gen-batch 8 --precision highest --upstream PATH

Each precision's first setting also times the tokenizer alone on one step's views (a
"tokenizer" line) and splits the step's time into tokenizer, teacher-forcing input,
transformer, the recording's reductions and the rest (a "split" line, each part timed alone),
so a regression shows where it is. The attention kernel defaults to `auto` (`blocked` on a
CPU, see varjax/attention.py); rows name the kernel that ran. `--precision-cost` then also
runs the same images through every timed precision and compares each with `highest`: share
of identical tokens, max relative error of mu, Spearman rank correlation of UnitMem,
agreement of the argmax over U10(highest), and the Jaccard index of the U10 sets.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from varjax import config as config_lib
from varjax import generate as gen_lib
from varjax import stats as stats_lib
from varjax import unitmem
from varjax.model import Model, init_params
from varjax import attention as attention_lib
from varjax.record import BF16_MODES, PRECISIONS, Options, compile_step, make_step, unit_layout
from varjax.taps import COLLECTION, UNIT_SITES, TapConfig, collect
from varjax.var import ATTENTION, VAR
from varjax.xla_options import jit

# Dense peak TFLOP/s per precision mode (NVIDIA datasheets, SXM parts; "highest" is the
# non-tensor-core float32 rate). docs/performance.md: ~790 bf16 on the H200 in practice.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "tf32": 494.0, "highest": 67.0},
    "H200": {"bf16": 989.0, "tf32": 494.0, "highest": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "highest": 19.5},
}


def _peak(device_kind: str, precision: str) -> float | None:
    for name, peaks in PEAK_TFLOPS.items():
        if name in device_kind:
            return peaks["bf16" if precision == "bf16_full" else precision]
    return None


def _synthetic_images(n: int, views: int, size: int, seed: int = 0) -> np.ndarray:
    """Structured random images: smooth colour fields plus stripes, so tokens vary."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, views, size, size, 3), np.uint8)
    for i in range(n):
        f = rng.uniform(1, 12, 3)
        ph = rng.uniform(0, 6.3, 3)
        base = np.stack([np.sin(f[c] * (xx * np.cos(ph[c]) + yy * np.sin(ph[c])) * 6.3 + ph[c])
                         for c in range(3)], -1)
        img = (base * 0.5 + 0.5) * 255
        for a in range(views):
            out[i, a] = np.clip(np.roll(img, 7 * a, axis=1) + rng.normal(0, 8, img.shape), 0, 255)
    return out


def _dot_conv_flops(jaxpr) -> float:
    """FLOPs of the matrix products and convolutions in a jaxpr (2 per multiply-add), sub-jaxprs
    included; what PyTorch's FLOP counter counts, so comparable with docs/performance.md."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[d] for d in contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
            per_out = math.prod(eqn.invars[1].aval.shape[d] for d in rhs_spec[1:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_out
        subs = [j.jaxpr if hasattr(j, "jaxpr") else j for j in jex_core.jaxprs_in_params(eqn.params)]
        if name == "cond":
            total += max((_dot_conv_flops(j) for j in subs), default=0.0)
        else:
            times = eqn.params.get("length", 1) if name == "scan" else 1
            total += times * sum(_dot_conv_flops(j) for j in subs)
    return total


def step_flops(model: Model, views: int, opts: Options, size: int) -> float:
    """FLOPs of one step, counted on its jaxpr (platform-independent: a GPU's compiled cost
    analysis leaves out cuBLAS/cuDNN calls). Counted on the spelled-out attention, which every
    kernel computes."""
    B = opts.batch_size
    step = make_step(model, views, dataclasses.replace(opts, attention="einsum"))
    args = (model.params, _empty_state(model), jax.ShapeDtypeStruct((B, views, size, size, 3), jnp.uint8),
            *(jax.ShapeDtypeStruct((B,), dt) for dt in (jnp.int32, jnp.int32, jnp.int32, jnp.bool_)))
    return _dot_conv_flops(jax.make_jaxpr(step)(*args).jaxpr)


def _versions() -> dict:
    import flax

    return {"jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _empty_state(model: Model) -> dict:
    return stats_lib.init_state(1, unit_layout(model).n_units)


def _compiled_mem_gib(compiled) -> float | None:
    """Device memory the compiled step needs (arguments + outputs + temporaries - aliased)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return round(total / 2**30, 3)


def bench_one(model: Model, precision: str, images_per_step: int, views: int, steps: int, size: int,
              attention: str = "einsum", cost_images: np.ndarray | None = None,
              against_xla_defaults: bool = False):
    """Time one compiled step at steady state; returns (JSON row, mu of `cost_images` or None).

    The step is compiled as a run that keeps activations (`save_activations`), so the same
    program also yields the per-sample mu that `precision_cost` compares; that costs one more
    (B, U) output per step and nothing else. `against_xla_defaults` also compiles the step as
    it was before varjax chose its CPU kernels (XLA's defaults; `einsum` for `blocked`) and
    times the two alternately, step by step, so both see the same machine load.
    """
    opts = Options(batch_size=images_per_step, precision=precision, attention=attention,
                   save_activations=True)
    st = compile_step(model, views, opts, (size, size), _empty_state(model))
    compiled, params, state, data, compile_s = st.fn, st.params, st.state, st.batch_sharding, st.compile_s
    B = images_per_step
    imgs = jax.device_put(_synthetic_images(B, views, size), data)
    rest = [jax.device_put(a, data) for a in (np.zeros(B, np.int32), np.arange(B, dtype=np.int32),
                                              np.zeros(B, np.int32), np.ones(B, bool))]
    state, out = compiled(params, state, imgs, *rest)  # warm-up (first run allocates)
    jax.block_until_ready(out)
    ref_ips = None
    if against_xla_defaults:
        before = dataclasses.replace(opts, attention="einsum" if attention == "blocked" else attention)
        ref = compile_step(model, views, before, (size, size), _empty_state(model), xla_defaults=True)
        ref_state, out = ref.fn(ref.params, ref.state, imgs, *rest)
        jax.block_until_ready(out)
        dt = ref_dt = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            state, out = jax.block_until_ready(compiled(params, state, imgs, *rest))
            t1 = time.perf_counter()
            ref_state, _ = jax.block_until_ready(ref.fn(ref.params, ref_state, imgs, *rest))
            dt, ref_dt = dt + t1 - t0, ref_dt + time.perf_counter() - t1
        ref_ips = B * steps / ref_dt
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            state, out = compiled(params, state, imgs, *rest)
        jax.block_until_ready((state, out))
        dt = time.perf_counter() - t0
    ips = B * steps / dt
    flops = step_flops(model, views, opts, size)
    dev = jax.devices()[0]
    mem = dev.memory_stats() or {}
    tflops = flops * steps / dt / 1e12 if flops else None
    peak = _peak(dev.device_kind, precision)
    row = {
        "what": "throughput", "precision": precision, "attention": attention, "images_per_s": round(ips, 4),
        "views_per_s": round(ips * views, 3), "views": views, "images_per_step": B,
        "steps": steps, "compile_s": round(compile_s, 2),
        "gflop_per_view": round(flops / (B * views) / 1e9, 2) if flops else None,
        "tflop_per_s": round(tflops, 3) if tflops else None,
        "peak_share": round(tflops / (peak * len(jax.devices())), 4) if tflops and peak else None,
        "step_mem_gib": _compiled_mem_gib(compiled),
        "peak_device_mem_gib": round(mem["peak_bytes_in_use"] / 2**30, 3) if "peak_bytes_in_use" in mem else None,
        "host_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "device": dev.device_kind, "devices": len(jax.devices()), **_versions(),
    }
    if ref_ips is not None:
        row.update(xla_defaults_images_per_s=round(ref_ips, 4), speedup_vs_xla_defaults=round(ips / ref_ips, 3))
    mu = None
    if cost_images is not None:
        mus = []
        n = len(cost_images)
        for s in range(0, n, B):
            chunk = cost_images[s:s + B]
            b = len(chunk)
            if b < B:
                chunk = np.concatenate([chunk, np.zeros((B - b,) + chunk.shape[1:], np.uint8)])
            args = [jax.device_put(a, data) for a in (chunk, np.zeros(B, np.int32),
                                                      np.arange(s, s + B, dtype=np.int32),
                                                      np.zeros(B, np.int32), np.arange(B) < b)]
            state, out = compiled(params, state, *args)
            mus.append(np.asarray(out["mu"])[:b])
        mu = np.concatenate(mus)
    return row, mu


def tokenizer_one(model: Model, precision: str, images: np.ndarray, steps: int):
    """Time the tokenizer alone on `images` (N, A, H, W, 3) as one batch of N*A views; returns
    (JSON row, tokens (N*A, L)). Tells how the step's time splits between the two halves."""
    tok = _token_fn(model, precision)
    flat = jax.device_put(images.reshape((-1,) + images.shape[2:]))
    t0 = time.perf_counter()
    compiled = tok.lower(flat).compile()
    compile_s = time.perf_counter() - t0
    tokens = np.asarray(compiled(flat))
    runs = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(flat))
        runs.append(time.perf_counter() - t0)
    row = {"what": "tokenizer", "precision": precision, "views_per_s": round(len(flat) * steps / sum(runs), 3),
           "views_per_step": len(flat), "steps": steps, "best_s": round(min(runs), 4),
           "compile_s": round(compile_s, 2), "device": jax.devices()[0].device_kind, **_versions()}
    return row, tokens


def split_one(model: Model, precision: str, attention: str, tokens: np.ndarray, tokenizer_s: float,
              steps: int, step_s: float) -> dict:
    """Where one step's time goes, each part compiled and timed alone (best of `steps` runs) on
    one step's views: tokenizer (`tokenizer_s`, from `tokenizer_one`, which made `tokens`
    (views, L)), teacher-forcing input, the transformer without recording, the recording's
    reductions (the transformer with the study's 48 sites, minus without; the two take
    turns), and the rest of the step (`step_s`: loss, statistics). Parts compiled apart need
    not add up exactly to the fused step, and on a busy machine a small difference can come
    out negative or large: rerun with more --steps."""
    from varjax.record import _precision
    from varjax.taps import NO_TAPS
    from varjax.vqvae import VQVAE

    cfg, params = model.config, model.params
    dtype = jnp.bfloat16 if precision in BF16_MODES else jnp.float32

    @jit
    def var_input(tokens):
        with _precision(precision, "vqvae"):
            return model.vqvae.apply({"params": params["vqvae"]}, tokens, cfg.patch_nums, method=VQVAE.var_input)

    def transformer(taps):
        var = VAR(cfg.var, taps, dtype=dtype, attention=attention)

        @jit
        def forward(labels, x):
            with _precision(precision, "var"):
                logits, sown = var.apply({"params": params["var"]}, labels, x, None, mutable=[COLLECTION])
            return logits, collect(sown.get(COLLECTION, {}))
        return forward

    ends = np.cumsum([p * p for p in cfg.patch_nums])[:-1]
    per_scale = tuple(jax.device_put(t) for t in np.split(tokens, ends, axis=1))
    labels = jnp.zeros(len(tokens), jnp.int32)
    x = var_input(per_scale)
    bare, with_taps = _best({"bare": (transformer(NO_TAPS), (labels, x)),
                             "taps": (transformer(TapConfig(sites=UNIT_SITES)), (labels, x))}, steps).values()
    seconds = {"tokenizer_s": tokenizer_s, "var_input_s": _best({"x": (var_input, (per_scale,))}, steps)["x"],
               "transformer_s": bare, "reductions_s": with_taps - bare}
    seconds["rest_s"] = step_s - with_taps - seconds["tokenizer_s"] - seconds["var_input_s"]
    return {"what": "split", "precision": precision, "attention": attention, "views_per_step": len(tokens),
            "step_s": round(step_s, 4), **{k: round(v, 4) for k, v in seconds.items()},
            **{k.replace("_s", "_share"): round(v / step_s, 3) for k, v in seconds.items()},
            "device": jax.devices()[0].device_kind, **_versions()}


def _best(fns: dict, steps: int) -> dict:
    """{name: seconds of the fastest of `steps` runs} for fns {name: (fn, args)}, after one
    warm-up run each; the functions take turns, so a change of machine load hits them alike."""
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    best = {name: float("inf") for name in fns}
    for _ in range(steps):
        for name, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def precision_cost(ref: tuple, got: tuple, precision: str, attention: str, n_images: int, views: int) -> dict:
    """One setting vs `highest` on the same images: ref and got are (mu (N, U), tokens (M, L) or None)."""
    from scipy.stats import spearmanr

    (mu_ref, tok_ref), (mu, tok) = ref, got
    ids = np.arange(n_images)
    st_ref, st = unitmem.stats_from_matrix(mu_ref, ids), unitmem.stats_from_matrix(mu, ids)
    um_ref, um = unitmem.unitmem_mean(st_ref), unitmem.unitmem_mean(st)
    (u10_ref, _), (u10, _) = unitmem.top_units(um_ref), unitmem.top_units(um)
    same_tokens = None
    if tok is not None and tok_ref is not None:
        m = min(len(tok), len(tok_ref))  # the same leading images, whatever each step size was
        same_tokens = float(np.mean(tok[:m] == tok_ref[:m]))
    rel = np.abs(mu - mu_ref) / np.maximum(np.abs(mu_ref), 1e-6)
    return {
        "what": "precision_cost", "precision": precision, "attention": attention,
        "vs": "highest", "images": n_images, "views": views, "identical_tokens": same_tokens,
        "mu_max_rel_err": float(rel.max()),
        # the max is set by near-silent units; the 99th percentile says what most units see
        "mu_p99_rel_err": float(np.quantile(rel, 0.99)),
        "unitmem_spearman": float(spearmanr(um, um_ref).statistic),
        "u10_units": int(u10_ref.sum()),
        "u10_argmax_agreement": float(np.mean(st.argmax[u10_ref] == st_ref.argmax[u10_ref])),
        "u10_jaccard": float((u10 & u10_ref).sum() / max((u10 | u10_ref).sum(), 1)),
        "device": jax.devices()[0].device_kind, **_versions(),
    }


def _token_fn(model: Model, precision: str):
    from varjax.record import _precision, tokenizer
    from varjax.vqvae import VQVAE

    vqvae = tokenizer(model, precision)

    @jit
    def tok(images):
        with _precision(precision, "vqvae"):
            t = vqvae.apply({"params": model.params["vqvae"]}, images, model.config.patch_nums,
                            method=VQVAE.tokenize)
        return jnp.concatenate(t, axis=1)

    return tok


def _variant(text: str) -> tuple[str, str, int]:
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in PRECISIONS or parts[1] not in ATTENTION \
            or not parts[2].isdigit() or int(parts[2]) < 1:
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: expected PRECISION:ATTENTION:IMAGES_PER_STEP, e.g. bf16:fused:16")
    return parts[0], parts[1], int(parts[2])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="d16", choices=sorted(config_lib.PRESETS),
                    help="model preset, random weights (default d16 + the released VQVAE shape)")
    ap.add_argument("--checkpoint", help="a converted checkpoint instead of random weights (overrides --config)")
    ap.add_argument("--precision", action="append", choices=PRECISIONS,
                    help="mode to time (repeatable; default: all)")
    ap.add_argument("--images-per-step", type=int, default=16, help="images per step, all devices")
    ap.add_argument("--views", type=int, default=8, help="augmentations per image")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--attention", action="append", choices=ATTENTION,
                    help="attention kernel to time (repeatable; default auto: blocked on a CPU)")
    ap.add_argument("--variant", action="append", type=_variant, metavar="P:A:B",
                    help="time exactly these precision:attention:images-per-step settings "
                         "(repeatable; replaces the --precision x --attention grid)")
    ap.add_argument("--precision-cost", action="store_true",
                    help="also compare every timed precision with highest on --images images")
    ap.add_argument("--images", type=int, default=64, help="images for --precision-cost")
    ap.add_argument("--skip-tokenizer", action="append", choices=PRECISIONS, metavar="PRECISION",
                    help="no tokenizer-alone timing (nor token comparison) for this precision (repeatable)")
    ap.add_argument("--against-xla-defaults", action="store_true",
                    help="also time each step as compiled before varjax chose its CPU kernels (XLA's "
                         "defaults, einsum attention), alternating step by step: the before/after")
    ap.add_argument("--split", action=argparse.BooleanOptionalAction, default=True,
                    help="with each tokenizer line, time the step's parts alone (a 'split' line; "
                         "three more compilations per precision)")
    gen = ap.add_argument_group("generation (--generate): the sampler, decode included")
    gen.add_argument("--generate", action="store_true", help="time the sampler instead of the recording pass")
    gen.add_argument("--gen-batch", type=int, action="append", help="images per call (repeatable; default 1, 8, 64)")
    gen.add_argument("--reps", type=int, default=3, help="timed calls per setting after one warm-up")
    gen.add_argument("--cfg", type=float, default=1.5)
    gen.add_argument("--top-k", type=int, default=900)
    gen.add_argument("--top-p", type=float, default=0.96)
    gen.add_argument("--upstream", metavar="PATH", help="also time upstream's sampler from this VAR checkout, interleaved")
    args = ap.parse_args(argv)
    if args.generate:
        return _generate(args)
    variants = args.variant or [(p, a, args.images_per_step) for p in (args.precision or PRECISIONS)
                                for a in (args.attention or ("auto",))]
    n_dev = len(jax.devices())
    for _, _, b in variants:
        if b % n_dev:
            print(f"bench: error: images per step ({b}) must be a multiple of the {n_dev} devices",
                  file=sys.stderr)
            return 2
    if args.checkpoint:
        import varjax

        model = varjax.load(args.checkpoint)
        cfg, args.config = model.config, Path(args.checkpoint).name
    else:
        cfg = config_lib.PRESETS[args.config]()
        model = Model(cfg, init_params(cfg, seed=0))
    def kernel(precision: str, attention: str) -> str:  # rows name the kernel that ran
        dtype = jnp.bfloat16 if precision in BF16_MODES else jnp.float32
        return attention_lib.resolve(attention, dtype, cfg.patch_nums)

    variants = [(p, kernel(p, a), b) for p, a, b in variants]
    if args.precision_cost and "highest" not in {p for p, _, _ in variants}:
        variants.insert(0, ("highest", kernel("highest", "auto"), variants[0][2]))  # the reference
    cost_imgs = _synthetic_images(args.images, args.views, cfg.resolution, seed=1) if args.precision_cost else None
    tokens = {}  # precision -> tokens of the tokenizer-alone run
    results, reported = {}, set()  # (precision, attention) -> (mu, tokens); cost rows printed
    failed = 0
    for precision, attention, b in variants:
        first = args.precision_cost and (precision, attention) not in results
        try:
            row, mu = bench_one(model, precision, b, args.views, args.steps, cfg.resolution, attention,
                                cost_imgs if first else None, args.against_xla_defaults)
        except Exception as e:  # noqa: BLE001 - one failed setting must not lose the others
            failed += 1
            print(json.dumps({"config": args.config, "what": "error", "precision": precision,
                              "attention": attention, "images_per_step": b,
                              "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}),
                  flush=True)
            continue
        print(json.dumps({"config": args.config, **row}), flush=True)
        if precision not in tokens and precision not in (args.skip_tokenizer or ()):
            # the tokenizer alone on one step's views: its speed, and tokens for the cost table
            src = cost_imgs if cost_imgs is not None else _synthetic_images(b, args.views, cfg.resolution)
            trow, tokens[precision] = tokenizer_one(model, precision, src[:b], args.steps)
            print(json.dumps({"config": args.config, **trow}), flush=True)
            if args.split:
                srow = split_one(model, precision, attention, tokens[precision], trow["best_s"], args.steps,
                                 b / row["images_per_s"])
                print(json.dumps({"config": args.config, **srow}), flush=True)
        if first:
            results[(precision, attention)] = (mu, tokens.get(precision))
            # each row as soon as it and highest are in (a run cut short keeps what it has)
            ref = next((v for k, v in results.items() if k[0] == "highest"), None)  # the first highest
            for key in [k for k in results if ref is not None and k not in reported]:
                reported.add(key)
                cost_row = precision_cost(ref, results[key], *key, args.images, args.views)
                print(json.dumps({"config": args.config, **cost_row}), flush=True)
    return 1 if failed else 0


# -- generation (--generate) ------------------------------------------------------------------
# Whole calls of the compiled sampler with the decoder (upstream's autoregressive_infer_cfg
# returns images too) after one warm-up call, compile time apart; with --upstream the same
# weights run through upstream's own VAR and VQVAE (torch, float32, its default threads) right
# after each of ours, so both see the same machine load. Upstream needs `huggingface_hub`
# importable (any stand-in that defines PyTorchModelHubMixin will do).

def _labels(batch: int, num_classes: int) -> np.ndarray:
    return (np.arange(batch) * 37 + 11) % num_classes  # fixed, spread over the classes


def _ours(model: Model, sampling: gen_lib.Sampling, precision: str, batch: int, attention: str):
    """(compile seconds, a function that runs one timed call)."""
    program = gen_lib.program_for(model, sampling, return_images=True, precision=precision, attention=attention)
    cs = gen_lib.compiled_for(model, program, batch)
    labels = _labels(batch, model.config.var.num_classes)

    def call():
        g = gen_lib.generate(model, labels, sampling, seed=0, return_images=True, precision=precision,
                             attention=attention)
        jax.block_until_ready(g.images)

    return cs.compile_s, call


def sampler_gflop(model: Model, sampling: gen_lib.Sampling, precision: str, batch: int) -> float:
    """GFLOP of one call (matmuls and convolutions, counted on the jaxpr as bench.py does)."""
    program = gen_lib.program_for(model, sampling, return_images=True, precision=precision)
    fn = gen_lib.make_sampler(model.config, program)
    pn, L = model.config.patch_nums, model.config.var.seq_len
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32), model.params)
    ints = jax.ShapeDtypeStruct((batch,), jnp.int32)
    jaxpr = jax.make_jaxpr(fn)(params, ints, ints, jax.ShapeDtypeStruct((), jnp.uint32),
                               jax.ShapeDtypeStruct((len(pn), 2), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32),
                               jax.ShapeDtypeStruct((batch, L), jnp.int32), ints)
    return _dot_conv_flops(jaxpr.jaxpr) / 1e9


def _upstream(path: str, model: Model, sampling: gen_lib.Sampling, batch: int):
    """A function that runs upstream's autoregressive_infer_cfg once on `model`'s weights."""
    import torch

    if __package__:
        from experiments.bench_upstream import build_upstream, import_upstream
    else:  # run as a script: experiments/ is on the path
        from bench_upstream import build_upstream, import_upstream

    with contextlib.redirect_stdout(sys.stderr):  # upstream prints its config; stdout is for JSON lines
        _, var = build_upstream(import_upstream(Path(path).resolve()), model.config, model.params)
    labels = torch.tensor(_labels(batch, model.config.var.num_classes))

    def call():
        with torch.inference_mode():
            var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, cfg=sampling.cfg, top_k=sampling.top_k,
                                         top_p=sampling.top_p, more_smooth=sampling.more_smooth)

    return call


def _row(what: str, times: list[float], batch: int, extra: dict) -> dict:
    med, best = statistics.median(times), min(times)
    return {"what": what, "batch": batch, "images_per_s": round(batch / med, 4),
            "images_per_s_best": round(batch / best, 4), "call_s": [round(t, 3) for t in times], **extra}


def generate_bench(model: Model, config_name: str, precisions, batches, reps: int, sampling,
        upstream: str | None, versions: dict, attention: str = "auto") -> int:
    """Prints one JSON line per (precision, batch) and one per upstream batch; returns 0."""
    dev = jax.devices()[0]
    common = {"config": config_name, "cfg": sampling.cfg, "top_k": sampling.top_k, "top_p": sampling.top_p,
              "decode": True}
    for batch in batches:
        up_call = _upstream(upstream, model, sampling, batch) if upstream else None
        up_times: list[float] = []
        up_cpu: list[float] = []  # this process's CPU seconds per call: on a shared machine,
        # the work done whatever the waiting (both sides run one thread per core)
        if up_call:
            up_call()  # warm-up
        for precision in precisions:
            compile_s, call = _ours(model, sampling, precision, batch, attention)
            call()  # warm-up (first run allocates)
            times, cpu = [], []
            for _ in range(reps):
                t0, c0 = time.perf_counter(), time.process_time()
                call()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                if up_call and precision == precisions[0]:  # interleaved with the first precision
                    t0, c0 = time.perf_counter(), time.process_time()
                    up_call()
                    up_times.append(time.perf_counter() - t0)
                    up_cpu.append(time.process_time() - c0)
            gflop = sampler_gflop(model, sampling, precision, batch) / batch
            row = _row("generation", times, batch, {
                **common, "precision": precision, "compile_s": round(compile_s, 2),
                "attention": gen_lib.program_for(model, sampling, precision=precision, attention=attention).attention,
                "gflop_per_image": round(gflop, 1), "cpu_s": [round(t, 3) for t in cpu],
                "tflop_per_s": round(gflop * batch / statistics.median(times) / 1e3, 3),
                "device": dev.device_kind, "devices": len(jax.devices()), **versions})
            print(json.dumps(row), flush=True)
        if up_call:
            import torch

            print(json.dumps(_row("generation_upstream", up_times, batch, {
                **common, "precision": "float32", "interleaved_with": precisions[0], "cpu_s": [round(t, 3) for t in up_cpu],
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads()})), flush=True)
    return 0


def _generate(args) -> int:
    from varjax.generate import PRECISIONS as GEN_PRECISIONS, Sampling

    precisions = args.precision or list(GEN_PRECISIONS)
    bad = [p for p in precisions if p not in GEN_PRECISIONS]
    batches = args.gen_batch or [1, 8, 64]
    if bad or min(batches) < 1 or args.reps < 1:
        print(f"bench: error: --generate takes precisions {', '.join(GEN_PRECISIONS)}, positive --gen-batch and --reps",
              file=sys.stderr)
        return 2
    if args.checkpoint:
        import varjax

        model, name = varjax.load(args.checkpoint), Path(args.checkpoint).name
    else:
        cfg = config_lib.PRESETS[args.config]()
        model, name = Model(cfg, init_params(cfg, seed=0)), args.config
    sampling = Sampling(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    attention = (args.attention or ["auto"])[0]
    return generate_bench(model, name, precisions, batches, args.reps, sampling, args.upstream, _versions(),
                          attention)


if __name__ == "__main__":
    sys.exit(main())
