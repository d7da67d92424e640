"""experiments/run.py: the demo end to end, --reanalyze on hand-written files, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import run
from tests.conftest import assert_canaries_found, canary_numbers
from varjax.data.planted import default_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_FRACTIONS = ("samples_with_memunits_frac", "top1pct_coverage", "top5pct_coverage",
                     "top10pct_coverage")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    assert run.main(["--out", str(out), "--augs", "2"]) == 0
    return out


def test_demo_writes_every_output(demo_run):
    for name in ("report.md", "summary.json", "units.csv", "samples.csv", "stats_train.npz",
                 "stats_val.npz", "per_sample.csv", "activations.npy", "run.json", "record.json",
                 "planted.json"):
        assert (demo_run / name).is_file(), name
    summary = json.loads((demo_run / "summary.json").read_text())
    for key in SUMMARY_FRACTIONS:
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["u10_count"] > 0 and summary["n_samples"] > 0 and "d_all" in summary
    report = (demo_run / "report.md").read_text()
    figures = sorted((demo_run / "figures").glob("*.png"))
    # the nine items of the study, each a figure linked from the report
    for i in range(1, 10):
        assert any(f.name.startswith(f"fig{i}_") for f in figures), f"figure {i} missing"
    for f in figures:
        assert f"figures/{f.name}" in report, f.name
        assert f.stat().st_size > 5000, f"{f.name} looks empty"


def test_demo_reports_the_open_questions(demo_run):
    """Class influence, diversity by depth, and scale x depth: each with its test in summary.json
    and its section and figure in the report (4 classes, 4 blocks, 4 scales)."""
    s = json.loads((demo_run / "summary.json").read_text())
    ci = s["class_influence"]
    assert ci["classes"] == [0, 1, 2, 3] and sum(ci["u10_argmax"]) == s["u10_count"]
    assert 0 < ci["p_value"] <= 1 and ci["n_permutations"] == 10_000
    every = s["diversity"]["by_site"]["all sites"]
    assert every["blocks"] == [0, 1, 2, 3] and every["p_image_falls"] is not None
    sd = s["scale_depth"]
    assert sd["labels"] == ["1x1", "2x2", "3x3", "4x4"] and sd["exact"] and sd["n_permutations"] == 24
    assert len(sd["u10_share"]) == 4 and len(sd["u10_share"][0]) == 4  # K scales x 4 blocks (x sites)
    report = (demo_run / "report.md").read_text()
    for heading in ("## The study's open questions", "### Class influence: ",
                    "### Diversity of memorized samples by depth, quantified (top 10 units per block)",
                    "### Where memorization sits by scale and depth"):
        assert heading in report, heading
    assert f"permutation p = {ci['p_value']:.3g}" in report
    assert f"p(deeper) = {sd['p_deeper']:.3g}" in report
    for name in ("open_class_influence", "extra_diversity_by_depth", "open_scale_depth"):
        assert f"](figures/{name}.png)" in report


def test_demo_finds_the_planted_canaries(demo_run):
    """The demo's known answer: the shipped model's canaries stand out, in what the run wrote.

    At this test's 2 views (the demo takes 8) seed 0 measured NumMemUnits AUC 0.695
    (p 0.0014), dup64 ratio 15.3, loss AUCs 0.067 and 0.262, loss gap 2.66 nats: inside every
    margin of test_planted.py, which holds at 8 views for training seeds 0-3.
    """
    planted = json.loads((demo_run / "planted.json").read_text())
    assert planted["model"]["checkpoint"] == str(default_checkpoint())
    assert planted["model"]["checkpoint_from"] == "run.json"
    assert {g: v["n"] for g, v in planted["groups"].items()} == {
        "heldout": 64, "single": 160, "canary dup4": 4, "canary dup16": 4, "canary dup64": 4}
    assert_canaries_found(canary_numbers(demo_run, planted))
    report = (demo_run / "report.md").read_text()
    nmu = planted["tests"]["nmu_u10"]["canary vs single"]
    assert "## Planted memorization" in report
    row = [line for line in report.splitlines() if line.startswith("| NumMemUnits, U10(D_all) | canary vs single |")]
    assert len(row) == 1 and f"| {nmu['auc']:.3g} |" in row[0], row


def test_rerun_resumes_not_recomputes(demo_run):
    before = (demo_run / "record.json").stat().st_mtime_ns
    assert run.main(["--out", str(demo_run), "--augs", "2"]) == 0
    assert (demo_run / "record.json").stat().st_mtime_ns == before
    assert (demo_run / "report.md").is_file()


def _hand_written(d: Path) -> None:
    """3 samples x 4 units from 'another tool': unit 0 is memorized by sample 11."""
    d.mkdir()
    acts = np.array([[0.1, 1.0, 0.5, 0.2],
                     [0.9, 1.0, 0.5, 0.2],
                     [0.1, 1.0, 0.6, 0.2]], np.float32)
    np.save(d / "activations.npy", acts)
    (d / "units.csv").write_text("unit,block,site,index\n0,0,attn.proj,0\n1,0,ffn.fc1,0\n"
                                 "2,0,ffn.fc1,1\n3,0,ffn.fc2,0\n")
    (d / "samples.csv").write_text("sample,split,label,source\n10,train,0,a.png\n11,train,1,b.png\n"
                                   "12,train,1,c.png\n")


def test_reanalyze_hand_written_directory(tmp_path):
    d = tmp_path / "other_tool"
    _hand_written(d)
    assert run.main(["--reanalyze", str(d)]) == 0
    summary = json.loads((d / "summary.json").read_text())
    # UnitMem: unit0 (0.9-0.1)/(0.9+0.1)=0.8; unit1 0; unit2 (0.6-0.5)/1.1; unit3 0.
    # P90 of [0.8, 0, 0.0909, 0] = 0.0909 + 0.7 * (0.8 - 0.0909) -> U10 = {unit 0}.
    assert summary["u10_count"] == 1
    assert summary["n_samples"] == 3
    assert summary["samples_with_memunits_frac"] == pytest.approx(1 / 3)
    assert (d / "report.md").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent/ckpt"], "no such directory"),
    (["--data", "/nonexistent/images"], "does not exist"),
    (["--reanalyze", "/nonexistent/run"], "no such run directory"),
    (["--preset", "study"], "needs --checkpoint"),
    (["--scale-units", "/nonexistent/units.txt"], "cannot read the unit list"),
    (["--data", "imagenet2012", "--data-dir", "/nonexistent/tfds"], "imagenet2012 is not prepared: nothing in /nonexistent/tfds"),
])
def test_bad_input_is_one_line(tmp_path, argv, message):
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "--out", str(tmp_path / "o")] + argv,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr, res.stderr


@pytest.mark.parametrize("argv, message", [(["--augs", "0"], "must be positive"),
                                           (["--sites", "ffn.fc1,ffn.fc3"], "unknown site(s) ffn.fc3")])
def test_bad_flag_value_exits_nonzero(tmp_path, argv, message):
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "--out", str(tmp_path / "o")] + argv,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "Traceback" not in res.stderr and message in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


def _as_recorded_before_the_site_fix(src: Path, dst: Path) -> None:
    """A copy of a run whose record.json is as the recording pass wrote it before 2026-12-01
    (no site definitions: attn.proj was proj(x) * gamma1)."""
    import shutil

    shutil.copytree(src, dst)
    info = json.loads((dst / "record.json").read_text())
    del info["fingerprint"]["sites"]
    (dst / "record.json").write_text(json.dumps(info))
    (dst / "report.md").unlink()


def test_run_recorded_with_the_old_attn_proj_is_refused(demo_run, tmp_path, capsys):
    old = tmp_path / "old"
    _as_recorded_before_the_site_fix(demo_run, old)
    for argv in (["--out", str(old), "--augs", "2"], ["--reanalyze", str(old)]):
        assert run.main(argv) == 2
        err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("run: error:")]
        assert len(err) == 1 and "before 2026-12-01" in err[0] and "record it again" in err[0], err
        assert not (old / "report.md").exists()


def test_other_views_into_a_finished_run_are_refused_and_change_nothing(demo_run, capsys):
    """Another crop scale (or any view setting) is another run: refused, and the refused
    command leaves the directory's files as they were."""
    before = {p.name: p.read_bytes() for p in demo_run.iterdir() if p.is_file()}
    assert run.main(["--out", str(demo_run), "--augs", "2", "--mid-reso", "1.25"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("run: error:")]
    assert len(err) == 1 and "other settings" in err[0], err
    assert {p.name: p.read_bytes() for p in demo_run.iterdir() if p.is_file()} == before


def test_refused_settings_leave_no_directory_behind(tmp_path):
    out = tmp_path / "never"
    assert run.main(["--out", str(out), "--augs", "2", "--precision", "tf32", "--attention", "cudnn"]) == 2
    assert not out.exists()
