"""Unit scaling: factor 1 changes nothing; "weights" equals editing the kernel by hand;
"output" equals editing the activation by hand (through the next layer's parameters); both
reach teacher forcing, the sampler and the recording pass."""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest

from varjax.config import micro
from varjax.model import Model, init_params
from varjax.errors import ScalingError
from varjax.scaling import UnitScaling, read_units, unit_of
from varjax.record import unit_layout

# Scaling by 0.5 is exact in float32, so the hand edits below give the same products; the
# sums may still run in another order (measured 0 here); logits |x| <= 5.
EDIT_ATOL = 1e-5
UNITS = (("ffn.fc1", 0, 3), ("attn.proj", 1, 5), ("ffn.fc2", 1, 2))


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def setup():
    cfg = micro()
    model = Model(cfg, init_params(cfg, seed=0))
    labels = np.array([0, 3, 1000])
    with jax.default_matmul_precision("highest"):
        tokens = model.generate(labels, cfg=1.5, top_k=10, seed=1)
    return model, labels, tokens


def _scaling(mode, factor, units=UNITS):
    return UnitScaling(mode, tuple((s, b, i, factor) for s, b, i in units))


def _edited(model, edit) -> Model:
    params = copy.deepcopy(jax.tree.map(np.array, model.params))
    edit(params["var"])
    return Model(model.config, params)


@pytest.mark.parametrize("mode", ["weights", "output"])
def test_factor_one_changes_nothing(setup, mode):
    model, labels, tokens = setup
    s = _scaling(mode, 1.0)
    a, acts_a = model.teacher_forced(labels, tokens)
    b, acts_b = model.teacher_forced(labels, tokens, unit_scaling=s)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in acts_a:
        np.testing.assert_array_equal(np.asarray(acts_a[k]), np.asarray(acts_b[k]), err_msg=k)
    plain, acts_plain = model.generate(labels, cfg=1.5, top_k=10, seed=1, return_acts=True)
    scaled, acts_scaled = model.generate(labels, cfg=1.5, top_k=10, seed=1, return_acts=True, unit_scaling=s)
    for x, y, t in zip(plain, scaled, tokens):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(t))
    for k in acts_plain:
        np.testing.assert_array_equal(np.asarray(acts_plain[k]), np.asarray(acts_scaled[k]), err_msg=k)


def test_weights_mode_equals_editing_the_kernel(setup):
    model, labels, tokens = setup

    def edit(p):
        for site, b, i in UNITS:
            first, second = site.split(".")
            p[f"blocks_{b}"][first][second]["kernel"][:, i] *= 0.5  # incoming weights; bias kept

    ref = _edited(model, edit)
    s = _scaling("weights", 0.5)
    want, want_acts = ref.teacher_forced(labels, tokens)
    got, got_acts = model.teacher_forced(labels, tokens, unit_scaling=s)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for k in want_acts:
        np.testing.assert_array_equal(np.asarray(got_acts[k]), np.asarray(want_acts[k]), err_msg=k)
    plain, _ = model.teacher_forced(labels, tokens)
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-3  # the edit matters
    # the sampler: the same tokens as the hand-edited model
    for x, y in zip(ref.generate(labels, cfg=1.5, top_k=10, seed=2),
                    model.generate(labels, cfg=1.5, top_k=10, seed=2, unit_scaling=s)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.array_equal(np.asarray(model.params["var"]["blocks_0"]["ffn"]["fc1"]["kernel"]),
                          init_params(model.config, seed=0)["var"]["blocks_0"]["ffn"]["fc1"]["kernel"])


def test_output_mode_equals_editing_the_activation(setup):
    """Scaling a unit's value by f equals scaling what reads it: fc1 unit i (after the GELU)
    feeds row i of fc2's kernel; attn.proj and ffn.fc2 unit i is column i of the layer's
    kernel plus bias i."""
    model, labels, tokens = setup

    def edit(p):
        p["blocks_0"]["ffn"]["fc2"]["kernel"][3, :] *= 0.5
        for b, layer, i in ((1, ("attn", "proj"), 5), (1, ("ffn", "fc2"), 2)):
            d = p[f"blocks_{b}"][layer[0]][layer[1]]
            d["kernel"][:, i] *= 0.5
            d["bias"][i] *= 0.5

    ref = _edited(model, edit)
    s = _scaling("output", 0.5)
    want, want_acts = ref.teacher_forced(labels, tokens)
    got, got_acts = model.teacher_forced(labels, tokens, unit_scaling=s)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=EDIT_ATOL)
    plain, plain_acts = model.teacher_forced(labels, tokens)
    # the scaled unit records f times its value; its neighbours at the same site do not change
    fc1 = np.asarray(got_acts["blocks.0.ffn.fc1"])
    np.testing.assert_array_equal(fc1[:, 3], 0.5 * np.asarray(plain_acts["blocks.0.ffn.fc1"])[:, 3])
    np.testing.assert_array_equal(np.delete(fc1, 3, 1), np.delete(np.asarray(plain_acts["blocks.0.ffn.fc1"]), 3, 1))
    # weights and output scaling are different interventions (the GELU and the bias)
    w, _ = model.teacher_forced(labels, tokens, unit_scaling=_scaling("weights", 0.5, UNITS[:1]))
    o, _ = model.teacher_forced(labels, tokens, unit_scaling=_scaling("output", 0.5, UNITS[:1]))
    assert np.abs(np.asarray(w) - np.asarray(o)).max() > 1e-4
    gen_ref = ref.generate(labels, cfg=1.5, top_k=1, seed=2)
    gen = model.generate(labels, cfg=1.5, top_k=1, seed=2, unit_scaling=s)
    for x, y in zip(gen_ref, gen):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unit_ids_follow_units_csv_order(setup, tmp_path):
    model, _, _ = setup
    cfg = model.config.var
    u = 0
    for name, block, site, size in unit_layout(model).segments():
        for i in (0, size - 1):
            assert unit_of(cfg, u + i) == (site, block, i)
        u += size
    with pytest.raises(ScalingError, match="does not exist"):
        unit_of(cfg, u)
    (tmp_path / "ids.txt").write_text("# top units\n3, 70\n600\n")
    assert read_units(tmp_path / "ids.txt", cfg) == [unit_of(cfg, 3), unit_of(cfg, 70), unit_of(cfg, 600)]
    assert unit_of(cfg, 70) == ("ffn.fc1", 0, 6) and unit_of(cfg, 600) == ("ffn.fc1", 1, 152)
    (tmp_path / "ids.csv").write_text("unit,block\n5,0\n9,0\n")
    assert read_units(tmp_path / "ids.csv", cfg) == [unit_of(cfg, 5), unit_of(cfg, 9)]
    # rows of a units.csv name their units directly, whatever layout the run had
    (tmp_path / "units.csv").write_text("unit,block,site,index\n900,1,ffn.fc2,7\n12,0,resid,12\n")
    assert read_units(tmp_path / "units.csv", cfg)[0] == ("ffn.fc2", 1, 7)
    with pytest.raises(ScalingError, match="unknown site"):  # resid units cannot be scaled
        UnitScaling.from_file(tmp_path / "units.csv", cfg, 0.5, "weights")
    # ids of a run that also recorded resid: block 0 has 64 more units before block 1
    assert unit_of(cfg, 600, ("attn.proj", "ffn.fc1", "ffn.fc2", "resid")) == ("ffn.fc1", 1, 88)
    (tmp_path / "bad.txt").write_text("3, x\n")
    with pytest.raises(ScalingError, match="not a list of units"):
        read_units(tmp_path / "bad.txt", cfg)
    with pytest.raises(ScalingError, match="does not exist"):
        UnitScaling("weights", (("ffn.fc1", 5, 0, 0.5),)).check(cfg)
    with pytest.raises(ScalingError, match="mode"):
        UnitScaling("input", ())
    with pytest.raises(ScalingError, match="twice"):
        UnitScaling("output", (("ffn.fc1", 0, 1, 0.5), ("ffn.fc1", 0, 1, 0.2)))


def test_recording_pass_scales_and_records_it(setup, tmp_path):
    from tests import record_worker as rw
    from varjax.driver import record
    from varjax.record import Options, RecordError

    model, _, _ = setup
    plan = rw.plan()
    s = _scaling("weights", 0.5)
    info = record(model, plan, tmp_path / "run", rw.NUM_VIEWS,
                  Options(batch_size=4, save_activations=True, unit_scaling=s), image_shape=(64, 64))
    assert info["fingerprint"]["unit_scaling"] == json.loads(json.dumps(s.describe()))
    mu = np.load(tmp_path / "run" / "activations.npy")
    for r in (0, 7):
        _, acts = model.teacher_forced(np.full(rw.NUM_VIEWS, plan.labels[r]), model.tokenize(rw.views(r)), unit_scaling=s)
        want = np.concatenate([np.asarray(acts[k]) for k in acts], axis=1).mean(0)
        np.testing.assert_allclose(mu[r], want, rtol=1e-5, atol=1e-7)
    with pytest.raises(RecordError, match="other settings"):  # the same directory without the scaling
        record(model, plan, tmp_path / "run", rw.NUM_VIEWS, Options(batch_size=4, save_activations=True),
               image_shape=(64, 64))
    with pytest.raises(RecordError, match="does not exist"):
        record(model, plan, tmp_path / "bad", rw.NUM_VIEWS,
               Options(batch_size=4, unit_scaling=UnitScaling("output", (("ffn.fc1", 9, 0, 0.5),))), image_shape=(64, 64))
    assert not (tmp_path / "bad").exists()
