"""The converter's rules and the reading side: everything about conversion that needs no torch.

The key rule (docs/design.md), the ignore list, the five released VAR layouts and the released
VQVAE's (tests/data/checkpoint_keys: every key and shape) against the Flax trees, and
`varjax.checkpoint.load_converted`'s errors. These run without torch; the tests that read or
write .pth files (test_convert.py, test_parity.py) fail without it, and
`test_without_torch_the_torch_tests_fail_and_these_run` holds the suite to that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convert.detect import detect_var, detect_vqvae, part_of
from convert.layout import var_layout, vqvae_layout
from convert.mapping import IGNORED, entry, is_ignored, plan, torch_key
from convert.verify import abstract_params, check
from varjax.checkpoint import CheckpointError, load_converted
from varjax.config import ModelConfig, VQVAEConfig, released
from varjax.data.planted import default_checkpoint

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "tests" / "data" / "checkpoint_keys"
RELEASED = sorted(KEYS.glob("*.tsv"))
BUFFERS = {"lvl_1L", "attn_bias_for_masking", "quantize.ema_vocab_hit_SV"}  # + zero_k_bias


def _tsv_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """A key listing (columns key, shape, dtype; a header row) -> {key: shape}, in file order."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return {key: tuple(json.loads(shape)) for key, shape, _ in rows}


# --- the rule ---------------------------------------------------------------------------
@pytest.mark.parametrize("key,ndim,path,transform", [
    ("blocks.3.attn.proj.weight", 2, "blocks_3/attn/proj/kernel", "linear"),
    ("encoder.down.0.block.1.conv1.weight", 4, "encoder/down_0/block_1/conv1/kernel", "conv"),
    ("blocks.0.ada_lin.1.weight", 2, "blocks_0/ada_lin_1/kernel", "linear"),
    ("quantize.quant_resi.qresi_ls.2.weight", 4, "quantize/quant_resi/qresi_ls_2/kernel", "conv"),
    ("encoder.mid.block_1.norm1.weight", 1, "encoder/mid/block_1/norm1/scale", "norm"),
    ("class_emb.weight", 2, "class_emb/embedding", "embedding"),
    ("quantize.embedding.weight", 2, "quantize/embedding/embedding", "embedding"),
    ("blocks.2.attn.scale_mul_1H11", 4, "blocks_2/attn/scale_mul_1H11", "copy"),
    ("pos_1LC", 3, "pos_1LC", "copy"),
    ("head.bias", 1, "head/bias", "copy"),
])
def test_rule(key, ndim, path, transform):
    e = entry(key, ndim)
    assert "/".join(e.path) == path and e.transform == transform
    assert torch_key(e.path) == key


def test_ignore_list_is_the_design_buffers():
    assert set(IGNORED) == BUFFERS | {"blocks.*.attn.zero_k_bias"}
    assert is_ignored("blocks.17.attn.zero_k_bias") and not is_ignored("blocks.1.attn.q_bias")


# --- all released layouts, shapes only ---------------------------------------------------
@pytest.mark.parametrize("tsv", RELEASED, ids=lambda p: p.stem)
def test_released_layout_fills_flax_tree(tsv):
    shapes = _tsv_shapes(tsv)
    part = part_of(shapes)
    if part == "var":
        cfg = detect_var(shapes)
        config = ModelConfig(patch_nums=cfg.patch_nums, var=cfg)
        assert config == dataclasses.replace(released(cfg.depth), vqvae=None)
        assert var_layout(cfg) == shapes
    else:
        cfg = detect_vqvae(shapes)
        config = ModelConfig(vqvae=cfg)
        assert cfg == VQVAEConfig()
        assert vqvae_layout(cfg) == shapes
    entries, ignored = plan(shapes)
    # Every key is a param or a listed buffer; the params fill the Flax tree exactly.
    assert len(entries) + len(ignored) == len(shapes)
    assert set(ignored) == {k for k in shapes if k in BUFFERS or k.endswith(".attn.zero_k_bias")}
    expected = abstract_params(part, config)
    check(entries, shapes, expected)  # raises on any missing, unexpected or misshaped key
    assert len(expected) == len(entries)
    for key, e in entries.items():
        assert torch_key(e.path) == key


# --- the reading side --------------------------------------------------------------------
def test_load_converted_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="no such directory"):
        load_converted(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_converted(tmp_path / "file")
    with pytest.raises(CheckpointError, match=r"not a converted checkpoint \(no manifest.json, config.json, params\)"):
        load_converted(tmp_path / "empty")
    out = tmp_path / "out"
    shutil.copytree(default_checkpoint(), out)  # a converted directory (no torch needed)
    assert load_converted(out)[0].var is not None
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(CheckpointError, match="format 'other/9'"):
        load_converted(out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="unreadable config.json"):
        load_converted(out)


# --- without torch ---------------------------------------------------------------------------
def test_without_torch_the_torch_tests_fail_and_these_run(tmp_path):
    """CI installs torch: its absence must fail the suite, not skip the converter's tests, and
    must not take the tests that need no torch down with it."""
    shadow = tmp_path / "torch"  # an importable `torch` that fails like a missing one
    shadow.mkdir()
    (shadow / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_convert.py",
                          "tests/test_convert_rules.py", "-k", "not without_torch", "-m", "not slow"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out  # 1: tests failed or errored (2 would be an interrupted run)
    assert "ERROR tests/test_convert.py" in out and "No module named 'torch'" in out, out
    summary = out.strip().splitlines()[-1]  # e.g. "17 passed, 1 error in 9.50s"
    assert "passed" in summary and "1 error" in summary, summary
    assert "skipped" not in summary and "failed" not in summary, out
