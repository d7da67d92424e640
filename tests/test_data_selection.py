"""Tests of varjax/data/selection.py: the study's classes, first-n per class, ids, samples.csv."""

import csv
import os
import random

import pytest

from varjax.data import DataError, imagenet_wnids, open_source, select, study_classes
from varjax.data import write_samples_csv


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def test_study_classes_equal_the_studys_random_calls():
    random.seed(0)
    expected = random.sample(range(1000), 32)
    state = random.getstate()
    assert study_classes(32, 0) == expected
    assert random.getstate() == state  # the global generator is left alone
    random.seed(5)
    assert study_classes(3, 5) == random.sample(range(1000), 3)


@pytest.fixture
def study_tree(tmp_path):
    """The study's 32 classes as synset folders with 5 train and 3 val images, shuffled names."""
    random.seed(0)
    classes = random.sample(range(1000), 32)
    wnids = imagenet_wnids()
    rng = random.Random(1)
    for c in classes:
        for split, n in [("train", 5), ("val", 3)]:
            for i in rng.sample(range(100), n):
                touch(tmp_path / split / wnids[c] / f"{wnids[c]}_{i}.JPEG")
    # A class outside the selection, which must not be picked.
    other = next(c for c in range(1000) if c not in classes)
    touch(tmp_path / "train" / wnids[other] / "x.JPEG")
    return tmp_path, classes, other


def test_selection_is_the_studys_rule(study_tree):
    root, classes, other = study_tree
    src = open_source(str(root))
    samples = select(src, n_classes=32, per_class=4, seed=0)
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == "val"]
    assert {s.label for s in train} == set(classes) == {s.label for s in val}
    assert len(train) == 32 * 4 and len(val) == 32 * 3  # val has only 3 per class: all kept
    for c in classes:
        names = sorted(os.listdir(root / "train" / imagenet_wnids()[c]))
        got = [os.path.basename(s.source) for s in train if s.label == c]
        assert got == names[:4]
    # Ids: row index; train first, then val; classes ascending; file order within a class.
    assert [s.sample for s in samples] == list(range(len(samples)))
    assert samples[len(train)].split == "val"
    assert [s.label for s in train] == sorted(s.label for s in train)


def test_no_selection_flags_take_everything(study_tree):
    root, classes, other = study_tree
    samples = select(open_source(str(root)))
    assert len(samples) == 32 * 5 + 1 + 32 * 3
    assert other in {s.label for s in samples}


def test_explicit_classes_and_split_choice(study_tree):
    root, classes, _ = study_tree
    samples = select(open_source(str(root)), classes=[classes[1], classes[0]], splits=["val"])
    assert {s.split for s in samples} == {"val"}
    assert [s.label for s in samples] == [min(classes[:2])] * 3 + [max(classes[:2])] * 3


def test_missing_class_is_an_error(study_tree):
    root, classes, _ = study_tree
    absent = next(c for c in range(1000) if c not in classes and c != study_tree[2])
    with pytest.raises(DataError, match=f"class {absent} has no images in the train split"):
        select(open_source(str(root)), classes=[absent])
    with pytest.raises(DataError, match="either classes or n_classes"):
        select(open_source(str(root)), classes=[1], n_classes=2)


def test_samples_csv(tmp_path, study_tree):
    root, _, _ = study_tree
    samples = select(open_source(str(root)), n_classes=32, per_class=2)
    path = tmp_path / "samples.csv"
    write_samples_csv(str(path), samples)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["sample", "split", "label", "source"]
    assert len(rows) == len(samples)
    assert rows[70] == {"sample": "70", "split": samples[70].split,
                        "label": str(samples[70].label), "source": samples[70].source}
    assert os.path.exists(rows[70]["source"])
