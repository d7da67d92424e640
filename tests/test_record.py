"""The recording pass: statistics equal a direct computation; batching, devices, processes,
padding and a SIGKILL never change the results."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import record_worker as rw
from varjax.data import DataError
from varjax.driver import record
from varjax.model import Model
from varjax.record import Options, Plan, RecordError
from varjax.stats import TIE_RTOL
from varjax.taps import UNIT_SITES, TapConfig

ROOT = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(ROOT / "tests" / "record_worker.py")]

# Another batch/device split or a resume sums the same float32 values in another order and
# lets XLA block the same matmuls differently; the pass's compiled graph and `teacher_forced`
# differ the same way. Largest relative difference measured (values above 1e-6), against the
# reference run over the device, process and resume tests: activations 1.4e-6, max 3.7e-7,
# sum 2.4e-7, scale_max 1.9e-6, scale_sum 2.0e-6, per-sample rows 2.5e-7; against numpy on
# `teacher_forced`: activations 1.4e-6, max 4.5e-7, sum 2.6e-7, scale_max 1.9e-6, scale_sum 2.0e-6,
# per-sample rows 2.1e-7. Both tests print theirs:
#   pytest tests/test_record.py -s -k "devices or processes or resume or direct"
# argmax and counts are compared exactly (ties -> lowest id by construction, stats.py).
SUM_RTOL = 1e-5
MU_RTOL = 1e-5
# per_sample.csv holds 7 significant digits (5e-8 relative rounding) of float32 values.
PER_SAMPLE_RTOL = 1e-5
# record.json fields that say how a run was executed, not what it computed.
HOW_IT_RAN = {"batch_size", "devices", "processes", "compile_s", "images_per_s"}


def _run_worker(out: Path, *args: str, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(WORKER + [str(out), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=ROOT, **popen)


def _read_per_sample(path: Path) -> dict:
    """per_sample.csv -> {"columns": names after `sample`, "sample": (N,) ids, "values": (N, C)}."""
    header, *rows = [line.split(",") for line in path.read_text().splitlines()]
    assert header[0] == "sample", header
    return {"columns": header[1:], "sample": np.array([int(r[0]) for r in rows], np.int64),
            "values": np.array([[float(v) for v in r[1:]] for r in rows], np.float64).reshape(len(rows), -1)}


def _load(run: Path) -> dict:
    """Every output file of a finished run directory, as comparable values."""
    out = {"files": sorted(p.name for p in run.iterdir())}
    for split in ("train", "val"):
        with np.load(run / f"stats_{split}.npz") as z:
            out.update({f"{split}/{k}": z[k] for k in z.files})
    out["activations"] = np.load(run / "activations.npy")
    per_sample = _read_per_sample(run / "per_sample.csv")
    out["per_sample/columns"], out["per_sample/sample"] = per_sample["columns"], per_sample["sample"]
    out["per_sample/values"] = per_sample["values"]
    for name in ("units.csv", "skipped.csv"):
        out[name] = (run / name).read_text()
    info = json.loads((run / "record.json").read_text())
    out["record.json"] = {k: v for k, v in info.items() if k not in HOW_IT_RAN}
    return out


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    """Largest |got - want| / |want| over the values above the comparison's atol (1e-6)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    big = np.abs(want) > 1e-6
    return float((np.abs(got - want)[big] / np.abs(want[big])).max()) if big.any() else 0.0


def _assert_same(a: dict, b: dict) -> None:
    """Two runs' outputs equal: ids, argmax, counts and text exactly, floats within rounding."""
    assert a.keys() == b.keys()
    worst = {}
    for k in a:
        if isinstance(a[k], (list, str, dict)):
            assert a[k] == b[k], k
        elif "argmax" in k or k.endswith(("count", "/sample")):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            rtol = PER_SAMPLE_RTOL if k.startswith("per_sample") else SUM_RTOL
            np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=1e-6, err_msg=k)
            worst[k] = _rel(b[k], a[k])
    print("\nlargest relative difference: " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """One process, one device, batch 4 (the last of 3 batches holds 3 rows and 1 pad)."""
    out = tmp_path_factory.mktemp("ref")
    res = _run_worker(out, "--batch-size", "4")
    assert res.returncode == 0, res.stderr
    return out


def _paths(depth: int, sites: tuple[str, ...]) -> list[str]:
    """The PyTorch module paths of the recorded sites in unit-column order (docs/design.md):
    block-major, the sites in the given (canonical) order, the residual stream as `blocks.{i}`,
    then the top sites once."""
    top = [s for s in sites if s in ("head_nm", "head")]
    inner = [s for s in sites if s not in top]
    return [f"blocks.{b}" if s == "resid" else f"blocks.{b}.{s}" for b in range(depth) for s in inner] + top


def _direct(model, plan, sites: tuple[str, ...] = UNIT_SITES) -> dict[str, np.ndarray]:
    """Per-sample outputs of the pass, computed in numpy from `teacher_forced` (float64).

    Unit values come from the signed (L, units) activations of every site, so neither the
    per-scale averaging matrix of varjax.taps nor the pass's loss code is used here.
    Returns mu (N, U), scale_mu (N, K, U) and per_sample (N, 2 + 2K) in per_sample.csv's
    column order (loss, acc, loss_s*, acc_s*).
    """
    full = Model(model.config, model.params, TapConfig(sites=sites, reductions=("full",)))
    pn = model.config.patch_nums
    bounds = np.cumsum([0] + [p * p for p in pn])
    sites = _paths(model.config.var.depth, sites)
    mu, scale_mu, per_sample = [], [], []
    for r in range(len(plan)):
        tokens = model.tokenize(rw.views(r))
        logits, acts = full.teacher_forced(np.full(rw.NUM_VIEWS, plan.labels[r]), tokens, reduction="full")
        x = np.abs(np.concatenate([np.asarray(acts[s], np.float64) for s in sites], axis=-1))  # (A, L, U)
        by_scale = [x[:, a:b].mean(1) for a, b in zip(bounds[:-1], bounds[1:])]  # K x (A, U)
        mu.append(x.mean(1).mean(0))
        scale_mu.append(np.stack(by_scale, 1).mean(0))
        z = np.asarray(logits, np.float64)  # (A, L, V)
        target = np.concatenate([np.asarray(t) for t in tokens], axis=1)  # (A, L)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, target[..., None], -1)[..., 0]
        hit = (z.argmax(-1) == target).astype(np.float64)
        per_scale = [(v[:, a:b].mean(1).mean(0)) for v in (nll, hit) for a, b in zip(bounds[:-1], bounds[1:])]
        per_sample.append([nll.mean(1).mean(0), hit.mean(1).mean(0)] + per_scale)
    return {"mu": np.stack(mu), "scale_mu": np.stack(scale_mu), "per_sample": np.array(per_sample)}


@pytest.mark.parametrize("sites", [UNIT_SITES, ("ffn.fc1", "resid", "head_nm", "head")],
                         ids=["study", "resid-head"])
def test_stats_and_per_sample_rows_equal_direct_numpy(tmp_path, sites):
    """Statistics, activations and per_sample.csv from the pass == numpy on `teacher_forced`,
    for the study's sites and for the residual stream and the head's sites."""
    model, plan = rw.model(), rw.plan()
    with jax.default_matmul_precision("highest"):
        record(model, plan, tmp_path, rw.NUM_VIEWS,
               Options(batch_size=4, save_activations=True, per_scale=True, sites=sites), image_shape=(64, 64))
        direct = _direct(model, plan, sites)
    # units.csv names the same columns: each path's units in order, a top site's block = depth.
    v = model.config.var
    width = {"ffn.fc1": v.mlp_dim, "head": v.vocab_size}
    want = []
    for p in _paths(v.depth, sites):
        parts = p.split(".")
        block = int(parts[1]) if parts[0] == "blocks" else v.depth
        site = (".".join(parts[2:]) or "resid") if parts[0] == "blocks" else p
        want += [(block, site)] * width.get(site, v.embed_dim)
    rows = [line.split(",") for line in (tmp_path / "units.csv").read_text().splitlines()[1:]]
    assert [(int(b), s) for _, b, s, _ in rows] == want
    info = json.loads((tmp_path / "record.json").read_text())
    assert list(info["fingerprint"]["sites"]) == list(sites)
    worst = {}

    def close(name, got, want, rtol, atol):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)
        worst[name] = max(worst.get(name, 0.0), _rel(got, want))

    close("activations", np.load(tmp_path / "activations.npy"), direct["mu"], MU_RTOL, 1e-7)
    for s, split in enumerate(plan.split_names):
        rows = plan.splits == s
        with np.load(tmp_path / f"stats_{split}.npz") as z:
            got = {k: z[k] for k in z.files}
        assert got["count"] == rows.sum()  # padding rows are never counted
        for prefix, values in (("", direct["mu"][rows]), ("scale_", direct["scale_mu"][rows])):
            close(prefix + "max", got[prefix + "max"], values.max(0), MU_RTOL, 0)
            close(prefix + "sum", got[prefix + "sum"], values.sum(0), SUM_RTOL, 0)
            # argmax: the smallest id among the rows within TIE_RTOL of the max (stats.py)
            near = values >= values.max(0) * (1 - TIE_RTOL)
            ids = plan.ids[rows].reshape((-1,) + (1,) * (values.ndim - 1))
            want = np.where(near, ids, np.iinfo(np.int64).max).min(0)
            assert (got[prefix + "argmax"] == want).mean() >= 0.999, f"{prefix}argmax differs beyond boundary cases"
    per_sample = _read_per_sample(tmp_path / "per_sample.csv")
    assert per_sample["sample"].tolist() == plan.ids.tolist()
    K = len(model.config.patch_nums)
    assert per_sample["columns"] == ["loss", "acc"] + [f"loss_s{k}" for k in range(K)] + [f"acc_s{k}" for k in range(K)]
    # 7 significant digits in the file; accuracy is a count of exact argmax hits.
    close("per_sample", per_sample["values"], direct["per_sample"], PER_SAMPLE_RTOL, 1e-7)
    print("\nlargest relative difference from numpy: " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))


def test_batch_size_and_devices_do_not_change_results(tmp_path, reference_run):
    ref = _load(reference_run)
    for devices, bs in (("1", "2"), ("4", "4"), ("4", "8")):
        out = tmp_path / f"d{devices}b{bs}"
        res = _run_worker(out, "--devices", devices, "--batch-size", bs)
        assert res.returncode == 0, res.stderr
        _assert_same(ref, _load(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_equal_one(tmp_path, reference_run):
    """2 processes x 2 CPU devices with jax.distributed (gloo) == 1 process."""
    out, port = tmp_path / "mp", str(_free_port())
    procs = [subprocess.Popen(WORKER + [str(out), "--devices", "2", "--batch-size", "4",
                                        "--processes", "2", "--process-id", str(i), "--port", port],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    _assert_same(_load(reference_run), _load(out))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference_run):
    out = tmp_path / "killed"
    env = {**os.environ, "RECORD_WORKER_DELAY": "0.4"}
    p = subprocess.Popen(WORKER + [str(out), "--batch-size", "2", "--checkpoint-every", "1"],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    position = 0
    while time.time() < deadline and p.poll() is None:
        if (out / "progress.npz").exists():
            try:
                with np.load(out / "progress.npz") as z:
                    position = int(z["position"])
            except (OSError, ValueError, KeyError):
                position = 0
            if position >= 4:
                break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed; raise RECORD_WORKER_DELAY"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "record.json").exists()
    res = _run_worker(out, "--batch-size", "4")  # another batch size: resuming must not care
    assert res.returncode == 0, res.stderr
    assert f"resuming after {position} images" in res.stderr
    _assert_same(_load(reference_run), _load(out))
    assert not (out / "progress.npz").exists()


def test_finished_run_is_not_recomputed(reference_run):
    before = (reference_run / "record.json").stat().st_mtime_ns
    info = record(rw.model(), rw.plan(), reference_run, rw.NUM_VIEWS,
                  Options(batch_size=4, save_activations=True, per_scale=True, checkpoint_every=2),
                  image_shape=(64, 64))
    assert info["images"] == rw.N_ROWS
    assert (reference_run / "record.json").stat().st_mtime_ns == before


def test_other_settings_in_same_dir_fail_clearly(reference_run):
    with pytest.raises(RecordError, match="other settings"):
        record(rw.model(), rw.plan(), reference_run, rw.NUM_VIEWS, Options(batch_size=4, precision="bf16"),
               image_shape=(64, 64))


def test_unfinished_run_with_other_site_definitions_is_not_resumed(tmp_path):
    """A progress checkpoint written under other site definitions (or none: before the
    attn.proj fix) is refused by name, not resumed and not overwritten."""
    import json

    from varjax.driver import PROGRESS, _fingerprint

    model, plan, opts = rw.model(), rw.plan(), Options(batch_size=4)
    for sites, msg in ((None, "before 2026-12-01"), ({"attn.proj": "proj(x) * gamma1"}, "attn.proj")):
        fp = {**_fingerprint(model, plan, rw.NUM_VIEWS, opts), "processes": 1}
        fp.pop("sites") if sites is None else fp.update(sites=sites)
        out = tmp_path / str(msg[:6])
        out.mkdir()
        np.savez(out / PROGRESS, fingerprint=np.array(json.dumps(fp)), position=np.array(4))
        before = (out / PROGRESS).read_bytes()
        with pytest.raises(RecordError, match=msg):
            record(model, plan, out, rw.NUM_VIEWS, opts, image_shape=(64, 64))
        assert (out / PROGRESS).read_bytes() == before and sorted(p.name for p in out.iterdir()) == [PROGRESS]


def test_bad_batch_size_and_precision(tmp_path):
    with pytest.raises(RecordError, match="unknown precision 'fp8'"):
        Options(precision="fp8")
    for bad in (0, -4):
        with pytest.raises(RecordError, match=f"batch_size must be a positive integer, got {bad}"):
            Options(batch_size=bad)
    with pytest.raises(RecordError, match="checkpoint_every must be a positive integer"):
        Options(checkpoint_every=0)
    # 4 images a step cannot be split over 3 devices: refused before anything is written.
    out = tmp_path / "run"
    res = _run_worker(out, "--devices", "3", "--batch-size", "4")
    assert res.returncode != 0
    assert "RecordError: --batch-size 4 must be a multiple of the 3 devices and the 1 processes" in res.stderr, res.stderr
    assert not out.exists()


def test_unreadable_image_is_skipped_and_listed(tmp_path):
    plan = rw.plan()

    def load(r):
        if r == 3:
            raise ValueError("broken.jpg: cannot identify image file")
        return rw.views(r)

    def bad_plan(on_error):
        return Plan.from_views(plan.ids, plan.labels, plan.splits, plan.split_names, load,
                               (rw.NUM_VIEWS, 64, 64, 3), on_error=on_error)

    info = record(rw.model(), bad_plan("skip"), tmp_path, rw.NUM_VIEWS, Options(batch_size=4),
                  image_shape=(64, 64))
    assert info["skipped"] == 1
    rows = (tmp_path / "skipped.csv").read_text().splitlines()
    assert rows[0] == "sample,source,reason"
    assert rows[1] == f"{plan.ids[3]},row 3,broken.jpg: cannot identify image file"
    with np.load(tmp_path / "stats_train.npz") as z:
        assert int(z["count"]) == int((plan.splits == 0).sum()) - 1
        assert plan.ids[3] not in set(z["argmax"].tolist())
    assert str(plan.ids[3]) not in [l.split(",")[0] for l in (tmp_path / "per_sample.csv").read_text().splitlines()]
    with pytest.raises(DataError, match="broken.jpg"):
        record(rw.model(), bad_plan("stop"), tmp_path / "stop", rw.NUM_VIEWS, Options(batch_size=4),
               image_shape=(64, 64))


def test_class_dropout_rate_one_equals_null_labels(tmp_path):
    """class_dropout=1 drops every view to the null class; 0.5 drops some, reproducibly."""
    model, plan = rw.model(), rw.plan()
    null = Plan.from_views(plan.ids, np.full(len(plan), model.config.var.num_classes), plan.splits,
                           plan.split_names, rw.views, (rw.NUM_VIEWS, 64, 64, 3))
    runs = {}
    for name, p, rate, bs in (("all", plan, 1.0, 4), ("null", null, 0.0, 4), ("half", plan, 0.5, 4),
                              ("half_b2", plan, 0.5, 2), ("none", plan, 0.0, 4)):
        record(model, p, tmp_path / name, rw.NUM_VIEWS,
               Options(batch_size=bs, save_activations=True, class_dropout=rate), image_shape=(64, 64))
        runs[name] = np.load(tmp_path / name / "activations.npy")
    np.testing.assert_allclose(runs["all"], runs["null"], rtol=MU_RTOL, atol=1e-7)
    np.testing.assert_allclose(runs["half"], runs["half_b2"], rtol=MU_RTOL, atol=1e-7)
    assert not np.allclose(runs["half"], runs["none"], rtol=1e-4)
    assert not np.allclose(runs["half"], runs["all"], rtol=1e-4)


def test_bf16_full_runs_the_encoder_in_bfloat16_and_nothing_else():
    import jax.numpy as jnp

    from varjax import config as config_lib
    from varjax.model import Model, init_params
    from varjax.record import _precision, tokenizer
    from varjax.vqvae import VQVAE

    cfg = config_lib.PRESETS["micro"]()
    model = Model(cfg, init_params(cfg, seed=0))
    images = np.random.default_rng(0).integers(0, 256, (4, cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
    p = {"params": model.params["vqvae"]}
    with _precision("highest", "vqvae"):
        f32 = np.asarray(model.vqvae.apply(p, images, method=VQVAE.encode))
        assert tokenizer(model, "bf16") is model.vqvae
        half = tokenizer(model, "bf16_full").apply(p, images, method=VQVAE.encode)
    assert half.dtype == jnp.float32  # the quantizer still gets float32 latents
    rel = np.abs(np.asarray(half) - f32).max() / np.abs(f32).max()
    assert 1e-5 < rel < 5e-2, rel  # bfloat16 rounding: visibly not float32, not garbage


@pytest.mark.parametrize("precision,attention,msg", [
    ("fp8", "einsum", "unknown precision 'fp8'"),
    ("highest", "cudnn", "only with a bf16 precision"),
    ("bf16", "cudnn", "needs an NVIDIA GPU"),
    ("bf16", "flash", "attention 'flash'"),
])
def test_bad_precision_or_kernel_is_refused_before_compiling(precision, attention, msg):
    from varjax import config as config_lib
    from varjax.model import Model, param_shapes
    from varjax.record import make_step

    if jax.default_backend() == "gpu" and attention == "cudnn" and precision == "bf16":
        pytest.skip("a GPU can run cuDNN attention")  # only this case depends on the machine
    cfg = config_lib.PRESETS["micro"]()
    with pytest.raises(RecordError, match=msg):
        make_step(Model(cfg, param_shapes(cfg)), 2, Options(precision=precision, attention=attention))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a GPU can run cuDNN attention")
def test_settings_this_machine_cannot_run_leave_nothing_behind(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecordError, match="needs an NVIDIA GPU"):
        record(rw.model(), rw.plan(), out, 2, Options(batch_size=4, precision="bf16", attention="cudnn",
                                                        save_activations=True), image_shape=(64, 64))
    assert not out.exists()


def test_head_and_residual_sites_are_what_their_definitions_say():
    """`head` is the logits; `head_nm` is the head's input (head(head_nm) = logits) and is
    AdaLNBeforeHead applied to the last block's residual stream `blocks.{depth-1}`:
    LayerNorm (no affine, eps) * (1 + scale) + shift, (scale, shift) = head_nm.ada_lin(SiLU(class
    embedding)) (upstream basic_var.py AdaLNBeforeHead), all in float64 numpy here."""
    model = rw.model()
    v = model.config.var
    full = Model(model.config, model.params, TapConfig(sites=("resid", "head_nm", "head"), reductions=("full",)))
    labels = np.array([3, 7])
    with jax.default_matmul_precision("highest"):
        logits, acts = full.teacher_forced(labels, model.tokenize(rw.views(0)), reduction="full")
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), model.params["var"])
    logits = np.asarray(logits, np.float64)
    np.testing.assert_allclose(acts["head"], logits, rtol=1e-6, atol=1e-6)
    h = np.asarray(acts["head_nm"], np.float64)
    np.testing.assert_allclose(h @ p["head"]["kernel"] + p["head"]["bias"], logits, rtol=1e-4, atol=1e-5)
    cond = p["class_emb"]["embedding"][labels]
    m = (cond / (1 + np.exp(-cond))) @ p["head_nm"]["ada_lin_1"]["kernel"] + p["head_nm"]["ada_lin_1"]["bias"]
    scale, shift = m[:, None, :v.embed_dim], m[:, None, v.embed_dim:]
    x = np.asarray(acts[f"blocks.{v.depth - 1}"], np.float64)
    ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + v.norm_eps)
    np.testing.assert_allclose(ln * (1 + scale) + shift, h, rtol=1e-4, atol=1e-5)
    assert set(acts) == {"blocks.0", "blocks.1", "head_nm", "head"}
