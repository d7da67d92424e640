"""PyTorch-exact bicubic and area resizing, as small constant matrices.

Ports the two `F.interpolate` modes that upstream `models/quant.py` uses on latent maps:
- `mode='bicubic', align_corners=False`: cubic convolution with a = -0.75, source coordinate
  (dst + 0.5) * in / out - 0.5 (not clamped), no antialiasing, taps clamped to the edge.
  `jax.image.resize(method='cubic')` uses a = -0.5 (Keys) and antialiases when shrinking, so
  it is not the same.
- `mode='area'` (= adaptive average pooling): output cell i averages the input cells
  floor(i * in / out) .. ceil((i + 1) * in / out) - 1. The windows overlap when in / out is
  not an integer (16 -> 13, 10, 6, 5, 3), which exact fractional-coverage resizing does not do.

Both are separable linear maps, so each axis is a constant (out, in) matrix built once in
numpy (float64, then float32) and applied with one einsum: on an accelerator that is a pair
of tiny matmuls, and under `jax.default_matmul_precision('highest')` it agrees with PyTorch
to float32 rounding.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's upsample_bicubic2d constant


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """The 4 tap weights for fractional offsets t in [0, 1): taps at floor-1 .. floor+2."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix of PyTorch bicubic resizing along one axis."""
    m = np.zeros((n_out, n_in), np.float64)
    # PyTorch computes the source coordinate and weights in float32 (opmath of float32).
    scale = np.float32(n_in / n_out)
    for o in range(n_out):
        src = np.float32(scale * np.float32(o + 0.5) - np.float32(0.5))
        base = math.floor(src)
        t = np.float32(src - base)
        w = _cubic_weights(np.array(t, np.float32)).astype(np.float32)
        for k in range(4):
            i = min(max(base - 1 + k, 0), n_in - 1)  # edge taps are clamped, not zero
            m[o, i] += w[k]
    m.setflags(write=False)
    return m.astype(np.float32)


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix of adaptive average pooling along one axis."""
    m = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        start = (o * n_in) // n_out
        end = -((-(o + 1) * n_in) // n_out)  # ceil
        m[o, start:end] = 1.0 / (end - start)
    return m.astype(np.float32)


def _apply(x_BHWC: jnp.ndarray, mh: np.ndarray, mw: np.ndarray) -> jnp.ndarray:
    return jnp.einsum("oh,bhwc,pw->bopc", mh, x_BHWC, mw)


def bicubic(x_BHWC: jnp.ndarray, size: int | tuple[int, int]) -> jnp.ndarray:
    """Resize (B, H, W, C) to (B, h, w, C) as `F.interpolate(mode='bicubic')` does."""
    h, w = (size, size) if isinstance(size, int) else size
    H, W = x_BHWC.shape[1:3]
    return _apply(x_BHWC, bicubic_matrix(H, h), bicubic_matrix(W, w))


def area(x_BHWC: jnp.ndarray, size: int | tuple[int, int]) -> jnp.ndarray:
    """Resize (B, H, W, C) to (B, h, w, C) as `F.interpolate(mode='area')` does."""
    h, w = (size, size) if isinstance(size, int) else size
    H, W = x_BHWC.shape[1:3]
    return _apply(x_BHWC, area_matrix(H, h), area_matrix(W, w))
