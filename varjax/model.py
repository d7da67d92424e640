"""The public facade: a converted checkpoint as a model with five calls.

    model = varjax.load("converted/d16")
    tokens = model.tokenize(images_uint8)              # K int32 arrays (B, pn*pn)
    logits, acts = model.teacher_forced(labels, tokens)  # (B, L, V), {'blocks.3.ffn.fc1': (B, 4C)}
    recon = model.decode(tokens)                       # (B, H, W, 3) float32 in [-1, 1]
    tokens = model.generate(labels, cfg=1.5, top_k=900, top_p=0.96, seed=0)  # the sampler

Each call is jit-compiled once per input shape, with varjax's XLA options (varjax/xla_options.py).
Computation follows `jax.default_matmul_precision` at the call site ('highest' for parity, see
tests). The attention kernel is the backend's (`attention="auto"`: `blocked` on a CPU).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from varjax import generate as generate_lib
from varjax.config import ModelConfig
from varjax.scaling import UnitScaling, prepare
from varjax.taps import COLLECTION, TapConfig, collect
from varjax.var import VAR
from varjax.vqvae import VQVAE
from varjax.xla_options import jit


@dataclasses.dataclass
class Model:
    """A VQVAE and/or VAR with their parameters (`params['vqvae']`, `params['var']`)."""

    config: ModelConfig
    params: dict[str, Any]
    taps: TapConfig = TapConfig()
    attention: str = "auto"  # the transformer's attention kernel (varjax/attention.py)
    # Compile with XLA's own CPU kernels instead of varjax's choice (varjax/xla_options.py):
    # the rounding of results computed before that choice existed, bit for bit.
    xla_defaults: bool = False

    def __post_init__(self):
        self.vqvae = VQVAE(self.config.vqvae) if self.config.vqvae is not None else None
        self.var = (VAR(self.config.var, self.taps, attention=self.attention)
                    if self.config.var is not None else None)
        self._placed: tuple | None = None  # (params id, sharding, params on devices)

    def _jit(self, fn):
        return fn.xla_defaults if self.xla_defaults else fn

    def _need(self, part: str):
        if getattr(self, part) is None:
            flag = {"vqvae": "--vae", "var": "--var"}[part]
            raise ValueError(f"this checkpoint has no {part} (convert it with {flag})")

    # -- the VQVAE side -------------------------------------------------------------------
    def tokenize(self, images: np.ndarray) -> list[jnp.ndarray]:
        """uint8 (B, H, W, 3) RGB -> list of K int32 arrays (B, pn*pn), row-major."""
        self._need("vqvae")
        images = jnp.asarray(images)
        if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"tokenize wants uint8 (B, H, W, 3) images, got {images.dtype} {images.shape}")
        return self._jit(_tokenize)(self.vqvae, self.config.patch_nums, self.params["vqvae"], images)

    def var_input(self, tokens: Sequence[jnp.ndarray]) -> jnp.ndarray:
        """Token indices -> the teacher-forcing input (B, L - 1, Cv)."""
        self._need("vqvae")
        return self._jit(_var_input)(self.vqvae, self.config.patch_nums, self.params["vqvae"], tuple(tokens))

    def decode(self, tokens: Sequence[jnp.ndarray]) -> jnp.ndarray:
        """Token indices -> VQVAE reconstruction, float32 (B, H, W, 3) in [-1, 1]."""
        self._need("vqvae")
        return self._jit(_decode)(self.vqvae, self.config.patch_nums, self.params["vqvae"], tuple(tokens))

    # -- the transformer ------------------------------------------------------------------
    def teacher_forced(self, labels, tokens: Sequence[jnp.ndarray], drop=None, reduction: str = "mean_abs",
                       unit_scaling: UnitScaling | None = None):
        """Teacher-forced forward, as in training.

        Args:
          labels: int (B,) in [0, num_classes] (num_classes = the null class).
          tokens: K int arrays (B, pn*pn), from `tokenize`.
          drop: optional bool (B,), class dropout made explicit (default: none dropped).
          reduction: which sown reduction to return (see varjax.taps; the model's TapConfig
            must ask for it).
          unit_scaling: multiply chosen units by factors (varjax.scaling; None: the model as is).
        Returns:
          logits float32 (B, L, V); acts {site: float32 (B, units)}, the per-unit mean over
          tokens of |value| at every recorded site (`blocks.{i}.attn.proj`, `.ffn.fc1`, `.ffn.fc2`).
        """
        self._need("vqvae")
        self._need("var")
        labels = jnp.asarray(labels, jnp.int32)
        x = self.var_input(tokens)
        var, params = prepare(self.var, self.params["var"], unit_scaling)
        logits, taps = self._jit(_teacher_forced)(var, params, labels, x, drop)
        return logits, collect(taps, reduction)

    def generate(self, labels, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                 seed: int = 0, prefix: Sequence[Any] | None = None, return_acts: bool = False, *,
                 return_images: bool = False, unit_scaling: UnitScaling | None = None,
                 sample_ids=None, precision: str | None = None):
        """Sample token maps of the given classes (upstream autoregressive_infer_cfg; the
        compiled sampler of varjax.generate, where every argument is described).

        Args:
          labels: int (B,) in [0, num_classes]; num_classes conditions on the null class.
          cfg, top_k, top_p, more_smooth: upstream's sampling arguments and defaults.
          seed: image i's randomness depends on (seed, sample_ids[i]) only (ids default 0..B-1).
          prefix: k int arrays (B, pn_s^2): scales 0..k-1 forced to these tokens.
          return_acts: also the per-unit mean |value| over the generated tokens (conditional
            rows), named as `teacher_forced`'s acts.
          return_images: also the decoded images (B, H, W, 3) in [-1, 1] (with more_smooth
            the only way to get its smoothed image).
        Returns:
          tokens (K int32 arrays (B, pn^2)); or a tuple (tokens, [images], [acts]) with what
          was asked for, in that order.
        """
        gen = generate_lib.generate(self, labels, generate_lib.Sampling(cfg, top_k, top_p, more_smooth), seed, prefix,
                       sample_ids=sample_ids, return_acts=return_acts, return_images=return_images,
                       unit_scaling=unit_scaling, precision=precision)
        out = (gen.tokens,) + ((gen.images,) if return_images else ()) + ((gen.acts,) if return_acts else ())
        return out[0] if len(out) == 1 else out

    def placed_params(self, sharding) -> dict[str, Any]:
        """`params` put on `sharding` (e.g. replicated over a mesh); kept until params change."""
        if self._placed is None or self._placed[0] is not self.params or self._placed[1] != sharding:
            self._placed = (self.params, sharding, jax.device_put(self.params, sharding))
        return self._placed[2]


# Module objects are hashable dataclasses, so they can be static jit arguments.
@functools.partial(jit, static_argnums=(0, 1))
def _tokenize(vqvae: VQVAE, patch_nums, params, images):
    return vqvae.apply({"params": params}, images, patch_nums, method=VQVAE.tokenize)


@functools.partial(jit, static_argnums=(0, 1))
def _var_input(vqvae: VQVAE, patch_nums, params, tokens):
    return vqvae.apply({"params": params}, tokens, patch_nums, method=VQVAE.var_input)


@functools.partial(jit, static_argnums=(0, 1))
def _decode(vqvae: VQVAE, patch_nums, params, tokens):
    return vqvae.apply({"params": params}, tokens, patch_nums, method=VQVAE.decode)


@functools.partial(jit, static_argnums=(0,))
def _teacher_forced(var: VAR, params, labels, x, drop):
    logits, state = var.apply({"params": params}, labels, x, drop, mutable=[COLLECTION])
    return logits, state.get(COLLECTION, {})


def load(path, taps: TapConfig = TapConfig()) -> Model:
    """A model for a directory written by `python -m convert`."""
    from varjax.checkpoint import load_converted

    config, params = load_converted(path)
    return Model(config, params, taps)


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """The exact parameter tree ({'vqvae': ..., 'var': ...}) as ShapeDtypeStructs."""
    shapes: dict[str, Any] = {}
    H = config.resolution
    key = jax.random.key(0)
    if config.vqvae is not None:
        vqvae = VQVAE(config.vqvae)
        shapes["vqvae"] = jax.eval_shape(lambda: vqvae.init(
            key, jnp.zeros((1, H, H, 3), jnp.uint8), config.patch_nums)["params"])
    if config.var is not None:
        v = config.var
        var = VAR(v)
        shapes["var"] = jax.eval_shape(lambda: var.init(
            key, jnp.zeros((1,), jnp.int32), jnp.zeros((1, v.seq_len - 1, v.z_channels)))["params"])
    return shapes


def init_params(config: ModelConfig, seed: int = 0) -> dict[str, Any]:
    """Random float32 parameters in the converted layout (tests, benchmarks, training).

    Drawn in numpy from the shapes of `param_shapes`: Flax's own init compiles the whole
    VQVAE, which takes tens of seconds on a CPU. Kernels ~ N(0, 1/fan_in), embeddings and
    position tables ~ N(0, 0.02), biases 0, norm scales 1, attention scale_mul = ln 4 (as
    upstream), ada_gss ~ N(0, C^-1/2).
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            return rng.normal(0, np.prod(shape[:-1]) ** -0.5, shape)
        if name in ("embedding", "pos_start", "pos_1LC"):
            return rng.normal(0, 0.02, shape)
        if name == "scale":
            return np.ones(shape)
        if name == "scale_mul_1H11":
            return np.full(shape, np.log(4.0))
        if name == "ada_gss":
            return rng.normal(0, shape[-1] ** -0.5, shape)
        return np.zeros(shape)  # bias, q_bias, v_bias

    return jax.tree_util.tree_map_with_path(lambda p, x: draw(p, x).astype(np.float32), param_shapes(config))
