"""The XLA settings of everything varjax compiles, in one place.

`COMPILER_OPTIONS` go to each compilation of varjax's programs (`jax.jit(...,
compiler_options=...)`), never into XLA_FLAGS: they touch no other JAX program in the process,
they work whatever was imported first, and a user's own XLA_FLAGS still apply. All of them
are XLA:CPU options, passed only when the default backend is the CPU (a GPU program compiles
exactly as without varjax's options). `jit` is `jax.jit` with them (and `varjax.cpu_gemm`'s
Dense products; `varjax_jit` the same for jits that take shardings).

What is set, and why (measured with experiments/bench_upstream.py and experiments/bench.py,
see README "This 2-core CPU"):
- Convolutions on XLA's Eigen kernels instead of YNNPACK. jax 0.10's XLA:CPU hands every
  convolution, matrix product and reduction to YNNPACK (`xla_cpu_experimental_ynn_fusion_type`
  = individual dot, individual convolution, reduce). Its float32 3x3 convolutions ran 1.6x
  (256 x 256 x 160, stride 1) to 3.6x (stride 2) slower than Eigen's, which match PyTorch's
  oneDNN ones; its matrix products are as fast as Eigen's and oneDNN's, and its reductions
  are faster for the VQVAE's per-channel sums. So YNNPACK keeps the products and reductions.
  (Re-measured on the idle machine, 2026-12-01 evening: Eigen's products against YNNPACK's
  are within the machine's noise, faster or slower by shape, and the whole d16 teacher
  forcing took 2.58 s with Eigen's against 2.54 s with YNNPACK's; oneDNN's, through
  `xla_cpu_use_onednn`, are the fastest products alone from ~1000 rows and lose in the whole
  call, 2.73 s. `experiments/bench_cpu_kernels.py --part dot --part teacher_forced`.)
- 512-bit vectors for the loops XLA generates itself (`xla_cpu_prefer_vector_width`; its
  default is 256 bits, and a CPU without AVX-512 keeps 256). On this AVX-512 CPU the d16
  tokenizer's element-wise passes (the GroupNorms' normalise-and-SiLU) ran faster: with
  256-bit loops tokenize ran at 0.968 of this speed (paired ratio, 95% interval
  0.938-0.998, eight repetitions), tokens identical; teacher forcing ran as fast (1.010,
  interval 0.976-1.044), its logits within 2.7e-6 of before (the loops' sums split
  differently).
  `python experiments/bench_cpu_kernels.py --part tokenize --part teacher_forced --reps 8`,
  the `vector_width_256` rows; the sampler was not re-timed.
- Not an XLA option, but compiled the same way: on a one-device CPU the transformer's Dense
  products go to MKL's sgemm through an FFI call (varjax/cpu_gemm.py), since none of the
  three products above matches MKL's at 1000+ rows. `varjax_jit` (and `jit`, and so teacher
  forcing, the recording step and the sampler) trace under `cpu_gemm.tracing()`;
  `.xla_defaults` and plain `jax.jit` keep XLA's products.
- Nothing about threads: XLA:CPU already runs one intra-op thread per core, as PyTorch does.
  (experiments/train_planted.py pins one thread through XLA_FLAGS for reproducible training.)

A jaxlib that does not know an option (an older one) keeps XLA's default for it:
`compiler_options` tries each once on a trivial program. To compare with XLA's defaults,
compile the same function with plain `jax.jit` (experiments/bench_upstream.py `--xla-defaults`
does).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from varjax import cpu_gemm

_YNN = "LIBRARY_FUSION_TYPE_"
COMPILER_OPTIONS: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": f"{_YNN}INDIVIDUAL_DOT,{_YNN}REDUCE",
    "xla_cpu_prefer_vector_width": 512,
}


@functools.cache
def compiler_options() -> dict[str, Any]:
    """The COMPILER_OPTIONS this jaxlib accepts, each tried on its own on a trivial program
    (a jaxlib that does not know one still gets the others); {} when not compiling for a CPU."""
    if jax.default_backend() != "cpu":
        return {}
    taken = {}
    for key, value in COMPILER_OPTIONS.items():
        try:
            jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile({key: value})
        except Exception:  # noqa: BLE001 - an unknown option or value: XLA's default for it
            continue
        taken[key] = value
    return taken


def varjax_jit(fun: Callable, xla_defaults: bool = False, **jit_kwargs):
    """`jax.jit(fun, **jit_kwargs)` as varjax compiles it: with `compiler_options()` and the
    Dense products on MKL where `varjax.cpu_gemm` applies; with `xla_defaults`, plain
    `jax.jit` (XLA's own kernels throughout). Looks the options up now (starts the backend)."""
    if xla_defaults:
        return jax.jit(fun, **jit_kwargs)
    return jax.jit(cpu_gemm.traced(fun), compiler_options=compiler_options(), **jit_kwargs)


def jit(fun: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` compiled with `compiler_options()`.

    The options are looked up at the first call (or `.lower`), not at import, so importing
    varjax starts no backend (jax.distributed.initialize must come first on several hosts).
    `.xla_defaults` is the same function under plain `jax.jit`: XLA's own kernel choice, for
    reproducing what was computed before these options existed (varjax.Model `xla_defaults`).
    """

    @functools.cache
    def jitted():
        return varjax_jit(fun, **jit_kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return jitted()(*args, **kwargs)

    call.lower = lambda *args, **kwargs: jitted().lower(*args, **kwargs)
    call.xla_defaults = varjax_jit(fun, xla_defaults=True, **jit_kwargs)
    return call
