"""The recording pass: jit-compiled, data-parallel, augmentation-averaged unit activations.

For every sample x and recorded unit u: mu_u(x) = mean over the A augmented views of x of
(the mean over tokens of |activation_u|), the model run teacher-forced as in training (the
study's method, shared/spec/unitmem.md). One compiled step tokenizes the views, builds the
teacher-forcing input, runs the transformer, reduces the sown units and folds them into the
streaming statistics of `varjax.stats`, all on the device; the batch is sharded over every
device of every host, parameters are replicated. By-products of the same forward: per-sample
teacher-forced cross-entropy and top-1 token accuracy, overall and per scale.

Replaces the study's notebook (forward hooks, one image's 8 views per batch, `.cpu()` per
layer). Shape letters: B images per step, A views, U units, K scales, L tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from varjax import stats as stats_lib
from varjax.model import Model
from varjax.taps import COLLECTION, UNIT_SITES, TapConfig, collect, scale_means_matrix
from varjax.var import VAR

PRECISIONS = ("highest", "tf32", "bf16")


class RecordError(RuntimeError):
    """A problem with the run's inputs or its directory; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to record: N rows, in the row order of every output file.

    `load(row)` returns the A views of that row's image, uint8 (A, H, W, 3), or None when
    the image cannot be read (the row is then skipped and listed in `skipped.csv`).
    """

    ids: np.ndarray  # (N,) int: stable sample ids
    labels: np.ndarray  # (N,) int
    splits: np.ndarray  # (N,) int: index into split_names
    split_names: tuple[str, ...]
    load: Callable[[int], np.ndarray | None]

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class Options:
    batch_size: int = 8  # images per step, over all devices and hosts (x A views each)
    precision: str = "highest"
    save_activations: bool = False
    per_scale: bool = False
    # Upstream drops the label to the null class at random (rate 0.1) on every forward; the
    # study ran with it on. Here it is off unless asked, and then drawn from (seed, sample
    # id, view index) alone, so a rerun or another batching drops the same views.
    class_dropout: float = 0.0
    seed: int = 0
    checkpoint_every: int = 20  # steps between progress saves
    skip_bad_images: bool = True  # else an unreadable image stops the run
    loader_threads: int = 4


def unit_layout(model: Model) -> list[tuple[str, int, str, int]]:
    """[(site name, block, site kind, units)] in unit-column order (docs/design.md)."""
    v = model.config.var
    size = {"attn.proj": v.embed_dim, "ffn.fc1": v.mlp_dim, "ffn.fc2": v.embed_dim}
    return [(f"blocks.{b}.{s}", b, s, size[s]) for b in range(v.depth) for s in UNIT_SITES]


@contextlib.contextmanager
def _precision(mode: str, part: str):
    # highest: float32 everywhere (parity); tf32: TF32 matmuls and convs; bf16: transformer in
    # bfloat16 (its matmuls in bf16), tokenizer float32 with TF32 (upstream's training setup).
    if mode == "highest":
        p = "highest"
    elif mode == "tf32" or part == "vqvae":
        p = "tensorfloat32"
    else:
        p = "default"
    with jax.default_matmul_precision(p):
        yield


def make_step(model: Model, num_views: int, opts: Options):
    """The per-step function (un-jitted): views -> per-sample outputs and new statistics."""
    cfg = model.config
    pn = cfg.patch_nums
    K = len(pn)
    layout = unit_layout(model)
    reductions = ("mean_abs", "scale_mean_abs") if opts.per_scale else ("mean_abs",)
    var = VAR(cfg.var, TapConfig(sites=UNIT_SITES, reductions=reductions),
              dtype=jnp.bfloat16 if opts.precision == "bf16" else jnp.float32)
    vqvae = model.vqvae
    scale_mat = jnp.asarray(scale_means_matrix(pn))  # (K, L)

    def step(params, state, images, labels, ids, splits, valid):
        B, A = images.shape[:2]
        flat = images.reshape((B * A,) + images.shape[2:])
        with _precision(opts.precision, "vqvae"):
            tokens = vqvae.apply({"params": params["vqvae"]}, flat, pn, method=type(vqvae).tokenize)
            x = vqvae.apply({"params": params["vqvae"]}, tokens, pn, method=type(vqvae).var_input)
        lab = jnp.repeat(labels, A)
        drop = None
        if opts.class_dropout > 0:
            drop = _dropout_mask(opts.seed, ids, A, opts.class_dropout).reshape(B * A)
        with _precision(opts.precision, "var"):
            logits, taps = var.apply({"params": params["var"]}, lab, x, drop, mutable=[COLLECTION])
        acts = collect(taps[COLLECTION])
        mu = jnp.concatenate([acts[name] for name, *_ in layout], axis=-1)  # (B*A, U)
        mu = mu.reshape(B, A, -1).mean(axis=1)
        scale_mu = None
        if opts.per_scale:
            s_acts = collect(taps[COLLECTION], "scale_mean_abs")
            scale_mu = jnp.concatenate([s_acts[name] for name, *_ in layout], axis=-1)
            scale_mu = scale_mu.reshape((B, A) + scale_mu.shape[1:]).mean(axis=1)

        # Teacher-forced cross-entropy and top-1 accuracy per token, then per scale and sample.
        target = jnp.concatenate(tokens, axis=1)  # (B*A, L)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        hit = (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)
        per_scale = jnp.stack([nll @ scale_mat.T, hit @ scale_mat.T], 0)  # (2, B*A, K)
        per_scale = per_scale.reshape(2, B, A, K).mean(axis=2)
        overall = jnp.stack([nll.mean(-1), hit.mean(-1)], 0).reshape(2, B, A).mean(axis=2)

        state = stats_lib.update(state, mu, ids, splits, valid, scale_mu)
        out = {"loss": overall[0], "acc": overall[1], "loss_s": per_scale[0], "acc_s": per_scale[1]}
        if opts.save_activations:
            out["mu"] = mu
        return state, out

    return step


def _dropout_mask(seed: int, ids, num_views: int, rate: float) -> jnp.ndarray:
    """bool (B, A): whether view a of sample id is run unconditionally."""
    base = jax.random.fold_in(jax.random.key(seed), 0x0D0)

    def one(i, a):
        return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(base, i), a), rate)

    views = jnp.arange(num_views)
    return jax.vmap(lambda i: jax.vmap(lambda a: one(i, a))(views))(ids)
