"""Benchmark of the sampler (varjax.generate), optionally side by side with upstream's.

    python experiments/bench.py --generate                      # d16, batch 1, 8, 64, every precision
    python experiments/bench.py --generate --gen-batch 8 --precision highest --reps 3 \\
        --upstream /path/to/FoundationVision/VAR                # and upstream's sampler, interleaved

Times whole calls of the compiled sampler with the decoder (upstream's
autoregressive_infer_cfg returns images too) after one warm-up call, compile time apart,
for a config with random weights (`varjax.model.init_params`) and each precision; prints one
JSON line per setting: images/s of the median and of the fastest call. With --upstream the
same weights are loaded into upstream's own VAR and VQVAE (torch, float32, its default
threads), and each repetition runs upstream's sampler right after ours on the same labels and
settings, so both see the same machine load. Upstream needs `huggingface_hub` importable (any
stand-in that defines PyTorchModelHubMixin will do).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from varjax import generate as gen_lib
from varjax.model import Model


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
    from experiments.bench import _dot_conv_flops

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

    sys.path.insert(0, str(Path(path).resolve()))
    from models import VAR, VQVAE  # upstream's package

    cfg = model.config
    v, q = cfg.var, cfg.vqvae
    if (q.ch_mult, q.num_res_blocks) != ((1, 1, 2, 2, 4), 2):
        raise ValueError("upstream's VQVAE has ch_mult (1, 1, 2, 2, 4) and 2 blocks per level; this config differs")
    # Upstream's build_vae_var fixes width = 64 * depth; the constructors take any config.
    with contextlib.redirect_stdout(sys.stderr):  # upstream prints its config; stdout is for JSON lines
        vae = VQVAE(vocab_size=q.vocab_size, z_channels=q.z_channels, ch=q.ch, share_quant_resi=q.share_quant_resi,
                    quant_resi=q.quant_resi, v_patch_nums=cfg.patch_nums, test_mode=True)
        var = VAR(vae_local=vae, num_classes=v.num_classes, depth=v.depth, embed_dim=v.embed_dim,
                  num_heads=v.num_heads, mlp_ratio=v.mlp_ratio, norm_eps=v.norm_eps, shared_aln=v.shared_aln,
                  attn_l2_norm=v.attn_l2_norm, patch_nums=cfg.patch_nums, flash_if_available=False,
                  fused_if_available=False)
    for module, part in ((vae, "vqvae"), (var, "var")):
        _load_into(module, model.params[part])
    vae.eval()
    var.eval()
    labels = torch.tensor(_labels(batch, v.num_classes))

    def call():
        with torch.inference_mode():
            var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, cfg=sampling.cfg, top_k=sampling.top_k,
                                         top_p=sampling.top_p, more_smooth=sampling.more_smooth)

    return call


def _load_into(module, params) -> None:
    """Our parameter tree -> a torch module's state_dict, by the converter's rule inverted."""
    import torch

    from convert.mapping import entry, is_ignored

    state = {}
    for key, tensor in module.state_dict().items():
        if is_ignored(key):
            continue
        e = entry(key, tensor.ndim)
        value = params
        for part in e.path:
            value = value[part]
        value = np.asarray(value)
        if e.axes:
            value = np.transpose(value, np.argsort(e.axes))
        state[key] = torch.from_numpy(np.ascontiguousarray(value, np.float32))
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected and all(is_ignored(k) for k in missing), (missing, unexpected)


def _row(what: str, times: list[float], batch: int, extra: dict) -> dict:
    med, best = statistics.median(times), min(times)
    return {"what": what, "batch": batch, "images_per_s": round(batch / med, 4),
            "images_per_s_best": round(batch / best, 4), "call_s": [round(t, 3) for t in times], **extra}


def run(model: Model, config_name: str, precisions, batches, reps: int, sampling: gen_lib.Sampling,
        upstream: str | None, versions: dict, attention: str = "einsum") -> int:
    """Prints one JSON line per (precision, batch) and one per upstream batch; returns 0."""
    dev = jax.devices()[0]
    common = {"config": config_name, "cfg": sampling.cfg, "top_k": sampling.top_k, "top_p": sampling.top_p,
              "decode": True}
    for batch in batches:
        up_call = _upstream(upstream, model, sampling, batch) if upstream else None
        up_times: list[float] = []
        if up_call:
            up_call()  # warm-up
        for precision in precisions:
            compile_s, call = _ours(model, sampling, precision, batch, attention)
            call()  # warm-up (first run allocates)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
                if up_call and precision == precisions[0]:  # interleaved with the first precision
                    t0 = time.perf_counter()
                    up_call()
                    up_times.append(time.perf_counter() - t0)
            gflop = sampler_gflop(model, sampling, precision, batch) / batch
            row = _row("generation", times, batch, {
                **common, "precision": precision, "attention": attention, "compile_s": round(compile_s, 2),
                "gflop_per_image": round(gflop, 1),
                "tflop_per_s": round(gflop * batch / statistics.median(times) / 1e3, 3),
                "device": dev.device_kind, "devices": len(jax.devices()), **versions})
            print(json.dumps(row), flush=True)
        if up_call:
            import torch

            print(json.dumps(_row("generation_upstream", up_times, batch, {
                **common, "precision": "float32", "interleaved_with": precisions[0], "torch": torch.__version__,
                "torch_threads": torch.get_num_threads()})), flush=True)
    return 0
