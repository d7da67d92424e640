"""Training the small VAR of the planted-memorization experiment (upstream's loss and recipe).

The model: a 4-block, width-64 VAR over a 4-scale pyramid (1, 2, 3, 4) at 64 px, vocabulary
256, on the `planted` image set (varjax/data/planted.py): 4 classes, one canary per class
duplicated 4, 16 and 64 times, 160 singletons seen once per epoch, 64 held-out images never
trained on. The loss is upstream's (`trainer.py`): teacher-forced next-scale cross-entropy,
the mean over all L tokens, with class dropout at rate 0.1 (`drop_B`), AdamW and gradient
clipping; the views are the study's random crops (resize the shorter side to 72 with Lanczos,
random 64 x 64 crop), the same pixels the recording pass sees.

The tokenizer is a FIXED RANDOM VQVAE (never trained): UnitMem is measured on the
transformer, and all it needs from the tokenizer is a deterministic map from pixels to token
pyramids; a VQVAE trained for a few CPU minutes would only add a second, unplanted source of
memorization (its codebook would be fitted to the canaries too). Its codebook is drawn at
about half the latents' scale so that each scale's quantization removes part of the residual
(with the default 0.02 codebook every scale would quantize the same latent). Decoding its
tokens gives no recognisable image; nothing in the experiment decodes.

Reproducible from the seed when XLA runs single-threaded (experiments/train_planted.py sets
that up before jax is imported): batches, crops and dropout come from numpy generators
seeded by the config's seed, and `params_sha256` fingerprints the weights bit for bit.

Shape letters (varjax.names): N images, L tokens, Cv latent channels; P crop positions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varjax.checkpoint import write_converted
from varjax.config import ModelConfig, VARConfig, VQVAEConfig
from varjax.data import AugmentConfig, select
from varjax.data.augment import center_offsets, decode_rgb, resize_shorter
from varjax.data.planted import PlantedSource, parse_role, training_list
from varjax.model import Model, init_params
from varjax.runfiles import atomic_path, atomic_write_text
from varjax.taps import NO_TAPS
from varjax.var import VAR

PATCH_NUMS = (1, 2, 3, 4)
RESOLUTION = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # init, batch order, crops, class dropout
    data_seed: int = 0  # the planted set (images and roles); run.py opens seed 0
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3  # Upstream: tblr 1e-4 * bs / 256; far too slow for a few CPU minutes
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 2.0
    class_dropout: float = 0.1  # upstream cond_drop_rate
    depth: int = 4
    width: int = 64
    heads: int = 1
    vocab: int = 256
    codebook_std: float = 0.2  # the latents' RMS is ~0.45 (see the module docstring)
    eval_every: int = 100


def model_config(tc: TrainConfig) -> ModelConfig:
    """The architecture: upstream's, small in every dimension (ch_mult all 1 keeps the VQVAE ~0.5M)."""
    vq = VQVAEConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=8, vocab_size=tc.vocab)
    var = VARConfig(depth=tc.depth, embed_dim=tc.width, num_heads=tc.heads, num_classes=4,
                    vocab_size=tc.vocab, z_channels=8, patch_nums=PATCH_NUMS)
    return ModelConfig(patch_nums=PATCH_NUMS, vqvae=vq, var=var)


def init_model(cfg: ModelConfig, tc: TrainConfig) -> dict:
    """Random VQVAE (codebook ~ N(0, codebook_std)) and VAR with upstream's `init_weights`.

    Upstream (var.py init_weights, train.py defaults): Linear and Embedding ~ N(0, 1/(3C))
    (init_std=-1), pos tables likewise; head x 0.02 (init_head); head_nm.ada_lin x 0.5
    (init_adaln); per block attn.proj and ffn.fc2 / sqrt(2 depth); ada_lin rows of the scales
    and shifts x 0.5, of the gammas x 1e-5 (init_adaln_gamma), so every block starts near
    the identity. Biases 0. (torch's trunc_normal_ cuts at +-2 absolute: no cut at this std.)
    """
    params = init_params(cfg, tc.seed)  # shapes, norms, scale_mul = ln 4, zero biases
    rng = np.random.default_rng([tc.seed, 0xC0DE])
    params["vqvae"]["quantize"]["embedding"]["embedding"] = rng.normal(
        0, tc.codebook_std, params["vqvae"]["quantize"]["embedding"]["embedding"].shape).astype(np.float32)
    C, std = cfg.var.embed_dim, (1 / cfg.var.embed_dim / 3) ** 0.5

    def var_leaf(path, leaf):
        names = [p.key for p in path]
        parent = names[-2] if len(names) > 1 else ""
        if names[-1] in ("kernel", "embedding", "pos_start", "pos_1LC"):
            w = rng.normal(0, std, leaf.shape)
            if names[0] == "head":
                w *= 0.02
            elif names[0] == "head_nm":
                w *= 0.5
            elif parent in ("proj", "fc2"):
                w /= np.sqrt(2 * cfg.var.depth)
            elif parent == "ada_lin_1":
                w[:, :2 * C] *= 1e-5  # output columns gamma1, gamma2 (flax kernels are (in, out))
                w[:, 2 * C:] *= 0.5
            return w.astype(np.float32)
        return np.asarray(leaf)

    params["var"] = jax.tree_util.tree_map_with_path(var_leaf, params["var"])
    return params


def tree_sha256(tree) -> str:
    """sha256 over every leaf's path, shape and float32 bytes, in sorted path order."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda t: jax.tree_util.keystr(t[0])):
        a = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class _Progress:
    """One line every few seconds to stderr: done/total, rate, ETA, and a message."""

    def __init__(self, what: str, total: int, unit: str, every_s: float = 5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every_s
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int, msg: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        print(f"[{self.what}] {done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%)  "
              f"{rate:.1f} {self.unit}/s  ETA {eta:.0f}s  {msg}", file=sys.stderr, flush=True)


def crop_bank(model: Model, source: PlantedSource, samples: list, aug: AugmentConfig,
              every_crop: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and teacher-forcing inputs of every random-crop position (or the center crop).

    Decoding and resizing are the data layer's (`varjax.data.augment`), so these are the
    pixels the recording pass crops from. A random crop picks top and left uniformly, so
    sampling a position uniformly from this bank is the same distribution.

    Returns:
      tokens int32 (N, P, L) and x float32 (N, P, L - 1, Cv), P crop positions per image
      (all (top, left) in row-major order, or 1: the center crop).
    """
    read, S = source.reader(), aug.resolution
    out_t, out_x = [], []
    progress = _Progress("tokenize", len(samples), "images")
    for n, s in enumerate(samples):
        pixels = np.asarray(resize_shorter(decode_rgb(read(s.locator)), aug.resize_to))
        H, W, _ = pixels.shape
        if every_crop:
            offsets = [(t, l) for t in range(H - S + 1) for l in range(W - S + 1)]
        else:
            offsets = [center_offsets(H, W, S)]
        views = np.stack([pixels[t:t + S, l:l + S] for t, l in offsets])
        tokens = model.tokenize(views)
        out_t.append(np.concatenate([np.asarray(t) for t in tokens], axis=1))
        out_x.append(np.asarray(model.var_input(tokens)))
        progress.update(n + 1)
    return np.stack(out_t), np.stack(out_x)


def _nll(var: VAR, params, label, x, target, drop):
    logits = var.apply({"params": params}, label, x, drop)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]  # (B, L)


def make_optimizer(tc: TrainConfig, params) -> optax.GradientTransformation:
    """AdamW, linear warmup then linear decay to 0 (upstream's 'lin0'), global-norm clipping.

    Upstream's no-weight-decay list: biases, pos_start, pos_1LC, lvl_embed, scale_mul, gammas;
    here decay applies to kernels and the class embedding only.
    """
    sched = optax.join_schedules([optax.linear_schedule(0.0, tc.lr, tc.warmup_steps),
                                  optax.linear_schedule(tc.lr, 0.0, tc.steps - tc.warmup_steps)],
                                 [tc.warmup_steps])
    decay = jax.tree_util.tree_map_with_path(
        lambda p, _: p[-1].key == "kernel" or p[0].key == "class_emb", params)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                       optax.adamw(sched, b1=tc.betas[0], b2=tc.betas[1], weight_decay=tc.weight_decay,
                                   mask=decay))


def make_train_step(var: VAR, opt: optax.GradientTransformation):
    """One jit-compiled AdamW step on the mean token cross-entropy (upstream's loss)."""

    def loss_fn(params, label, x, target, drop):
        return _nll(var, params, label, x, target, drop).mean()

    @jax.jit
    def step(params, opt_state, label, x, target, drop):
        loss, grads = jax.value_and_grad(loss_fn)(params, label, x, target, drop)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train(tc: TrainConfig, log=print) -> tuple[ModelConfig, dict, dict]:
    """Builds the set, trains, and returns (config, params, info for planted.json)."""
    t_start = time.perf_counter()
    cfg = model_config(tc)
    params = init_model(cfg, tc)
    # XLA's own CPU kernels for the crop bank: the shipped weights were trained on tokens
    # computed with them; varjax's kernel choice (varjax/xla_options.py) rounds differently
    # and flips 3 of the crop bank's 417,960 tokens, which would change every trained weight.
    model = Model(cfg, params, xla_defaults=True)
    source = PlantedSource(tc.data_seed)
    samples = select(source)
    members = [s for s in samples if s.split == "train"]
    aug = AugmentConfig(resolution=RESOLUTION)  # the study's random crops (mid_reso 1.125)
    log(f"tokenizing every crop of {len(members)} member images (the fixed random VQVAE)")
    tokens, xs = crop_bank(model, source, members, aug, every_crop=True)
    n_pos = tokens.shape[1]
    # The training set: member index per entry, each canary `dup` times (training_list's rule).
    row = {s.sample: i for i, s in enumerate(members)}
    entries = np.array([row[s.sample] for s in training_list(source, members)])
    labels = np.array([s.label for s in members], np.int32)
    log(f"training set: {len(entries)} entries ({len(members)} distinct images), {n_pos} crops each")

    # Monitoring set: center crops of every image, grouped by role and duplication count.
    t_center, x_center = crop_bank(model, source, samples, aug, every_crop=False)
    roles = [parse_role(s.source) for s in samples]
    groups = {name: np.array([i for i, r in enumerate(roles) if pick(r)]) for name, pick in
              [(f"canary dup{d}", lambda r, d=d: r.kind == "canary" and r.dup == d) for d in source.duplicates]
              + [("single", lambda r: r.kind == "single"), ("heldout", lambda r: r.kind == "heldout")]}
    all_labels = np.array([s.label for s in samples], np.int32)

    var = VAR(cfg.var, NO_TAPS)
    opt = make_optimizer(tc, params["var"])
    p_var = jax.tree.map(jnp.asarray, params["var"])
    opt_state = opt.init(p_var)
    step = make_train_step(var, opt)
    evaluate = jax.jit(lambda p, lab, x, t: _nll(var, p, lab, x, t, None).mean(-1))

    def eval_groups(p) -> dict[str, float]:
        per = np.asarray(evaluate(p, all_labels, x_center[:, 0], t_center[:, 0]))
        return {g: float(per[ix].mean()) for g, ix in groups.items()}

    rng = np.random.default_rng([tc.seed, 0x7EA1])
    order = np.empty(0, np.int64)
    history = {"step": [], "loss": [], "eval_step": [], "eval": []}
    progress = _Progress("train", tc.steps, "steps")
    t_train = time.perf_counter()
    ema = None
    for t in range(tc.steps):
        if len(order) < tc.batch_size:  # epochs: a fresh permutation of the entries each time
            order = np.concatenate([order, rng.permutation(entries)])
        idx, order = order[:tc.batch_size], order[tc.batch_size:]
        pos = rng.integers(0, n_pos, tc.batch_size)
        drop = rng.random(tc.batch_size) < tc.class_dropout
        p_var, opt_state, loss = step(p_var, opt_state, labels[idx], xs[idx, pos], tokens[idx, pos], drop)
        loss = float(loss)
        history["step"].append(t + 1)
        history["loss"].append(loss)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        if (t + 1) % tc.eval_every == 0 or t + 1 == tc.steps:
            history["eval_step"].append(t + 1)
            history["eval"].append(eval_groups(p_var))
        progress.update(t + 1, f"loss {ema:.3f}", force=t + 1 == tc.steps)
    train_s = time.perf_counter() - t_train
    params["var"] = jax.tree.map(lambda a: np.asarray(a, np.float32), p_var)
    final = history["eval"][-1]
    info = {
        "data": source.describe(),
        "members": len(members), "training_entries": int(len(entries)),
        "model": {"depth": tc.depth, "width": tc.width, "heads": tc.heads, "vocab": tc.vocab,
                  "patch_nums": list(PATCH_NUMS), "resolution": RESOLUTION,
                  "var_params": int(sum(a.size for a in jax.tree.leaves(params["var"]))),
                  "vqvae_params": int(sum(a.size for a in jax.tree.leaves(params["vqvae"])))},
        "tokenizer": f"fixed random VQVAE (init seed {tc.seed}, codebook ~ N(0, {tc.codebook_std})), "
                     "never trained",
        "augmentation": f"random {RESOLUTION}px crops after a Lanczos resize of the shorter side to "
                        f"{aug.resize_to} (the study's, mid_reso {aug.mid_reso})",
        "training": {**dataclasses.asdict(tc), "epochs": round(tc.steps * tc.batch_size / len(entries), 1),
                     "final_loss": float(np.mean(history["loss"][-100:])),
                     "train_seconds": round(train_s, 1),
                     "total_seconds": round(time.perf_counter() - t_start, 1),
                     "steps_per_second": round(tc.steps / train_s, 2)},
        "center_crop_loss": final,
        "params_sha256": tree_sha256(params),
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "optax": optax.__version__,
                     "numpy": np.__version__},
    }
    return cfg, params, {"info": info, "history": history}


def plot_curves(history: dict, path: Path) -> None:
    """Training loss (raw and smoothed) and center-crop loss per role over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    loss = np.array(history["loss"])
    k = min(50, len(loss))
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax[0].plot(history["step"], loss, lw=0.4, alpha=0.4, color="C0", label="batch")
    ax[0].plot(history["step"][k - 1:], smooth, color="C0", label=f"mean of {k}")
    ax[0].set(xlabel="step", ylabel="cross-entropy (nats/token)", title="training loss (with class dropout)")
    ax[0].legend()
    names = list(history["eval"][0])
    for i, g in enumerate(names):
        ax[1].plot(history["eval_step"], [e[g] for e in history["eval"]], label=g, color=f"C{i}")
    ax[1].set(xlabel="step", ylabel="cross-entropy (nats/token)", title="center-crop loss by role")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def save(out: Path, cfg: ModelConfig, params: dict, result: dict, command: str, force: bool) -> None:
    """The converted checkpoint, then planted.json and loss_curve.png beside it."""
    info = {**result["info"], "command": command}
    manifest = {"created_by": "experiments/train_planted.py", "command": command,
                "config": dataclasses.asdict(cfg), "params_sha256": info["params_sha256"],
                "num_params": info["model"]["var_params"] + info["model"]["vqvae_params"],
                "versions": info["versions"]}
    write_converted(out, cfg, params, manifest, force=force)
    plot_curves(result["history"], out / "loss_curve.png")
    atomic_write_text(out / "planted.json", json.dumps(info, indent=1) + "\n")
