"""Parity with the upstream PyTorch code: every array of tests/data/upstream_var, all scales.

The fixtures are converted with `python -m convert`'s library function and loaded with
`varjax.load`, so this checks the converter and the model together, in float32 at highest
matmul precision. Each tolerance states the error measured on this CPU (jax 0.10.2); they
leave ~5-10x headroom for other BLAS builds, not for a wrong operation (a wrong resize
kernel, a missing scale or a transposed weight costs orders of magnitude more).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import varjax
from varjax import cpu_gemm
from convert.core import convert_checkpoints  # needs torch: without it this module fails, never skips
from varjax.taps import TapConfig, collect
from tests.conftest import mkl_expected

pytestmark = pytest.mark.torch

DATA = Path(__file__).parent / "data" / "upstream_var"

# Latent f = quant_conv(encoder(x)): 12 convs and 3 attention blocks deep; measured max abs
# error 8.5e-6 (256 px) and 2.4e-5 (512 px) against upstream's float32 run (|f| <= 3.3)
# (5.4e-5 at 256 px before the GroupNorm summed per channel first, varjax/vqvae.py; 8.3e-6
# and 2.3e-5 before it took the convolution's bias into its statistics and normalised as
# x * s + t).
F_ATOL = 3e-4
# Teacher-forcing input (bicubic/area resizes of accumulated f_hat): measured 9.4e-7 at 256 px,
# 1.4e-6 at 512 px (|x| <= 2.5).
VAR_INPUT_ATOL = 1e-5
# Logits of sample 0: measured 7.0e-6 (tiny256) and 5.7e-6 (saln) with |logit| <= 5.7;
# log-sum-exp of every row: measured 9.5e-7.
LOGITS_ATOL = 5e-5
LSE_ATOL = 1e-5
# Recorded units, error relative to the site's largest value: measured <= 3.8e-7 for the
# per-unit mean |value| (averaging over 680 tokens cancels rounding) and 3.7e-6 for block 0's
# full signed (L, units) values (`python experiments/parity.py` prints both).
ACT_RTOL = 3e-6
FULL_RTOL = 2e-5
# Decoder reconstruction from the full f_hat, in [-1, 1]: measured 1.1e-5 (1.08e-5 and 7.8e-6
# on the two fixtures; `python experiments/parity.py`).
RECON_ATOL = 1e-4

CONFIGS = ["tiny256", "tiny256_saln"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = {}
    for name in CONFIGS:
        d = tmp_path_factory.mktemp(name) / "ckpt"
        convert_checkpoints(DATA / name / "var.pth", DATA / "vae.pth", d, log=None)
        out[name] = d
    return out


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _ref(name: str):
    return np.load(DATA / name / "reference.npz")


def _ref_tokens(ref, K: int = 10):
    return [jnp.asarray(ref[f"idx{s}_f64"], jnp.int32) for s in range(K)]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_detected(converted, name):
    model = varjax.load(converted[name])
    want = json.loads((DATA / name / "config.json").read_text())
    v, q = model.config.var, model.config.vqvae
    assert (v.depth, v.embed_dim, v.num_heads, v.shared_aln) == (
        want["depth"], want["embed_dim"], want["num_heads"], want["shared_aln"])
    assert list(model.config.patch_nums) == want["patch_nums"]
    assert (q.ch, list(q.ch_mult), q.vocab_size, q.z_channels) == (
        want["ch"], want["ch_mult"], want["vocab_size"], want["z_channels"])


@pytest.mark.parametrize("name", CONFIGS)
def test_tokens_identical_on_every_scale(converted, name):
    ref = _ref(name)
    model = varjax.load(converted[name])
    tokens = model.tokenize(ref["images_uint8"])
    assert len(tokens) == 10
    for s, tok in enumerate(tokens):
        assert tok.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(tok), ref[f"idx{s}_f64"], err_msg=f"scale {s}")
        np.testing.assert_array_equal(np.asarray(tok), ref[f"idx{s}_f32"], err_msg=f"scale {s}")


def test_latent_f(converted):
    from varjax.vqvae import VQVAE

    ref = _ref("tiny256")
    model = varjax.load(converted["tiny256"])
    f = model.vqvae.apply({"params": model.params["vqvae"]}, jnp.asarray(ref["images_uint8"]),
                          method=VQVAE.encode)
    np.testing.assert_allclose(np.asarray(f).transpose(0, 3, 1, 2), ref["f_f32"], rtol=0, atol=F_ATOL)


@pytest.mark.parametrize("name", CONFIGS)
def test_teacher_forcing_input(converted, name):
    ref = _ref(name)
    model = varjax.load(converted[name])
    x = model.var_input(_ref_tokens(ref))
    np.testing.assert_allclose(np.asarray(x), ref["var_input"], rtol=0, atol=VAR_INPUT_ATOL)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_recorded_units(converted, name):
    _check_logits_and_units(converted, name)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_recorded_units_with_products_on_mkl(converted, name, monkeypatch):
    """The same, every Dense product through varjax.cpu_gemm (MKL), which otherwise takes only
    the released models' widths; the same tolerances."""
    if not mkl_expected():
        pytest.skip("no torch with MKL or no C++ compiler here: varjax uses XLA's products")
    ok, why = cpu_gemm.status()
    assert ok, why  # everything it needs is here, so it must be in use
    calls, gemm = [], cpu_gemm._gemm
    monkeypatch.setattr(cpu_gemm, "MIN_WIDTH", 0)
    monkeypatch.setattr(cpu_gemm, "_gemm", lambda a, b: calls.append(a.shape) or gemm(a, b))
    jax.clear_caches()  # the choice is made at trace time
    try:
        _check_logits_and_units(converted, name)
    finally:
        jax.clear_caches()
    assert len(calls) >= 4 * varjax.load(converted[name]).config.var.depth  # qkv, proj, fc1, fc2 per block


def _check_logits_and_units(converted, name):
    ref = _ref(name)
    model = varjax.load(converted[name])
    logits, acts = model.teacher_forced(ref["labels"], _ref_tokens(ref))
    logits = np.asarray(logits)
    assert logits.dtype == np.float32 and logits.shape == (4, 680, 512)
    np.testing.assert_allclose(logits[0], ref["logits0"], rtol=0, atol=LOGITS_ATOL)
    np.testing.assert_array_equal(logits.argmax(-1), ref["logits_argmax"])
    lse = np.asarray(jax.scipy.special.logsumexp(logits, axis=-1))
    np.testing.assert_allclose(lse, ref["logits_logsumexp"], rtol=0, atol=LSE_ATOL)

    sites = sorted(k.split("/", 1)[1] for k in ref.files if k.startswith("act_mean_abs/"))
    assert sorted(acts) == sites  # every recorded site, nothing more by default
    for site in sites:
        want = ref[f"act_mean_abs/{site}"]
        got = np.asarray(acts[site])
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=ACT_RTOL * np.abs(want).max(), err_msg=site)


@pytest.mark.parametrize("name", CONFIGS)
def test_full_block0_values(converted, name):
    """The signed (L, units) values of block 0 for sample 0, through the `full` reduction."""
    from varjax.model import Model
    from varjax.taps import UNIT_SITES

    ref = _ref(name)
    base = varjax.load(converted[name])
    model = Model(base.config, base.params, TapConfig(sites=UNIT_SITES, reductions=("full",), blocks=(0,)))
    _, full = model.teacher_forced(ref["labels"][:1], [t[:1] for t in _ref_tokens(ref)], reduction="full")
    for site in UNIT_SITES:
        want = ref[f"act_full0/blocks.0.{site}"]
        got = np.asarray(full[f"blocks.0.{site}"][0])
        np.testing.assert_allclose(got, want, rtol=0, atol=FULL_RTOL * np.abs(want).max(), err_msg=site)


@pytest.mark.parametrize("name", CONFIGS)
def test_attn_proj_times_gamma1_is_the_gated_branch(converted, name):
    """`attn.proj` is the layer's own output (parity above); the optional
    `attn.proj_times_gamma1` is that output times the block's gate gamma1, computed here by
    hand from the parameters, and is not what the study recorded."""
    from varjax.model import Model

    ref = _ref(name)
    base = varjax.load(converted[name])
    sites = ("attn.proj", "attn.proj_times_gamma1")
    model = Model(base.config, base.params, TapConfig(sites=sites, reductions=("full",), blocks=(0,)))
    labels = ref["labels"][:2]
    _, full = model.teacher_forced(labels, [t[:2] for t in _ref_tokens(ref)], reduction="full")
    p, C = base.params["var"], base.config.var.embed_dim
    cond = np.asarray(p["class_emb"]["embedding"])[labels]
    silu = cond / (1 + np.exp(-cond))
    if base.config.var.shared_aln:
        lin = p["shared_ada_lin_1"]
        gamma1 = (silu @ lin["kernel"] + lin["bias"]).reshape(-1, 6, C)[:, 0] + np.asarray(p["blocks_0"]["ada_gss"])[0, 0, 0]
    else:
        lin = p["blocks_0"]["ada_lin_1"]
        gamma1 = (silu @ lin["kernel"] + lin["bias"]).reshape(-1, 6, C)[:, 0]
    proj = np.asarray(full["blocks.0.attn.proj"])
    gated = np.asarray(full["blocks.0.attn.proj_times_gamma1"])
    np.testing.assert_allclose(gated, proj * gamma1[:, None, :], rtol=0, atol=FULL_RTOL * np.abs(gated).max())
    want = ref["act_full0/blocks.0.attn.proj"]
    assert not np.allclose(gated[0], want, rtol=0.1), "the fixtures hold the layer's own output, not x gamma1"


@pytest.mark.parametrize("name", CONFIGS)
def test_reconstruction(converted, name):
    ref = _ref(name)
    model = varjax.load(converted[name])
    recon = model.decode([t[:1] for t in _ref_tokens(ref)])
    np.testing.assert_allclose(np.asarray(recon)[0].transpose(2, 0, 1), ref["reconstruction0"][0],
                               rtol=0, atol=RECON_ATOL)


def test_tokenization_512px(tmp_path):
    d = tmp_path / "vae512"
    convert_checkpoints(None, DATA / "vae.pth", d, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32), log=None)
    ref = _ref("vq512")
    model = varjax.load(d)
    tokens = model.tokenize(ref["images_uint8"])
    for s, tok in enumerate(tokens):
        np.testing.assert_array_equal(np.asarray(tok), ref[f"idx{s}_f64"], err_msg=f"scale {s}")
    x = model.var_input(_ref_tokens(ref))
    np.testing.assert_allclose(np.asarray(x), ref["var_input"], rtol=0, atol=VAR_INPUT_ATOL)


def test_class_dropout_is_explicit(converted):
    """No label is dropped unless asked; dropping equals passing the null class."""
    ref = _ref("tiny256")
    model = varjax.load(converted["tiny256"])
    tokens = _ref_tokens(ref)
    a, _ = model.teacher_forced(ref["labels"], tokens)
    b, _ = model.teacher_forced(ref["labels"], tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    drop = np.array([True, False, False, False])
    c, _ = model.teacher_forced(ref["labels"], tokens, drop=drop)
    null = np.where(drop, 1000, ref["labels"])
    d, _ = model.teacher_forced(null, tokens)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
    assert not np.allclose(np.asarray(c)[0], np.asarray(a)[0])
    np.testing.assert_array_equal(np.asarray(c)[1:], np.asarray(a)[1:])


@pytest.mark.parametrize("kernel", ["einsum", "blocked", "fused"])
def test_every_attention_kernel_computes_the_same(converted, kernel):
    """Each CPU kernel (varjax/attention.py) == upstream's logits, and == the model's default
    (`auto`: `blocked` on a CPU) to within the same tolerance."""
    from varjax.model import _teacher_forced
    from varjax.var import VAR

    ref = _ref("tiny256_saln")
    model = varjax.load(converted["tiny256_saln"])
    x = model.var_input(_ref_tokens(ref))
    labels = jnp.asarray(ref["labels"], jnp.int32)
    a, taps_a = _teacher_forced(model.var, model.params["var"], labels, x, None)
    var = VAR(model.config.var, model.var.taps, attention=kernel)
    b, taps_b = _teacher_forced(var, model.params["var"], labels, x, None)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=LOGITS_ATOL)
    np.testing.assert_allclose(np.asarray(b)[0], ref["logits0"], rtol=0, atol=LOGITS_ATOL)
    units_a, units_b = collect(taps_a), collect(taps_b)
    for site, want in units_a.items():
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(units_b[site]), want, rtol=0,
                                   atol=ACT_RTOL * np.abs(want).max(), err_msg=site)
