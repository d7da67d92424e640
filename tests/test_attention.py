"""The CPU attention kernel and the XLA options (varjax/attention.py, varjax/xla_options.py)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varjax import attention, xla_options
from varjax.config import PATCH_NUMS_256, PATCH_NUMS_512
from varjax.var import block_causal_mask

# `blocked` sums the same products over fewer (exactly zero-weighted) keys and in other
# blocks: measured max abs difference 4.8e-7 from `einsum` on outputs of size ~1 (float32).
BLOCKED_ATOL = 3e-6


def _einsum(q, k, v, mask, scale, dtype):
    # varjax/var.py's spelled-out path, verbatim
    B, L, H, c = q.shape
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    attn = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bkhc->bqhc", attn, v).reshape(B, L, H * c)


@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, (1, 2, 3, 4), (1, 3, 8, 9), (8, 11)])
def test_query_groups_cover_every_query_and_mask_only_mixed_scales(patch_nums):
    groups = attention.query_groups(patch_nums)
    L = sum(p * p for p in patch_nums)
    assert [g[0] for g in groups] == [0] + [g[1] for g in groups[:-1]] and groups[-1][1] == L
    mask = block_causal_mask(patch_nums)
    for first, end, masked in groups:
        # a group sees keys [0, end): everything its queries may see, nothing after
        assert not mask[first:end, end:].any()
        assert masked == (not mask[first:end, :end].all())


def _check_blocked(patch_nums, heads, width, scale, seed):
    """`blocked` on random (2, L, heads, width / heads) inputs equals the spelled-out softmax."""
    L = sum(p * p for p in patch_nums)
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(2, L, heads, width // heads)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(block_causal_mask(patch_nums))
    with jax.default_matmul_precision("highest"):
        want = _einsum(q, k, v, mask, scale, jnp.float32)
        got = jax.jit(lambda q, k, v: attention.blocked(q, k, v, mask, patch_nums, scale, jnp.float32))(q, k, v)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=BLOCKED_ATOL)


@pytest.mark.parametrize("patch_nums,heads,width", [(PATCH_NUMS_256, 3, 48), ((1, 2, 3, 9, 10), 2, 24)])
def test_blocked_is_the_spelled_out_softmax(patch_nums, heads, width):
    _check_blocked(patch_nums, heads, width, 0.3, seed=0)


@pytest.mark.parametrize("chunk_bytes,pairs", [(0, 1), (2 * 81 * 150 * 4, 2), (1 << 40, 8)])
def test_blocked_in_steps_of_any_size_is_the_spelled_out_softmax(monkeypatch, chunk_bytes, pairs):
    """One (image, head) pair per lax.map step, two, or all eight in one step: the same."""
    patch_nums, heads, width = (1, 2, 8, 9), 4, 16  # largest group: 81 queries x 150 keys
    monkeypatch.setattr(attention, "CHUNK_BYTES", chunk_bytes)
    assert attention._pairs_per_step(2 * heads, 81 * 150 * 4) == pairs
    _check_blocked(patch_nums, heads, width, 0.7, seed=1)


def _cached_einsum(q, k_BHcE, v_BHEc, scale):
    # varjax/var.py's cached einsum path (SelfAttention._attend_cached), verbatim
    logits = jnp.einsum("bqhc,bhck->bhqk", q, k_BHcE).astype(jnp.float32) * scale
    attn = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bhkc->bqhc", attn, v_BHEc)


@pytest.mark.parametrize("whole_bytes,chunk_bytes,pairs", [(1 << 40, 0, 8), (0, 0, 1), (0, 2 * 9 * 30 * 4, 2),
                                                           (0, 1 << 40, 8)])
def test_cached_whole_or_in_chunks_is_the_spelled_out_softmax(monkeypatch, whole_bytes, chunk_bytes, pairs):
    """The sampler's kernel: one product for all (row, head) pairs, or lax.map over chunks of
    1, 2 or all 8 pairs, against the spelled-out softmax on the same cache."""
    monkeypatch.setattr(attention, "WHOLE_BYTES", whole_bytes)
    monkeypatch.setattr(attention, "CHUNK_BYTES", chunk_bytes)
    B, l, E, H, c = 4, 9, 30, 2, 16
    if whole_bytes == 0:
        assert attention._pairs_per_step(B * H, l * E * 4) == pairs
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(B, l, H, c)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, H, c, E)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, H, E, c)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        want = _cached_einsum(q, k, v, 0.4)
        got = jax.jit(lambda q, k, v: attention.cached(q, k, v, 0.4, jnp.float32))(q, k, v)
    assert got.shape == (B, l, H, c) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=BLOCKED_ATOL)


def test_blocked_keeps_the_compute_dtype():
    patch_nums = (1, 2, 8)
    L = sum(p * p for p in patch_nums)
    q = k = v = jnp.ones((1, L, 2, 4), jnp.bfloat16)
    out = attention.blocked(q, k, v, jnp.asarray(block_causal_mask(patch_nums)), patch_nums, 1.0, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, L, 8)


def test_auto_picks_the_backends_kernel():
    cpu = jax.default_backend() == "cpu"
    assert attention.resolve("auto", jnp.float32, PATCH_NUMS_256) == ("blocked" if cpu else "einsum")
    assert attention.resolve("auto", jnp.float32, PATCH_NUMS_512) == ("blocked" if cpu else "einsum")
    assert attention.resolve("auto", jnp.float32, (1, 2, 3, 4)) == "einsum"  # nothing to block
    assert attention.resolve("fused", jnp.float32, PATCH_NUMS_256) == "fused"


def test_an_option_the_jaxlib_rejects_costs_only_itself(monkeypatch):
    """compiler_options tries each option on its own: one this jaxlib does not know is left
    out, the others are still taken."""
    if jax.default_backend() != "cpu":
        return
    real = xla_options.compiler_options()
    bogus = {"xla_cpu_no_such_option_in_any_jaxlib": True}
    monkeypatch.setattr(xla_options, "COMPILER_OPTIONS", {**xla_options.COMPILER_OPTIONS, **bogus})
    xla_options.compiler_options.cache_clear()
    try:
        assert xla_options.compiler_options() == real
    finally:
        xla_options.compiler_options.cache_clear()


def test_compiled_programs_get_the_options():
    """Convolutions leave YNNPACK (XLA's own op), products stay on it: the CPU lever of
    varjax/xla_options.py takes effect, and `xla_defaults` undoes it. An option this jaxlib
    rejects is left out, and only that one."""
    opts = xla_options.compiler_options()
    if jax.default_backend() != "cpu":
        assert opts == {}
        return
    for key, value in xla_options.COMPILER_OPTIONS.items():
        if key in opts:
            assert opts[key] == value
        else:
            with pytest.raises(Exception):
                jax.jit(lambda x: x).lower(jnp.zeros(())).compile({key: value})
    if "xla_cpu_experimental_ynn_fusion_type" not in opts:
        return

    def f(x, w, a):
        conv = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return conv, a @ a

    # (YNNPACK takes convolutions of >= 32 channels: smaller ones would pass either way)
    args = (jnp.ones((1, 16, 16, 32)), jnp.ones((3, 3, 32, 32)), jnp.ones((64, 64)))
    text = xla_options.jit(f).lower(*args).compile().as_text()
    fused = re.findall(r"fusion\(.*op_name=\"[^\"]*/(\w+)\"", text)
    assert "conv_general_dilated" not in fused  # not inside a library fusion
    assert "dot_general" in fused and re.search(r"= f32\[1,16,16,32\]\S* convolution\(", text)
    # `.xla_defaults` (Model(xla_defaults=True)) compiles with XLA's own choice: YNNPACK's conv
    default = xla_options.jit(f).xla_defaults.lower(*args).compile().as_text()
    assert "conv_general_dilated" in re.findall(r"fusion\(.*op_name=\"[^\"]*/(\w+)\"", default)
