"""Parity with upstream's PyTorch code on model shapes the fixtures do not cover.

tests/test_parity.py checks varjax against upstream's stored outputs for three small models
(tests/data/upstream_var). This script asks the same of shapes outside them, against the
upstream code itself: other depths, widths, head counts, `mlp_ratio`, `norm_eps`, no
`attn_l2_norm`, shared AdaLN, another vocabulary and latent width, fewer classes, and the
512-px pyramid. Each case builds random weights, hands the same weights to upstream's
modules (experiments/bench_upstream.py's builder: the converter's key rule run backwards)
and compares, in float32 at highest matmul precision:
  - tokenize: share of identical tokens;
  - teacher_forced on upstream's tokens: largest logit error, and per site the largest unit
    error relative to that site's largest value, every site the study records (`attn.proj`:
    the layer's own output, read in the hook before upstream's in-place gamma multiply);
  - greedy generation (cfg 1.5, top_k 1): share of identical tokens and the largest pixel
    error of the decoded images (upstream returns them in [0, 1]; varjax in [-1, 1]).
One JSON line per case; a last line with the worst of each measure over all cases.

    python experiments/parity_upstream.py --upstream /path/to/VAR
    python experiments/parity_upstream.py --upstream /path/to/VAR --case px512 --case no_l2norm
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

from varjax import config as config_lib
from varjax.model import Model, init_params

if __package__:
    from experiments.bench_upstream import BenchError, build_upstream, import_upstream, study_hooks
else:  # run as a script: experiments/ is on the path
    from bench_upstream import BenchError, build_upstream, import_upstream, study_hooks


def _case(var: dict | None = None, vqvae: dict | None = None, patch_nums=None) -> config_lib.ModelConfig:
    """The fixtures' tiny model (depth 2, width 128, V 512, ch 32) with some fields changed."""
    base = config_lib.tiny()
    q = dataclasses.replace(base.vqvae, **(vqvae or {}))
    pn = tuple(patch_nums or base.patch_nums)
    v = dataclasses.replace(base.var, vocab_size=q.vocab_size, z_channels=q.z_channels, patch_nums=pn, **(var or {}))
    return dataclasses.replace(base, patch_nums=pn, vqvae=q, var=v)


CASES = {
    "d3_w192_h3": lambda: _case(var=dict(depth=3, embed_dim=192, num_heads=3)),
    "d4_w256_h8": lambda: _case(var=dict(depth=4, embed_dim=256, num_heads=8)),
    "shared_aln_h4": lambda: _case(var=dict(shared_aln=True, num_heads=4)),
    "no_l2norm": lambda: _case(var=dict(attn_l2_norm=False)),
    "mlp2_eps1e-5": lambda: _case(var=dict(mlp_ratio=2.0, norm_eps=1e-5)),
    "v1024_z16": lambda: _case(vqvae=dict(vocab_size=1024, z_channels=16)),
    "classes10": lambda: _case(var=dict(num_classes=10)),
    "px512": lambda: _case(patch_nums=config_lib.PATCH_NUMS_512),
}


def measure(models, name: str, cfg: config_lib.ModelConfig, images: int, seed: int) -> dict:
    """One case: random weights, the same in both; returns the row of errors."""
    import torch

    model = Model(cfg, init_params(cfg, seed=seed))
    with contextlib.redirect_stdout(sys.stderr):  # upstream's constructors print
        vae, var = build_upstream(models, cfg, model.params)
    acts_up = study_hooks(var, cfg.var.depth)
    rng = np.random.default_rng(seed + 1)
    img = rng.integers(0, 256, (images, cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
    labels = ((np.arange(images) * 7 + 3) % cfg.var.num_classes).astype(np.int32)
    row: dict = {"case": name, "depth": cfg.var.depth, "embed_dim": cfg.var.embed_dim,
                 "num_heads": cfg.var.num_heads, "patch_nums": list(cfg.patch_nums)}
    with torch.inference_mode():
        x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        idx_up = vae.img_to_idxBl(x)
        logits_up = var(torch.from_numpy(labels.astype(np.int64)), vae.quantize.idxBl_to_var_input(idx_up)).numpy()
        acts_up = {k: v.numpy() for k, v in acts_up.items()}
        img_up = var.autoregressive_infer_cfg(B=images, label_B=torch.from_numpy(labels.astype(np.int64)),
                                              g_seed=seed, cfg=1.5, top_k=1, top_p=0.0).numpy()
    idx_up = [t.numpy() for t in idx_up]
    with jax.default_matmul_precision("highest"):
        tokens = [np.asarray(t) for t in model.tokenize(img)]
        logits, acts = model.teacher_forced(labels, idx_up)
        gen_tokens, gen_images = model.generate(labels, cfg=1.5, top_k=1, seed=seed, return_images=True)
    row["tokenize_identical_share"] = float(np.mean(np.concatenate(
        [(a == b).ravel() for a, b in zip(tokens, idx_up)])))
    logits = np.asarray(logits)
    row["logits_max_abs_err"] = float(np.abs(logits - logits_up).max())
    row["logits_max_abs"] = float(np.abs(logits_up).max())
    per_site: dict[str, float] = {}
    for key, ref in acts_up.items():
        site = key.split(".", 2)[2]
        err = float(np.abs(np.asarray(acts[key]) - ref).max() / max(float(np.abs(ref).max()), 1e-30))
        per_site[site] = max(per_site.get(site, 0.0), err)
    row["units_max_rel_err"] = per_site
    row["sites_compared"] = len(acts_up)
    # Upstream's generation does not return its tokens: re-tokenize nothing, compare the
    # images it decodes (a flipped token moves its patch far more than float error does).
    gen = (np.asarray(gen_images) + 1.0) / 2.0
    row["generation_image_max_abs_err"] = float(np.abs(gen - img_up.transpose(0, 2, 3, 1)).max())
    row["generation_images"] = images
    row["generation_tokens"] = int(sum(np.asarray(t).size for t in gen_tokens))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, type=Path, help="a FoundationVision/VAR checkout")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="cases to run (default: all)")
    ap.add_argument("--images", type=int, default=2, help="images per case (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.images < 1:
        print("parity_upstream: error: --images must be >= 1", file=sys.stderr)
        return 2
    try:
        models = import_upstream(args.upstream.resolve())
    except BenchError as e:
        print(f"parity_upstream: error: {e}", file=sys.stderr)
        return 2
    rows = []
    for name in args.case or CASES:
        row = measure(models, name, CASES[name](), args.images, args.seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    worst = {k: max(r[k] for r in rows) for k in ("logits_max_abs_err", "generation_image_max_abs_err")}
    worst["tokenize_identical_share"] = min(r["tokenize_identical_share"] for r in rows)
    worst["units_max_rel_err"] = {s: max(r["units_max_rel_err"][s] for r in rows) for s in rows[0]["units_max_rel_err"]}
    print(json.dumps({"case": "worst", "cases": len(rows), **worst}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
