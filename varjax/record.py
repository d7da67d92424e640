"""The recording pass: jit-compiled, data-parallel, augmentation-averaged unit activations.

For every sample x and recorded unit u: mu_u(x) = mean over the A augmented views of x of
(the mean over tokens of |activation_u|), the model run teacher-forced as in training (the
study's method, docs/unitmem.md). One compiled step tokenizes the views, builds the
teacher-forcing input, runs the transformer, reduces the sown units and folds them into the
streaming statistics of `varjax.stats`, all on the device; the batch is sharded over every
device of every host, parameters are replicated. By-products of the same forward: per-sample
teacher-forced cross-entropy and top-1 token accuracy, overall and per scale; with
`Options.membership`, on upstream's validation view appended to the views (or the one view
of deterministic mode), the membership scores and the extraction candidates' statistic of
varjax.membership and that view's tokens.

Replaces the study's notebook (forward hooks, one image's 8 views per batch, `.cpu()` per
layer). Shape letters: B images per step, A views, U units, K scales, L tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from varjax import stats as stats_lib
from varjax.errors import RecordError
from varjax.model import Model
from varjax.precision import BF16_MODES, PRECISIONS, matmul_scope
from varjax.errors import ScalingError
from varjax.scaling import UnitScaling, prepare
from varjax.names import UnitLayout
from varjax.names import canonical_sites
from varjax.taps import COLLECTION, UNIT_SITES, TapConfig, collect, scale_means_matrix
from varjax.var import ATTENTION, VAR
from varjax import membership as mia
from varjax.membership import MODES as MEMBERSHIP_MODES
from varjax.xla_options import varjax_jit


# A batch for the step: images uint8 (b, A, H, W, 3), label (b,), sample (b,) (ids), valid
# (b,) (False on padding and unreadable images), skipped [(sample id, reason)] (docs/design.md).
Batch = dict
# (start, batch size, shard index, shard count) -> this host's batches from row `start` of its
# shard. Shards are contiguous (`varjax.data.shard_bounds`), padded to whole batches.
OpenBatches = Callable[[int, int, int, int], Iterable[Batch]]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to record: N samples, in the row order of every output file.

    `open_batches` streams them; build a Plan with `from_views` (any per-row function, e.g.
    in-memory arrays) or `from_samples` (the data layer: folders, tfds, the demo set).
    """

    ids: np.ndarray  # (N,) int: stable sample ids
    labels: np.ndarray  # (N,) int
    splits: np.ndarray  # (N,) int: index into split_names
    split_names: tuple[str, ...]
    open_batches: OpenBatches
    sources: tuple[str, ...] | None = None  # (N,) what names each image (samples.csv, skipped.csv)
    # How the views are made (resize, crop, views, deterministic), for the run's fingerprint:
    # a resumed run must see the same pixels. None: the caller's `load` alone decides.
    view: dict | None = None
    # Which loaded view is upstream's validation view (resize, center crop), the one the
    # membership scores use: 0 in deterministic mode, A when appended after the A random
    # views (then only views < A enter the unit statistics); None: there is none.
    center_view: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_views(cls, ids, labels, splits, split_names, load: Callable[[int], np.ndarray],
                   view_shape: tuple[int, int, int, int], threads: int = 4, on_error: str = "skip",
                   center_view: int | None = None) -> "Plan":
        """`load(row)` gives uint8 `view_shape` (A', H, W, 3) views of row's image, or raises
        (then the row is skipped, or with on_error='stop' the run stops); A' = A, or A + 1
        when `center_view` = A names an appended center view."""
        ids, labels, splits = (np.asarray(a) for a in (ids, labels, splits))
        return cls(ids, labels, splits, tuple(split_names),
                   functools.partial(_row_batches, ids, labels, load, tuple(view_shape), threads, on_error),
                   center_view=center_view)

    @classmethod
    def from_samples(cls, source, samples, augment_config, seed: int, on_error: str = "skip",
                     num_workers: int = 0, threads: int = 4) -> "Plan":
        """Samples selected by `varjax.data.select`, loaded by `varjax.data.make_loader`."""
        from varjax import data

        names = tuple(sp for sp in data.SPLITS if any(s.split == sp for s in samples))

        def open_batches(start, batch_size, shard_index, shard_count):
            loader = data.make_loader(source, samples, batch_size=batch_size, augment_config=augment_config,
                                      seed=seed, num_workers=num_workers, num_threads=threads,
                                      shard_index=shard_index, shard_count=shard_count, start=start,
                                      on_error=on_error)
            seen = 0
            for batch in loader:
                batch["skipped"] = [(s.sample, s.reason) for s in loader.skipped[seen:]]
                seen = len(loader.skipped)
                yield batch

        view = {**dataclasses.asdict(augment_config), "num_views": augment_config.num_views,
                "resize_to": augment_config.resize_to, "crop_seed": seed}
        if not augment_config.center_view:
            del view["center_view"]  # runs without it keep the fingerprint they had
        return cls(np.array([s.sample for s in samples]), np.array([s.label for s in samples]),
                   np.array([names.index(s.split) for s in samples]), names, open_batches,
                   tuple(s.source for s in samples), view, augment_config.center_index)


def _row_batches(ids, labels, load, view_shape, threads, on_error, start, batch_size, shard_index,
                 shard_count):
    """Batches of `load(row)` over this host's contiguous shard, padded, from row `start`."""
    import grain  # here, not at import: benchmarks on a bare accelerator host need no loader

    from varjax.data import DataError, shard_bounds

    lo, hi = shard_bounds(len(ids), shard_index, shard_count)
    per_host = math.ceil(len(ids) / shard_count)
    total = math.ceil(per_host / batch_size) * batch_size  # every host: the same batch count
    n_steps = math.ceil((total - start) / batch_size)

    def build(t: int) -> Batch:
        rows = lo + start + t * batch_size + np.arange(batch_size)
        real = rows < hi
        views = np.zeros((batch_size,) + view_shape, np.uint8)
        valid, skipped = np.zeros(batch_size, bool), []
        for j in np.flatnonzero(real):
            r = int(rows[j])
            try:
                v = load(r)
            except Exception as e:  # noqa: BLE001 - the loader's message names the image
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                if on_error == "stop":
                    raise DataError(f"row {r} (sample {ids[r]}): {why}") from None
                skipped.append((int(ids[r]), why))
                continue
            views[j], valid[j] = v, True
        safe = np.minimum(rows, len(ids) - 1)
        return {"images": views, "label": labels[safe].astype(np.int32),
                "sample": np.where(real, ids[safe], -1), "valid": valid, "skipped": skipped}

    ds = grain.MapDataset.range(max(n_steps, 0)).map(build)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, threads), prefetch_buffer_size=4))


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
    # "einsum" (spelled-out softmax, the parity path), "blocked" (the same by scale groups and
    # one head at a time: the CPU's kernel), "fused" (jax.nn.dot_product_attention, XLA's
    # lowering), "cudnn" (the same through cuDNN's flash kernel: GPU and bf16 only) or "auto"
    # (per backend, varjax/attention.py `resolve`)
    attention: str = "einsum"
    # The recording sites (varjax.names.SITES), kept in canonical order: the study's three by
    # default; `head_nm`, `head` and `resid` are the others the study names.
    sites: tuple[str, ...] = UNIT_SITES
    # Multiply chosen units (varjax.scaling): "weights" edits their incoming weights in
    # memory, "output" their values; None leaves the model as it is on disk.
    unit_scaling: UnitScaling | None = None
    # Membership scores and the extraction candidates' statistic per sample, on the plan's
    # center view (varjax.membership): "none", "conditional" (the conditional logits, no
    # extra forward) or "both" (also conditional minus null-class logits: one more forward
    # of the transformer on the center view).
    membership: str = "none"

    def __post_init__(self):
        for name in ("batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:  # 0 would divide by zero half-way, after the run dir exists
                raise RecordError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise RecordError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.attention not in ATTENTION:
            raise RecordError(f"attention {self.attention!r}: expected one of {', '.join(ATTENTION)}")
        try:
            object.__setattr__(self, "sites", canonical_sites(self.sites))
        except ValueError as e:
            raise RecordError(str(e)) from None
        if not self.sites:
            raise RecordError("record at least one site")
        if self.membership not in MEMBERSHIP_MODES:
            raise RecordError(f"membership {self.membership!r}: expected one of {', '.join(MEMBERSHIP_MODES)}")
        if self.attention == "cudnn" and self.precision not in BF16_MODES:
            raise RecordError(f"attention 'cudnn' runs only with a bf16 precision (cuDNN's fused kernel "
                              f"takes bf16/fp16), not {self.precision!r}")


def unit_layout(model: Model, sites: tuple[str, ...] = UNIT_SITES) -> UnitLayout:
    """The units of `model` recorded at `sites`, in unit-column order (varjax.names)."""
    v = model.config.var
    return UnitLayout.for_var(v.depth, v.embed_dim, v.mlp_dim, v.vocab_size, sites)


_precision = matmul_scope  # the name bench.py and older callers use


def check_backend(opts: Options) -> None:
    """Raises RecordError if `opts` cannot run on this machine's backend (Options checks the rest)."""
    if opts.attention == "cudnn" and jax.default_backend() != "gpu":
        raise RecordError(f"attention 'cudnn' needs an NVIDIA GPU; this backend is {jax.default_backend()!r}")


def check_scaling(model: Model, opts: Options) -> None:
    """Raises RecordError if opts.unit_scaling names a unit this model does not have."""
    if opts.unit_scaling is not None:
        try:
            opts.unit_scaling.check(model.config.var)
        except ScalingError as e:
            raise RecordError(str(e)) from None


def tokenizer(model: Model, precision: str):
    """The VQVAE module that tokenizes in `precision` (run it under `_precision(precision, "vqvae")`)."""
    return model.vqvae.clone(encoder_dtype=jnp.bfloat16) if precision == "bf16_full" else model.vqvae


def total_views(num_views: int, center_view: int | None) -> int:
    """Views per image in a batch: A, plus one when the center view is appended after them."""
    return num_views + (1 if center_view == num_views else 0)


def make_step(model: Model, num_views: int, opts: Options, center_view: int | None = None):
    """The per-step function (un-jitted): views -> per-sample outputs and new statistics.

    The batch holds `total_views(num_views, center_view)` views per image; the unit
    statistics, loss and accuracy average views < num_views; the membership outputs (when
    opts.membership asks) come from view `center_view`.
    """
    check_backend(opts)
    check_scaling(model, opts)
    if opts.membership != "none" and center_view is None:
        raise RecordError("membership scores need upstream's validation view (a center crop): record with "
                          "--deterministic or with the center view appended (AugmentConfig.center_view)")
    cfg = model.config
    pn = cfg.patch_nums
    K = len(pn)
    names = [name for name, *_ in unit_layout(model, opts.sites).segments()]
    reductions = ("mean_abs", "scale_mean_abs") if opts.per_scale else ("mean_abs",)
    var = VAR(cfg.var, TapConfig(sites=opts.sites, reductions=reductions),
              dtype=jnp.bfloat16 if opts.precision in BF16_MODES else jnp.float32, attention=opts.attention)
    vqvae = tokenizer(model, opts.precision)
    scale_mat = jnp.asarray(scale_means_matrix(pn))  # (K, L)

    A = num_views

    def step(params, state, images, labels, ids, splits, valid):
        B, Vw = images.shape[:2]  # Vw = A, or A + 1 with the appended center view
        flat = images.reshape((B * Vw,) + images.shape[2:])
        with _precision(opts.precision, "vqvae"):
            tokens = vqvae.apply({"params": params["vqvae"]}, flat, pn, method=type(vqvae).tokenize)
            x = vqvae.apply({"params": params["vqvae"]}, tokens, pn, method=type(vqvae).var_input)
        lab = jnp.repeat(labels, Vw)
        drop = None
        if opts.class_dropout > 0:
            drop = _dropout_mask(opts.seed, ids, Vw, opts.class_dropout)
            if center_view == A:  # the appended center view keeps its label (membership scores)
                drop = drop.at[:, A].set(False)
            drop = drop.reshape(B * Vw)
        with _precision(opts.precision, "var"):
            var_s, p_var = prepare(var, params["var"], opts.unit_scaling)
            logits, taps = var_s.apply({"params": p_var}, lab, x, drop, mutable=[COLLECTION])
        acts = collect(taps[COLLECTION])
        mu = jnp.concatenate([acts[name] for name in names], axis=-1)  # (B*Vw, U)
        mu = mu.reshape(B, Vw, -1)[:, :A].mean(axis=1)
        scale_mu = None
        if opts.per_scale:
            s_acts = collect(taps[COLLECTION], "scale_mean_abs")
            scale_mu = jnp.concatenate([s_acts[name] for name in names], axis=-1)
            scale_mu = scale_mu.reshape((B, Vw) + scale_mu.shape[1:])[:, :A].mean(axis=1)

        # Teacher-forced cross-entropy and top-1 accuracy per token, then per scale and sample.
        target = jnp.concatenate(tokens, axis=1)  # (B*Vw, L)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        hit = (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)
        per_scale = jnp.stack([nll @ scale_mat.T, hit @ scale_mat.T], 0)  # (2, B*Vw, K)
        per_scale = per_scale.reshape(2, B, Vw, K)[:, :, :A].mean(axis=2)
        overall = jnp.stack([nll.mean(-1), hit.mean(-1)], 0).reshape(2, B, Vw)[:, :, :A].mean(axis=2)

        state = stats_lib.update(state, mu, ids, splits, valid, scale_mu)
        out = {"loss": overall[0], "acc": overall[1], "loss_s": per_scale[0], "acc_s": per_scale[1]}
        if opts.save_activations:
            out["mu"] = mu
        if opts.membership != "none":
            c = center_view
            view = lambda a: a.reshape((B, Vw) + a.shape[1:])[:, c]  # noqa: E731
            out.update(_membership_outputs(var_s, p_var, view(logits), view(target), view(x), labels,
                                           pn[-1] ** 2, opts.membership == "both", null=cfg.var.num_classes,
                                           precision=opts.precision))
        return state, out

    return step


def _membership_outputs(var, params, logits_BLV, target_BL, x_BLC, labels_B, last: int, uncond: bool,
                        null: int, precision: str) -> dict[str, jnp.ndarray]:
    """The center view's per-sample statistics (varjax.membership): the last scale's
    arg-max accuracy, loss and Min-K% from the conditional logits and, with `uncond`, from
    conditional minus null-class logits (the transformer run once more on that view), and the
    true tokens (the zlib ratio and the extraction need them on the host)."""
    out = {"acc_last": mia.last_scale_accuracy(logits_BLV, target_BL, last),
           "cond": mia.device_scores(logits_BLV, target_BL), "tokens": target_BL.astype(jnp.int32)}
    if uncond:
        with _precision(precision, "var"):
            # Upstream (llm_mia.py): the model's forward with every label the null class.
            logits_u, _ = var.apply({"params": params}, jnp.full_like(labels_B, null), x_BLC, None,
                                    mutable=[COLLECTION])
        diff = logits_BLV.astype(jnp.float32) - logits_u.astype(jnp.float32)
        out["diff"] = mia.device_scores(diff, target_BL)
    return out


@dataclasses.dataclass
class CompiledStep:
    """`make_step` compiled for a mesh of every device: call `fn(params, state, *batch)`."""

    fn: Any
    params: Any  # replicated on the mesh
    state: dict  # replicated on the mesh (donated to each call)
    batch_sharding: NamedSharding  # of images, labels, ids, splits, valid (sharded over devices)
    compile_s: float


def compile_step(model: Model, num_views: int, opts: Options, image_shape: tuple[int, int],
                 state: dict, xla_defaults: bool = False, center_view: int | None = None) -> CompiledStep:
    """Jit `make_step` with the batch sharded and parameters and statistics replicated, and
    compile it ahead of time (so compile time is reported apart from steady-state speed).

    Args:
      image_shape: (H, W) of the views; opts.batch_size: images per step over all devices.
      state: host statistics (`varjax.stats.init_state` or a resumed checkpoint).
      xla_defaults: compile with XLA's own CPU kernels, not varjax/xla_options.py's choice.
      center_view: the plan's center view (see make_step).
    """
    mesh = Mesh(np.array(jax.devices()), ("data",))
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = varjax_jit(make_step(model, num_views, opts, center_view), xla_defaults,
                      in_shardings=(repl, repl) + (data,) * 5, out_shardings=(repl, data), donate_argnums=(1,))
    params = jax.device_put(model.params, repl)
    dev_state = jax.device_put(state, repl)
    G, (H, W) = opts.batch_size, image_shape
    views = total_views(num_views, center_view)
    example = (jax.ShapeDtypeStruct((G, views, H, W, 3), jnp.uint8, sharding=data),) + tuple(
        jax.ShapeDtypeStruct((G,), dt, sharding=data) for dt in (jnp.int32, jnp.int32, jnp.int32, bool))
    t0 = time.perf_counter()
    compiled = step.lower(params, dev_state, *example).compile()
    return CompiledStep(compiled, params, dev_state, data, time.perf_counter() - t0)


def _dropout_mask(seed: int, ids, num_views: int, rate: float) -> jnp.ndarray:
    """bool (B, A): whether view a of sample id is run unconditionally."""
    base = jax.random.fold_in(jax.random.key(seed), 0x0D0)

    def one(i, a):
        return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(base, i), a), rate)

    views = jnp.arange(num_views)
    return jax.vmap(lambda i: jax.vmap(lambda a: one(i, a))(views))(ids)
