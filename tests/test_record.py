"""The recording pass: statistics equal a direct computation; batching, devices, processes,
padding and a SIGKILL never change the results."""

from __future__ import annotations

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
from varjax.driver import record
from varjax.data import DataError
from varjax.stats import TIE_RTOL
from varjax.record import Options, Plan, RecordError

ROOT = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(ROOT / "tests" / "record_worker.py")]

# Float sums over a different batch/device split are summed in another order: float32
# rounding, measured at ~2e-7 relative; argmax is exact by construction (ties -> lowest id).
SUM_RTOL = 1e-5
# mu itself is computed per sample; another batch composition changes XLA's blocking of the
# same matmuls only by rounding (measured 0 to 3e-7 relative).
MU_RTOL = 1e-5


def _run_worker(out: Path, *args: str, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(WORKER + [str(out), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=ROOT, **popen)


def _load(run: Path) -> dict[str, np.ndarray]:
    out = {}
    for split in ("train", "val"):
        with np.load(run / f"stats_{split}.npz") as z:
            out.update({f"{split}/{k}": z[k] for k in z.files})
    out["activations"] = np.load(run / "activations.npy")
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if "argmax" in k or k.endswith("count"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=SUM_RTOL, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """One process, one device, batch 4 (the last of 3 batches holds 3 rows and 1 pad)."""
    out = tmp_path_factory.mktemp("ref")
    res = _run_worker(out, "--batch-size", "4")
    assert res.returncode == 0, res.stderr
    return out


def test_stats_equal_direct_numpy(tmp_path):
    """Statistics from the pass == numpy on per-sample outputs of `teacher_forced`."""
    model, plan = rw.model(), rw.plan()
    with jax.default_matmul_precision("highest"):
        record(model, plan, tmp_path, rw.NUM_VIEWS, Options(batch_size=4, save_activations=True),
               image_shape=(64, 64))
        direct = []
        for r in range(len(plan)):
            views = rw.views(r)
            _, acts = model.teacher_forced(np.full(rw.NUM_VIEWS, plan.labels[r]), model.tokenize(views))
            direct.append(np.concatenate([np.asarray(acts[k]) for k in acts], axis=1).mean(0))
    direct = np.stack(direct)  # (N, U), unit order of units.csv
    mu = np.load(tmp_path / "activations.npy")
    np.testing.assert_allclose(mu, direct, rtol=MU_RTOL, atol=1e-7)
    for s, split in enumerate(plan.split_names):
        rows = plan.splits == s
        with np.load(tmp_path / f"stats_{split}.npz") as z:
            got = {k: z[k] for k in z.files}
        sub, ids = direct[rows], plan.ids[rows]
        assert got["count"] == rows.sum()  # padding rows are never counted
        np.testing.assert_allclose(got["max"], sub.max(0), rtol=MU_RTOL)
        np.testing.assert_allclose(got["sum"], sub.sum(0, dtype=np.float64), rtol=SUM_RTOL)
        # argmax: the smallest id among the rows within TIE_RTOL of the max (stats.py)
        near = sub >= sub.max(0) * (1 - TIE_RTOL)
        want = np.where(near, ids[:, None], np.iinfo(np.int64).max).min(0)
        assert (got["argmax"] == want).mean() >= 0.999, "argmax differs beyond boundary cases"
    per_sample = np.genfromtxt(tmp_path / "per_sample.csv", delimiter=",", names=True)
    assert per_sample["sample"].tolist() == plan.ids.tolist()
    assert np.all((per_sample["acc"] >= 0) & (per_sample["acc"] <= 1)) and np.all(per_sample["loss"] > 0)


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
    with pytest.raises(RecordError, match="precision"):
        record(rw.model(), rw.plan(), tmp_path, 2, Options(precision="fp8"), image_shape=(64, 64))


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
