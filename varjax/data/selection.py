"""The study's choice of images (dataset D' and D_val) and the stable sample ids.

Classes: Python's `random.seed(seed); random.sample(range(1000), n_classes)` (seed 0, 32
classes in the study), reproduced with a private `random.Random(seed)`, which runs the same
algorithm on the same state without touching the global generator. Per class the first
`per_class` images (256) in the source's sorted file order (torchvision ImageFolder's). D'
comes from train, D_val from val with the same classes.

Sample id rule: the row index of the selection, in the order
  split (train, then val) -> class label ascending -> the source's file order.
So with the study's numbers, ids 0..8191 are D' and 8192..16383 D_val. The rule depends on
the selection arguments and the data only, never on the loader.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from varjax.data.errors import DataError
from varjax.runfiles import write_csv
from varjax.data.source import ImageSource, Locator, check_splits

log = logging.getLogger(__name__)

STUDY_SEED = 0
STUDY_CLASSES = 32
STUDY_PER_CLASS = 256


class Sample(NamedTuple):
    """One selected image.

    sample: stable integer id (see the module docstring).
    split: 'train' or 'val'.
    label: class index.
    source: the path or tfds key written to samples.csv.
    locator: what the source's reader fetches the bytes with.
    """

    sample: int
    split: str
    label: int
    source: str
    locator: Locator


def study_classes(n_classes: int = STUDY_CLASSES, seed: int = STUDY_SEED,
                  num_classes: int = 1000) -> list[int]:
    """Returns `random.seed(seed); random.sample(range(num_classes), n_classes)`, in draw order."""
    if not 0 < n_classes <= num_classes:
        raise DataError(f"cannot draw {n_classes} classes out of {num_classes}")
    return random.Random(seed).sample(range(num_classes), n_classes)


def select(source: ImageSource, *, n_classes: int | None = None, per_class: int | None = None,
           seed: int = STUDY_SEED, classes: Sequence[int] | None = None,
           splits: Sequence[str] | None = None) -> list[Sample]:
    """Selects and numbers the images of a run.

    With no arguments every image of every split is taken (each split with its own classes).
    The study's D' + D_val is `select(source, n_classes=32, per_class=256, seed=0)`.

    Args:
      source: where the images come from.
      n_classes: draw this many classes with the study's rule from range(source.num_classes).
      per_class: keep the first this many images per class (all if None). A class with fewer
        keeps all it has, with a warning.
      seed: the class-drawing seed.
      classes: explicit class labels instead of drawing (exclusive with n_classes).
      splits: splits to take, a subset of ('train', 'val'); default all the source has.

    Returns:
      The samples, sample id = list index.

    Raises:
      DataError: a chosen class with no image in a split, a missing split, bad arguments.
    """
    if classes is not None and n_classes is not None:
        raise DataError("give either classes or n_classes, not both")
    if per_class is not None and per_class < 1:
        raise DataError(f"per_class must be positive, got {per_class}")
    splits = list(source.splits if splits is None else splits)
    check_splits(splits)
    if n_classes is not None:
        classes = study_classes(n_classes, seed, source.num_classes)
    chosen = None if classes is None else sorted(set(int(c) for c in classes))
    samples: list[Sample] = []
    for split in ("train", "val"):  # fixed order: it defines the sample ids
        if split not in splits:
            continue
        source.check_split(split)
        for label in chosen if chosen is not None else source.labels(split):
            refs = source.images(split, label)
            if not refs:
                raise DataError(f"class {label} has no images in the {split} split of "
                                f"{source.name}")
            if per_class is not None and len(refs) < per_class:
                log.warning("class %d has only %d images in the %s split of %s (wanted %d)",
                            label, len(refs), split, source.name, per_class)
            for ref in refs[:per_class]:
                samples.append(Sample(len(samples), split, label, ref.source, ref.locator))
    if not samples:
        raise DataError(f"no images selected from {source.name}")
    return samples


def write_samples_csv(path: str, samples: Iterable[Sample]) -> None:
    """Writes `samples.csv` (columns sample,split,label,source; design.md "Run directory"),
    atomically."""
    write_csv(path, ("sample", "split", "label", "source"),
              ((s.sample, s.split, s.label, s.source) for s in samples))
