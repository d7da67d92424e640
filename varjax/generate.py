"""The VAR sampler: all K scales, the key/value cache, CFG, sampling and the f_hat updates in
one jit-compiled, data-parallel function.

Ports upstream `models/var.py` (VAR.autoregressive_infer_cfg) with `models/quant.py`
(get_next_autoregressive_input); the sampling rules are in varjax/sampling.py. What it adds:
a forced prefix (the first k scales' tokens given, as an extraction attack does), the units
recorded during generation (as `teacher_forced` records them), unit scaling
(varjax/scaling.py), and randomness that depends on (seed, sample id) only, so a batch of 2
or 8 on 1 or 4 devices gives the same images.

    gen = generate(model, labels, Sampling(cfg=1.5, top_k=900, top_p=0.96), seed=0)
    gen.tokens      # K int32 arrays (B, pn*pn): decode with model.decode(gen.tokens)

Layout (docs/design.md, "Sampler"): with CFG the transformer runs R = 2B rows, conditional and
null-class rows interleaved (row 2i is sample i, row 2i + 1 its unconditional twin), so each
device holds both halves of its own samples; the cache holds every block's keys and values
for all L positions, preallocated, scale s written at its sequence offset. The K scales are unrolled at
trace time (each has its own token count, so every shape is static).

Shape letters: B images, R transformer rows, L tokens of all scales, l of one scale, V
vocabulary, Cv latent channels, K scales, U units.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from varjax.sampling import cfg_coefficients, draw, filter_logits, guide, gumbel_soft, smooth_params
from varjax.config import ModelConfig
from varjax.errors import GenerateError, ScalingError
from varjax.precision import matmul_scope
from varjax.scaling import UnitScaling, prepare
from varjax.taps import COLLECTION, NO_TAPS, TapConfig, collect
from varjax.var import ATTENTION, CACHE, VAR, scale_begin
from varjax.xla_options import varjax_jit
from varjax.vqvae import VQVAE

PRECISIONS = ("highest", "tf32", "bf16")  # bf16_full only concerns the encoder, unused here


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: upstream's arguments, with its defaults.

    cfg: guidance ratio (0: conditional only); top_k: keep the k largest logits (0: all);
    top_p: keep the nucleus of this mass (0: off); more_smooth: feed the next scale the
    Gumbel-softmax mixture of codebook vectors instead of the drawn one (visualisation only).
    """

    cfg: float = 1.5
    top_k: int = 0
    top_p: float = 0.0
    more_smooth: bool = False

    def __post_init__(self):
        if not math.isfinite(self.cfg):
            raise GenerateError(f"cfg must be a finite number, got {self.cfg}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise GenerateError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise GenerateError(f"top_p must be in [0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class Program:
    """What the compiled sampler computes; one compilation per distinct value (and batch).
    cfg and the top_p value are inputs, so changing them does not recompile."""

    top_k: int = 0
    top_p: bool = False  # whether the top-p rule runs
    more_smooth: bool = False
    guided: bool = True  # CFG on (cfg != 0): the batch is doubled
    acts: bool = False
    images: bool = False
    logits: bool = False  # also return every scale's logits (tests, debugging; large)
    precision: str | None = None  # None: float32 at the caller's jax.default_matmul_precision
    scaling: UnitScaling | None = None
    attention: str = "einsum"  # resolved (program_for): never "auto"
    taps: TapConfig = TapConfig()  # the sites recorded when `acts` (reduction: mean_abs)


@dataclasses.dataclass(frozen=True)
class Generated:
    """The sampler's outputs for B images (the optional ones None unless asked for).

    tokens: K int32 arrays (B, pn^2). images: float32 (B, H, W, 3) in [-1, 1], decoded from
    the sampler's f_hat (which with more_smooth is not the tokens' f_hat). acts: {site:
    float32 (B, U)}, the per-unit mean |value| over all L tokens of the conditional rows.
    logits: float32 (B, L, V), CFG-combined; row_logits: float32 (B, 2, L, V) (conditional,
    unconditional) with CFG, else (B, 1, L, V).
    """

    tokens: list[jnp.ndarray]
    images: jnp.ndarray | None = None
    acts: dict[str, jnp.ndarray] | None = None
    logits: jnp.ndarray | None = None
    row_logits: jnp.ndarray | None = None


def make_sampler(config: ModelConfig, program: Program):
    """The sampler (un-jitted): (params, labels (B,), ids (B,), seed (), coef (K, 2), top_p (),
    prefix (B, L), prefix_len (B,)) -> dict of outputs (see Generated).

    Sample i's scales s < prefix_len[i] take their tokens from prefix[i] (the rest of the row
    is ignored); cfg (as coef, `sampling.cfg_coefficients`), top_p and the prefix are inputs,
    so none of them recompiles."""
    pn = config.patch_nums
    K, hw, null = len(pn), pn[-1], config.var.num_classes
    taps = TapConfig(program.taps.sites, ("mean_abs",), program.taps.blocks) if program.acts else NO_TAPS
    dtype = jnp.bfloat16 if program.precision == "bf16" else jnp.float32
    base_var = VAR(config.var, taps, dtype=dtype, attention=program.attention)
    vqvae = VQVAE(config.vqvae)
    mode = program.precision

    def scope(part: str):
        return matmul_scope(mode, part) if mode is not None else contextlib.nullcontext()

    def quant(params, fn, *args):
        with scope("vqvae"):
            return vqvae.apply({"params": params["vqvae"]}, *args, method=lambda m, *a: fn(m.quantize, *a))

    def sample(params, labels_B, ids_B, seed, coef_K2, top_p, prefix_BL, prefix_len_B):
        var, p_var = prepare(base_var, params["var"], program.scaling)
        B = labels_B.shape[0]
        rows = jnp.stack([labels_B, jnp.full_like(labels_B, null)], 1).reshape(-1) if program.guided else labels_B
        R = rows.shape[0] // B
        key_B = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), ids_B)
        f_hat = jnp.zeros((B, hw, hw, config.vqvae.z_channels), jnp.float32)
        x, cache, acts, tokens, logs, row_logs = None, {}, {}, [], [], []
        for s in range(K):
            with scope("var"):
                logits_RlV, state = var.apply({"params": p_var, CACHE: cache}, rows, x, s,
                                              method=VAR.step, mutable=[CACHE, COLLECTION])
            cache = state[CACHE]
            for site, v in collect(state.get(COLLECTION, {})).items():
                acts[site] = acts.get(site, 0.0) + v.reshape(B, R, -1)[:, 0] * pn[s] ** 2
            both = logits_RlV.reshape((B, R) + logits_RlV.shape[1:])
            logits = guide(both[:, 0], both[:, 1], coef_K2[s]) if program.guided else both[:, 0]
            if program.logits:
                logs.append(logits)
                row_logs.append(both)
            begin = scale_begin(pn, s)
            forced = (s < prefix_len_B, prefix_BL[:, begin:begin + pn[s] ** 2])
            idx, h = _choose(s, logits, key_B, forced, top_p, program, K,
                             lambda i: quant(params, lambda q, j: q.embedding(j), i),
                             lambda: quant(params, lambda q: q.codebook()))
            tokens.append(idx)
            f_hat, nxt = quant(params, lambda q, f, e: q.add_scale(f, e, s, pn), f_hat, h)
            if nxt is not None:  # Upstream: word_embed on B rows, then .repeat(2, 1, 1)
                x = jnp.repeat(nxt, R, axis=0)
        out: dict[str, Any] = {"tokens": tuple(tokens)}
        if program.acts:
            out["acts"] = {k: v / config.var.seq_len for k, v in acts.items()}
        if program.images:
            with scope("vqvae"):
                out["images"] = vqvae.apply({"params": params["vqvae"]}, f_hat, method=VQVAE.decode_fhat)
        if program.logits:
            out["logits"] = jnp.concatenate(logs, axis=1)
            out["row_logits"] = jnp.concatenate(row_logs, axis=2)
        return out

    return sample


def _choose(s, logits_BlV, key_B, forced, top_p, program: Program, K: int, embed, codebook):
    """Scale s's tokens (B, l) and the codebook vectors (B, l, Cv) that feed f_hat.

    forced: (bool (B,), int (B, l)): which samples take the given tokens at this scale (their
    logits were still computed and their keys and values still fill the cache).
    """
    keys = jax.vmap(jax.random.fold_in, (0, None))(key_B, s)
    # Upstream filters in place, so the Gumbel path below sees the filtered logits too.
    logits_BlV = filter_logits(logits_BlV, program.top_k, top_p if program.top_p else None)
    is_forced, given = forced
    idx = jnp.where(is_forced[:, None], given, jax.vmap(draw)(keys, logits_BlV))
    h = embed(idx)
    if program.more_smooth:
        mul, tau = smooth_params(s, K)
        gkeys = jax.vmap(jax.random.fold_in, (0, None))(keys, 1)
        soft = jax.vmap(lambda k, lg: gumbel_soft(k, lg, tau))(gkeys, logits_BlV * mul)
        h = jnp.where(is_forced[:, None, None], h, soft @ codebook())
    return idx, h


@dataclasses.dataclass
class CompiledSampler:
    """`make_sampler` compiled for a batch on a mesh of every device: `fn(params, *inputs)`."""

    fn: Any
    batch: int
    batch_sharding: NamedSharding  # of labels, ids, prefix, prefix_len and every output
    replicated: NamedSharding  # of params, seed, coef, top_p
    compile_s: float


def compile_sampler(model, program: Program, batch: int) -> CompiledSampler:
    """Jit `make_sampler` with the batch sharded over every device and the rest replicated
    (as varjax.record.compile_step), compiled ahead of time so compile time is apart.

    Args:
      model: a varjax.Model with both parts; batch: images per call, a multiple of the devices.
    """
    mesh = Mesh(np.array(jax.devices()), ("data",))
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    # The Dense products on MKL where varjax.cpu_gemm applies: its packed product rounds each
    # row alike whatever the rows beside it, so an image does not depend on the batch size.
    fn = varjax_jit(make_sampler(model.config, program), model.xla_defaults,
                    in_shardings=(repl, data, data, repl, repl, repl, data, data), out_shardings=data)
    pn = model.config.patch_nums
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32, sharding=repl), model.params)
    ints = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data)
    t0 = time.perf_counter()
    compiled = fn.lower(abstract, ints, ints, jax.ShapeDtypeStruct((), jnp.uint32, sharding=repl),
                        jax.ShapeDtypeStruct((len(pn), 2), jnp.float32, sharding=repl),
                        jax.ShapeDtypeStruct((), jnp.float32, sharding=repl),
                        jax.ShapeDtypeStruct((batch, model.config.var.seq_len), jnp.int32, sharding=data),
                        ints).compile()
    return CompiledSampler(compiled, batch, data, repl, time.perf_counter() - t0)


_COMPILED: dict[tuple, CompiledSampler] = {}
_MAX_COMPILED = 8


def compiled_for(model, program: Program, batch: int) -> CompiledSampler:
    """The compiled sampler for `batch` images (padded up to a multiple of the device count),
    compiled on first use and kept (the last few programs)."""
    n = len(jax.devices())
    batch = -(-batch // n) * n
    key = (model.config, program, batch, model.xla_defaults, tuple(jax.devices()), jax.config.jax_default_matmul_precision)
    if key not in _COMPILED:
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = compile_sampler(model, program, batch)
    return _COMPILED[key]


def program_for(model, sampling: Sampling, *, return_acts: bool = False, return_images: bool = False,
                return_logits: bool = False, unit_scaling: UnitScaling | None = None,
                precision: str | None = None, attention: str = "auto") -> Program:
    """The Program `generate` runs for these arguments (checked; GenerateError if unusable)."""
    cfg = model.config
    if model.vqvae is None or model.var is None:
        raise GenerateError("generation needs both the VQVAE and the VAR (convert with --vae and --var)")
    if precision is not None and precision not in PRECISIONS:
        raise GenerateError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if attention not in ATTENTION:
        raise GenerateError(f"attention {attention!r}: expected one of {', '.join(ATTENTION)}")
    if attention == "auto":  # the CPU's chunked kernel there; elsewhere the spelled-out softmax
        attention = "blocked" if jax.default_backend() == "cpu" else "einsum"
    if attention == "cudnn" and (precision != "bf16" or jax.default_backend() != "gpu"):
        raise GenerateError("attention 'cudnn' needs an NVIDIA GPU and precision 'bf16'")
    if unit_scaling is not None:
        try:
            unit_scaling.check(cfg.var)
        except ScalingError as e:
            raise GenerateError(str(e)) from None
    return Program(top_k=int(sampling.top_k), top_p=sampling.top_p > 0, more_smooth=sampling.more_smooth,
                   guided=sampling.cfg != 0, acts=return_acts, images=return_images, logits=return_logits,
                   precision=precision, scaling=unit_scaling, attention=attention, taps=model.taps)


def generate(model, labels, sampling: Sampling = Sampling(), seed: int = 0,
             prefix: Sequence[Any] | None = None, *, sample_ids=None, return_acts: bool = False,
             return_images: bool = False, return_logits: bool = False,
             unit_scaling: UnitScaling | None = None, precision: str | None = None,
             attention: str = "auto") -> Generated:
    """Sample images of the given classes (upstream autoregressive_infer_cfg).

    Args:
      model: a varjax.Model with both parts (VQVAE and VAR).
      labels: int (B,) in [0, num_classes]; num_classes conditions on the null class.
      sampling: cfg, top_k, top_p, more_smooth.
      seed: int in [0, 2^32). Sample i draws from fold_in(key(seed), sample_ids[i]) only.
      prefix: k int arrays (B, pn_s^2), the tokens of scales 0..k-1, forced.
      sample_ids: int (B,) in [0, 2^31) (default 0..B-1): pass each image's index in a larger
        job so that batching never changes an image.
      return_acts / return_images / return_logits: what else to compute (see Generated).
      unit_scaling: multiply chosen units (varjax.scaling), recorded with the run by callers.
      precision: None (float32 at the caller's jax.default_matmul_precision) or one of
        PRECISIONS: "highest", "tf32", "bf16" (transformer in bfloat16; VQVAE in TF32).
      attention: the attention kernel (varjax.var.SelfAttention); "auto": `blocked` on a CPU
        (varjax.attention.cached), `einsum` elsewhere.
    Returns:
      Generated; its arrays hold the B images in order (padding to a multiple of the device
      count is internal).
    """
    cfg = model.config
    program = program_for(model, sampling, return_acts=return_acts, return_images=return_images,
                          return_logits=return_logits, unit_scaling=unit_scaling, precision=precision,
                          attention=attention)
    labels = _int_array(labels, "labels", 1)
    B = len(labels)
    if B == 0 or labels.min() < 0 or labels.max() > cfg.var.num_classes:
        raise GenerateError(f"labels must be a non-empty list of ints in [0, {cfg.var.num_classes}] "
                            f"({cfg.var.num_classes} = the null class)")
    ids = np.arange(B) if sample_ids is None else _int_array(sample_ids, "sample_ids", 1)
    if ids.shape != (B,) or ids.min() < 0 or ids.max() >= 2**31:
        raise GenerateError(f"sample_ids must be {B} ints in [0, 2^31)")
    prefix = _check_prefix(prefix, B, cfg)
    if int(seed) != seed or not 0 <= seed < 2**32:
        raise GenerateError(f"seed must be an integer in [0, 2^32), got {seed}")
    cs = compiled_for(model, program, B)
    pad = cs.batch - B
    out = cs.fn(*sampler_inputs(model, cs, labels, ids, seed, sampling, prefix))
    cut = (lambda a: a[:B]) if pad else (lambda a: a)
    return Generated(
        tokens=[cut(t) for t in out["tokens"]],
        images=cut(out["images"]) if return_images else None,
        acts={k: cut(v) for k, v in out["acts"].items()} if return_acts else None,
        logits=cut(out["logits"]) if return_logits else None,
        row_logits=cut(out["row_logits"]) if return_logits else None)


def sampler_inputs(model, cs: CompiledSampler, labels: np.ndarray, ids: np.ndarray, seed: int,
                   sampling: Sampling, prefix: Sequence[np.ndarray]) -> tuple:
    """`cs.fn`'s arguments, placed on its mesh, for checked inputs (as `generate` checks them):
    B <= cs.batch labels and sample ids (padded with the null class and id 0), the seed, the
    sampling's cfg and top_p, and the prefix's k token arrays (B, pn_s^2)."""
    cfg = model.config
    B, Bp = len(labels), cs.batch
    labels = np.concatenate([labels, np.full(Bp - B, cfg.var.num_classes)]).astype(np.int32)
    ids = np.concatenate([ids, np.zeros(Bp - B, ids.dtype)]).astype(np.int32)
    prefix_len = np.full(Bp, len(prefix), np.int32)
    prefix_BL = np.zeros((Bp, cfg.var.seq_len), np.int32)
    if prefix:
        prefix_BL[:B, :sum(t.shape[1] for t in prefix)] = np.concatenate(prefix, axis=1)
    put = jax.device_put
    return (model.placed_params(cs.replicated), put(labels, cs.batch_sharding), put(ids, cs.batch_sharding),
            put(np.uint32(seed), cs.replicated),
            put(cfg_coefficients(float(sampling.cfg), len(cfg.patch_nums)), cs.replicated),
            put(np.float32(sampling.top_p), cs.replicated), put(prefix_BL, cs.batch_sharding),
            put(prefix_len, cs.batch_sharding))


def _int_array(x, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != ndim or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise GenerateError(f"{name} must be a {ndim}-D array of ints, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def _check_prefix(prefix, B: int, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    if prefix is None:
        return ()
    pn, V = cfg.patch_nums, cfg.var.vocab_size
    if len(prefix) > len(pn):
        raise GenerateError(f"prefix has {len(prefix)} scales; the model has {len(pn)}")
    out = []
    for s, t in enumerate(prefix):
        a = _int_array(t, f"prefix[{s}]", 2)
        if a.shape != (B, pn[s] ** 2):
            raise GenerateError(f"prefix[{s}] must have shape ({B}, {pn[s] ** 2}), got {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= V):
            raise GenerateError(f"prefix[{s}] holds tokens outside [0, {V})")
        out.append(a)
    return tuple(out)
