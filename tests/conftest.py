"""Builders shared by several test files: hand-written run directories, and what the
planted-memorization tests measure and bound (test_planted.py and test_run.py both check a
planted run against the same margins)."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from varjax import unitmem
from varjax.data.planted import parse_role


def pytest_configure(config):
    """One persistent JAX compilation cache for this test session, in a fresh temporary
    directory removed at the end: many tests build the same small programs through different
    jit wrappers (a new Model, a cleared cache, a worker process), and each identical program
    is then compiled once. Nothing carries over between sessions, so every run compiles from
    scratch as a user's first run does. Worker processes inherit it through the environment."""
    d = tempfile.mkdtemp(prefix="varjax-tests-jax-cache-")
    config._varjax_jax_cache = d
    for var, value in (("JAX_COMPILATION_CACHE_DIR", d), ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                       ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")):
        os.environ[var] = value
    import jax

    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    d = getattr(config, "_varjax_jax_cache", None)
    if d:
        shutil.rmtree(d, ignore_errors=True)


def mkl_expected() -> bool:
    """Whether this machine has what varjax.cpu_gemm's MKL path needs (torch with MKL, a C++
    compiler): where it does, the MKL tests assert the path is in use instead of skipping."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.backends.mkl.is_available()) and shutil.which(os.environ.get("CXX", "c++")) is not None


def unit_rows(n_blocks: int, c: int) -> list[tuple[int, str, int]]:
    """units.csv rows (block, site path, index) of n_blocks x (attn.proj c, ffn.fc1 4c, ffn.fc2 c)."""
    return [(b, f"blocks.{b}.{s}", i) for b in range(n_blocks)
            for s, w in (("attn.proj", c), ("ffn.fc1", 4 * c), ("ffn.fc2", c)) for i in range(w)]


def spiked() -> np.ndarray:
    """(20 samples, 12 units = 2 blocks x (1 + 4 + 1)), every activation 1 except: unit u
    spikes to v_u = u + 2 on sample 100 (so UnitMem = (v - 1)/(v + 1) rises with u); units
    10 (fc1, block 1) and 11 (fc2, block 1) spike on samples 107 and 105 instead; unit 0 is
    zero everywhere. U10 = {10, 11} (P90 between the 10th and 11th of the 12 values)."""
    acts = np.ones((20, 12), np.float32)
    for u in range(12):
        acts[0, u] = u + 2
    acts[0, 10], acts[7, 10] = 1, 12
    acts[0, 11], acts[5, 11] = 1, 13
    acts[:, 0] = 0
    return acts


def write_run(d: Path, acts: np.ndarray | None, splits: list[str], units, npz: bool = False,
              scales: int = 0, sources: list[str] | None = None) -> np.ndarray:
    """Writes units.csv, samples.csv and activations.npy and/or stats_*.npz; returns sample ids."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "units.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["unit", "block", "site", "index"])
        w.writerows([u, *row] for u, row in enumerate(units))
    ids = np.arange(len(splits)) + 100
    with open(d / "samples.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample", "split", "label", "source"])
        for r, sp in enumerate(splits):
            w.writerow([ids[r], sp, r % 4, sources[r] if sources else f"missing/{ids[r]}.png"])
    if npz:
        for sp in dict.fromkeys(splits):
            rows = np.flatnonzero(np.array(splits) == sp)
            st = unitmem.stats_from_matrix(acts, ids[rows], rows)
            extra = {}
            if scales:  # scale k: the same activations scaled per sample, so UnitMem differs
                ramp = 1 + np.arange(len(ids))[:, None] / 10
                sc = [unitmem.stats_from_matrix(acts * ramp ** k, ids[rows], rows) for k in range(scales)]
                extra = {f"scale_{n}": np.stack([getattr(s, n) for s in sc])
                         for n in ("max", "argmax", "sum")}
            np.savez(d / f"stats_{sp}.npz", max=st.max, argmax=st.argmax, sum=st.sum,
                     count=np.int64(st.count), **extra)
    else:
        np.save(d / "activations.npy", acts.astype(np.float32))
    return ids


def finish_run(d: Path, sites: tuple[str, ...] = ("attn.proj", "ffn.fc1", "ffn.fc2"), depth: int = 2,
               precision: str = "highest") -> None:
    """record.json as the recording pass writes it for a finished run (what the analysis reads of it)."""
    import json

    from varjax.names import SITE_DEFINITIONS

    fp = {"sites": {s: SITE_DEFINITIONS[s] for s in sites}, "precision": precision,
          "model": {"var": {"depth": depth}}}
    (d / "record.json").write_text(json.dumps({"fingerprint": fp, "precision": precision}))


# -- Sensitivity of the pipeline on the shipped model ------------------------------------------
# Margins that held for every training seed tried (0-3, data seed 0, 8 views, crop seed 0;
# measured values in brackets, seed 0 = the shipped model first). Each is looser than the worst
# seed, so the test guards the pipeline (recording, statistics, ids, loss), not one seed's luck.
# Brackets re-measured after the 2026-12-01 attn.proj fix (varjax/assets/planted/seeds.json, its
# `reproduce` line); before it the NumMemUnits ones were [0.643, 0.764, 0.688, 0.825], [0.016, 7e-5,
# 0.0016, 5e-8] and [17.6, 10.4, 11.1, 14.2]: every margin held under both definitions.
NMU_AUC_MIN = 0.6  # canaries vs singletons, NumMemUnits over U10(D_all) [0.660, 0.825, 0.714, 0.807]
NMU_P_MAX = 0.05  # its two-sided Mann-Whitney p [0.0037, 2e-7, 1.5e-5, 5e-10]
DUP64_RATIO_MIN = 5.0  # dup64 canaries' mean NumMemUnits / singletons' [20.3, 17.1, 16.2, 26.2]
LOSS_AUC_MAX = 0.1  # canaries vs singletons, loss: P(canary's > singleton's) [0.024, 0.043, 0.048, 0.053]
HELDOUT_LOSS_AUC_MAX = 0.3  # singletons vs held-out, loss [0.217, 0.162, 0.183, 0.211]
# Every 64-fold canary is fitted better than every singleton [gap >= 1.35 nats in all seeds].
LOSS_GAP_MIN = 0.0

def canary_numbers(run_dir: Path, result: dict) -> dict[str, float]:
    """What the margins bound, from a planted run's planted.json content and per_sample.csv."""
    t, g = result["tests"], result["groups"]
    with open(run_dir / "samples.csv", newline="") as f:
        role = {r["sample"]: parse_role(r["source"]) for r in csv.DictReader(f)}
    with open(run_dir / "per_sample.csv", newline="") as f:
        loss = [(role[r["sample"]], float(r["loss"])) for r in csv.DictReader(f)]
    dup64 = [x for r, x in loss if r.kind == "canary" and r.dup == 64]
    assert len(dup64) == 4
    return {"nmu_auc": t["nmu_u10"]["canary vs single"]["auc"],
            "nmu_p": t["nmu_u10"]["canary vs single"]["p_mannwhitney"],
            "dup64_ratio": g["canary dup64"]["nmu_u10"]["mean"] / g["single"]["nmu_u10"]["mean"],
            "loss_auc": t["loss"]["canary vs single"]["auc"],
            "heldout_loss_auc": t["loss"]["single vs heldout"]["auc"],
            "loss_gap": min(x for r, x in loss if r.kind == "single") - max(dup64)}


def assert_canaries_found(n: dict[str, float]) -> None:
    """The pipeline singles out the canaries: every margin above holds."""
    assert n["nmu_auc"] > NMU_AUC_MIN and n["nmu_p"] < NMU_P_MAX, n
    assert n["dup64_ratio"] > DUP64_RATIO_MIN, n
    assert n["loss_auc"] < LOSS_AUC_MAX and n["heldout_loss_auc"] < HELDOUT_LOSS_AUC_MAX, n
    assert n["loss_gap"] > LOSS_GAP_MIN, n
