"""Tests of varjax.analysis (rundir, compute, figures, report) on hand-written run dirs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import analyze as analyze_cli
from tests.conftest import finish_run, spiked, unit_rows, write_run
from varjax import analysis as A
from varjax.analysis import report as report_lib

N_PERM = 200  # enough to exercise the test; the default 10,000 is for real runs
STUDY_FIGURES = ["fig1_u10_per_block", "fig2_mean_unitmem_per_block", "fig3_u10_per_type",
                 "fig4_mean_unitmem_per_type", "fig5_max_unitmem_per_block", "fig6_coverage",
                 "fig7_top_samples", "fig8_top_units_images"]


@pytest.fixture
def no_png(monkeypatch):
    """Skips rendering PNGs (the slow part) in tests about numbers, not figures."""
    monkeypatch.setattr(A.F, "save", lambda fig, path: None)


def hand_run(d: Path, sources=None) -> None:
    """2 blocks x (1 + 4 + 1) units, 20 train samples, every activation 1 except one spike.

    Unit u spikes to v_u = u + 2 on one sample, so mu_-max = 1 and UnitMem = (v - 1)/(v + 1);
    unit 0 is zero everywhere (UnitMem 0). Sorted UnitMem: s_9 = 10/12, s_10 = 11/13, s_11 =
    12/14, so P90 = s_9 + 0.9 (s_10 - s_9) and U10 = units 10 (fc1, block 1) and 11 (fc2).
    Unit 10 spikes on sample id 107, unit 11 on id 105 (the others on id 100).
    """
    write_run(d, spiked(), ["train"] * 20, unit_rows(2, 1), sources=sources)


def test_hand_run_numbers_report_and_figures(tmp_path):
    hand_run(tmp_path)
    s = A.analyze(tmp_path, n_permutations=N_PERM)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["u10_count"] == s["u10_count"] == 2
    assert on_disk["p90"] == pytest.approx(10 / 12 + 0.9 * (11 / 13 - 10 / 12))
    assert (on_disk["n_samples"], on_disk["n_units"], on_disk["variant"]) == (20, 12, "mean")
    assert on_disk["samples_with_memunits_frac"] == pytest.approx(2 / 20)
    # Top 1%: floor(0.2) = 0 samples; 5%: 1 sample (id 105, by the id tie-break) = 1 of 2; 10%: both.
    assert on_disk["top1pct_coverage"] == 0.0
    assert on_disk["top5pct_coverage"] == pytest.approx(0.5)
    assert on_disk["top10pct_coverage"] == pytest.approx(1.0)
    assert [t["sample"] for t in on_disk["top_samples"][:2]] == [105, 107]
    assert on_disk["per_site"]["ffn.fc1"]["u10_count"] == 1
    assert on_disk["per_site"]["ffn.fc1"]["u10_count_size_adjusted"] == pytest.approx(0.25)
    assert on_disk["per_block"]["u10_total"] == [0, 2]
    assert on_disk["stats_source"] == "activations"
    assert on_disk["variants_available"] == ["mean", "median"]
    assert on_disk["other_variant"]["variant"] == "median"  # all others are 1: median = mean
    assert on_disk["other_variant"]["u10_count"] == 2
    assert "d_all" not in on_disk and on_disk["loss_correlation"] is None
    # Item 8 on the fc1 units of blocks 0 and 1 (2 blocks: linspace(0, 1, 4) -> 0, 1).
    assert list(on_disk["top_units"]) == ["0", "1"]
    assert on_disk["top_units"]["1"][0] == {"unit": 10, "site": "ffn.fc1", "unitmem": pytest.approx(11 / 13),
                                            "argmax": 107, "label": 3}
    # Open questions. Classes (labels = row % 4): U10's argmax samples 107 (class 3) and 105
    # (class 1): O = [0, 1, 0, 1], E = 0.5 each, chi2 = 4 x 0.25 / 0.5 = 2, the least any
    # relabelling gives (two samples in two classes: 2; in one class: 6), so p = 1.
    ci = on_disk["class_influence"]
    assert ci["u10_argmax"] == [0, 1, 0, 1] and ci["chi2"] == pytest.approx(2.0)
    assert ci["p_value"] == 1.0 and ci["stand_out"] == [] and "exchangeable" in ci["null"]
    div = on_disk["diversity"]
    assert div["k"] == 10 and list(div["by_site"]) == ["attn.proj", "ffn.fc1", "ffn.fc2", "all sites"]
    # Block 1's fc1: units 10 (UnitMem 11/13, argmax 107) then 7, 8, 9 (argmax 100): 2 images.
    assert div["by_site"]["ffn.fc1"]["distinct_images"] == [1, 2]
    assert on_disk["scale_depth"] is None
    for name in STUDY_FIGURES + ["extra_unitmem_histogram", "extra_diversity_by_depth", "open_class_influence"]:
        png = tmp_path / "figures" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert on_disk["figures"][name] == f"figures/{name}.png"
    report = (tmp_path / "report.md").read_text()
    for name in on_disk["figures"]:
        assert f"](figures/{name}.png)" in report
    assert "## D_all" not in report and "No run.json" in report
    assert "### Class influence: no class stands out" in report
    assert "### Diversity of memorized samples by depth, quantified (top 10 units per block)" in report
    assert "### Where memorization sits" not in report  # no per-scale statistics
    assert "10.00% (2/20)" in report  # samples with NumMemUnits > 0
    assert not list(tmp_path.rglob("*.tmp"))


def test_skipped_samples_are_left_out(tmp_path, no_png):
    hand_run(tmp_path)
    (tmp_path / "skipped.csv").write_text("row,sample,reason\n19,119,cannot decode\n")
    s = A.analyze(tmp_path, n_permutations=N_PERM)
    # Sample 119 (all ones) is gone: UnitMem and U10 are unchanged, N = 19, so the top 5% is
    # floor(0.95) = 0 samples and the top 10% floor(1.9) = 1 sample (id 105: 1 of 2 units).
    assert (s["n_samples"], s["n_skipped"], s["u10_count"]) == (19, 1, 2)
    assert s["samples_with_memunits_frac"] == pytest.approx(2 / 19)
    assert (s["top5pct_coverage"], s["top10pct_coverage"]) == (0.0, 0.5)
    assert "1 unreadable samples listed in skipped.csv" in (tmp_path / "report.md").read_text()


def test_median_variant(tmp_path, no_png):
    """5 samples (ids 100-104) x 12 units where the median and the mean of the others differ.

    Units with a profile (the other 9 are 1 on every sample: UnitMem 0 in both variants):
      unit 0 (block 0 attn.proj): 3 on id 102, others 0.5      -> mean = median = 0.5: 5/7
      unit 7 (block 1 fc1):       4 on id 101, others 0.2      -> 3.8/4.2 = 19/21 in both
      unit 11 (block 1 fc2):      3 on id 104, others 0,0,0,2.8 -> mean 0.7: 2.3/3.7 = 23/37;
                                                                   median 0: 1
    Mean: sorted tail 23/37, 5/7, 19/21 -> P90 = 23/37 + 0.9 (5/7 - 23/37), U10 = {0, 7}.
    Median: tail 5/7, 19/21, 1 -> P90 = 5/7 + 0.9 (19/21 - 5/7), U10 = {7, 11}.
    """
    acts = np.ones((5, 12), np.float32)
    acts[:, 0] = [0.5, 0.5, 3, 0.5, 0.5]
    acts[:, 7] = [0.2, 4, 0.2, 0.2, 0.2]
    acts[:, 11] = [0, 0, 0, 2.8, 3]
    write_run(tmp_path, acts, ["train"] * 5, unit_rows(2, 1))
    mean_p90, median_p90 = 23 / 37 + 0.9 * (5 / 7 - 23 / 37), 5 / 7 + 0.9 * (19 / 21 - 5 / 7)

    s = A.analyze(tmp_path, variant="median", n_permutations=N_PERM)
    assert s["variant"] == "median" and s["u10_count"] == 2
    assert s["p90"] == pytest.approx(median_p90)
    assert s["unitmem"]["max"] == pytest.approx(1.0) and s["unitmem"]["mean"] == pytest.approx((5 / 7 + 19 / 21 + 1) / 12)
    assert {k: v["u10_count"] for k, v in s["per_site"].items()} == {"attn.proj": 0, "ffn.fc1": 1, "ffn.fc2": 1}
    assert [t["sample"] for t in s["top_samples"][:3]] == [101, 104, 100]  # NumMemUnits 1, 1, 0
    o = s["other_variant"]
    assert o["variant"] == "mean" and o["p90"] == pytest.approx(mean_p90) and o["u10_count"] == 2
    assert o["u10_jaccard_with_main"] == pytest.approx(1 / 3)  # {0, 7} vs {7, 11}
    assert "median of the other N-1" in (tmp_path / "report.md").read_text()

    m = A.analyze(tmp_path, n_permutations=N_PERM)  # the mean variant, the other way round
    assert m["p90"] == pytest.approx(mean_p90) and m["other_variant"]["p90"] == pytest.approx(median_p90)
    assert {k: v["u10_count"] for k, v in m["per_site"].items()} == {"attn.proj": 1, "ffn.fc1": 1, "ffn.fc2": 0}
    assert [t["sample"] for t in m["top_samples"][:2]] == [101, 102]


def test_stats_npz_run_with_val_matches_matrix_run(tmp_path):
    rng = np.random.default_rng(0)
    units = unit_rows(4, 2)  # 4 blocks x 12 units
    acts = rng.gamma(2.0, 0.1, size=(30, len(units))).astype(np.float32)
    acts[rng.integers(0, 15, 20), rng.integers(0, len(units), 20)] += 3  # train samples memorized
    splits = ["train"] * 15 + ["val"] * 15
    npz_dir, mat_dir = tmp_path / "npz", tmp_path / "mat"
    ids = write_run(npz_dir, acts, splits, units, npz=True, scales=3)
    write_run(mat_dir, acts, splits, units)
    with open(npz_dir / "per_sample.csv", "w") as f:
        f.write("sample,loss,acc\n" + "".join(f"{i},{5 - 0.1 * k},0.5\n" for k, i in enumerate(ids)))
    (npz_dir / "run.json").write_text(json.dumps({"precision": "float32", "config": {"depth": 4}}))
    a = A.analyze(npz_dir, n_permutations=N_PERM)
    A.F.save, real_save = (lambda fig, path: None), A.F.save  # numbers only
    try:
        b = A.analyze(mat_dir, n_permutations=N_PERM)
    finally:
        A.F.save = real_save
    for key in ("u10_count", "p90", "samples_with_memunits_frac", "top5pct_coverage", "n_samples"):
        assert a[key] == pytest.approx(b[key]), key
    assert a["stats_source"] == "stats_npz" and a["variants_available"] == ["mean"]
    d = json.loads((npz_dir / "summary.json").read_text())["d_all"]
    assert d["n_samples"] == 30 and d["all_units"]["n_train"] == d["all_units"]["n_val"] == 15
    assert d["all_units"]["sum_train"] + d["all_units"]["sum_val"] == len(units)
    assert d["u10"]["sum_train"] + d["u10"]["sum_val"] == d["u10_count"]
    assert 0 < d["u10"]["p_value"] <= 1 and d["u10"]["n_permutations"] == N_PERM
    assert d["u10_count"] == b["d_all"]["u10_count"]
    assert a["per_scale"] is not None and len(a["per_scale"]["threshold"]) == 3
    assert a["loss_correlation"]["n"] == 15
    for name in ("fig9_train_vs_val", "extra_per_scale", "extra_loss_vs_memunits", "open_scale_depth"):
        assert (npz_dir / "figures" / f"{name}.png").is_file()
    sd = a["scale_depth"]
    assert len(sd["centre"]) == 3 and sd["exact"] and sd["n_permutations"] == 6  # 3! orders
    assert 0 <= min(sd["centre"]) and max(sd["centre"]) <= 0.75  # blocks 0..3 of depth 4
    report = (npz_dir / "report.md").read_text()
    assert "## D_all" in report and "| precision | float32 |" in report and "| config.depth | 4 |" in report
    assert "### Where memorization sits by scale and depth" in report and "Spearman rho = " in report


def test_image_loading_is_pluggable_and_never_crashes(tmp_path):
    img_path = tmp_path / "img.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(img_path)
    sources = [str(img_path), "tfds:x/1", "demo:cat", "bad"] * 5
    hand_run(tmp_path, sources=sources)
    A.analyze(tmp_path, n_permutations=N_PERM)  # default loader: the file opens, the rest are tiles
    seen = []

    def loader(source):
        seen.append(source)
        if source == "demo:cat":
            return np.zeros((32, 32, 3), np.uint8)
        if source == "bad":
            return np.zeros((5,))  # wrong shape: placeholder
        raise RuntimeError("no tfds here")

    A.analyze(tmp_path, load_image=loader, n_permutations=N_PERM)
    assert "demo:cat" in seen and (tmp_path / "report.md").is_file()


def test_interrupted_report_leaves_no_report(tmp_path, monkeypatch):
    hand_run(tmp_path)
    (tmp_path / "report.md").write_text("# an old report\n")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "report.md":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        A.analyze(tmp_path, n_permutations=N_PERM)
    # The full report was in a temp file when the rename failed: neither the stale report
    # nor a partial one is left, and the temp file is cleaned up.
    assert not (tmp_path / "report.md").exists()
    assert not list(tmp_path.glob(".report.md*"))
    assert (tmp_path / "summary.json").is_file()  # written (completely) before the report


def test_crash_while_rendering_leaves_no_report(tmp_path, monkeypatch, no_png):
    hand_run(tmp_path)
    (tmp_path / "report.md").write_text("# an old report\n")

    def boom(*args, **kwargs):
        raise RuntimeError("crash while rendering")

    monkeypatch.setattr(report_lib, "render_markdown", boom)
    with pytest.raises(RuntimeError):
        A.analyze(tmp_path, n_permutations=N_PERM)
    assert not (tmp_path / "report.md").exists()


def test_bad_inputs(tmp_path, capsys, no_png):
    hand_run(tmp_path)
    (tmp_path / "samples.csv").rename(tmp_path / "elsewhere.csv")
    with pytest.raises(A.AnalysisError, match="missing samples.csv"):
        A.analyze(tmp_path)
    (tmp_path / "elsewhere.csv").rename(tmp_path / "samples.csv")
    np.save(tmp_path / "activations.npy", np.ones((20, 11), np.float32))
    assert analyze_cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: activations.npy has shape (20, 11)") and "\n" not in err
    (tmp_path / "activations.npy").unlink()
    with pytest.raises(A.AnalysisError, match="neither stats_"):
        A.analyze(tmp_path)
    with pytest.raises(A.AnalysisError, match="does not exist"):
        A.analyze(tmp_path / "nope")
    assert not (tmp_path / "report.md").exists()


def test_npz_inconsistent_with_samples(tmp_path, no_png):
    acts = np.random.default_rng(0).random((6, 12)).astype(np.float32)
    write_run(tmp_path, acts, ["train"] * 6, unit_rows(2, 1), npz=True)
    with np.load(tmp_path / "stats_train.npz") as z:
        parts = dict(z)
    np.savez(tmp_path / "stats_train.npz", **{**parts, "count": np.int64(7)})
    with pytest.raises(A.AnalysisError, match="count 7"):
        A.analyze(tmp_path)
    np.savez(tmp_path / "stats_train.npz", **{**parts, "argmax": parts["argmax"] + 1000})
    with pytest.raises(A.AnalysisError, match="argmax does not match"):
        A.analyze(tmp_path)
    np.savez(tmp_path / "stats_val.npz", **parts)
    with pytest.raises(A.AnalysisError, match="no 'val' samples"):
        A.analyze(tmp_path)


def test_run_with_head_and_residual_sites(tmp_path, no_png):
    """2 blocks x (fc1 4, resid 1) + head_nm 1 + head 3 at block 2 (= depth), 12 samples:
    the top sites get their rows in every table, a relative depth of 1, no trend test of
    their own and no place in the scale x depth profile (not in a block)."""
    units = ([(b, f"blocks.{b}.ffn.fc1", i) for b in range(2) for i in range(4)]
             + [(b, f"blocks.{b}", 0) for b in range(2)] + [(2, "head_nm", 0)] + [(2, "head", i) for i in range(3)])
    acts = np.random.default_rng(0).gamma(2.0, 0.1, size=(12, len(units))).astype(np.float32)
    acts[3, -3:] += 5  # the head's units memorize sample 103
    write_run(tmp_path, acts, ["train"] * 12, units, npz=True, scales=3)
    finish_run(tmp_path, sites=("ffn.fc1", "resid", "head_nm", "head"))
    A.analyze(tmp_path, n_permutations=N_PERM)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["sites"] == ["ffn.fc1", "resid", "head_nm", "head"] and s["n_blocks"] == 3
    assert s["per_site"]["head"]["n_units"] == 3 and s["per_site"]["head"]["u10_count"] >= 1
    assert s["per_block"]["blocks"] == [0, 1, 2]
    head = s["diversity"]["by_site"]["head"]
    assert head["blocks"] == [2] and head["relative_depth"] == [1.0] and head["p_image_falls"] is None
    assert s["diversity"]["by_site"]["all sites"]["blocks"] == [0, 1]
    assert s["scale_depth"]["sites"] == ["ffn.fc1", "resid"] and len(s["scale_depth"]["u10_share"][0]) == 2
    assert list(s["top_units"]) == ["0", "1"]  # item 8: the fc1 blocks, not the head's
    report = (tmp_path / "report.md").read_text()
    assert "| head | 3 |" in report and "head: no trend test (one block)." in report
    # The run's own sites are checked: units.csv must hold what record.json recorded.
    finish_run(tmp_path, sites=("ffn.fc1", "resid"))
    with pytest.raises(A.AnalysisError, match="record.json recorded ffn.fc1, resid"):
        A.analyze(tmp_path, n_permutations=N_PERM)
