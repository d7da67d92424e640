"""experiments/compare.py and varjax.analysis.compare: runs side by side, refusals, and two
precision runs of the planted model recorded here (they share samples and units)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import compare as compare_cli
from tests.conftest import finish_run, spiked, unit_rows, write_run
from varjax import unitmem
from varjax.analysis import load_run
from varjax.data.planted import default_checkpoint
from varjax.study import record_planted

N_PERM = 200


def two_depths(tmp_path: Path) -> tuple[Path, Path]:
    """d2: the spiked matrix; d4: it twice side by side as 4 blocks, so each UnitMem value
    appears twice and P90 (position 20.7 of 24) is the 11th value: U10 = {10, 11, 22, 23}."""
    a, b = tmp_path / "d2", tmp_path / "d4"
    write_run(a, spiked(), ["train"] * 20, unit_rows(2, 1))
    write_run(b, np.concatenate([spiked(), spiked()], axis=1), ["train"] * 20, unit_rows(4, 1))
    finish_run(a, depth=2)
    finish_run(b, depth=4)
    return a, b


def test_two_depths_side_by_side(tmp_path):
    a, b = two_depths(tmp_path)
    out = tmp_path / "cmp"
    assert compare_cli.main([str(a), str(b), "--out", str(out), "--permutations", str(N_PERM)]) == 0
    c = json.loads((out / "comparison.json").read_text())
    ra, rb = c["runs"]
    assert (ra["depth"], rb["depth"], ra["u10_count"], rb["u10_count"]) == (2, 4, 2, 4)
    assert ra["per_block"]["relative_depth"] == [0, 0.5] and rb["per_block"]["relative_depth"] == [0, 0.25, 0.5, 0.75]
    # fc1's U10 units: unit 10 (block 1) in d2; units 10 and 22 (blocks 1 and 3) in d4, 1 of 4 each.
    assert ra["per_block"]["u10_share_by_site"]["ffn.fc1"] == [0, 0.25]
    assert rb["per_block"]["u10_share_by_site"]["ffn.fc1"] == [0, 0.25, 0, 0.25]
    assert ra["u10_centre_by_site"]["ffn.fc1"] == pytest.approx(0.5)  # block 1 of 2
    assert rb["u10_centre_by_site"]["ffn.fc2"] == pytest.approx(0.5)  # blocks 1 and 3 of 4: (0.25 + 0.75) / 2
    assert ra["u10_centre_by_site"]["attn.proj"] is None  # no U10 unit there
    assert ra["samples_with_memunits"] == rb["samples_with_memunits"] == 2
    # Same samples, other units: no Jaccard; samples 105 and 107 lead both rankings.
    (o,) = c["overlaps"]
    assert (o["a"], o["b"], o["n_common"], o["u10_jaccard"]) == ("d2", "d4", 20, None)
    assert o["top_overlap"] == 1.0 and o["nmu_spearman"] == pytest.approx(1.0)
    assert list(ra["diversity"]) == ["attn.proj", "ffn.fc1", "ffn.fc2"]
    report = (out / "report.md").read_text()
    for heading in ("## The runs", "## Where U10 sits over depth", "## Coverage", "## Diversity by depth",
                    "## Runs over the same samples"):
        assert heading in report
    for name in ("compare_depth", "compare_coverage", "compare_diversity"):
        assert (out / "figures" / f"{name}.png").is_file() and f"figures/{name}.png" in report


def _refused(argv: list[str], out: Path, capsys, message: str) -> None:
    assert compare_cli.main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compare: error:") and message in err[0], err
    assert not out.exists()


def test_runs_that_cannot_be_compared_are_refused(tmp_path, capsys):
    a, b = two_depths(tmp_path)
    out = tmp_path / "never"
    _refused([str(a)], out, capsys, "at least two")
    _refused([str(a), str(a)], out, capsys, "given twice")
    _refused([str(a), str(tmp_path / "nope")], out, capsys, "not a run directory")
    # Not finished: no record.json, or an interrupted pass's progress.npz.
    c = tmp_path / "unfinished"
    shutil.copytree(a, c)
    (c / "record.json").unlink()
    _refused([str(a), str(c)], out, capsys, "not a finished run")
    finish_run(c)
    (c / "progress.npz").write_bytes(b"")
    _refused([str(a), str(c)], out, capsys, "not a finished run")
    (c / "progress.npz").unlink()
    # A site defined otherwise (the analysis refuses it too: recorded under old definitions).
    info = json.loads((c / "record.json").read_text())
    info["fingerprint"]["sites"]["attn.proj"] = "proj(x) * gamma1"
    (c / "record.json").write_text(json.dumps(info))
    _refused([str(a), str(c)], out, capsys, "other site definitions")
    # No common layer type: a run of resid alone.
    r = tmp_path / "resid"
    write_run(r, np.random.default_rng(0).random((20, 4)).astype(np.float32), ["train"] * 20,
              [(blk, f"blocks.{blk}", i) for blk in range(2) for i in range(2)])
    finish_run(r, sites=("resid",))
    _refused([str(a), str(r)], out, capsys, "share no layer type")
    # Analysed with other variants; the median asked of a run without activations.npy.
    (a / "summary.json").write_text(json.dumps({"variant": "median"}))
    (b / "summary.json").write_text(json.dumps({"variant": "mean"}))
    _refused([str(a), str(b)], out, capsys, "different UnitMem variants")
    n = tmp_path / "npz"
    write_run(n, spiked(), ["train"] * 20, unit_rows(2, 1), npz=True)
    finish_run(n)
    _refused([str(a), str(n), "--variant", "median"], out, capsys, "the median variant needs it")
    # --out inside a run directory would overwrite its report.
    _refused([str(a), str(b), "--variant", "mean"], b / "cmp", capsys, "inside the run directory")


@pytest.fixture(scope="module")
def precision_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The planted model on the planted set at 2 views, in float32 and in bfloat16."""
    root = tmp_path_factory.mktemp("precision")
    for p in ("highest", "bf16"):
        record_planted(default_checkpoint(), root / p, views=2, precision=p)
    return root / "highest", root / "bf16"


def _u10_and_nmu(run_dir: Path):
    """U10 and NumMemUnits on D' straight from the run's files (not through the comparison)."""
    d = load_run(run_dir)
    st = d.stats["train"]
    mask, _ = unitmem.top_units(unitmem.unitmem_mean(st), 90)
    ids = d.ids[d.split == "train"]
    return mask, unitmem.num_mem_units(st.argmax, mask, ids), ids


@pytest.mark.slow
def test_precision_runs_share_samples_and_units(precision_runs, tmp_path):
    hi, bf = precision_runs
    out = tmp_path / "cmp"
    assert compare_cli.main([str(hi), str(bf), "--out", str(out), "--permutations", str(N_PERM)]) == 0
    c = json.loads((out / "comparison.json").read_text())
    assert [r["precision"] for r in c["runs"]] == ["highest", "bf16"]
    (o,) = c["overlaps"]
    m_hi, n_hi, ids = _u10_and_nmu(hi)
    m_bf, n_bf, _ = _u10_and_nmu(bf)
    assert o["n_common"] == len(ids) == 172
    assert o["u10_jaccard"] == pytest.approx((m_hi & m_bf).sum() / (m_hi | m_bf).sum())
    top = lambda n: set(ids[unitmem.rank_samples(n, ids)[:20]].tolist())  # noqa: E731
    assert o["top_overlap"] == pytest.approx(len(top(n_hi) & top(n_bf)) / 20)
    # bf16 moves a little of U10 (README: Jaccard 0.987 at 8 views): the runs mostly agree.
    assert 0.8 < o["u10_jaccard"] < 1.0 and o["top_overlap"] >= 0.7
    report = (out / "report.md").read_text()
    assert "| highest vs bf16 | 172 |" in report
