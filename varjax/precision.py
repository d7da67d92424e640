"""Precision modes: which dtype and matmul precision each part of the model runs in.

No upstream counterpart (upstream runs float32, or bf16 autocast around the transformer in
training). Shared by the recording pass (varjax/record.py) and the sampler (varjax/generate.py).
"""

from __future__ import annotations

import contextlib

import jax

PRECISIONS = ("highest", "tf32", "bf16", "bf16_full")
BF16_MODES = ("bf16", "bf16_full")


@contextlib.contextmanager
def matmul_scope(mode: str, part: str):
    """jax.default_matmul_precision for `part` ("var" or "vqvae") in precision `mode`.

    highest: float32 everywhere (parity); tf32: TF32 matmuls and convs; bf16: transformer in
    bfloat16 (its matmuls in bf16), the VQVAE float32 with TF32 (upstream's training setup);
    bf16_full: as bf16, and the VQVAE encoder in bfloat16 too (its dtype, set by the caller).
    """
    if mode == "highest":
        p = "highest"
    elif mode == "tf32" or part == "vqvae":
        p = "tensorfloat32"
    else:
        p = "default"
    with jax.default_matmul_precision(p):
        yield
