"""The interface every image source implements, and `open_source`, which picks one from a spec.

A source answers three questions and nothing else:
  - which classes a split holds (`labels(split)`),
  - the images of one class in the study's order (`images(split, label)`: the sorted file
    order of torchvision's ImageFolder, which the study used),
  - how to fetch the encoded bytes of one image (`reader()`, a picklable callable that grain
    workers receive; it never holds the index of the whole dataset).
Selection (`selection.py`) turns these answers into numbered samples; the loader
(`loader.py`) turns samples into batches. Splits are always named `train` and `val`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

from varjax.data.errors import DataError

SPLITS = ("train", "val")

# An image's address for its source's reader: a path, or (tfds split, record index), ...
Locator = Hashable


class ImageRef(NamedTuple):
    """One image of a class, as a source lists it.

    source: the name written to samples.csv (a path, or `<tfds name>/<split>/<file name>`).
    locator: what the source's reader needs to fetch the bytes.
    """

    source: str
    locator: Locator


class ImageSource(abc.ABC):
    """A collection of labelled images in the `train` and/or `val` split.

    Attributes:
      name: the spec it was opened from (for messages and run.json).
      num_classes: size of the label space selection draws classes from (1000 for ImageNet).
      splits: the splits present, a subset of ("train", "val") in that order.
    """

    name: str
    num_classes: int
    splits: tuple[str, ...]

    @abc.abstractmethod
    def labels(self, split: str) -> list[int]:
        """Returns the sorted class labels that have at least one image in `split`."""

    @abc.abstractmethod
    def images(self, split: str, label: int) -> list[ImageRef]:
        """Returns the images of class `label` in `split`, in the study's (sorted) order."""

    @abc.abstractmethod
    def reader(self) -> Callable[[Locator], bytes]:
        """Returns a picklable function from a locator to the encoded image bytes.

        It raises OSError (or any Exception) for an image that cannot be read; the loader
        turns that into a skipped sample or a DataError.
        """

    def check_split(self, split: str) -> None:
        """Raises DataError unless `split` is present."""
        if split not in self.splits:
            raise DataError(f"{self.name} has no '{split}' split (it has: {', '.join(self.splits)})")


def check_splits(splits: Sequence[str]) -> None:
    """Raises DataError for a split name other than train and val."""
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}' (expected one of: {', '.join(SPLITS)})")
