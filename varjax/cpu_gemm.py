"""The Linear layers' products on a CPU through MKL, as PyTorch computes them.

On this project's 2-core AVX-512 CPU every matrix product XLA:CPU offers (YNNPACK, Eigen,
oneDNN) was 5-30% slower than MKL's at the transformer's shapes (1000+ rows), and the
Linear layers are about 75% of teacher forcing and of the sampler (docs/performance.md).
So in varjax's jits on a CPU (`varjax.xla_options.varjax_jit`: teacher forcing, the
recording step, the sampler), `var.py`'s Dense layers hand their product to MKL through an
XLA FFI custom call (varjax/cpu_gemm.cc). The handler uses MKL's packed-matrix product
(the weights packed per call, then `cblas_sgemm_compute`) rather than plain sgemm: plain
sgemm picks its kernels by the matrix size, so a row's last bits could depend on how many
rows share the call, while with the packed product every row came out the same whatever
the rows beside it (a single row is computed as two; tests/test_cpu_gemm.py checks it), at
plain sgemm's speed. That is what lets the sampler use it: a generated image must not
depend on the batch size (varjax.generate's contract). MKL is the one inside the torch CPU
wheel, which varjax already installs for the converter: nothing new is downloaded.

When it is used: float32 operands of the released models' widths (MIN_WIDTH), a CPU backend
with ONE device (GSPMD cannot split a custom call, so on a multi-device mesh each device
would compute every sharded product whole: meshes keep XLA's products), inside a function
traced under `tracing()` (varjax's own jits; plain `jax.jit`, `Model(xla_defaults=True)` and
training keep XLA's products), torch built with MKL, and a C++ compiler to build the small
handler once (cached in `$VARJAX_CACHE` or `~/.cache/varjax`, keyed by the source and the
jaxlib version). `VARJAX_CPU_GEMM=xla` turns it off (`mkl` or unset: on where possible;
read once, at the first use). Anything missing: XLA's products, as before; `status()` says
which and why. The choice is made when a function is traced, so a change of MIN_WIDTH applies
to functions traced afterwards.

The result is the same float32 product, summed in MKL's order instead of YNNPACK's
(tests/test_parity.py runs the fixtures through it with their usual tolerances). It has a
VJP (XLA's products of the cotangent), so differentiating a varjax-compiled function works.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

TARGET = "varjax_cpu_gemm"
SOURCE = Path(__file__).with_name("cpu_gemm.cc")
ENV_SWITCH = "VARJAX_CPU_GEMM"  # "xla" turns the MKL path off
# Products whose inner and output widths are both at least this go to MKL: the released
# models' (d16 and up, width 1024+). The small presets and the planted model (no layer wider
# than 128 on both sides) keep XLA's: their products are too small to repay the call.
MIN_WIDTH = 512

_state = threading.local()


@contextlib.contextmanager
def tracing():
    """Inside: Dense products may go to MKL (when `status()` allows). varjax's jits trace
    their functions inside it (`traced`)."""
    before = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = before


def traced(fun: Callable) -> Callable:
    """`fun`, traced inside `tracing()`: give this to jax.jit."""

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        with tracing():
            return fun(*args, **kwargs)

    return wrapped


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """flax.linen.Dense's product: MKL's sgemm where this module applies (see the module
    docstring), else `jax.lax.dot_general` with the same arguments."""
    (l_contract, r_contract), (l_batch, r_batch) = dimension_numbers
    if (getattr(_state, "on", False) and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
            and rhs.ndim == 2 and min(rhs.shape) >= MIN_WIDTH
            and tuple(l_contract) == (lhs.ndim - 1,) and tuple(r_contract) == (0,)
            and not l_batch and not r_batch and preferred_element_type in (None, jnp.float32)
            and jax.device_count() == 1 and status()[0]):
        out = _gemm(lhs.reshape(math.prod(lhs.shape[:-1]), lhs.shape[-1]), rhs)
        return out.reshape(lhs.shape[:-1] + (rhs.shape[1],))
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


@jax.custom_vjp
def _gemm(a, b):
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.float32),
                            vmap_method="sequential")(a, b)


def _gemm_fwd(a, b):
    return _gemm(a, b), (a, b)


def _gemm_bwd(res, g):
    a, b = res
    return g @ b.T, a.T @ g


_gemm.defvjp(_gemm_fwd, _gemm_bwd)


@functools.cache
def status() -> tuple[bool, str]:
    """(whether Dense products can go to MKL in this process, why or why not). The first
    call imports torch and may build the handler (a few seconds, once per machine)."""
    switch = os.environ.get(ENV_SWITCH, "").lower()
    if switch not in ("", "mkl", "xla"):
        warnings.warn(f"varjax: {ENV_SWITCH}={switch!r} is neither 'mkl' nor 'xla'; using XLA's products", stacklevel=2)
        return False, f"{ENV_SWITCH}={switch!r} is neither 'mkl' nor 'xla'"
    if switch == "xla":
        return False, f"{ENV_SWITCH}=xla"
    if jax.default_backend() != "cpu":
        return False, f"backend {jax.default_backend()} (the MKL path is for the CPU)"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.backends.mkl.is_available():
        return False, "this torch has no MKL"
    try:
        torch_lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        mkl = [getattr(torch_lib, f"cblas_sgemm_{name}") for name in ("pack_get_size", "pack", "compute")]
    except (OSError, AttributeError) as e:
        return False, f"torch's library does not export MKL's packed sgemm ({e})"
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"varjax: XLA's products on the CPU, building the MKL handler failed: {e}", stacklevel=2)
        return False, f"building {SOURCE.name} failed"
    lib.varjax_set_mkl(*(ctypes.cast(f, ctypes.c_void_p) for f in mkl))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.VarjaxCpuGemm), platform="cpu")
    return True, f"MKL packed sgemm from torch {torch.__version__}"


def _build() -> Path:
    """The compiled handler, built once per (source, jaxlib) into the cache directory; a
    failed or interrupted build leaves nothing there (written to a temporary name, renamed)."""
    import jaxlib

    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + jaxlib.__version__.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("VARJAX_CACHE") or Path.home() / ".cache" / "varjax")
    out = cache / f"cpu_gemm-{key}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", dir=cache)
    os.close(fd)
    try:
        cmd = [os.environ.get("CXX", "c++"), "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
               "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise subprocess.SubprocessError(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                                             else f"{cmd[0]} exited {done.returncode}")
        os.replace(tmp, out)
    except FileNotFoundError as e:  # no compiler
        raise subprocess.SubprocessError(f"no C++ compiler ({e.filename})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
