"""Measured parity errors against the upstream reference outputs (tests/data/upstream_var).

Converts each fixture with `python -m convert`'s library function, runs varjax in float32
at highest matmul precision and prints one JSON line per fixture with the largest error of
every compared array: the numbers behind the tolerances of tests/test_parity.py.

    python experiments/parity.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "upstream_var"


def measure(name: str, work: Path) -> dict:
    import jax
    import jax.numpy as jnp

    import varjax
    from convert.core import convert_checkpoints
    from varjax.model import Model
    from varjax.taps import UNIT_SITES, TapConfig
    from varjax.vqvae import VQVAE

    ref = np.load(DATA / name / "reference.npz")
    cfg = json.loads((DATA / name / "config.json").read_text())
    var_path = DATA / name / "var.pth" if (DATA / name / "var.pth").exists() else None
    out = work / name
    convert_checkpoints(var_path, DATA / "vae.pth", out, patch_nums=tuple(cfg["patch_nums"]), log=None)
    model = varjax.load(out)
    K = len(cfg["patch_nums"])
    ref_tokens = [jnp.asarray(ref[f"idx{s}_f64"], jnp.int32) for s in range(K)]
    row: dict = {"fixture": name}
    with jax.default_matmul_precision("highest"):
        tokens = model.tokenize(ref["images_uint8"])
        row["token_mismatches"] = int(sum((np.asarray(t) != ref[f"idx{s}_f64"]).sum()
                                          for s, t in enumerate(tokens)))
        row["tokens"] = int(sum(t.size for t in tokens))
        f = model.vqvae.apply({"params": model.params["vqvae"]}, jnp.asarray(ref["images_uint8"]),
                              method=VQVAE.encode)
        row["f_max_abs_err"] = float(np.abs(np.asarray(f).transpose(0, 3, 1, 2) - ref["f_f32"]).max())
        row["var_input_max_abs_err"] = float(np.abs(np.asarray(model.var_input(ref_tokens)) - ref["var_input"]).max())
        if model.var is None:
            return row
        logits, acts = model.teacher_forced(ref["labels"], ref_tokens)
        logits = np.asarray(logits)
        row["logits0_max_abs_err"] = float(np.abs(logits[0] - ref["logits0"]).max())
        row["logits_argmax_mismatches"] = int((logits.argmax(-1) != ref["logits_argmax"]).sum())
        lse = np.asarray(jax.scipy.special.logsumexp(logits, axis=-1))
        row["logsumexp_max_abs_err"] = float(np.abs(lse - ref["logits_logsumexp"]).max())
        row["units_mean_abs_max_rel_err"] = max(
            float(np.abs(np.asarray(v) - ref[f"act_mean_abs/{k}"]).max() / np.abs(ref[f"act_mean_abs/{k}"]).max())
            for k, v in acts.items())
        full_model = Model(model.config, model.params, TapConfig(sites=UNIT_SITES, reductions=("full",), blocks=(0,)))
        _, full = full_model.teacher_forced(ref["labels"][:1], [t[:1] for t in ref_tokens], reduction="full")
        row["units_full_block0_max_rel_err"] = max(
            float(np.abs(np.asarray(full[f"blocks.0.{s}"][0]) - ref[f"act_full0/blocks.0.{s}"]).max()
                  / np.abs(ref[f"act_full0/blocks.0.{s}"]).max()) for s in UNIT_SITES)
        recon = np.asarray(model.decode([t[:1] for t in ref_tokens]))[0].transpose(2, 0, 1)
        row["reconstruction_max_abs_err"] = float(np.abs(recon - ref["reconstruction0"][0]).max())
    return row


def main() -> int:
    with tempfile.TemporaryDirectory() as work:
        for name in ("tiny256", "tiny256_saln", "vq512"):
            print(json.dumps(measure(name, Path(work))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
