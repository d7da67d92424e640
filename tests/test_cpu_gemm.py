"""varjax.cpu_gemm: the Dense layers' products through MKL's packed product on a one-device CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varjax import config as config_lib
from varjax import cpu_gemm
from varjax.model import Model, _teacher_forced, init_params
from tests.conftest import mkl_expected

DN = lambda lhs: (((lhs.ndim - 1,), (0,)), ((), ()))  # noqa: E731 - Dense's dimension numbers


@pytest.fixture
def mkl(monkeypatch):
    """The MKL path for products of any width (MIN_WIDTH 0), with jit caches cleared before
    and after (the choice is made when a function is traced)."""
    if not mkl_expected():
        pytest.skip("no torch with MKL or no C++ compiler here: varjax uses XLA's products")
    ok, why = cpu_gemm.status()
    assert ok, why  # everything it needs is here, so it must be in use
    monkeypatch.setattr(cpu_gemm, "MIN_WIDTH", 0)
    jax.clear_caches()
    yield why
    jax.clear_caches()


def _traced_dot(lhs, rhs):
    return jax.jit(cpu_gemm.traced(lambda a, b: cpu_gemm.dot_general(a, b, DN(a))))(lhs, rhs)


def _hlo(fun, *args) -> str:
    return jax.jit(fun).lower(*args).compile().as_text()


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (37, 129, 65), (2, 50, 64, 96), (0, 8, 4), (6, 0, 5)])
def test_product_equals_the_float64_product(mkl, shape):
    rng = np.random.default_rng(sum(shape))
    *rows, k, n = shape
    a = rng.standard_normal((*rows, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(_traced_dot(a, b))
    want = np.tensordot(a.astype(np.float64), b.astype(np.float64), 1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.sqrt(k)))
    if a.size and b.size:  # (XLA folds an empty product away before it reaches the call)
        assert cpu_gemm.TARGET in _hlo(cpu_gemm.traced(lambda a, b: cpu_gemm.dot_general(a, b, DN(a))), a, b)


@pytest.mark.parametrize("k, n", [(1024, 3072), (4096, 1024)])
def test_a_rows_bits_do_not_depend_on_the_rows_beside_it(mkl, k, n):
    """Each row of the product comes out bit for bit the same whether it is computed alone,
    with a few rows or with many, and wherever it sits among them (d16's fc1 and fc2 shapes;
    plain sgemm fails this, the packed product does not). The sampler relies on it."""
    rng = np.random.default_rng(k + n)
    a = rng.standard_normal((600, k)).astype(np.float32)
    b = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    whole = np.asarray(_traced_dot(a, b))
    for lo, hi in ((0, 1), (5, 6), (0, 2), (3, 7), (7, 23), (100, 164), (37, 181), (50, 600)):
        np.testing.assert_array_equal(np.asarray(_traced_dot(a[lo:hi], b)), whole[lo:hi], err_msg=f"rows {lo}:{hi}")


def test_the_sampler_uses_it_and_an_image_does_not_depend_on_the_batch(mkl):
    """The sampler's Dense products go to MKL too, and a sample's tokens are the same in a
    batch of 8 and in batches of 2, as tests/test_generate.py checks with XLA's products.
    (Its logits agree within rounding, not bit for bit: XLA's own attention and convolutions
    round a row differently per batch shape, with or without MKL.)"""
    from varjax import generate as gen_lib

    cfg = config_lib.PRESETS["micro"]()
    model = Model(cfg, init_params(cfg, seed=0))
    sampling = gen_lib.Sampling(cfg=1.5, top_k=4)
    program = gen_lib.program_for(model, sampling, return_images=False)
    assert cpu_gemm.TARGET in gen_lib.compile_sampler(model, program, 2).fn.as_text()
    labels = np.array([0, 1, 2, 3, 4, 5, 1000, 7])
    whole = gen_lib.generate(model, labels, sampling, seed=3, return_logits=True)
    for start in (0, 6):
        part = gen_lib.generate(model, labels[start:start + 2], sampling, seed=3, return_logits=True,
                                sample_ids=np.arange(start, start + 2))
        for s, (x, y) in enumerate(zip(whole.tokens, part.tokens)):
            np.testing.assert_array_equal(np.asarray(x)[start:start + 2], np.asarray(y), err_msg=f"scale {s}")
        np.testing.assert_allclose(np.asarray(whole.logits)[start:start + 2], np.asarray(part.logits), rtol=0, atol=2e-5)


def test_only_inside_tracing_for_float32_on_one_device_and_wide_layers(mkl, monkeypatch):
    a, b = jnp.ones((4, 8)), jnp.ones((8, 3))
    dense = lambda a, b: cpu_gemm.dot_general(a, b, DN(a))  # noqa: E731
    assert cpu_gemm.TARGET in _hlo(cpu_gemm.traced(dense), a, b)
    assert cpu_gemm.TARGET not in _hlo(dense, a, b)  # plain jax.jit: XLA's product
    assert cpu_gemm.TARGET not in _hlo(cpu_gemm.traced(dense), a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    monkeypatch.setattr(cpu_gemm, "MIN_WIDTH", 4)  # b is 8 x 3: too narrow
    assert cpu_gemm.TARGET not in _hlo(cpu_gemm.traced(dense), a, b)
    monkeypatch.setattr(cpu_gemm, "MIN_WIDTH", 3)
    assert cpu_gemm.TARGET in _hlo(cpu_gemm.traced(dense), a, b)
    with monkeypatch.context() as m:
        m.setattr(jax, "device_count", lambda *_: 2)  # a mesh: GSPMD cannot split the call
        assert cpu_gemm.TARGET not in _hlo(cpu_gemm.traced(dense), a, b)
    monkeypatch.undo()  # the shipped MIN_WIDTH (the fixture's 0 undone too): the released models' layers only
    assert cpu_gemm.TARGET in _hlo(cpu_gemm.traced(dense), jnp.ones((2, 1024)), jnp.ones((1024, 4096)))
    assert cpu_gemm.TARGET not in _hlo(cpu_gemm.traced(dense), jnp.ones((2, 128)), jnp.ones((128, 512)))


def test_model_uses_it_except_with_xla_defaults(mkl):
    cfg = config_lib.PRESETS["micro"]()
    model = Model(cfg, init_params(cfg, seed=0))
    L = cfg.var.seq_len
    args = (model.params["var"], jnp.arange(2, dtype=jnp.int32),
            jnp.zeros((2, L - 1, cfg.vqvae.z_channels), jnp.float32), None)
    varjax_hlo = _teacher_forced.lower(model.var, *args).compile().as_text()
    default_hlo = _teacher_forced.xla_defaults.lower(model.var, *args).compile().as_text()
    # every Dense of every block (qkv, proj, fc1, fc2, ada_lin) and the word embedding and head
    assert varjax_hlo.count(f'custom_call_target="{cpu_gemm.TARGET}"') >= 5 * cfg.var.depth
    assert cpu_gemm.TARGET not in default_hlo
    out = _teacher_forced(model.var, *args)
    ref = _teacher_forced.xla_defaults(model.var, *args)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), rtol=0, atol=2e-5)


def test_gradient_is_xla_products_of_the_cotangent(mkl):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 5, 6)).astype(np.float32)
    b = rng.standard_normal((6, 4)).astype(np.float32)
    loss = lambda dot: lambda a, b: jnp.sum(jnp.tanh(dot(a, b, DN(a))) ** 2)  # noqa: E731
    got = jax.jit(cpu_gemm.traced(jax.grad(loss(cpu_gemm.dot_general), argnums=(0, 1))))(a, b)
    want = jax.grad(loss(jax.lax.dot_general), argnums=(0, 1))(a, b)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV_SWITCH, "xla")
    assert cpu_gemm.status.__wrapped__() == (False, f"{cpu_gemm.ENV_SWITCH}=xla")


def test_an_unknown_switch_value_warns_and_keeps_xla(monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV_SWITCH, "fast")
    with pytest.warns(UserWarning, match="neither 'mkl' nor 'xla'"):
        ok, why = cpu_gemm.status.__wrapped__()
    assert not ok and "'fast'" in why


def test_failed_build_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("VARJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(Exception, match="false exited|no C\\+\\+ compiler"):
        cpu_gemm._build()
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(Exception, match="no C\\+\\+ compiler"):
        cpu_gemm._build()
    assert list((tmp_path / "cache").iterdir()) == []
