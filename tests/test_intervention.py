"""varjax.intervention (unit choice, controls, tests) and experiments/intervene.py end to end on a
small planted run: factor 1 changes nothing, the chosen units are the top percent, resume,
refusals."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import intervene as script
from experiments import run
from varjax import intervention as iv
from varjax import unitmem
from varjax.analysis.outputs import with_section
from varjax.errors import InterventionError
from varjax.names import UnitLayout

ROOT = Path(__file__).resolve().parents[1]


def _layout(depth=3, c=8) -> UnitLayout:
    return UnitLayout.for_var(depth, c, 4 * c, 11)  # attn.proj (8), ffn.fc1 (32), ffn.fc2 (8) per block


# -- choosing units ------------------------------------------------------------------------

def test_chosen_units_are_the_top_percent_by_hand():
    lay = _layout()
    rng = np.random.default_rng(0)
    um = rng.random(lay.n_units)
    fc1 = [u for u in range(lay.n_units) if lay.sites[lay.site[u]] == "ffn.fc1"]  # 96 units
    um[fc1[5]] = um[fc1[7]] = 2.0  # a tie at the top: both in
    want = sorted(sorted(fc1, key=lambda u: (-um[u], u))[:9])  # floor(96 * 0.1) = 9
    assert iv.choose_top(um, lay, ("ffn.fc1",), 10).tolist() == want
    # per layer: floor(32 * 0.1) = 3 of each block's fc1
    per = [sorted(sorted([u for u in fc1 if lay.block[u] == b], key=lambda u: (-um[u], u))[:3]) for b in range(3)]
    assert iv.choose_top(um, lay, ("ffn.fc1",), 10, "layer").tolist() == sum(per, [])
    # ties go to the lower unit id
    flat = np.zeros(lay.n_units)
    assert iv.choose_top(flat, lay, ("ffn.fc1",), 10).tolist() == fc1[:9]


def test_choosing_refuses_bad_settings():
    lay = _layout()
    um = np.zeros(lay.n_units)
    for percent in (0, -1, 101):
        with pytest.raises(InterventionError, match="top percent"):
            iv.choose_top(um, lay, ("ffn.fc1",), percent)
    with pytest.raises(InterventionError, match="not recorded"):
        iv.choose_top(um, lay, ("head",), 10)
    with pytest.raises(InterventionError, match="scope"):
        iv.choose_top(um, lay, ("ffn.fc1",), 10, "block")


def test_control_draws_match_counts_per_site_and_block():
    lay = _layout(depth=4)
    rng = np.random.default_rng(1)
    um = rng.random(lay.n_units)
    chosen = iv.choose_top(um, lay, ("ffn.fc1", "attn.proj"), 20)
    draws = iv.control_draws(lay, chosen, 6, seed=3)
    want = iv.cell_counts(lay, chosen)
    assert len(set(want)) > 2  # several cells, unequal counts: the test can tell them apart
    for d in draws:
        assert iv.cell_counts(lay, d) == want
        assert len(np.unique(d)) == len(d) == len(chosen)
    assert not all(np.array_equal(draws[0], d) for d in draws[1:])
    again = iv.control_draws(lay, chosen, 2, seed=3)  # draw d does not depend on the number of draws
    assert all(np.array_equal(a, b) for a, b in zip(again, draws))
    assert not np.array_equal(iv.control_draws(lay, chosen, 1, seed=4)[0], draws[0])


def test_own_targets_are_the_samples_owning_the_most_chosen_units():
    argmax = np.array([7, 7, 3, 3, 3, 9, 7, 5, 5, 1])  # unit u's argmax sample
    chosen = np.array([0, 1, 2, 3, 5, 6, 7, 8])  # 7 owns 0, 1, 6; 3 owns 2, 3; 5 owns 7, 8; 9 owns 5
    got = iv.own_targets(argmax, chosen, np.array([1, 3, 5, 7, 9, 11]), 3)
    assert [(x, u.tolist()) for x, u in got] == [(7, [0, 1, 6]), (3, [2, 3]), (5, [7, 8])]  # ties: lower id
    assert [x for x, _ in iv.own_targets(argmax, chosen, np.array([1, 11]), 5)] == []  # own no chosen unit
    lay = _layout()
    own = np.array([40, 41, 100])
    a, b = (iv.control_draws(lay, own, 1, seed=0, stream=(s,))[0] for s in (7, 3))
    assert iv.cell_counts(lay, a) == iv.cell_counts(lay, own) and not np.array_equal(a, b)


def test_groups_of_a_run_that_is_not_planted(tmp_path):
    """Memorized = the D' samples that are the argmax of a U10(D') unit; val samples stay val."""
    from tests.conftest import finish_run, unit_rows, write_run
    from varjax.analysis import load_run
    from varjax.analysis.intervention import groups

    acts = np.random.default_rng(0).random((9, 24)) * 0.1 + 1.0
    acts[0, [3, 4]] = acts[2, 20] = 50.0  # rows 0 and 2 (train) own the three most memorizing units
    acts[7, 9] = 60.0  # a val sample's unit: not in D', so it makes no one memorized
    write_run(tmp_path, acts, ["train"] * 6 + ["val"] * 3, unit_rows(2, 2), npz=True)
    finish_run(tmp_path, depth=2)
    data = load_run(tmp_path)
    um = unitmem.unitmem_mean(data.stats["train"])
    names, mem, planted = groups(data, um)
    assert not planted and names.tolist() == ["memorized", "other", "memorized", "other", "other", "other",
                                              "val", "val", "val"]
    assert mem.tolist() == [True, False, True] + [False] * 6


# -- the permutation tests -------------------------------------------------------------------

def test_paired_test_matches_exact_enumeration():
    d = np.array([0.9, 0.4, 1.3, -0.2, 0.7, 0.5, -0.1])
    obs = abs(d.mean())
    signs = np.array(list(itertools.product([-1, 1], repeat=len(d))))
    exact = np.mean(np.abs((signs * d).mean(axis=1)) >= obs - 1e-12)
    t = iv.paired_test(d, 40_000, seed=0)
    assert t.statistic == pytest.approx(d.mean())
    assert t.p_value == pytest.approx(exact, abs=0.006)
    assert iv.paired_test(np.array([1.0, -1.0, 2.0, -2.0]), 1000).p_value == 1.0  # mean 0: nothing to see


def test_two_sample_test_on_constructed_groups():
    a, b = np.arange(10.0) + 100, np.arange(30.0)
    t = iv.two_sample_test(a, b, 2000, seed=1)
    assert t.statistic == pytest.approx(a.mean() - b.mean()) and t.p_value == pytest.approx(1 / 2001)
    same = iv.two_sample_test(np.ones(5), np.ones(9), 500)
    assert same.statistic == 0 and same.p_value == 1.0
    # exact: 2 vs 2 values, 6 splits, 2 as extreme as the observed one
    small = iv.two_sample_test(np.array([3.0, 4.0]), np.array([1.0, 2.0]), 60_000, seed=2)
    assert small.p_value == pytest.approx(2 / 6, abs=0.01)
    assert iv.two_sample_test(np.array([]), b, 10).p_value is None
    assert iv.rank_among_controls(5.0, np.array([1.0, 6.0, 2.0])) == pytest.approx(2 / 4)


def test_report_section_replaces_its_older_copy():
    once = with_section("# report\n\ntext\n", "x.md", "## X\nold\n")
    twice = with_section(once + "\ntrailer\n", "x.md", "## X\nnew\n")
    assert twice.count("## X") == 1 and "new" in twice and "old" not in twice and twice.rstrip().endswith("trailer")


# -- experiments/intervene.py on a small planted run -------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("iv") / "run"
    assert run.main(["--out", str(out), "--augs", "1", "--per-class", "6"]) == 0
    return out


@pytest.fixture(scope="module")
def identity(small_run) -> Path:
    """The intervention with factor 1: every condition is the unscaled model."""
    assert script.main([str(small_run), "--factor", "1", "--draws", "1", "--permutations", "200"]) == 0
    return small_run


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_factor_one_changes_nothing(identity):
    rows = _csv(identity / "intervention.csv")
    n = len(_csv(identity / "samples.csv"))
    assert len(rows) == 2 * n  # chosen + 1 control, every sample
    for r in rows:
        assert r["loss_before"] == r["loss_after"] and r["acc_before"] == r["acc_after"], r
        assert r["identical_share_k2_before"] == r["identical_share_k2_after"] and r["ssim_k2_before"] == r["ssim_k2_after"]
    s = json.loads((identity / "intervention.json").read_text())
    for c in s["conditions"].values():
        assert c["unitmem_of_scaled_before"] == c["unitmem_of_scaled_after"]
    # the baseline is the run's own files: the scaled passes reproduce them to the last digit
    assert all(r["loss_before"] == f"{float(p['loss']):.7g}" for r, p in zip(rows, _csv(identity / "per_sample.csv")))
    assert "## Interventions" in (identity / "report.md").read_text()
    assert (identity / "figures" / "intervention.png").stat().st_size > 5000


def test_chosen_units_are_the_runs_top_fc1_units(identity):
    with np.load(identity / "stats_train.npz") as z:
        um = unitmem.unitmem_mean(unitmem.UnitStats(z["max"], z["argmax"], z["sum"], int(z["count"])))
    units = _csv(identity / "units.csv")
    fc1 = [int(u["unit"]) for u in units if u["site"] == "ffn.fc1"]
    want = sorted(sorted(fc1, key=lambda u: (-um[u], u))[:len(fc1) // 10])
    s = json.loads((identity / "intervention.json").read_text())
    assert [u["unit"] for u in s["chosen_units"]] == want
    counts = {k: v for k, v in s["conditions"]["chosen"]["cells"].items()}
    assert all(c["cells"] == counts for c in s["conditions"].values())


def test_rerun_skips_done_conditions_and_refuses_other_settings(identity, capsys):
    work = identity / "intervention"
    stamps = {p.name: p.stat().st_mtime_ns for p in work.glob("*.npz")}
    assert script.main([str(identity), "--factor", "1", "--draws", "1", "--permutations", "200"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("*.npz")} == stamps
    before = {p.name: p.read_bytes() for p in identity.iterdir() if p.is_file()}
    assert script.main([str(identity), "--factor", "0.5", "--draws", "1"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("intervene: error:")]
    assert len(err) == 1 and "other settings (factor" in err[0] and "--restart" in err[0], err
    assert {p.name: p.read_bytes() for p in identity.iterdir() if p.is_file()} == before


def test_mismatched_checkpoint_is_refused(small_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(small_run, other, ignore=shutil.ignore_patterns("intervention*"))
    info = json.loads((other / "record.json").read_text())
    info["fingerprint"]["weights_sha256"] = "0" * 64
    (other / "record.json").write_text(json.dumps(info))
    assert script.main([str(other), "--draws", "1"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("intervene: error:")]
    assert len(err) == 1 and "not the model this run was recorded with" in err[0], err
    assert not (other / "intervention").exists() and not (other / "intervention.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent/run"], "does not exist"),
    (["{run}", "--sites", "head"], "not recorded in this run"),
    (["{run}", "--top-percent", "0"], "--top-percent must be in (0, 100]"),
    (["{run}", "--draws", "0"], "--draws must be >= 1"),
    (["{run}", "--per-sample", "-1"], "--per-sample must be >= 0"),
    (["{run}", "--factor", "nan"], "--factor must be a finite number"),
    (["{run}", "--prefix-scales", "7"], "--prefix-scales [7]"),
    (["{empty}"], "lacks run.json"),
])
def test_bad_input_is_one_line(small_run, tmp_path, argv, message, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.format(run=small_run, empty=tmp_path / "empty") for a in argv]
    before = sorted(p.name for p in small_run.iterdir())
    assert script.main(argv) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("[")]
    assert len(err) == 1 and err[0].startswith("intervene: error:") and message in err[0], err
    assert sorted(p.name for p in small_run.iterdir()) == before


def test_script_reports_errors_without_a_traceback(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "intervene.py"), str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"intervene: error: run directory {tmp_path / 'none'} does not exist"]
