"""Where one call's time goes on the CPU: a jax.profiler trace, summed per op kind and module.

    python experiments/profile_cpu.py --config d16 --call tokenize
    python experiments/profile_cpu.py --config d16 --call teacher_forced --xla-defaults
    python experiments/profile_cpu.py --config d16 --call generate --images 8

Compiles `Model.tokenize`, `Model.teacher_forced` or the sampler (`generate`: the generation
benchmark's setting, cfg 1.5, top_k 900, top_p 0.96, images decoded) on random weights and
synthetic images, float32 at highest precision, runs it twice, then once under `jax.profiler.trace`, and sums the
traced time of XLA:CPU's thunks by the jax op that made them (`conv_general_dilated`,
`dot_general`, `mkl_gemm` for the Dense products varjax.cpu_gemm hands to MKL, ...) and by Flax module path (`encoder/down_0/block_N/conv1`, block indices
folded). Prints one JSON object. Thunks that run asynchronously (Eigen's convolutions, which
varjax's options choose) are not traced one by one: their time is the traced total minus the
attributed part ("unattributed_ms"). `--xla-defaults` compiles with XLA's own kernels and the
einsum attention (varjax.Model `xla_defaults`), as before varjax chose them. The trace is
left in `--out` (perfetto_trace.json.gz, for ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from varjax import config as config_lib
from varjax.model import Model, _teacher_forced, _tokenize, init_params


def _compiled_call(model: Model, call: str, images: np.ndarray):
    """(compiled function, its arguments) for one of the calls."""
    cfg, params = model.config, model.params
    if call == "generate":
        return _compiled_sampler(model, len(images))
    pick = (lambda f: f.xla_defaults) if model.xla_defaults else (lambda f: f)
    if call == "tokenize":
        args = (params["vqvae"], images)
        lowered = pick(_tokenize).lower(model.vqvae, cfg.patch_nums, *args)
    else:
        x = model.var_input(model.tokenize(images))
        args = (params["var"], jnp.arange(len(images), dtype=jnp.int32), x, None)
        lowered = pick(_teacher_forced).lower(model.var, *args)
    return lowered.compile(), args


def _compiled_sampler(model: Model, batch: int):
    """The sampler as the generation benchmark times it (cfg 1.5, top_k 900, top_p 0.96, images
    decoded), compiled for `batch` images, and its arguments (classes 0..batch-1, seed 0)."""
    from varjax import generate as gen_lib

    cfg = model.config
    sampling = gen_lib.Sampling(cfg=1.5, top_k=min(900, cfg.vqvae.vocab_size), top_p=0.96)
    cs = gen_lib.compiled_for(model, gen_lib.program_for(model, sampling, return_images=True), batch)
    labels, ids = np.arange(batch) % cfg.var.num_classes, np.arange(batch)
    return cs.fn, gen_lib.sampler_inputs(model, cs, labels, ids, 0, sampling, [])


def _op_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (jax op, module path with block indices folded)."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"', line)
        if m and m.group(1) not in out:
            parts = re.sub(r"^jit\([^)]*\)/", "", m.group(2)).split("/")
            module = re.sub(r"(blocks_|block_|attn_)\d+", r"\1N", "/".join(parts[:-1]))
            op = "mkl_gemm" if parts[-1] == "ffi_call" else parts[-1]  # Dense products on MKL (varjax.cpu_gemm)
            out[m.group(1)] = (op, module)
    return out


def profile(model: Model, call: str, images: np.ndarray, out: Path) -> dict:
    compiled, args = _compiled_call(model, call, images)
    walls = []
    for _ in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        walls.append(time.perf_counter() - t0)
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        traced_wall = time.perf_counter() - t0
    trace = json.load(gzip.open(next(out.glob("**/*perfetto_trace.json.gz"))))
    meta = _op_metadata(compiled.as_text())
    by_op, by_module, by_both = collections.Counter(), collections.Counter(), collections.Counter()
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        if e.get("ph") == "X" and e.get("name") in meta:
            op, module = meta[e["name"]]
            by_op[op] += e.get("dur", 0) / 1e3
            by_module[module] += e.get("dur", 0) / 1e3
            by_both[f"{op} @ {module}"] += e.get("dur", 0) / 1e3
    attributed = sum(by_op.values())
    return {"call": call, "images": len(images), "xla_defaults": model.xla_defaults,
            "attention": model.attention, "wall_s": [round(w, 3) for w in walls],
            "traced_wall_ms": round(traced_wall * 1e3, 1), "attributed_ms": round(attributed, 1),
            "unattributed_ms": round(traced_wall * 1e3 - attributed, 1),
            "by_op_ms": {k: round(v, 1) for k, v in by_op.most_common(12)},
            "by_module_ms": {k: round(v, 1) for k, v in by_module.most_common(25)},
            "by_op_and_module_ms": {k: round(v, 1) for k, v in by_both.most_common(25)},
            "trace": str(out), "jax": jax.__version__, "device": jax.devices()[0].device_kind}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="d16", choices=sorted(config_lib.PRESETS))
    ap.add_argument("--call", default="tokenize", choices=("tokenize", "teacher_forced", "generate"),
                    help="generate: the sampler at cfg 1.5, top_k 900, top_p 0.96, decode included")
    ap.add_argument("--images", type=int, default=2, help="images per call (generate: the batch)")
    ap.add_argument("--xla-defaults", action="store_true",
                    help="XLA's own CPU kernels and the einsum attention (before varjax chose them)")
    ap.add_argument("--out", type=Path, help="trace directory (default: a new temporary one)")
    args = ap.parse_args(argv)
    if args.images < 1:
        print("profile_cpu: error: --images must be >= 1", file=sys.stderr)
        return 2
    if __package__:
        from experiments.bench import _synthetic_images
    else:  # run as a script: experiments/ is on the path
        from bench import _synthetic_images

    cfg = config_lib.PRESETS[args.config]()
    model = Model(cfg, init_params(cfg, seed=0), attention="einsum" if args.xla_defaults else "auto",
                  xla_defaults=args.xla_defaults)
    images = _synthetic_images(args.images, 1, cfg.resolution, seed=1)[:, 0]
    out = args.out or Path(tempfile.mkdtemp(prefix="varjax-profile-"))
    with jax.default_matmul_precision("highest"):
        row = profile(model, args.call, images, out)
    print(json.dumps({"config": args.config, **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
