"""The VQVAE's building blocks against float64 numpy: GroupNorm (with and without a bias handed
over by the convolution before it) and Conv (nn.Conv's parameters and computation, with the
bias optionally handed back). The whole encoder and decoder are checked against upstream in
test_parity.py; these pin the pieces the CPU speed work rewrote."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varjax.vqvae import Conv, GroupNorm


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _group_norm64(x, scale, bias, groups=32, eps=1e-6):
    B, H, W, C = x.shape
    xg = x.astype(np.float64).reshape(B, H, W, groups, C // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(B, H, W, C) * scale + bias


def _inputs(C=64, seed=0):
    rng = np.random.default_rng(seed)
    # Per-channel offsets several times the spread: a mean far from zero is where a careless
    # variance (E[x^2] - E[x]^2) or normalisation loses digits.
    x = rng.normal(size=(2, 12, 10, C)) * 0.5 + rng.normal(size=(1, 1, 1, C)) * 4
    b = rng.normal(size=(C,)) * 3  # differs within a group, so it is not normalised away
    scale, bias = rng.normal(size=(C,)), rng.normal(size=(C,))
    return [np.asarray(a, np.float32) for a in (x, b, scale, bias)]


@pytest.mark.parametrize("C", [32, 64, 160])
def test_group_norm_matches_float64(C):
    x, _, scale, bias = _inputs(C)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    y = GroupNorm().apply(params, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), _group_norm64(x, scale, bias), rtol=0, atol=2e-5)


@pytest.mark.parametrize("C", [64, 160])
def test_a_pending_bias_is_normalised_as_if_added(C):
    x, b, scale, bias = _inputs(C, seed=1)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    y = GroupNorm().apply(params, jnp.asarray(x), jnp.asarray(b))
    want = _group_norm64(x.astype(np.float64) + b, scale, bias)
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=2e-5)
    # and not as if it were absent (the statistics must take it in)
    assert np.abs(np.asarray(GroupNorm().apply(params, jnp.asarray(x))) - want).max() > 0.1


def test_conv_has_nn_convs_parameters_and_output():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 7, 5)), jnp.float32)
    for k in (1, 3):
        ours = Conv(6, k).init(jax.random.PRNGKey(3), x)
        flax_conv = nn.Conv(6, (k, k), padding=k // 2)
        theirs = flax_conv.init(jax.random.PRNGKey(3), x)
        assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same initial values
        params = jax.tree_util.tree_map(lambda a: a + 0.5, theirs)  # a bias that is not zero
        want = np.asarray(flax_conv.apply(params, x))
        np.testing.assert_array_equal(np.asarray(Conv(6, k).apply(params, x)), want)
        y, b = Conv(6, k).apply(params, x, add_bias=False)
        np.testing.assert_array_equal(np.asarray(b), np.asarray(params["params"]["bias"]))
        np.testing.assert_array_equal(np.asarray(y + b), want)


@pytest.mark.parametrize("num_blocks", [0, 1, 2])
def test_a_level_takes_a_handed_over_bias_as_if_added(num_blocks):
    from varjax.vqvae import _Level

    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(size=(1, 8, 8, 64)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(64,)) * 2, jnp.float32)
    level = _Level(64, num_blocks, attn=False, resample="down")
    params = level.init(jax.random.PRNGKey(5), h)
    params = jax.tree_util.tree_map_with_path(  # biases that are not zero
        lambda path, a: a + 0.3 if path[-1].key == "bias" else a, params)
    want = np.asarray(level.apply(params, h + b))
    np.testing.assert_allclose(np.asarray(level.apply(params, h, b)), want, rtol=0, atol=2e-5)
