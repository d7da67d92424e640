"""Tests of varjax/data/loader.py: batch format, padding, sharding, resume, crops, bad images."""

import csv
import io
import os

import numpy as np
import PIL.Image
import pytest

from varjax.data import (AugmentConfig, DataError, augment, make_loader, open_source, select,
                         shard_bounds, write_skipped_csv)

CONFIG = AugmentConfig(resolution=32, views=3)  # small: the pipeline, not the pixels, is tested


def jpeg(seed, size=(60, 45), mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    img = PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def tree(tmp_path):
    """11 good images in two integer classes."""
    for i in range(11):
        write(tmp_path / "train" / str(i % 2) / f"img_{i:02d}.jpg", jpeg(i))
    return tmp_path


def collect(loader):
    """Returns ({sample: images}, batches) from one pass."""
    by_sample, batches = {}, []
    for batch in loader:
        batches.append(batch)
        for row in np.flatnonzero(batch["valid"]):
            by_sample[int(batch["sample"][row])] = batch["images"][row]
    return by_sample, batches


def test_batch_format_and_padding_of_the_last_batch(tree):
    src = open_source(str(tree))
    samples = select(src)
    loader = make_loader(src, samples, batch_size=4, augment_config=CONFIG, seed=0)
    by_sample, batches = collect(loader)
    assert len(loader) == len(batches) == 3
    b = batches[0]
    assert set(b) == {"images", "label", "sample", "valid"}
    assert b["images"].shape == (4, 3, 32, 32, 3) and b["images"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and b["sample"].dtype == np.int64
    assert b["valid"].dtype == bool
    last = batches[-1]
    assert last["valid"].tolist() == [True, True, True, False]
    assert last["sample"][-1] == -1 and not last["images"][-1].any()
    assert sorted(by_sample) == list(range(11))
    assert [int(x) for x in np.concatenate([b["label"][b["valid"]] for b in batches])] == \
        [s.label for s in samples]
    # The pixels are the augmentation of the file, views seeded by the sample id.
    with open(samples[5].source, "rb") as f:
        np.testing.assert_array_equal(by_sample[5], augment(f.read(), 5, CONFIG, seed=0))


def test_crops_do_not_depend_on_batch_size_or_workers(tree):
    src = open_source(str(tree))
    samples = select(src)
    ref, _ = collect(make_loader(src, samples, batch_size=4, augment_config=CONFIG, seed=1))
    for batch_size, workers, threads in [(3, 0, 1), (5, 2, 1)]:
        got, _ = collect(make_loader(src, samples, batch_size=batch_size, num_workers=workers,
                                     num_threads=threads, augment_config=CONFIG, seed=1))
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k])
    other, _ = collect(make_loader(src, samples, batch_size=4, augment_config=CONFIG, seed=2))
    assert not np.array_equal(other[0], ref[0])


@pytest.mark.parametrize("n, count", [(11, 2), (11, 3), (2, 3)])
def test_shards_cover_every_sample_once_with_equal_batch_counts(tree, n, count):
    src = open_source(str(tree))
    samples = select(src)[:n]
    seen, lengths = [], set()
    for index in range(count):
        loader = make_loader(src, samples, batch_size=2, augment_config=CONFIG,
                             shard_index=index, shard_count=count)
        by_sample, batches = collect(loader)
        seen += list(by_sample)
        lengths.add(len(batches))
        lo, hi = shard_bounds(n, index, count)
        assert sorted(by_sample) == list(range(lo, hi))  # contiguous blocks
    assert sorted(seen) == list(range(n))
    assert len(lengths) == 1  # every host runs the same number of steps
    with pytest.raises(DataError, match="shard index"):
        make_loader(src, samples, batch_size=2, shard_index=count, shard_count=count)


def test_resume_from_a_position(tree):
    src = open_source(str(tree))
    samples = select(src)
    full, full_batches = collect(make_loader(src, samples, batch_size=4, augment_config=CONFIG))
    resumed_loader = make_loader(src, samples, batch_size=4, augment_config=CONFIG, start=4)
    resumed, batches = collect(resumed_loader)
    assert len(batches) == 2 and sorted(resumed) == list(range(4, 11))
    for k in resumed:
        np.testing.assert_array_equal(resumed[k], full[k])
    np.testing.assert_array_equal(batches[0]["sample"], full_batches[1]["sample"])
    assert [s.sample for s in resumed_loader.samples] == list(range(4, 11))
    off_grid, batches = collect(make_loader(src, samples, batch_size=4, augment_config=CONFIG,
                                            start=9))
    assert sorted(off_grid) == [9, 10] and len(batches) == 1


@pytest.fixture
def bad_tree(tmp_path):
    """Good, odd-but-readable and unreadable images in one class, in this file order."""
    good = jpeg(0)
    files = {
        "a_good.jpg": good,
        "b_truncated.jpg": jpeg(1, size=(300, 200))[:1500],
        "c_random_bytes.jpg": bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8)),
        "d_gray.jpg": jpeg(2, mode="L"),
        "e_cmyk.jpg": jpeg(3, mode="CMYK"),
        "f_tiny.jpg": jpeg(4, size=(5, 3)),
        "g_empty.jpg": b"",
    }
    for name, data in files.items():
        write(tmp_path / "0" / name, data)
    return tmp_path


def test_bad_images_are_skipped_and_recorded(bad_tree, tmp_path):
    src = open_source(str(bad_tree))
    samples = select(src)
    loader = make_loader(src, samples, batch_size=3, augment_config=CONFIG, on_error="skip")
    by_sample, batches = collect(loader)
    assert sorted(by_sample) == [0, 3, 4, 5]  # good, gray, CMYK, tiny all decode
    assert [(s.sample, os.path.basename(s.source)) for s in loader.skipped] == \
        [(1, "b_truncated.jpg"), (2, "c_random_bytes.jpg"), (6, "g_empty.jpg")]
    assert "truncated" in loader.skipped[0].reason
    unreadable = "UnidentifiedImageError: not a readable image (unknown format or corrupt data)"
    assert [s.reason for s in loader.skipped[1:]] == [unreadable, unreadable]  # random bytes, empty file
    assert all("\n" not in s.reason for s in loader.skipped)
    flat_samples = np.concatenate([b["sample"] for b in batches])
    flat_valid = np.concatenate([b["valid"] for b in batches])
    assert flat_samples[:7].tolist() == list(range(7))  # skipped rows keep their place
    assert flat_valid[:7].tolist() == [True, False, False, True, True, True, False]
    path = tmp_path / "skipped.csv"
    write_skipped_csv(str(path), loader.skipped)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["sample", "source", "reason"] and len(rows) == 4
    assert rows[2][1] == samples[2].source


def test_bad_image_stops_with_one_line_naming_the_file(bad_tree):
    src = open_source(str(bad_tree))
    loader = make_loader(src, select(src), batch_size=3, augment_config=CONFIG)
    with pytest.raises(DataError, match="b_truncated.jpg") as err:
        collect(loader)
    assert "\n" not in str(err.value) and "sample 1" in str(err.value)


def test_bad_arguments(tree):
    src = open_source(str(tree))
    samples = select(src)
    with pytest.raises(DataError, match="on_error"):
        make_loader(src, samples, batch_size=2, on_error="ignore")
    with pytest.raises(DataError, match="batch size"):
        make_loader(src, samples, batch_size=0)
