"""Tests of `python -m convert` (convert/) on .pth files: these need torch.

Fixtures: tests/data/upstream_var (small upstream-format .pth files with their true config)
and tests/data/checkpoint_keys (every key and shape of the released d16 and its VQVAE, for
the real-size run). The key rule, the released layouts and the reading side need no torch:
test_convert_rules.py. The failure tests run the real command in a subprocess and hold it to
its contract: non-zero exit, exactly one line on stderr, no traceback, no output left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# A test dependency (pyproject's test extra): without it this module fails to import, loudly;
# never skipped. What needs no torch is in test_convert_rules.py and runs either way.
import torch

from convert import ConvertError, convert_checkpoints
from convert.layout import var_layout, vqvae_layout
from convert.mapping import entry, is_ignored
from convert.synthetic import state_dict, state_dict_from_tsv
from varjax import checkpoint
from varjax.checkpoint import load_converted
from varjax.config import PATCH_NUMS_512, ModelConfig, VARConfig, VQVAEConfig, released, tiny

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
UPSTREAM = DATA / "upstream_var"
VAE = UPSTREAM / "vae.pth"
TINY = UPSTREAM / "tiny256" / "var.pth"
TINY_SALN = UPSTREAM / "tiny256_saln" / "var.pth"
KEYS = DATA / "checkpoint_keys"

# Sizes that never coincide (width 48, 3 heads, V 37, Cvae 8, 2 levels): a transposed or
# swapped tensor cannot pass the shape check by accident.
ODD_VAR = VARConfig(depth=3, embed_dim=48, num_heads=3, num_classes=10, vocab_size=37,
                    z_channels=8, patch_nums=(1, 2, 3))
ODD_VQVAE = VQVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=37,
                        share_quant_resi=3, using_sa=False)


def load_sd(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def to_flax(key: str, t: torch.Tensor) -> np.ndarray:
    """The transforms of docs/design.md, written out independently of convert/mapping.py."""
    a = t.float().numpy()
    module = key.rsplit(".", 1)[0]
    if key.endswith(".weight") and module not in ("class_emb", "lvl_embed", "quantize.embedding"):
        if a.ndim == 2:
            return a.T
        if a.ndim == 4:
            return a.transpose(2, 3, 1, 0)
    return a


def flax_path(key: str) -> tuple[str, ...]:
    """docs/design.md's rule, independently of convert/mapping.py."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit():
            out[-1] += f"_{part}"
        else:
            out.append(part)
    return tuple(out)


def get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def assert_params_match(params: dict, sd: dict, bf16: bool = False) -> None:
    """Every non-buffer tensor equals its param under the transforms; nothing else exists."""
    n = 0
    for key, t in sd.items():
        if is_ignored(key):
            continue
        leaf = flax_path(key)
        if key.endswith(".weight"):
            name = {1: "scale", 2: "kernel", 4: "kernel"}[t.ndim]
            if key.rsplit(".", 1)[0] in ("class_emb", "lvl_embed", "quantize.embedding"):
                name = "embedding"
            leaf = (*leaf[:-1], name)
        got = get(params, leaf)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32, key
        np.testing.assert_array_equal(got, to_flax(key, t), err_msg=key)
        n += 1
    assert n == len(checkpoint_leaves(params))


def checkpoint_leaves(tree: dict) -> list:
    out = []
    for v in tree.values():
        out += checkpoint_leaves(v) if isinstance(v, dict) else [v]
    return out


def no_output(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


# --- the fixtures: detection and round trip ----------------------------------------------
@pytest.mark.parametrize("var_path", [TINY, TINY_SALN], ids=["tiny256", "tiny256_saln"])
def test_fixture_converts_with_true_config(tmp_path, var_path):
    truth = json.loads((var_path.parent / "config.json").read_text())
    out = tmp_path / "out"
    config = convert_checkpoints(var_path, VAE, out, log=None)
    assert config == tiny(shared_aln=truth["shared_aln"])
    v, q = config.var, config.vqvae
    for name in ("depth", "embed_dim", "num_heads", "mlp_ratio", "shared_aln", "attn_l2_norm",
                 "norm_eps", "num_classes", "vocab_size", "z_channels"):
        assert getattr(v, name) == truth[name], name
    for name in ("ch", "num_res_blocks", "share_quant_resi", "quant_resi", "vocab_size", "z_channels"):
        assert getattr(q, name) == truth[name], name
    assert q.ch_mult == tuple(truth["ch_mult"]) and config.patch_nums == tuple(truth["patch_nums"])
    assert config.resolution == truth["resolution"]

    loaded, params = load_converted(out)
    assert loaded == config
    assert set(params) == {"var", "vqvae"}
    assert_params_match(params["var"], load_sd(var_path))
    assert_params_match(params["vqvae"], load_sd(VAE))
    assert ModelConfig.from_json((out / "config.json").read_text()) == config


def test_manifest(tmp_path):
    out = tmp_path / "out"
    convert_checkpoints(TINY, None, out, log=None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == checkpoint.FORMAT
    src = m["sources"]["var"]
    assert src["sha256"] == hashlib.sha256(TINY.read_bytes()).hexdigest()
    assert src["num_keys"] == len(load_sd(TINY)) == 38 and src["num_param_keys"] == 34
    assert src["ignored_keys"] == ["lvl_1L", "attn_bias_for_masking",
                                   "blocks.0.attn.zero_k_bias", "blocks.1.attn.zero_k_bias"]
    assert m["config"]["var"]["depth"] == 2 and m["config"]["vqvae"] is None
    assert {"varjax", "jax", "flax", "orbax-checkpoint", "torch", "numpy"} <= set(m["versions"])
    assert m["convert_seconds"] > 0


def test_odd_sizes_round_trip(tmp_path):
    var_sd = state_dict(var_layout(ODD_VAR), seed=1)
    vae_sd = state_dict(vqvae_layout(ODD_VQVAE, num_scales=3), seed=2)
    torch.save(var_sd, tmp_path / "var.pth")
    torch.save(vae_sd, tmp_path / "vae.pth")
    config = convert_checkpoints(tmp_path / "var.pth", tmp_path / "vae.pth", tmp_path / "out",
                                 patch_nums=(1, 2, 3), log=None)
    assert config == ModelConfig(patch_nums=(1, 2, 3), vqvae=ODD_VQVAE, var=ODD_VAR)
    _, params = load_converted(tmp_path / "out")
    assert_params_match(params["var"], var_sd)
    assert_params_match(params["vqvae"], vae_sd)


def test_wrapped_trainer_checkpoint(tmp_path):
    """Upstream's trainer: {'trainer': {'var_wo_ddp', 'vae_local', 'var_opt'}, 'args', ...}."""
    var_sd, vae_sd = load_sd(TINY), load_sd(VAE)
    ckpt = {
        "epoch": 3, "iter": 10, "args": {"depth": 2, "pn": "1_2_3_4_5_6_8_10_13_16", "tlr": 1e-4},
        "trainer": {
            "var_wo_ddp": {f"module.{k}": v for k, v in var_sd.items()},  # saved from DDP
            "vae_local": vae_sd,
            "var_opt": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]},
        },
    }
    torch.save(ckpt, tmp_path / "ckpt.pth")
    out = tmp_path / "out"
    config = convert_checkpoints(tmp_path / "ckpt.pth", tmp_path / "ckpt.pth", out, log=None)
    assert config == tiny()
    _, params = load_converted(out)
    assert_params_match(params["var"], var_sd)
    assert_params_match(params["vqvae"], vae_sd)
    where = json.loads((out / "manifest.json").read_text())["sources"]["var"]["state_dict_at"]
    assert "var_wo_ddp" in where and "module." in where


def test_bf16_checkpoint(tmp_path):
    sd = {k: v.bfloat16() if v.is_floating_point() else v for k, v in load_sd(TINY_SALN).items()}
    torch.save(sd, tmp_path / "bf16.pth")
    config = convert_checkpoints(tmp_path / "bf16.pth", None, tmp_path / "out", log=None)
    assert config == dataclasses.replace(tiny(shared_aln=True), vqvae=None)
    _, params = load_converted(tmp_path / "out")
    assert_params_match(params["var"], sd)  # bf16 values, exactly, as float32


def test_nonzero_key_bias_is_refused(tmp_path):
    sd = load_sd(TINY)
    sd["blocks.1.attn.zero_k_bias"][3] = 0.5
    torch.save(sd, tmp_path / "k.pth")
    with pytest.raises(ConvertError, match=r"k.pth: blocks.1.attn.zero_k_bias is not all zeros"):
        convert_checkpoints(tmp_path / "k.pth", None, tmp_path / "out", log=None)


def test_vqvae_alone_with_512px_pyramid(tmp_path):
    config = convert_checkpoints(None, VAE, tmp_path / "out", patch_nums=PATCH_NUMS_512, log=None)
    assert config.var is None and config.patch_nums == PATCH_NUMS_512 and config.resolution == 512
    loaded, params = load_converted(tmp_path / "out")
    assert loaded == config and set(params) == {"vqvae"}


def test_var_and_vqvae_must_agree(tmp_path):
    torch.save(state_dict(vqvae_layout(ODD_VQVAE)), tmp_path / "vae.pth")
    with pytest.raises(ConvertError, match=r"V=512.*V=37.*do not belong together"):
        convert_checkpoints(TINY, tmp_path / "vae.pth", tmp_path / "out", log=None)
    no_output(tmp_path / "out")


def test_unknown_pyramid_needs_patch_nums(tmp_path):
    cfg = dataclasses.replace(ODD_VAR, patch_nums=(1, 2, 4))
    torch.save(state_dict(var_layout(cfg)), tmp_path / "var.pth")
    with pytest.raises(ConvertError, match=r"unknown scale pyramid: 3 scales, L=21 .*--patch-nums"):
        convert_checkpoints(tmp_path / "var.pth", None, tmp_path / "out", log=None)
    with pytest.raises(ConvertError, match="does not fit"):
        convert_checkpoints(tmp_path / "var.pth", None, tmp_path / "out", patch_nums=(1, 2, 3), log=None)
    config = convert_checkpoints(tmp_path / "var.pth", None, tmp_path / "out", patch_nums=(1, 2, 4), log=None)
    assert config.var == cfg


def test_interrupt_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt  # after the params are on disk, before the rename

    monkeypatch.setattr(ModelConfig, "to_json", interrupted)
    out = tmp_path / "new" / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoints(TINY, VAE, out, log=None)
    assert not (tmp_path / "new").exists()


def test_force_replaces_only_when_done(tmp_path):
    out = tmp_path / "out"
    convert_checkpoints(TINY, None, out, log=None)
    with pytest.raises(ConvertError, match="exists; pass --force"):
        convert_checkpoints(None, VAE, out, log=None)
    with pytest.raises(ConvertError):  # a failed --force run keeps the old directory
        convert_checkpoints(VAE, None, out, force=True, log=None)
    assert load_converted(out)[0].var is not None
    convert_checkpoints(None, VAE, out, force=True, log=None)
    config, params = load_converted(out)
    assert config.var is None and set(params) == {"vqvae"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(ConvertError, match="not a converted checkpoint; not replacing it, even with --force"):
        convert_checkpoints(TINY, None, tmp_path / "home", force=True, log=None)
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"


def test_out_that_is_a_file_is_named_as_such(tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    for force in (False, True):  # not "pass --force" first, then another error with it
        with pytest.raises(ConvertError) as err:
            convert_checkpoints(TINY, None, out, force=force, log=None)
        assert str(err.value) == f"{out} exists and is not a directory; not replacing it"
    assert out.read_text() == "keep me"


def test_out_under_a_file_fails_before_converting(tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("keep me")
    lines: list[str] = []
    with pytest.raises(ConvertError) as err:
        convert_checkpoints(TINY, VAE, blocker / "x", log=lines.append)
    assert str(err.value) == f"cannot write {blocker / 'x'}: {blocker} is not a directory"
    assert lines == []  # refused before reading any input
    r = run_cli("--var", TINY, "--out", blocker / "a" / "b")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "reading" not in r.stdout
    message = f"cannot write {blocker / 'a' / 'b'}: {blocker} is not a directory"
    assert r.stderr.splitlines() == [f"convert: error: {message}"]
    assert blocker.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["somefile"]


def test_failed_replace_restores_the_old_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert_checkpoints(TINY, None, out, log=None)
    rename = os.rename

    def full_disk(src, dst):
        if ".partial-" in Path(src).name:  # the new checkpoint onto `out`, the old one moved aside
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", full_disk)
    with pytest.raises(ConvertError, match="No space left on device"):
        convert_checkpoints(None, VAE, out, force=True, log=None)
    monkeypatch.undo()
    assert load_converted(out)[0].var is not None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- the command line --------------------------------------------------------------------
def test_cli_converts_and_reports(tmp_path):
    r = run_cli("--var", TINY, "--vae", VAE, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "var: VAR-d2 (depth 2, width 128, 2 heads, shared_aln off, 10 scales, V 512): 0.9M params" in r.stdout
    assert "vqvae: VQVAE ch32 (ch_mult 1,1,2,2,4" in r.stdout and "done:" in r.stdout
    assert load_converted(tmp_path / "out")[0] == tiny()


def _modified(tmp_path: Path, name: str, change) -> Path:
    sd = load_sd(TINY)
    change(sd)
    torch.save(sd, tmp_path / name)
    return tmp_path / name


class Evil:
    """A pickle that would create a marker file when unpickled by plain torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list, str]]:
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(TINY.read_bytes()[: TINY.stat().st_size // 2])
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    evil = tmp_path / "evil.pth"
    torch.save({"weights": Evil(tmp_path / "MARKER")}, evil)
    evil_plain = tmp_path / "evil_plain.pth"
    evil_plain.write_bytes(pickle.dumps({"weights": Evil(tmp_path / "MARKER")}, protocol=2))

    def drop(sd):
        del sd["blocks.1.ffn.fc2.bias"]

    def add(sd):
        sd["blocks.1.ffn.extra.weight"] = torch.zeros(3, 5)

    def transpose(sd):
        sd["blocks.1.ffn.fc1.weight"] = sd["blocks.1.ffn.fc1.weight"].T.contiguous()

    return {
        "truncated": (["--var", truncated], "truncated or corrupt checkpoint"),
        "random_bytes": (["--var", noise], "not a PyTorch checkpoint"),
        "text_file": (["--var", text], "not a PyTorch checkpoint"),
        "code_execution": (["--var", evil], "refused to unpickle posix.system"),
        "code_execution_plain_pickle": (["--vae", evil_plain], "refused to unpickle posix.system"),
        "no_such_file": (["--var", tmp_path / "nope.pth"], "nope.pth: no such file"),
        "missing_key": (["--var", _modified(tmp_path, "m.pth", drop)],
                        "m.pth: missing keys: blocks.1.ffn.fc2.bias"),
        "unexpected_key": (["--var", _modified(tmp_path, "u.pth", add)],
                           "u.pth: unexpected keys: blocks.1.ffn.extra.weight"),
        "transposed": (["--var", _modified(tmp_path, "t.pth", transpose)],
                       "t.pth: shape mismatch: blocks.1.ffn.fc1.weight is (128, 512), expected (512, 128)"),
        "vqvae_as_var": (["--var", VAE], "looks like a VQVAE checkpoint, pass it with --vae"),
        "var_as_vqvae": (["--vae", TINY], "looks like a VAR checkpoint, pass it with --var"),
    }


# Run through the command line: the contract is about the process (exit code, stderr).
CLI_CASES = ["truncated", "random_bytes", "code_execution", "missing_key", "unexpected_key",
             "transposed", "vqvae_as_var"]
# The same errors, checked in-process (cheaper; the CLI prints str(error)).
LIBRARY_CASES = ["text_file", "code_execution_plain_pickle", "no_such_file", "var_as_vqvae"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_failure_is_one_line(tmp_path, case):
    args, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    r = run_cli(*args, "--out", out)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert: error: "), r.stderr
    assert message in lines[0]
    assert not (tmp_path / "MARKER").exists()
    no_output(out)


@pytest.mark.parametrize("case", LIBRARY_CASES)
def test_failure_is_one_line(tmp_path, case):
    (flag, path), message = _bad_inputs(tmp_path)[case]
    paths = {"--var": (path, None), "--vae": (None, path)}[flag]
    with pytest.raises(ConvertError) as err:
        convert_checkpoints(*paths, tmp_path / "out", log=None)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "MARKER").exists()
    no_output(tmp_path / "out")


# --- real size ---------------------------------------------------------------------------
# Peak resident memory of converting d16 + the VQVAE (1.56 GiB of float32 weights), measured
# 2.24 GiB on this machine (the weights once, plus ~0.7 GiB of torch, jax and orbax). The
# bound leaves 0.5 GiB for other builds; a second copy of the VAR's weights (+1.16 GiB) breaks it.
PEAK_RSS_MAX_GIB = 2.75


@pytest.mark.slow
def test_real_size_d16_and_vqvae(tmp_path):
    """Random weights in the released d16 + vae_ch160v4096z32 layouts, converted by the CLI."""
    t = time.perf_counter()
    var_sd = state_dict_from_tsv(KEYS / "var_d16.tsv", seed=0)
    torch.save(var_sd, tmp_path / "var_d16.pth")
    vae_sd = state_dict_from_tsv(KEYS / "vae_ch160v4096z32.tsv", seed=1)
    torch.save(vae_sd, tmp_path / "vae.pth")
    print(f"\nsynthetic checkpoints written in {time.perf_counter() - t:.1f} s")

    # The CLI's own main() in a child that reports its peak resident set size: VmHWM, the
    # high-water mark of its own address space. (ru_maxrss survives execve, so a child forked
    # from a pytest process that already holds 2.9 GiB after other tests reported that instead.)
    code = ("import re, sys; from convert.__main__ import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
            "print(f'maxrss_kib={hwm}'); sys.exit(rc)")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, "--var", tmp_path / "var_d16.pth", "--vae",
                        tmp_path / "vae.pth", "--out", tmp_path / "out"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    peak_gib = int(r.stdout.rsplit("maxrss_kib=", 1)[1]) / 2**20  # VmHWM is in KiB
    print(r.stdout + f"conversion: {seconds:.1f} s wall (with imports), peak RSS {peak_gib:.2f} GiB")
    assert peak_gib < PEAK_RSS_MAX_GIB, f"the conversion peaked at {peak_gib:.2f} GiB"
    assert "VAR-d16 (depth 16, width 1024, 16 heads, shared_aln off, 10 scales, V 4096): 310.3M params" in r.stdout

    config, params = load_converted(tmp_path / "out")
    assert config == released(16)
    for key in ("blocks.7.attn.mat_qkv.weight", "blocks.15.ffn.fc2.weight", "pos_1LC", "class_emb.weight"):
        np.testing.assert_array_equal(get(params["var"], entry(key, var_sd[key].ndim).path),
                                      to_flax(key, var_sd[key]), err_msg=key)
    for key in ("encoder.down.4.attn.1.qkv.weight", "decoder.up.3.block.0.nin_shortcut.weight",
                "quantize.embedding.weight", "decoder.norm_out.weight"):
        np.testing.assert_array_equal(get(params["vqvae"], entry(key, vae_sd[key].ndim).path),
                                      to_flax(key, vae_sd[key]), err_msg=key)

    # One image through both models, as a user would (random weights: only shapes and finiteness).
    import varjax

    model = varjax.load(tmp_path / "out")
    image = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    tokens = model.tokenize(image)
    assert [t.shape for t in tokens] == [(1, pn * pn) for pn in config.patch_nums]
    logits, acts = model.teacher_forced(np.array([3]), tokens)
    assert logits.shape == (1, 680, 4096) and np.isfinite(np.asarray(logits)).all()
    assert len(acts) == 3 * 16
