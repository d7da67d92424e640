"""Benchmark of the recording pass, and what each precision costs.

Times the whole compiled step of `varjax.record` (tokenization, teacher-forced transformer,
unit reductions, loss, streaming statistics) at steady state on synthetic images, for a
config (random weights; default d16 with the released VQVAE shape) and each precision mode,
on whatever devices JAX finds. Prints one JSON line per measurement:

    python experiments/bench.py                         # d16, all precisions
    python experiments/bench.py --config tiny --images-per-step 2 --steps 3
    python experiments/bench.py --precision-cost --config d16 --images 64

`--precision-cost` runs the same images through every precision and compares each with
`highest`: share of identical tokens, max relative error of mu, Spearman rank correlation of
UnitMem, agreement of the argmax over U10(highest), and the Jaccard index of the U10 sets.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from varjax import config as config_lib  # noqa: E402
from varjax import stats as stats_lib  # noqa: E402
from varjax import unitmem  # noqa: E402
from varjax.model import Model, init_params  # noqa: E402
from varjax.record import PRECISIONS, Options, compile_step, unit_layout  # noqa: E402

# Dense peak TFLOP/s per precision mode (NVIDIA datasheets, SXM parts; "highest" is the
# non-tensor-core float32 rate). perf.md measured ~790 bf16 on the H200 in practice.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "tf32": 494.0, "highest": 67.0},
    "H200": {"bf16": 989.0, "tf32": 494.0, "highest": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "highest": 19.5},
}


def _peak(device_kind: str, precision: str) -> float | None:
    for name, peaks in PEAK_TFLOPS.items():
        if name in device_kind:
            return peaks[precision]
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


def _versions() -> dict:
    import flax

    return {"jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _compiled_step(model: Model, views: int, opts: Options, size: int):
    U = sum(n for *_, n in unit_layout(model))
    st = compile_step(model, views, opts, (size, size), stats_lib.init_state(1, U))
    return st.fn, st.params, st.state, st.batch_sharding, st.compile_s


def bench_one(model: Model, precision: str, images_per_step: int, views: int, steps: int, size: int,
              attention: str = "einsum") -> dict:
    opts = Options(batch_size=images_per_step, precision=precision, attention=attention)
    compiled, params, state, data, compile_s = _compiled_step(model, views, opts, size)
    B = images_per_step
    imgs = jax.device_put(_synthetic_images(B, views, size), data)
    rest = [jax.device_put(a, data) for a in (np.zeros(B, np.int32), np.arange(B, dtype=np.int32),
                                              np.zeros(B, np.int32), np.ones(B, bool))]
    state, out = compiled(params, state, imgs, *rest)  # warm-up (first run allocates)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, out = compiled(params, state, imgs, *rest)
    jax.block_until_ready((state, out))
    dt = time.perf_counter() - t0
    ips = B * steps / dt
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    dev = jax.devices()[0]
    mem = dev.memory_stats() or {}
    tflops = flops * steps / dt / 1e12 if flops else None
    peak = _peak(dev.device_kind, precision)
    return {
        "what": "throughput", "precision": precision, "attention": attention, "images_per_s": round(ips, 4),
        "views_per_s": round(ips * views, 3), "views": views, "images_per_step": B,
        "steps": steps, "compile_s": round(compile_s, 2),
        "gflop_per_view": round(flops / (B * views) / 1e9, 2) if flops else None,
        "tflop_per_s": round(tflops, 3) if tflops else None,
        "peak_share": round(tflops / (peak * len(jax.devices())), 4) if tflops and peak else None,
        "peak_device_mem_gib": round(mem["peak_bytes_in_use"] / 2**30, 3) if "peak_bytes_in_use" in mem else None,
        "host_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "device": dev.device_kind, "devices": len(jax.devices()), **_versions(),
    }


def precision_cost(model: Model, n_images: int, views: int, images_per_step: int, size: int,
                   precisions=PRECISIONS) -> list[dict]:
    """Each precision vs `highest` on the same n_images: tokens, mu, UnitMem, U10."""
    imgs_all = _synthetic_images(n_images, views, size, seed=1)
    results = {}
    for precision in precisions:
        opts = Options(batch_size=images_per_step, precision=precision, save_activations=True)
        compiled, params, state, data, _ = _compiled_step(model, views, opts, size)
        mus = []
        for s in range(0, n_images, images_per_step):
            chunk = imgs_all[s:s + images_per_step]
            B = len(chunk)
            pad = images_per_step - B
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.uint8)]) if pad else chunk
            ids = np.arange(s, s + images_per_step, dtype=np.int32)
            valid = np.arange(images_per_step) < B
            args = [jax.device_put(a, data) for a in (chunk, np.zeros(images_per_step, np.int32), ids,
                                                      np.zeros(images_per_step, np.int32), valid)]
            state, out = compiled(params, state, *args)
            mus.append(np.asarray(out["mu"])[:B])
        tok_fn = _token_fn(model, precision)
        tokens = np.concatenate([tok_fn(imgs_all[i:i + 1].reshape((-1, size, size, 3)))
                                 for i in range(min(n_images, 16))])
        results[precision] = (np.concatenate(mus), tokens)

    mu_ref, tok_ref = results["highest"]
    ids = np.arange(n_images)
    um_ref = unitmem.unitmem_mean(unitmem.stats_from_matrix(mu_ref, ids))
    u10_ref, _ = unitmem.top_units(um_ref)
    arg_ref = unitmem.stats_from_matrix(mu_ref, ids).argmax
    rows = []
    for precision, (mu, tok) in results.items():
        st = unitmem.stats_from_matrix(mu, ids)
        um = unitmem.unitmem_mean(st)
        u10, _ = unitmem.top_units(um)
        from scipy.stats import spearmanr

        rows.append({
            "what": "precision_cost", "precision": precision, "vs": "highest", "images": n_images,
            "views": views, "identical_tokens": float(np.mean(tok == tok_ref)),
            "mu_max_rel_err": float(np.max(np.abs(mu - mu_ref) / np.maximum(np.abs(mu_ref), 1e-6))),
            "unitmem_spearman": float(spearmanr(um, um_ref).statistic),
            "u10_argmax_agreement": float(np.mean(st.argmax[u10_ref] == arg_ref[u10_ref])),
            "u10_jaccard": float((u10 & u10_ref).sum() / max((u10 | u10_ref).sum(), 1)),
            "device": jax.devices()[0].device_kind, **_versions(),
        })
    return rows


def _token_fn(model: Model, precision: str):
    from varjax.record import _precision
    from varjax.vqvae import VQVAE

    @jax.jit
    def tok(images):
        with _precision(precision, "vqvae"):
            t = model.vqvae.apply({"params": model.params["vqvae"]}, images, model.config.patch_nums,
                                  method=VQVAE.tokenize)
        return jnp.concatenate(t, axis=1)

    return lambda x: np.asarray(tok(x))


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
    ap.add_argument("--attention", action="append", choices=("einsum", "fused"),
                    help="attention kernel to time (repeatable; default einsum)")
    ap.add_argument("--precision-cost", action="store_true", help="compare precisions instead of timing")
    ap.add_argument("--images", type=int, default=64, help="images for --precision-cost")
    args = ap.parse_args(argv)
    if args.images_per_step % len(jax.devices()):
        print(f"bench: error: --images-per-step must be a multiple of the {len(jax.devices())} devices",
              file=sys.stderr)
        return 2
    if args.checkpoint:
        import varjax

        model = varjax.load(args.checkpoint)
        cfg, args.config = model.config, Path(args.checkpoint).name
    else:
        cfg = config_lib.PRESETS[args.config]()
        model = Model(cfg, init_params(cfg, seed=0))
    precisions = tuple(args.precision or PRECISIONS)
    if args.precision_cost:
        for row in precision_cost(model, args.images, args.views, args.images_per_step,
                                  cfg.resolution, ("highest",) + tuple(p for p in precisions if p != "highest")):
            print(json.dumps({"config": args.config, **row}), flush=True)
        return 0
    for precision in precisions:
        for attention in args.attention or ("einsum",):
            row = bench_one(model, precision, args.images_per_step, args.views, args.steps, cfg.resolution,
                            attention)
            print(json.dumps({"config": args.config, **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
