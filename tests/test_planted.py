"""Tests of the planted-memorization pieces: the source, the training step, the shipped model,
the canary analysis (varjax/analysis/planted.py) and its report section."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from tests.conftest import assert_canaries_found, canary_numbers, unit_rows, write_run
from varjax import analysis as A
from varjax import train_planted as T
from varjax.analysis.planted import FIGURE as PLANTED_FIGURE
from varjax.data import open_source, select
from varjax.data.planted import (
    DUPLICATES,
    HELDOUT_PER_CLASS,
    PLANTED_CLASSES,
    SINGLES_PER_CLASS,
    PlantedSource,
    Role,
    default_checkpoint,
    generate,
    parse_role,
    training_list,
)
from varjax.study import record_planted

N_PERM = 200  # exercises the permutation tests; real runs use 10,000


def analyze_planted(run_dir, **kwargs):
    """The planted tests of a run directory as planted.json holds them (None: not planted)."""
    p = A.analyze_planted_run(run_dir, **kwargs)
    return None if p is None else p.to_json()


def test_source_is_deterministic_and_roles_parse():
    src = open_source("planted")
    assert isinstance(src, PlantedSource) and src.splits == ("train", "val")
    samples = select(src)
    n_cls = len(PLANTED_CLASSES)
    members = [s for s in samples if s.split == "train"]
    held = [s for s in samples if s.split == "val"]
    assert len(members) == n_cls * (len(DUPLICATES) + SINGLES_PER_CLASS)
    assert len(held) == n_cls * HELDOUT_PER_CLASS
    roles = [parse_role(s.source) for s in samples]
    assert all(r is not None for r in roles)
    assert len({s.source for s in samples}) == len(samples)  # every role string names one image
    assert all((r.kind == "heldout") == (s.split == "val") for r, s in zip(roles, samples))
    canaries = [(s.label, r.dup) for s, r in zip(samples, roles) if r.kind == "canary"]
    assert sorted(canaries) == sorted((c, d) for c in range(n_cls) for d in DUPLICATES)
    # The same selection again, and the same pixels through the reader.
    assert [s.source for s in select(open_source("planted"))] == [s.source for s in samples]
    s = samples[7]
    decoded = np.asarray(PIL.Image.open(io.BytesIO(src.reader()(s.locator))))
    np.testing.assert_array_equal(decoded, generate(*s.locator[1:]))
    np.testing.assert_array_equal(src.load_image(s.source), decoded)
    assert generate(0, 1, 3).std() > 5 and not np.array_equal(generate(0, 1, 3), generate(1, 1, 3))
    # Another seed draws other roles.
    assert [r.source for r in PlantedSource(1).roles[0]] != [r.source for r in src.roles[0]]
    # The training list: members only, each canary `dup` times.
    train = training_list(src, samples)
    assert len(train) == n_cls * (sum(DUPLICATES) + SINGLES_PER_CLASS)
    assert all(s.split == "train" for s in train)
    first_canary = next(s for s in members if parse_role(s.source).kind == "canary")
    assert train.count(first_canary) == parse_role(first_canary.source).dup


def test_parse_role():
    assert parse_role("planted:canary/dup64/3") == Role("canary", 64, 3)
    assert parse_role("planted:single/17") == Role("single", 1, 17)
    assert parse_role("planted:heldout/5") == Role("heldout", 0, 5)
    for other in ("demo/train/stripes_00.png", "planted:canary/64/3", "planted:single/x", "planted:heldout/5/"):
        assert parse_role(other) is None
    for r in (Role("canary", 16, 4), Role("single", 1, 0), Role("heldout", 0, 63)):
        assert parse_role(r.source) == r


def test_training_step_reduces_loss_and_is_deterministic():
    import jax

    tc = T.TrainConfig(depth=1, width=32, vocab=32, steps=200, warmup_steps=1, lr=3e-3)
    cfg = T.model_config(tc)
    L = cfg.var.seq_len
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, 4, 8).astype(np.int32), rng.normal(size=(8, L - 1, 8)).astype(np.float32),
             rng.integers(0, 32, (8, L)).astype(np.int32), rng.random(8) < 0.1)

    def run(steps):
        params = T.init_model(cfg, tc)["var"]
        opt = T.make_optimizer(tc, params)
        state = opt.init(params)
        step = T.make_train_step(T.VAR(cfg.var, T.NO_TAPS), opt)
        losses = []
        for _ in range(steps):
            params, state, loss = step(params, state, *batch)
            losses.append(float(loss))
        return params, losses

    params, losses = run(15)
    assert losses[0] == pytest.approx(np.log(32), abs=0.05)  # near-uniform start (head x 0.02)
    assert losses[-1] < losses[0] - 0.3
    again, _ = run(15)
    assert T.tree_sha256(params) == T.tree_sha256(jax.tree.map(np.asarray, again))


def test_shipped_checkpoint_loads_and_matches_planted_json():
    import varjax

    ckpt = default_checkpoint()
    info = json.loads((ckpt / "planted.json").read_text())
    model = varjax.load(ckpt)
    train = info["training"]
    assert model.config == T.model_config(T.TrainConfig(depth=info["model"]["depth"], width=info["model"]["width"],
                                                        heads=info["model"]["heads"], vocab=info["model"]["vocab"]))
    assert T.tree_sha256(model.params) == info["params_sha256"]
    assert info["data"] == PlantedSource(train["data_seed"]).describe()
    assert (ckpt / "loss_curve.png").is_file()
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert size < 8e6, f"shipped model is {size / 1e6:.1f} MB"


def _planted_run(d: Path) -> list[str]:
    """A hand-made planted run: 2 blocks x (1 + 4 + 1) units, 4 canaries, 10 singletons, 6 held-out.

    Activations are 1 (+ tiny noise) except spikes: canary dup64/8 on units 0-3 (the two
    largest spikes, so U10 = units 0 and 1 both point at it), canary dup64/9 on units 4-6,
    canary dup4/0 on unit 7, singletons 0-3 a little on units 8-11. Loss: canaries 1, singletons 2, held-out 3 (+ noise).
    """
    sources = (["planted:canary/dup64/8", "planted:canary/dup64/9", "planted:canary/dup4/0", "planted:canary/dup4/1"]
               + [f"planted:single/{i}" for i in range(10)] + [f"planted:heldout/{i}" for i in range(6)])
    order = np.random.default_rng(1).permutation(len(sources))  # roles mixed in sample-id order
    sources = [sources[i] for i in order]
    splits = ["val" if "heldout" in s else "train" for s in sources]
    n = len(sources)
    rng = np.random.default_rng(0)
    acts = (1 + 0.01 * rng.random((n, 12))).astype(np.float32)
    row = {s: r for r, s in enumerate(sources)}
    for unit, (src, v) in enumerate([("planted:canary/dup64/8", 9), ("planted:canary/dup64/8", 8),
                                     ("planted:canary/dup64/8", 3), ("planted:canary/dup64/8", 3),
                                     ("planted:canary/dup64/9", 3), ("planted:canary/dup64/9", 3),
                                     ("planted:canary/dup64/9", 3), ("planted:canary/dup4/0", 3)]
                                    + [(f"planted:single/{i}", 1.5) for i in range(4)]):
        acts[row[src], unit] = v
    ids = write_run(d, acts, splits, unit_rows(2, 1), npz=True, sources=sources)
    loss = np.array([{"canary": 1.0, "single": 2.0, "heldout": 3.0}[parse_role(s).kind] for s in sources])
    loss = loss + 0.1 * rng.random(n)
    with open(d / "per_sample.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample", "loss", "acc"])
        w.writerows([int(i), f"{x:.6f}", "0.5"] for i, x in zip(ids, loss))
    return sources


def test_analyze_planted_on_a_hand_made_run(tmp_path):
    _planted_run(tmp_path)
    out = analyze_planted(tmp_path, checkpoint=tmp_path / "none", n_permutations=N_PERM)
    assert json.loads((tmp_path / "planted.json").read_text()) == out
    assert (tmp_path / PLANTED_FIGURE).is_file()
    g = out["groups"]
    assert {k: v["n"] for k, v in g.items()} == {"heldout": 6, "single": 10, "canary dup4": 2, "canary dup64": 2}
    assert g["canary dup64"]["training_copies"] == 64 and g["heldout"]["training_copies"] == 0
    assert out["u10_count"] == 2
    assert g["canary dup64"]["nmu_u10"]["mean"] == 1.0  # both U10 units point at dup64/8
    assert g["canary dup64"]["units_singled_out"] == 7 and g["canary dup64"]["units_singled_out_in_u10"] == 2
    assert g["canary dup4"]["nmu_all"]["mean"] == 0.5
    assert g["heldout"]["loss"]["mean"] == pytest.approx(3.05, abs=0.06)
    t = out["tests"]
    assert t["loss"]["canary vs heldout"]["auc"] == 0.0  # every canary below every held-out image
    assert t["loss"]["canary vs heldout"]["p_permutation"] == pytest.approx(1 / (N_PERM + 1), rel=0.01)
    assert t["nmu_all"]["canary vs single"]["auc"] == 31 / 40  # counts 4,3,1,0 vs four 1s, six 0s
    assert out["dose_response"]["loss"]["all"]["rho"] < -0.8
    assert out["canaries_in_top"]["found"] == pytest.approx(1 + 3 * 3 / 19)  # 19 zeros share 3 slots
    assert [c["source"] for c in out["canaries"]][:2] == ["planted:canary/dup4/0", "planted:canary/dup4/1"]
    assert out["model"] is None or out["model"]["checkpoint"] == str(default_checkpoint())

    A.analyze(tmp_path, n_permutations=N_PERM)  # the report picks up planted.json
    text = (tmp_path / "report.md").read_text()
    assert "## Planted memorization" in text and "`planted:canary/dup64/8`" in text
    assert f"]({PLANTED_FIGURE})" in text


def test_analyze_planted_ignores_other_runs_and_refuses_mixed_ones(tmp_path):
    write_run(tmp_path / "demo", np.ones((6, 12), np.float32), ["train"] * 6, unit_rows(2, 1), npz=True,
              sources=[f"demo/train/{i}.png" for i in range(6)])
    assert analyze_planted(tmp_path / "demo") is None
    assert not (tmp_path / "demo" / "planted.json").exists()
    write_run(tmp_path / "mixed", np.ones((6, 12), np.float32), ["train"] * 6, unit_rows(2, 1), npz=True,
              sources=["planted:single/0", "planted:single/1"] + [f"demo/train/{i}.png" for i in range(4)])
    with pytest.raises(A.AnalysisError, match="mixes planted and other sources"):
        analyze_planted(tmp_path / "mixed")


# -- Sensitivity of the pipeline on the shipped model (margins: tests/conftest.py) ---------------
# Seed 0's own values (the shipped model, 8 views, crop seed 0), measured on this CPU with
# `pytest tests/test_planted.py -s -k finds` (the test prints them): identical at 16 and 8
# images per step. The tolerances absorb another machine's rounding, which can move a few
# near-tied argmaxes (one canary-singleton pair of 1,920 moves an AUC by 0.0005), not a
# change of what is recorded (the attn.proj fix moved the first three by 0.017, x0.23, +15%).
SEED0 = {"nmu_auc": 0.6596, "nmu_p": 0.00366, "dup64_ratio": 20.29, "loss_auc": 0.02448,
         "heldout_loss_auc": 0.2174, "loss_gap": 3.007}
SEED0_AUC_ATOL = 0.01  # nmu_auc, loss_auc, heldout_loss_auc
SEED0_P_FACTOR = 2.0  # nmu_p within a factor of 2
SEED0_RATIO_RTOL = 0.1  # dup64_ratio
SEED0_GAP_ATOL = 0.01  # loss_gap, nats


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory):
    """The default run's recording (8 random views, crop seed 0) of the shipped model."""
    out = tmp_path_factory.mktemp("planted_run")
    record_planted(default_checkpoint(), out)
    return out, analyze_planted(out, checkpoint=default_checkpoint(), n_permutations=N_PERM)


def test_pipeline_finds_the_planted_canaries(shipped_run):
    run_dir, result = shipped_run
    n = canary_numbers(run_dir, result)
    print("\nseed 0: " + ", ".join(f"{k} {v:.4g}" for k, v in n.items()))
    assert_canaries_found(n)
    for key in ("nmu_auc", "loss_auc", "heldout_loss_auc"):
        assert n[key] == pytest.approx(SEED0[key], abs=SEED0_AUC_ATOL), key
    assert SEED0["nmu_p"] / SEED0_P_FACTOR < n["nmu_p"] < SEED0["nmu_p"] * SEED0_P_FACTOR, n["nmu_p"]
    assert n["dup64_ratio"] == pytest.approx(SEED0["dup64_ratio"], rel=SEED0_RATIO_RTOL)
    assert n["loss_gap"] == pytest.approx(SEED0["loss_gap"], abs=SEED0_GAP_ATOL)
    assert result["model"]["params_sha256"] == json.loads(
        (default_checkpoint() / "planted.json").read_text())["params_sha256"]


def test_recorded_planted_run_names_its_checkpoint(shipped_run, tmp_path):
    """record_planted's run names the checkpoint it recorded, so the analysis of a run from
    another seed's model reads that model's planted.json, not the shipped one's."""
    run_dir, _ = shipped_run
    assert json.loads((run_dir / "run.json").read_text())["checkpoint"] == str(default_checkpoint().resolve())
    p = A.analyze_planted(A.load_run(run_dir), n_permutations=0)  # no checkpoint argument
    assert p.model["checkpoint_from"] == "run.json"
