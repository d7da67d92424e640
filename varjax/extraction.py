"""Extraction: does the model regenerate a training image from a short prefix of its tokens?

The published attack on VAR (sprintml/privacy_attacks_against_iars, `gen_memorized.py`,
`find_memorized.py`, docs/memorization.md): the true tokens of the first k scales are
forced, every later scale takes the arg-max of the conditional logits (no CFG, no noise),
and the result is compared with the VQVAE decode of the image's own true tokens (not the raw
pixels): identical tokens (counted over all L tokens, the forced ones included, as theirs
"out of 680"), SSIM of the two decodes (`dm_pix.ssim`, 11x11 Gaussian, sigma 1.5, on [0, 1]
images) and, when the caller has the SSCD copy-detection network, the cosine of its
embeddings (`sscd_cosine`; the published threshold for "extracted" is 0.75).

The greedy continuation is the compiled sampler (varjax.generate) with cfg=0 and top_k=1:
only the arg-max survives the filter, so the draw is the arg-max.

Shape letters: N samples, B per call, K scales, L tokens of all scales, H, W pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from varjax import generate as generate_lib
from varjax.errors import GenerateError
from varjax.scaling import UnitScaling

GREEDY = generate_lib.Sampling(cfg=0.0, top_k=1, top_p=0.0)  # the published continuation
SSCD_THRESHOLD = 0.75  # their "extracted": SSCD cosine above this
SSCD_SIZE = 320  # SSCD's input side (their transform: Resize([320, 320]) + ImageNet mean/std)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Extraction:
    """The greedy continuation of N samples from their first `prefix_scales` true scales.

    Attributes:
      prefix_scales: k, the scales forced.
      tokens: K int32 arrays (N, pn^2), what the model generated (scales < k are the true ones).
      identical_tokens: int (N,), tokens equal to the true ones over all L (forced included).
      identical_share: float (N,), identical_tokens / L.
      free_identical_share: float (N,), the share over the L - prefix tokens generated (NaN if none).
      ssim: float (N,), SSIM of the decode of `tokens` against the decode of the true tokens.
      images: float32 (N, H, W, 3) in [0, 1], the generated decodes, when asked for (else None).
      originals: the same for the true tokens' decodes, when asked for (else None).
    """

    prefix_scales: int
    tokens: list[np.ndarray]
    identical_tokens: np.ndarray
    identical_share: np.ndarray
    free_identical_share: np.ndarray
    ssim: np.ndarray
    images: np.ndarray | None = None
    originals: np.ndarray | None = None


def to_unit(images: jnp.ndarray) -> jnp.ndarray:
    """Decoder output in [-1, 1] -> [0, 1] (upstream's visualisation: (x + 1) / 2, clipped)."""
    return jnp.clip((images + 1.0) * 0.5, 0.0, 1.0)


@jax.jit
def _ssim(a_BHW3: jnp.ndarray, b_BHW3: jnp.ndarray) -> jnp.ndarray:
    import dm_pix

    return dm_pix.ssim(a_BHW3, b_BHW3)  # defaults: max_val 1, 11x11 Gaussian, sigma 1.5


def ssim(a_BHW3, b_BHW3) -> np.ndarray:
    """SSIM per image of two float (B, H, W, 3) batches in [0, 1] (dm_pix defaults)."""
    return np.asarray(_ssim(jnp.asarray(a_BHW3, jnp.float32), jnp.asarray(b_BHW3, jnp.float32)))


def _check(model, tokens_true, labels, prefix_scales: int) -> tuple[list[np.ndarray], np.ndarray]:
    pn = model.config.patch_nums
    if not 0 <= prefix_scales <= len(pn):
        raise GenerateError(f"prefix_scales must be in [0, {len(pn)}], got {prefix_scales}")
    if len(tokens_true) != len(pn):
        raise GenerateError(f"tokens_true has {len(tokens_true)} scales; the model has {len(pn)}")
    labels = np.asarray(labels)
    toks = [np.asarray(t) for t in tokens_true]
    for s, t in enumerate(toks):
        if t.shape != (len(labels), pn[s] ** 2) or not np.issubdtype(t.dtype, np.integer):
            raise GenerateError(f"tokens_true[{s}] must be ints of shape ({len(labels)}, {pn[s] ** 2}), "
                                f"got {t.dtype} {t.shape}")
    return toks, labels


def extract(model, tokens_true: Sequence[Any], labels, prefix_scales: int, *,
            unit_scaling: UnitScaling | None = None, batch_size: int = 64, precision: str | None = None,
            return_images: bool = False, sample_ids=None,
            progress: Callable[[int, int], None] | None = None) -> Extraction:
    """The published extraction attack on N samples, batched (each batch on every device).

    Args:
      model: a varjax.Model with both parts.
      tokens_true: K int arrays (N, pn^2), each sample's true tokens (e.g. `model.tokenize`
        of upstream's validation view, or a run's `view_tokens.npy` split by scale).
      labels: int (N,) the samples' classes.
      prefix_scales: k, the number of leading scales forced to the true tokens.
      unit_scaling: generate from a model with chosen units scaled (varjax.scaling).
      batch_size: samples per compiled call (the last batch is padded, so one compilation).
      precision: the sampler's precision (None: float32 at the caller's matmul precision).
      return_images: also keep both decodes (N, H, W, 3) in [0, 1] (for image grids).
      sample_ids: int (N,) ids passed to the sampler (greedy decoding draws nothing, so they
        change nothing; kept so a scaled and an unscaled call see the same ids).
      progress: called with (samples done, N) after every batch.
    Returns:
      Extraction, rows in the order of `labels`.
    Raises:
      GenerateError: shapes or arguments the sampler cannot use.
    """
    toks, labels = _check(model, tokens_true, labels, prefix_scales)
    N, L = len(labels), sum(t.shape[1] for t in toks)
    if batch_size < 1:
        raise GenerateError(f"batch_size must be positive, got {batch_size}")
    ids = np.arange(N) if sample_ids is None else np.asarray(sample_ids)
    gen_parts: list[list[np.ndarray]] = []
    ssims, images, originals = [], [], []
    for lo in range(0, N, batch_size):
        sel = np.arange(lo, min(lo + batch_size, N))
        pad = np.concatenate([sel, np.full(batch_size - len(sel), sel[-1])]) if len(sel) < batch_size else sel
        true_b = [t[pad] for t in toks]
        gen = generate_lib.generate(model, labels[pad], GREEDY, 0, true_b[:prefix_scales], sample_ids=ids[pad],
                                    unit_scaling=unit_scaling, precision=precision)
        a, b = to_unit(model.decode(gen.tokens)), to_unit(model.decode(true_b))
        ssims.append(ssim(a, b)[:len(sel)])
        gen_parts.append([np.asarray(t)[:len(sel)] for t in gen.tokens])
        if return_images:
            images.append(np.asarray(a)[:len(sel)])
            originals.append(np.asarray(b)[:len(sel)])
        if progress is not None:
            progress(int(sel[-1]) + 1, N)
    tokens = [np.concatenate([g[s] for g in gen_parts]) for s in range(len(toks))]
    same = sum((g == t).sum(axis=1) for g, t in zip(tokens, toks))
    forced = sum(t.shape[1] for t in toks[:prefix_scales])
    free = L - forced
    free_share = (same - forced) / free if free else np.full(N, np.nan)
    return Extraction(prefix_scales, tokens, same.astype(np.int64), same / L, free_share, np.concatenate(ssims),
                      np.concatenate(images) if return_images else None,
                      np.concatenate(originals) if return_images else None)


def sscd_cosine(embed: Callable[[np.ndarray], np.ndarray], a_BHW3: np.ndarray, b_BHW3: np.ndarray) -> np.ndarray:
    """Cosine of SSCD embeddings of two [0, 1] image batches, with the published transform
    (resize to 320 x 320, ImageNet mean/std).

    Args:
      embed: float32 (B, 3, 320, 320) normalized images -> (B, D) embeddings (the caller
        wraps the TorchScript file; varjax never imports torch itself).
      a_BHW3, b_BHW3: float (B, H, W, 3) in [0, 1].
    Returns:
      float (B,).
    """
    def prep(x):
        # Upstream: torchvision Resize([320, 320]) on a tensor (bilinear, antialias); here
        # jax.image.resize's linear with antialiasing, which differs in the last digits.
        x = jax.image.resize(jnp.asarray(x, jnp.float32), (x.shape[0], SSCD_SIZE, SSCD_SIZE, 3), "linear")
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        return np.asarray(jnp.transpose(x, (0, 3, 1, 2)))

    ea, eb = np.asarray(embed(prep(a_BHW3)), np.float64), np.asarray(embed(prep(b_BHW3)), np.float64)
    ea /= np.linalg.norm(ea, axis=1, keepdims=True) + 1e-12
    eb /= np.linalg.norm(eb, axis=1, keepdims=True) + 1e-12
    return (ea * eb).sum(axis=1)


def split_scales(tokens_NL: np.ndarray, patch_nums: Sequence[int]) -> list[np.ndarray]:
    """(N, L) concatenated tokens -> K arrays (N, pn^2) (the inverse of np.concatenate(axis=1))."""
    bounds = np.cumsum([0] + [p * p for p in patch_nums])
    if tokens_NL.ndim != 2 or tokens_NL.shape[1] != bounds[-1]:
        raise GenerateError(f"tokens must be (N, {bounds[-1]}), got {tokens_NL.shape}")
    return [tokens_NL[:, bounds[s]:bounds[s + 1]] for s in range(len(patch_nums))]
