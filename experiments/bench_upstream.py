"""varjax and upstream's PyTorch code side by side: the same weights, images and calls, timed.

Builds one model preset (default VAR-d16 + the released VQVAE shape) with random weights
(`varjax.model.init_params`), copies the same weights into upstream's PyTorch modules (the
converter's key rule, run backwards), and times the two calls a user makes, interleaved in
one process so both see the same machine load, the order reversed every other repetition
(`--fixed-order`: upstream first every time, as before 2026-12-02):

- tokenize: uint8 images -> the K token maps (upstream `VQVAE.img_to_idxBl`);
- teacher_forced: tokens -> teacher-forcing input -> logits and the 48 recorded unit vectors
  (upstream `idxBl_to_var_input` + `VAR.forward` with the study's forward hooks: |output|,
  tanh-GELU first on fc1, mean over tokens, on `blocks.{i}.attn.proj`, `.ffn.fc1`, `.ffn.fc2`).

    python experiments/bench_upstream.py --upstream /path/to/VAR              # d16, 2 images
    python experiments/bench_upstream.py --upstream /path/to/VAR --config tiny --images 4

`--upstream` is a checkout of FoundationVision/VAR; nothing of it is copied, its `models`
package is imported from there. Prints one JSON line per call (and one for both) with min and
median wall seconds over `--reps` repetitions (after one warm-up each), the least CPU seconds
this process used for it (steadier than wall time on a shared machine; both libraries use
one thread per core), the ratios upstream / varjax (> 1: varjax is faster): of the best
times, of the medians, and per repetition (`ratio_paired_gmean` with its 95% interval
`ratio_paired_ci95`: each repetition times both side by side, so its ratio is free of the
machine's slower drifts; see `paired_ratio`), and per varjax variant a check that it
computed what upstream did (identical tokens, logits and unit differences), so a fast wrong
answer cannot pass for a speed-up. `--xla-defaults` adds varjax compiled with XLA's default
CPU kernels and the einsum attention (the settings before varjax/xla_options.py and
varjax/attention.py). varjax runs float32 at
`jax.default_matmul_precision('highest')`, the parity setting; torch uses its CPU defaults
(float32, `torch.get_num_threads()` threads) under `torch.inference_mode()`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np

from varjax import config as config_lib
from varjax import cpu_gemm
from varjax.model import Model, init_params
from varjax.taps import UNIT_SITES

CALLS = ("tokenize", "teacher_forced")


class BenchError(RuntimeError):
    """A problem with the arguments or the upstream checkout; the message is one line."""


def import_upstream(path: Path):
    """Upstream's `models` package (VQVAE, VAR) imported from a checkout at `path`."""
    if not (path / "models" / "var.py").is_file() or not (path / "dist.py").is_file():
        raise BenchError(f"--upstream {path}: not a FoundationVision/VAR checkout (no models/var.py, dist.py)")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        # Upstream's var.py imports one mixin class from huggingface_hub for its hub wrapper
        # (VARHF), which this benchmark never builds; an empty stand-in is enough.
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stub
    sys.path.insert(0, str(path))
    import models

    return models


def build_upstream(models, cfg: config_lib.ModelConfig, params: dict):
    """Upstream VQVAE + VAR for `cfg`, holding `params` (varjax layout) as torch tensors."""
    import torch

    from convert.mapping import entry, is_ignored

    q, v = cfg.vqvae, cfg.var
    if q.ch_mult != (1, 1, 2, 2, 4) or q.num_res_blocks != 2 or not (q.using_sa and q.using_mid_sa):
        raise BenchError("upstream's VQVAE has a fixed ch_mult (1, 1, 2, 2, 4), 2 blocks and attention; "
                         "this preset differs")
    vae = models.VQVAE(vocab_size=q.vocab_size, z_channels=q.z_channels, ch=q.ch, test_mode=True,
                       share_quant_resi=q.share_quant_resi, quant_resi=q.quant_resi, v_patch_nums=cfg.patch_nums)
    var = models.VAR(vae, num_classes=v.num_classes, depth=v.depth, embed_dim=v.embed_dim,
                     num_heads=v.num_heads, mlp_ratio=v.mlp_ratio, norm_eps=v.norm_eps,
                     shared_aln=v.shared_aln, cond_drop_rate=0.0, attn_l2_norm=v.attn_l2_norm,
                     patch_nums=cfg.patch_nums, flash_if_available=False, fused_if_available=False)
    for module, tree in ((vae, params["vqvae"]), (var, params["var"])):
        with torch.no_grad():
            for key, tensor in module.state_dict().items():
                if is_ignored(key):
                    continue  # buffers upstream computes in its constructor
                e = entry(key, tensor.ndim)
                leaf = tree
                for part in e.path:
                    leaf = leaf[part]
                arr = np.asarray(leaf)
                if e.axes:
                    arr = arr.transpose(np.argsort(e.axes))  # the converter's permutation, inverted
                if tuple(arr.shape) != tuple(tensor.shape):
                    raise BenchError(f"{key}: varjax shape {arr.shape} != upstream {tuple(tensor.shape)}")
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(arr)))
    vae.eval()
    var.eval()
    return vae, var


def study_hooks(var, depth: int) -> dict:
    """The study's forward hooks on the 3 x depth unit sites; returns the dict they fill."""
    import torch.nn.functional as F

    acts: dict = {}

    def hook(name: str, gelu: bool):
        def fn(_module, _inp, out):
            x = F.gelu(out, approximate="tanh") if gelu else out
            acts[name] = x.abs().mean(dim=1)
        return fn

    for i in range(depth):
        b = var.blocks[i]
        for site, mod in zip(UNIT_SITES, (b.attn.proj, b.ffn.fc1, b.ffn.fc2)):
            mod.register_forward_hook(hook(f"blocks.{i}.{site}", site == "ffn.fc1"))
    return acts


def _timed(fn) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, result) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def upstream_calls(vae, var, acts: dict, images: np.ndarray, labels: np.ndarray):
    """(tokenize(), teacher_forced(tokens)) on upstream's modules: torch tensors out."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    lab = torch.from_numpy(labels.astype(np.int64))

    def tokenize():
        with torch.inference_mode():
            return vae.img_to_idxBl(x.float() / 127.5 - 1.0)

    def teacher_forced(idx):
        with torch.inference_mode():
            logits = var(lab, vae.quantize.idxBl_to_var_input(idx))
            return logits, dict(acts)

    return tokenize, teacher_forced


def varjax_calls(model: Model, images: np.ndarray, labels: np.ndarray, xla_defaults: bool = False):
    """(tokenize(), teacher_forced(tokens)) through the public API; with `xla_defaults`, the same
    functions compiled with plain jax.jit (XLA's default CPU kernels) and the einsum attention:
    the settings before varjax/xla_options.py and the `blocked` kernel existed."""
    if xla_defaults:
        model = Model(model.config, model.params, attention="einsum", xla_defaults=True)
    return (lambda: jax.block_until_ready(model.tokenize(images)),
            lambda tokens: jax.block_until_ready(model.teacher_forced(labels, tokens)))


def paired_ratio(ref_s, other_s, confidence: float = 0.95) -> dict:
    """The speed ratio ref / other with its uncertainty, from repetitions timed side by side.

    Each repetition times both contenders within seconds of each other, so its own ratio
    ref_s[i] / other_s[i] is free of the machine's slower drifts (another job starting or
    ending, the CPU's clock), which move the best-of-n and median ratios. Returns
    `paired_gmean`, the geometric mean of the per-repetition ratios; `paired_ci95`, its
    `confidence` interval (Student's t on the log ratios; None with one repetition); and
    `paired_share_ge_1`, the share of repetitions in which `other` was at least as fast.
    The interval covers the noise within one run: separate runs of the same code on this
    project's machine gave intervals that did not overlap, so a claim needs several runs.
    """
    from scipy import stats as sps

    if len(ref_s) != len(other_s) or not len(ref_s):
        raise ValueError("paired_ratio: ref_s and other_s need the same, non-zero number of repetitions")
    logs = np.log(np.asarray(ref_s, np.float64) / np.asarray(other_s, np.float64))
    out = {"paired_gmean": round(float(np.exp(logs.mean())), 4), "paired_ci95": None,
           "paired_share_ge_1": round(float(np.mean(logs >= 0)), 3)}
    if len(logs) > 1:
        half = sps.t.ppf(0.5 + confidence / 2, len(logs) - 1) * logs.std(ddof=1) / np.sqrt(len(logs))
        out["paired_ci95"] = [round(float(np.exp(logs.mean() - half)), 4), round(float(np.exp(logs.mean() + half)), 4)]
    return out


def compare(contenders: dict, images: np.ndarray, reps: int, fixed_order: bool = False) -> list[dict]:
    """Times every contender's two calls, interleaved, in alternating order; returns one row
    per call (and both).

    contenders: name -> (tokenize(), teacher_forced(tokens)); the first is the reference
    of the ratios (ratio > 1: the other is faster). The last outputs are kept in `outputs`.
    """
    times = {(who, call): [] for who in contenders for call in CALLS}
    cpu = {(who, call): [] for who in contenders for call in CALLS}
    outputs = {}
    for rep in range(reps + 1):  # rep 0 warms up (compiles varjax, allocates torch)
        # Every other repetition in reverse order, so that each contender's calls follow each
        # other contender's equally often: what ran just before a call can change its time (in
        # the fixed order upstream's tokenize always follows varjax's teacher forcing, which
        # runs MKL, and was sometimes faster there; compare with --fixed-order).
        order = list(contenders.items())
        for who, (tok, tf) in (order[::-1] if rep % 2 and not fixed_order else order):
            t_tok, c_tok, tokens = _timed(tok)
            t_tf, c_tf, out = _timed(lambda: tf(tokens))
            if rep:
                for call, t, c in (("tokenize", t_tok, c_tok), ("teacher_forced", t_tf, c_tf)):
                    times[(who, call)].append(t)
                    cpu[(who, call)].append(c)
            outputs[who] = (tokens, out)
    ref = next(iter(contenders))
    rows = []
    for call in CALLS + ("both",):
        def runs(table, who):
            if call == "both":
                return [a + b for a, b in zip(*(table[(who, c)] for c in CALLS))]
            return table[(who, call)]
        row = {"what": call, "images": len(images), "reps": reps}
        for who in contenders:
            row[f"{who}_min_s"] = round(min(runs(times, who)), 3)
            row[f"{who}_median_s"] = round(statistics.median(runs(times, who)), 3)
            row[f"{who}_cpu_min_s"] = round(min(runs(cpu, who)), 3)
        for who in list(contenders)[1:]:
            suffix = "" if who == "varjax" else f"_{who}"
            for stat in ("min", "median", "cpu_min"):
                row[f"ratio_{stat}{suffix}"] = round(row[f"{ref}_{stat}_s"] / row[f"{who}_{stat}_s"], 3)
            for key, value in paired_ratio(runs(times, ref), runs(times, who)).items():
                row[f"ratio_{key}{suffix}"] = value
        rows.append(row)
    return rows, outputs


def _agreement(up_tokens, up_out, jx_tokens, jx_out, who: str) -> dict:
    """How far `who`'s outputs are from upstream's (the same weights and images)."""
    same = np.mean(np.concatenate([np.asarray(a).ravel() == b.numpy().ravel()
                                   for a, b in zip(jx_tokens, up_tokens)]))
    (up_logits, up_acts), (jx_logits, jx_acts) = up_out, jx_out
    rel = max(float(np.max(np.abs(np.asarray(jx_acts[k]) - up_acts[k].numpy()))
                    / max(float(np.max(np.abs(up_acts[k].numpy()))), 1e-30)) for k in up_acts)
    return {"what": "agreement", "who": who, "identical_tokens": float(same), "sites": len(up_acts),
            "units_max_err_rel_to_site_max": rel,
            "logits_max_abs_err": float(np.max(np.abs(np.asarray(jx_logits) - up_logits.numpy())))}


def _environment() -> dict:
    import flax
    import torch

    return {"jax": jax.__version__, "flax": flax.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": jax.devices()[0].device_kind,
            "varjax_dense_products": cpu_gemm.status()[1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, type=Path, help="a FoundationVision/VAR checkout")
    ap.add_argument("--config", default="d16", choices=sorted(config_lib.PRESETS),
                    help="model preset, random weights (default d16 + the released VQVAE shape)")
    ap.add_argument("--images", type=int, default=2, help="images per call (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights")
    ap.add_argument("--xla-defaults", action="store_true",
                    help="also time varjax compiled with XLA's default CPU kernels and the einsum "
                         "attention (varjax_xla_defaults: the settings before they were tuned)")
    ap.add_argument("--fixed-order", action="store_true",
                    help="time the contenders in the same order in every repetition (upstream "
                         "first), as before 2026-12-02, instead of reversing it every other time")
    args = ap.parse_args(argv)
    if args.images < 1 or args.reps < 1:
        print("bench_upstream: error: --images and --reps must be >= 1", file=sys.stderr)
        return 2
    try:
        models = import_upstream(args.upstream.resolve())
        cfg = config_lib.PRESETS[args.config]()
        model = Model(cfg, init_params(cfg, seed=args.seed))
        with contextlib.redirect_stdout(sys.stderr):  # upstream's constructors print
            vae, var = build_upstream(models, cfg, model.params)
    except BenchError as e:
        print(f"bench_upstream: error: {e}", file=sys.stderr)
        return 2
    acts = study_hooks(var, cfg.var.depth)
    if __package__:
        from experiments.bench import _synthetic_images
    else:  # run as a script: experiments/ is on the path
        from bench import _synthetic_images

    images = _synthetic_images(args.images, 1, cfg.resolution, seed=1)[:, 0]
    labels = ((np.arange(args.images) * 37) % cfg.var.num_classes).astype(np.int32)
    contenders = {"upstream": upstream_calls(vae, var, acts, images, labels),
                  "varjax": varjax_calls(model, images, labels)}
    if args.xla_defaults:
        contenders["varjax_xla_defaults"] = varjax_calls(model, images, labels, xla_defaults=True)
    with jax.default_matmul_precision("highest"):
        rows, outputs = compare(contenders, images, args.reps, args.fixed_order)
    rows += [_agreement(*outputs["upstream"], *outputs[who], who) for who in list(contenders)[1:]]
    for row in rows:
        order = "fixed" if args.fixed_order else "alternating"
        print(json.dumps({"config": args.config, **row, "order": order, **_environment()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
