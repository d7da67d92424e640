"""experiments/bench.py keeps working (its numbers are measured by running it, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> list[dict]:
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench.py"), *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def test_throughput_line_has_every_field():
    rows = _bench("--config", "micro", "--images-per-step", "2", "--views", "2", "--steps", "1",
                  "--precision", "highest")
    (row,) = [r for r in rows if r["what"] == "throughput"]
    (tok,) = [r for r in rows if r["what"] == "tokenizer"]
    assert tok["views_per_step"] == 4 and tok["views_per_s"] > 0
    (split,) = [r for r in rows if r["what"] == "split"]
    assert split["attention"] == row["attention"] and split["step_s"] > 0
    parts = ("tokenizer_s", "var_input_s", "transformer_s", "reductions_s", "rest_s")
    assert all(split[k] > 0 for k in parts[:3])
    assert sum(split[k] for k in parts) == pytest.approx(split["step_s"], abs=1e-3)
    for key in ("images_per_s", "views_per_s", "compile_s", "tflop_per_s", "gflop_per_view",
                "peak_device_mem_gib", "device", "jax", "precision"):
        assert key in row, key
    assert row["images_per_s"] > 0 and row["gflop_per_view"] > 0


def test_precision_cost_compares_against_highest():
    rows = _bench("--config", "micro", "--precision-cost", "--images", "8", "--views", "2",
                  "--images-per-step", "4", "--precision", "bf16")
    by = {r["precision"]: r for r in rows if r["what"] == "precision_cost"}
    assert set(by) == {"highest", "bf16"}
    assert {r["what"] for r in rows} == {"throughput", "tokenizer", "split", "precision_cost"}
    ref = by["highest"]
    assert ref["identical_tokens"] == 1.0 and ref["mu_max_rel_err"] == 0.0 and ref["u10_jaccard"] == 1.0
    # bf16 is not float32: its mu must differ (a mode that silently ran in float32 fails here)
    assert by["bf16"]["mu_max_rel_err"] > 0
    assert 0 <= by["bf16"]["u10_jaccard"] <= 1


def test_variants_time_exactly_what_is_named():
    rows = _bench("--config", "micro", "--views", "2", "--steps", "1",
                  "--variant", "bf16:fused:2", "--variant", "bf16:einsum:4")
    got = [(r["precision"], r["attention"], r["images_per_step"]) for r in rows if r["what"] == "throughput"]
    assert got == [("bf16", "fused", 2), ("bf16", "einsum", 4)]
    assert all(r["step_mem_gib"] is None or r["step_mem_gib"] > 0 for r in rows if r["what"] == "throughput")


def test_a_bad_variant_is_one_clear_error():
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench.py"), "--variant", "bf16:flash:2"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 2 and "PRECISION:ATTENTION:IMAGES_PER_STEP" in res.stderr


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "experiments" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flop_count_of_products_and_convolutions():
    import jax
    import jax.numpy as jnp

    bench = _bench_module()

    def f(a, b, x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        z = jax.lax.cond(a.sum() > 0, lambda: a @ b, lambda: a @ b @ jnp.eye(6))  # the larger branch counts
        return jnp.tanh(z).sum() + y.sum()

    args = (jnp.ones((4, 5)), jnp.ones((5, 6)), jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 7)))
    got = bench._dot_conv_flops(jax.make_jaxpr(f)(*args).jaxpr)
    conv = 2 * (2 * 8 * 8 * 7) * (3 * 3 * 3)
    assert got == conv + 2 * 4 * 6 * 5 + 2 * 4 * 6 * 6


def test_d16_costs_what_upstream_counted():
    """docs/performance.md: 525 GFLOP per 256 px view (PyTorch's FLOP counter, tokenizer + transformer)."""
    import dataclasses

    from varjax import config as config_lib
    from varjax.model import Model, param_shapes
    from varjax.record import Options

    bench = _bench_module()
    cfg = config_lib.PRESETS["d16"]()
    model = Model(cfg, param_shapes(cfg))
    per_view = bench.step_flops(model, 2, Options(batch_size=1), cfg.resolution) / 2
    assert abs(per_view / 1e9 - 525) < 1.0, per_view
    fused = bench.step_flops(model, 2, dataclasses.replace(Options(batch_size=1), attention="fused"), cfg.resolution)
    assert fused / 2 == per_view  # every kernel is counted on the same algebra


def test_bench_upstream_refuses_a_path_that_is_no_checkout(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_upstream.py"), "--upstream",
                          str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 2 and "not a FoundationVision/VAR checkout" in res.stderr
    assert res.stderr.count("\n") == 1 and not res.stdout


def test_paired_ratio_follows_each_repetition_not_the_drift():
    from experiments.bench_upstream import paired_ratio

    # varjax 1.1x faster in every repetition while the machine slows down 2x over the run:
    # the per-repetition ratio is exact, its interval has no width.
    ref = np.linspace(2.0, 4.0, 8)
    tight = paired_ratio(ref, ref / 1.1)
    assert tight["paired_gmean"] == 1.1 and tight["paired_ci95"] == [1.1, 1.1]
    assert tight["paired_share_ge_1"] == 1.0
    # Ratios 1 and 1.21 (log ratios 0 and 2a, a = ln 1.1): mean a, standard error a, and the
    # 95% t quantile with one degree of freedom 12.706.
    two = paired_ratio([1.0, 1.21], [1.0, 1.0])
    assert two["paired_gmean"] == 1.1 and two["paired_share_ge_1"] == 1.0
    a = np.log(1.1)
    assert two["paired_ci95"] == pytest.approx([np.exp(a - 12.7062 * a), np.exp(a + 12.7062 * a)], rel=1e-3)
    # Slower in half the repetitions; one repetition has no interval; unequal lengths refused.
    assert paired_ratio([1.0, 1.0], [0.9, 1.1])["paired_share_ge_1"] == 0.5
    assert paired_ratio([2.0], [1.0]) == {"paired_gmean": 2.0, "paired_ci95": None, "paired_share_ge_1": 1.0}
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])


def test_cpu_kernel_rows_compare_like_with_like():
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_cpu_kernels.py"), "--part",
                          "attention", "--images", "1", "--reps", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = {r["impl"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert {"einsum", "blocked", "torch_sdpa"} <= set(rows)
    # the same function: blocked and torch's kernel agree with the spelled-out softmax
    assert all(r["max_abs_diff"] < 1e-5 and r["min_s"] > 0 for r in rows.values())


def test_profile_attributes_the_traced_time():
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "profile_cpu.py"), "--config", "micro",
                          "--call", "teacher_forced"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    (row,) = [json.loads(line) for line in res.stdout.splitlines()]
    # micro's layers are narrower than cpu_gemm.MIN_WIDTH: its Dense products stay XLA's
    assert row["by_op_ms"]["dot_general"] > 0 and "dot_general @ VAR/blocks_N/ffn/fc1" in row["by_op_and_module_ms"]
    assert 0 < row["attributed_ms"] <= row["traced_wall_ms"] * 2  # thunks may overlap on 2 threads


def test_against_xla_defaults_times_both_programs():
    rows = _bench("--config", "micro", "--images-per-step", "2", "--views", "2", "--steps", "1",
                  "--precision", "highest", "--against-xla-defaults", "--no-split")
    (row,) = [r for r in rows if r["what"] == "throughput"]
    assert row["xla_defaults_images_per_s"] > 0
    assert row["speedup_vs_xla_defaults"] == pytest.approx(row["images_per_s"] / row["xla_defaults_images_per_s"], rel=1e-2)
    assert not [r for r in rows if r["what"] == "split"]


def test_generation_rows():
    rows = _bench("--generate", "--config", "micro", "--gen-batch", "2", "--reps", "2", "--precision", "highest",
                  "--top-k", "10")
    (row,) = rows
    assert row["what"] == "generation" and row["batch"] == 2 and len(row["call_s"]) == 2
    assert row["images_per_s_best"] >= row["images_per_s"] > 0 and row["compile_s"] > 0
    assert row["gflop_per_image"] > 0 and (row["cfg"], row["top_k"], row["top_p"]) == (1.5, 10, 0.96)


def test_generation_flops_split_as_expected():
    """d16 with CFG: the transformer twice (about 300 GFLOP a pass with the cache) plus the
    decoder (394 GFLOP); without CFG the transformer once."""
    from varjax import config as config_lib
    from varjax.generate import Sampling
    from varjax.model import Model, param_shapes
    from varjax.vqvae import VQVAE

    import jax
    import jax.numpy as jnp

    bench = _bench_module()
    cfg = config_lib.PRESETS["d16"]()
    model = Model(cfg, param_shapes(cfg))
    guided = bench.sampler_gflop(model, Sampling(1.5, 900, 0.96), "highest", 1)
    plain = bench.sampler_gflop(model, Sampling(0.0, 900, 0.96), "highest", 1)
    vq = VQVAE(cfg.vqvae)
    dec = jax.make_jaxpr(lambda p, f: vq.apply({"params": p}, f, method=VQVAE.decode_fhat))(
        model.params["vqvae"], jax.ShapeDtypeStruct((1, 16, 16, 32), jnp.float32))
    decoder = bench._dot_conv_flops(dec.jaxpr) / 1e9
    transformer = guided - plain
    assert 280 < transformer < 310  # teacher forcing: 310 with the full masked L x L attention
    assert abs(plain - transformer - decoder) < 1.0  # the rest is the decoder (f_hat updates are tiny)


def test_parity_upstream_refuses_a_path_that_is_no_checkout(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "parity_upstream.py"), "--upstream",
                          str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 2 and "not a FoundationVision/VAR checkout" in res.stderr
    assert res.stderr.count("\n") == 1 and not res.stdout


def test_parity_upstream_cases_are_valid_models():
    """Every case is a model varjax builds, and differs from the fixtures' shape."""
    from experiments import parity_upstream
    from varjax import config as config_lib
    from varjax.model import param_shapes

    for name, make in parity_upstream.CASES.items():
        cfg = make()
        assert cfg != config_lib.tiny() and cfg.var.vocab_size == cfg.vqvae.vocab_size, name
        assert param_shapes(cfg)["var"], name
