"""experiments/sample.py and varjax.gallery: the files, resumption, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import sample
from varjax import gallery
from varjax.errors import GenerateError

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--classes", "1,3", "--per-class", "3", "--batch-size", "4", "--seed", "5"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gallery") / "g"
    assert sample.main(ARGS + ["--out", str(out)]) == 0
    return out


def test_writes_every_file_and_the_tokens_are_the_images(shipped):
    import varjax
    from varjax.data.planted import default_checkpoint

    names = sorted(p.name for p in shipped.iterdir())
    pngs = [f"{i:05d}_class{c}.png" for i, c in enumerate([1, 1, 1, 3, 3, 3])]
    assert names == sorted(pngs + ["grid.png", "run.json", "tokens.npz"])
    info = json.loads((shipped / "run.json").read_text())
    assert info["sampling"] == {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "more_smooth": False}
    assert info["images"] == 6 and info["seed"] == 5 and info["unit_scaling"] is None and info["compile_s"] > 0
    z = np.load(shipped / "tokens.npz")
    np.testing.assert_array_equal(z["labels"], [1, 1, 1, 3, 3, 3])
    model = varjax.load(default_checkpoint())
    want = model.generate(z["labels"], cfg=1.5, top_k=900, top_p=0.96, seed=5, sample_ids=z["sample_ids"])
    for s, t in enumerate(want):
        np.testing.assert_array_equal(z[f"idx{s}"], np.asarray(t), err_msg=f"scale {s}")
    decoded = np.asarray(model.decode(want))
    for i, name in enumerate(pngs):
        png = np.asarray(Image.open(shipped / name)).astype(int)
        assert np.abs(png - gallery._to_uint8(decoded[i]).astype(int)).max() <= 1, name
    assert Image.open(shipped / "grid.png").size == (3 * 66 + 2, 2 * 66 + 2)


def test_rerun_returns_the_finished_gallery(shipped):
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()}
    assert sample.main(ARGS + ["--out", str(shipped)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} == before


def test_interrupted_gallery_resumes_to_the_same_files(shipped, tmp_path):
    config = gallery.GalleryConfig(classes=(1, 3), per_class=3, batch_size=2, seed=5)

    def stop_after_first_batch(msg):
        if msg.startswith("2/"):
            raise KeyboardInterrupt

    with pytest.raises(GenerateError, match="interrupted after 2 of 6"):
        gallery.run(None, tmp_path / "g", config, log=stop_after_first_batch)
    assert not (tmp_path / "g" / "run.json").exists() and (tmp_path / "g" / gallery.PROGRESS).exists()
    gallery.run(None, tmp_path / "g", config, log=lambda m: None)
    a, b = np.load(shipped / "tokens.npz"), np.load(tmp_path / "g" / "tokens.npz")
    assert a.files == b.files
    for k in a.files:  # batch 4 uninterrupted == batch 2 interrupted and resumed
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not (tmp_path / "g" / gallery.PROGRESS).exists()
    with pytest.raises(GenerateError, match="other settings"):
        gallery.run(None, tmp_path / "g", gallery.GalleryConfig(classes=(1, 3), per_class=3, seed=6))


@pytest.mark.parametrize("argv, message", [
    (["--classes", "9"], "classes [9]"),
    (["--classes", "x"], "comma-separated"),
    (["--per-class", "0"], "must be positive"),
    (["--top-p", "2"], "top_p"),
    (["--checkpoint", "/nonexistent/ckpt"], "no such directory"),
    (["--scale-units", "/nonexistent/units.txt"], "cannot read"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, argv, message):
    out = tmp_path / "o"
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "sample.py"), "--out", str(out)] + argv,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert not out.exists()


def test_scaled_gallery_records_its_scaling(tmp_path):
    (tmp_path / "units.txt").write_text("0 5 300\n")
    out = tmp_path / "g"
    assert sample.main(["--classes", "2", "--per-class", "2", "--batch-size", "2", "--out", str(out),
                        "--scale-units", str(tmp_path / "units.txt"), "--scale-mode", "output"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["unit_scaling"]["mode"] == "output"
    assert [u[:3] for u in info["unit_scaling"]["units"]] == [["attn.proj", 0, 0], ["attn.proj", 0, 5], ["ffn.fc1", 0, 236]]
