"""Tests of varjax/data/demo.py: the bundled demo set needs no download and loads cleanly."""

import io
import os

import numpy as np
import PIL.Image

from varjax.data import DEMO_CLASSES, AugmentConfig, make_loader, open_source, select
from varjax.data.demo import DemoSource, pattern, read_demo


def test_demo_contents():
    src = open_source("demo")
    assert isinstance(src, DemoSource) and src.splits == ("train", "val")
    samples = select(src)
    per_split = {split: [s.label for s in samples if s.split == split] for split in src.splits}
    assert len(per_split["train"]) == 34 and len(per_split["val"]) == 17
    for label in range(len(DEMO_CLASSES) - 1):
        assert per_split["train"].count(label) == 8 and per_split["val"].count(label) == 4
    photos = [s for s in samples if DEMO_CLASSES[s.label] == "photo"]
    assert [os.path.basename(s.source) for s in photos] == [
        "Minduka_Present_Blue_Pack.png", "grace_hopper.jpg", "logo2.png"]
    assert all(os.path.isfile(s.source) for s in photos)


def test_patterns_are_deterministic_varied_and_include_gray_and_tiny():
    a, b = pattern(0, 0, "train", 1), pattern(0, 0, "train", 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, pattern(1, 0, "train", 1)[: a.shape[0], : a.shape[1]])
    assert pattern(0, 1, "train", 2).ndim == 2  # every third image is grayscale
    assert max(pattern(0, 3, "val", 0).shape[:2]) < 256  # index 0 is smaller than a crop
    for label in range(4):  # patterns are not blank
        assert pattern(0, label, "train", 1).std() > 5
    decoded = PIL.Image.open(io.BytesIO(read_demo(("pattern", 0, 2, "val", 3))))
    np.testing.assert_array_equal(np.asarray(decoded), pattern(0, 2, "val", 3))


def test_demo_loads_without_skipping():
    src = open_source("demo")
    samples = select(src)
    loader = make_loader(src, samples, batch_size=16, on_error="skip",
                         augment_config=AugmentConfig(resolution=64, deterministic=True))
    n_valid = sum(int(batch["valid"].sum()) for batch in loader)
    assert n_valid == len(samples) == 51 and loader.skipped == []
