"""The sampler: parity with upstream's own sampler (tests/data/upstream_var/*/generation.npz),
the key/value cache against teacher forcing, the recorded units, and randomness that does not
depend on the batch size or the device count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import varjax
from convert.core import convert_checkpoints
from varjax.config import micro
from varjax.errors import GenerateError
from varjax.generate import Sampling, generate
from varjax.model import Model, init_params

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "upstream_var"
CONFIGS = ["tiny256", "tiny256_saln"]
CASES = ["cfg1.5", "cfg4", "cfg0", "prefix2", "prefix4"]
# A token may differ from upstream's only where upstream's best and second-best CFG-combined
# logits are closer than this (float32 rounding can then order them either way); none does here
# (the smallest margin in the fixtures is 2.1e-5).
FLIP_MARGIN = 1e-4
# The teacher-forcing tolerances of tests/test_parity.py, the same values: the sampler runs the
# same float32 algebra one scale at a time. Measured here: CFG-combined logits of sample 0 vs
# upstream 1.5e-5 (|logit| <= 7.7); the sampler's logits vs teacher forcing on the same tokens
# 9.1e-6 (the cache test); recorded units 2.4e-7 of the site's largest; image 5.5e-6 in [0, 1].
LOGITS_ATOL = 5e-5
ACT_RTOL = 3e-6
RECON_ATOL = 1e-4
CACHE_ATOL = LOGITS_ATOL
# The same tokens decoded in another batch (or on another device count): XLA's CPU convolutions
# round differently per batch shape; measured 7.7e-6 in [-1, 1].
BATCH_IMAGE_ATOL = 5e-5


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Per config: the model, upstream's generation.npz, and the sampler's run of every case.

    Every case runs in batches of 4 (the 3-label cases get a fourth label that rides along;
    samples are independent, see test_batch_size_and_ids_do_not_change_an_image), so one
    compiled program serves cfg 1.5, cfg 4 and both prefixes, and one more serves cfg 0.
    """
    out = {}
    for name in CONFIGS:
        d = tmp_path_factory.mktemp(name) / "ckpt"
        convert_checkpoints(DATA / name / "var.pth", DATA / "vae.pth", d, log=None)
        model = varjax.load(d)
        ref = np.load(DATA / name / "generation.npz")
        runs = {}
        with jax.default_matmul_precision("highest"):
            for case in CASES:
                labels = ref[f"{case}/labels"]
                n = len(labels)
                k = int(ref[f"{case}/prefix_scales"])
                padded = np.concatenate([labels, np.full(4 - n, 17, labels.dtype)])
                prefix = [np.concatenate([ref[f"{case}/idx{s}"], np.zeros((4 - n, ref[f"{case}/idx{s}"].shape[1]), np.int64)])
                          for s in range(k)]
                gen = generate(model, padded, Sampling(cfg=float(ref[f"{case}/cfg"]), top_k=1), seed=0, prefix=prefix,
                               return_images=True, return_logits=True, return_acts=True)
                runs[case] = (n, gen)
        out[name] = (model, ref, runs)
    return out


def _flat(tokens, n):
    return np.concatenate([np.asarray(t)[:n] for t in tokens], axis=1)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("case", CASES)
def test_tokens_logits_and_image_equal_upstream(fixtures, name, case):
    model, ref, runs = fixtures[name]
    n, gen = runs[case]
    pn = model.config.patch_nums
    diverged = np.zeros(n, bool)  # after a forgiven flip a sample's later scales may differ
    for s in range(len(pn)):
        got, want = np.asarray(gen.tokens[s])[:n], ref[f"{case}/idx{s}"]
        flip = (got != want) & ~diverged[:, None]
        assert (ref[f"{case}/margin_s{s}"][flip] < FLIP_MARGIN).all(), f"scale {s}: a token differs where upstream's margin is clear"
        diverged |= flip.any(1)
    assert not diverged.all(), "every sample flipped: nothing was compared"
    if diverged[0]:
        return
    if f"{case}/logits0_s0" in ref.files:
        begin = 0
        for s in range(len(pn)):
            end = begin + pn[s] ** 2
            np.testing.assert_allclose(np.asarray(gen.logits[0, begin:end]), ref[f"{case}/logits0_s{s}"],
                                       rtol=0, atol=LOGITS_ATOL, err_msg=f"scale {s}")
            begin = end
    image = (np.asarray(gen.images[0]) + 1) / 2  # upstream returns (x + 1) / 2
    np.testing.assert_allclose(image, ref[f"{case}/image0"], rtol=0, atol=RECON_ATOL / 2)
    # the tokens are the image: decoding them alone gives it again
    np.testing.assert_allclose(np.asarray(model.decode([t[:1] for t in gen.tokens])), np.asarray(gen.images[:1]),
                               rtol=0, atol=BATCH_IMAGE_ATOL)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("case", ["cfg1.5", "cfg0", "prefix4"])
def test_cache_equals_teacher_forcing(fixtures, name, case):
    """At every scale, the sampler's logits for the tokens it chose equal teacher forcing on
    those tokens, for the conditional and the unconditional rows; and the units it records
    equal teacher forcing's."""
    model, ref, runs = fixtures[name]
    _, gen = runs[case]
    labels = ref[f"{case}/labels"]
    labels = np.concatenate([labels, np.full(4 - len(labels), 17, labels.dtype)])
    tf_cond, acts = model.teacher_forced(labels, gen.tokens)
    halves = [(tf_cond, 0)]
    if float(ref[f"{case}/cfg"]) != 0:
        tf_null, _ = model.teacher_forced(np.full(4, model.config.var.num_classes), gen.tokens)
        halves.append((tf_null, 1))
    pn = model.config.patch_nums
    for tf, half in halves:
        begin = 0
        for s in range(len(pn)):
            end = begin + pn[s] ** 2
            np.testing.assert_allclose(np.asarray(gen.row_logits[:, half, begin:end]), np.asarray(tf[:, begin:end]),
                                       rtol=0, atol=CACHE_ATOL, err_msg=f"half {half}, scale {s}")
            begin = end
    assert sorted(gen.acts) == sorted(acts)
    for site, want in acts.items():
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(gen.acts[site]), want, rtol=0, atol=ACT_RTOL * np.abs(want).max(),
                                   err_msg=site)


@pytest.fixture(scope="module")
def micro_model():
    cfg = micro()
    return Model(cfg, init_params(cfg, seed=0))


SAMPLING = Sampling(cfg=1.5, top_k=20, top_p=0.9)


def test_batch_size_and_ids_do_not_change_an_image(micro_model):
    labels = np.array([0, 1, 2, 3, 4, 5, 1000, 7])
    whole = generate(micro_model, labels, SAMPLING, seed=11, return_images=True)
    for start in range(0, 8, 2):
        part = generate(micro_model, labels[start:start + 2], SAMPLING, seed=11, sample_ids=np.arange(start, start + 2),
                        return_images=True)
        for s, (a, b) in enumerate(zip(whole.tokens, part.tokens)):
            np.testing.assert_array_equal(np.asarray(a)[start:start + 2], np.asarray(b), err_msg=f"scale {s}")
        np.testing.assert_allclose(np.asarray(whole.images)[start:start + 2], np.asarray(part.images), rtol=0,
                                   atol=BATCH_IMAGE_ATOL)
    other_seed = generate(micro_model, labels, SAMPLING, seed=12)
    assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(whole.tokens, other_seed.tokens))
    shifted = generate(micro_model, labels, SAMPLING, seed=11, sample_ids=np.arange(1, 9))
    assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(whole.tokens, shifted.tokens))


def test_cpu_kernel_in_chunks_equals_the_einsum_sampler(micro_model, monkeypatch):
    """The CPU's cached-attention kernel (varjax.attention.cached), forced into lax.map
    chunks at every scale, samples what the spelled-out einsum path samples."""
    from varjax import attention, generate as gen_lib

    labels = np.array([3, 1000, 9])
    want = generate(micro_model, labels, SAMPLING, seed=4, attention="einsum", return_logits=True)
    monkeypatch.setattr(attention, "WHOLE_BYTES", 0)
    monkeypatch.setattr(attention, "CHUNK_BYTES", 1)  # one (row, head) pair per step
    monkeypatch.setattr(gen_lib, "_COMPILED", {})
    got = generate(micro_model, labels, SAMPLING, seed=4, attention="blocked", return_logits=True)
    for s, (a, b) in enumerate(zip(got.tokens, want.tokens)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"scale {s}")
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), rtol=0, atol=CACHE_ATOL)


@pytest.mark.multiprocess
def test_four_devices_give_the_same_images(micro_model, tmp_path):
    """The sampler sharded over 4 (forced CPU) devices, in a fresh process, equals one device."""
    out = tmp_path / "four.npz"
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "generate_worker.py"), str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert res.returncode == 0, res.stderr
    from tests import generate_worker

    got = np.load(out)
    assert int(got["devices"]) == 4
    want = generate_worker.run(micro_model)
    for k in want:
        if k.startswith("idx"):
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_allclose(got["images"], want["images"], rtol=0, atol=BATCH_IMAGE_ATOL)


def test_model_generate_api(micro_model):
    labels = [1, 2, 1000]
    tokens = micro_model.generate(labels, seed=5)
    assert [t.shape for t in tokens] == [(3, p * p) for p in micro_model.config.patch_nums]
    assert all(t.dtype == np.int32 for t in tokens)
    again, acts = micro_model.generate(labels, seed=5, return_acts=True)
    for a, b in zip(tokens, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert acts["blocks.0.ffn.fc1"].shape == (3, micro_model.config.var.mlp_dim)
    images = micro_model.decode(tokens)
    assert images.shape == (3, 64, 64, 3)
    # a prefix of every scale reproduces the given tokens
    forced = micro_model.generate(labels, seed=9, prefix=tokens)
    for a, b in zip(tokens, forced):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # bfloat16 (the transformer) runs and mostly agrees with float32 greedy decoding
    greedy = np.concatenate([np.asarray(t) for t in micro_model.generate(labels, top_k=1)], 1)
    bf16 = np.concatenate([np.asarray(t) for t in micro_model.generate(labels, top_k=1, precision="bf16")], 1)
    assert bf16.shape == greedy.shape and (bf16[:, :5] == greedy[:, :5]).mean() > 0.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=[1001]), "labels"), (dict(labels=[-1]), "labels"), (dict(labels=[[1]]), "labels"),
    (dict(prefix=[np.zeros((1, 2), int)]), "prefix"), (dict(prefix=[np.full((1, 1), 64)]), "prefix"),
    (dict(seed=-1), "seed"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(precision="fp8"), "precision"),
])
def test_bad_arguments_are_one_clear_error(micro_model, kwargs, match):
    args = dict(labels=[1])
    args.update(kwargs)
    with pytest.raises(GenerateError, match=match):
        micro_model.generate(**args)


def test_more_smooth_feeds_soft_embeddings(micro_model):
    """more_smooth: the image comes from the Gumbel-softmax mixtures, not the drawn tokens;
    forced scales still use the given tokens' own vectors."""
    labels = np.array([1, 2, 3, 4])
    smooth = Sampling(cfg=1.5, top_k=20, more_smooth=True)
    a = generate(micro_model, labels, smooth, seed=4, return_images=True)
    b = generate(micro_model, labels, smooth, seed=4, return_images=True)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    hard = np.asarray(micro_model.decode(a.tokens))
    assert np.abs(np.asarray(a.images) - hard).max() > 1e-2
    forced = generate(micro_model, labels, smooth, seed=4, prefix=a.tokens, return_images=True)
    np.testing.assert_allclose(np.asarray(forced.images), hard, rtol=0, atol=BATCH_IMAGE_ATOL)
