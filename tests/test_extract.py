"""Extraction: the library call, experiments/extract.py on the planted demo run (the known
answer: the 64-copy canaries come back from a short prefix, singletons and held-out images do
not), the candidate rule, and bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import extract as extract_cli
from experiments import run
from varjax import extraction
from varjax.data.planted import parse_role
from varjax.errors import GenerateError
from varjax.extraction_job import rank_samples


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The demo (2 views) with extraction of every sample from 2 forced scales."""
    out = tmp_path_factory.mktemp("extract") / "run"
    assert run.main(["--out", str(out), "--augs", "2"]) == 0
    assert extract_cli.main([str(out), "--all", "--prefix-scales", "2"]) == 0
    return out


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "extraction.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_64_copy_canaries_are_regenerated_and_the_rest_are_not(demo_run):
    """Measured (seed 0, k = 2): all 4 of the 64-copy canaries token for token (SSIM 1.000),
    none of the 224 singletons and held-out images (SSIM <= 0.75)."""
    rows = _rows(demo_run)
    assert {r["prefix_scales"] for r in rows} == {"2"} and len(rows) == 236
    kind = [parse_role(r["source"]) for r in rows]
    dup64 = [r for r, k in zip(rows, kind) if k.kind == "canary" and k.dup == 64]
    rest = [r for r, k in zip(rows, kind) if k.kind != "canary"]
    assert len(dup64) == 4 and len(rest) == 224
    assert np.mean([r["extracted"] == "1" for r in dup64]) >= 0.75
    assert np.mean([r["extracted"] == "1" for r in rest]) <= 0.02
    assert np.mean([float(r["free_identical_share"]) for r in dup64]) > 0.9
    # the published candidate rule (top 5 per class by last-scale accuracy) picks them out
    assert all(r["candidate"] == "1" and r["rank_by"] == "accuracy" for r in dup64)


def test_report_and_summary_show_membership_inference_and_extraction(demo_run):
    s = json.loads((demo_run / "summary.json").read_text())
    mia = s["membership"]
    assert mia["n_members"] == 172 and mia["n_nonmembers"] == 64 and mia["repeats"] == 250
    for name in ("acc_last", "cond_loss", "cond_mink20", "cond_zlib", "diff_loss", "diff_zlib", "num_mem_units"):
        e = mia["scores"][name]
        assert 0 <= e["auc"] <= 1 and 0 <= e["tpr_mean"] <= 1 and e["tpr_std"] >= 0, name
    # the members' loss is lower: the trained samples include 12 canaries the model fits well
    assert mia["scores"]["cond_loss"]["auc"] > 0.55
    ext = s["extraction"]
    assert ext["by_role"]["2"]["canary dup64"]["rate"] >= 0.75
    assert ext["by_role"]["2"]["heldout"]["rate"] == 0
    report = (demo_run / "report.md").read_text()
    for heading in ("## Membership inference", "## Extraction", "Per canary", "By NumMemUnits"):
        assert heading in report, heading
    for fig in ("mia_roc.png", "extraction_k2_best.png", "extraction_k2_worst.png"):
        assert (demo_run / "figures" / fig).stat().st_size > 5000 and f"figures/{fig}" in report


def test_rank_samples_is_per_split_and_class_with_ties_by_id():
    score = np.array([0.5, 0.9, 0.9, 0.1, np.nan, 0.7])
    split = np.array(["train"] * 4 + ["val"] * 2)
    label = np.array([0, 0, 0, 1, 0, 0])
    ids = np.array([10, 12, 11, 13, 14, 15])
    rank, cand = rank_samples(score, True, split, label, ids, per_class=2)
    assert rank.tolist() == [3, 2, 1, 1, 2, 1]  # 0.9 tie: id 11 first; NaN last
    assert cand.tolist() == [False, True, True, True, True, True]


def test_extract_refuses_tokens_of_the_wrong_shape():
    from varjax.data.planted import default_checkpoint
    import varjax

    model = varjax.load(default_checkpoint())
    good = [np.zeros((2, p * p), np.int32) for p in model.config.patch_nums]
    with pytest.raises(GenerateError, match="prefix_scales"):
        extraction.extract(model, good, [0, 1], 5)
    with pytest.raises(GenerateError, match=r"tokens_true\[1\]"):
        extraction.extract(model, [good[0], good[1][:, :3]] + good[2:], [0, 1], 1)
    with pytest.raises(GenerateError, match=r"\(N, 30\)"):
        extraction.split_scales(np.zeros((2, 7)), model.config.patch_nums)


def _copy(run_dir: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("extraction*", *drop))
    return dest


@pytest.mark.parametrize("case,message", [
    ("no_membership", "record it with --membership"),
    ("other_weights", "not the checkpoint"),
    ("bad_sscd", "not a usable SSCD TorchScript file"),
    ("bad_prefix", "prefix scales must be in [0, 4]"),
    ("missing", "no finished recording"),
])
def test_bad_input_is_one_line_and_writes_nothing(demo_run, tmp_path, capsys, case, message):
    d = tmp_path / "run"
    argv = [str(d), "--no-report"]
    if case == "no_membership":
        _copy(demo_run, d, ("membership.csv",))
    elif case == "other_weights":
        _copy(demo_run, d)
        info = json.loads((d / "record.json").read_text())
        info["fingerprint"]["weights_sha256"] = "0" * 64
        (d / "record.json").write_text(json.dumps(info))
    elif case == "bad_sscd":
        _copy(demo_run, d)
        (tmp_path / "sscd.pt").write_text("not torchscript")
        argv += ["--sscd", str(tmp_path / "sscd.pt")]
    elif case == "bad_prefix":
        _copy(demo_run, d)
        argv += ["--prefix-scales", "2,7"]
    assert extract_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("extract: error:") and message in err[0], err
    if d.exists():
        assert not list(d.glob("extraction*")) and not (d / ".extraction_progress.npz").exists()


@pytest.mark.torch
def test_sscd_file_decides_extracted_at_the_published_threshold(demo_run, tmp_path):
    """A stand-in TorchScript embedder (mean colour per channel): the column is filled and
    `extracted` is cosine > 0.75."""
    import torch

    class MeanColour(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    torch.jit.save(torch.jit.script(MeanColour()), str(tmp_path / "sscd.pt"))
    d = _copy(demo_run, tmp_path / "run")
    assert extract_cli.main([str(d), "--no-report", "--prefix-scales", "2", "--sscd", str(tmp_path / "sscd.pt")]) == 0
    rows = _rows(d)
    assert len(rows) == 40  # top 5 per class and split, 4 classes, 2 splits
    sscd = np.array([float(r["sscd"]) for r in rows])
    assert np.all(np.abs(sscd) <= 1 + 1e-6)
    assert [r["extracted"] == "1" for r in rows] == list(sscd > extraction.SSCD_THRESHOLD)
    assert "SSCD cosine > 0.75" in json.loads((d / "extraction.json").read_text())["extracted"]


def test_interrupted_extraction_resumes_to_the_same_result(demo_run, tmp_path, monkeypatch, capsys):
    from varjax import extraction_job

    d = _copy(demo_run, tmp_path / "run")
    calls, real = [], extraction.extract

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(extraction_job.extraction, "extract", flaky)
    argv = [str(d), "--no-report", "--all", "--prefix-scales", "2", "--batch-size", "8"]
    assert extract_cli.main(argv) == 2
    assert "run the same command again to resume" in capsys.readouterr().err
    assert (d / ".extraction_progress.npz").is_file() and not (d / "extraction.csv").exists()
    monkeypatch.setattr(extraction_job.extraction, "extract", real)
    assert extract_cli.main(argv) == 0
    assert "resuming: 64 of 236 continuations done" in capsys.readouterr().err
    assert not (d / ".extraction_progress.npz").exists()
    got, want = _rows(d), _rows(demo_run)
    for col in ("sample", "identical_tokens", "extracted", "candidate", "class_rank"):
        assert [r[col] for r in got] == [r[col] for r in want], col
    np.testing.assert_allclose([float(r["ssim"]) for r in got], [float(r["ssim"]) for r in want], atol=1e-5)


def test_a_finished_extraction_is_not_recomputed(demo_run, capsys):
    before = (demo_run / "extraction.csv").stat().st_mtime_ns
    assert extract_cli.main([str(demo_run), "--all", "--prefix-scales", "2", "--no-report"]) == 0
    assert "this extraction is done" in capsys.readouterr().err
    assert (demo_run / "extraction.csv").stat().st_mtime_ns == before
