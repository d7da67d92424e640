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
import os
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


def open_source(spec: str, *, data_dir: str | None = None, flat_split: str = "train",
                index_dir: str | None = None) -> ImageSource:
    """Opens an image source from a spec.

    Args:
      spec: 'demo' (the bundled demo set), 'planted' (the planted-memorization set,
        `planted.py`), a folder path (an ImageFolder tree, see
        `folder.py`), or a tfds dataset name such as 'imagenet2012' (optionally with a
        version, 'imagenet2012:5.1.0') prepared as ArrayRecord (see `IMAGENET_HOWTO`).
      data_dir: tfds data directory (default: tfds' own default, ~/tensorflow_datasets).
      flat_split: the split of a folder whose class folders sit directly in it (no
        train/ or val/ subfolder); ignored otherwise.
      index_dir: where the tfds source caches its (record, label, file name) index.

    Returns:
      The source.

    Raises:
      DataError: a missing path, an unrecognised layout or an unprepared tfds dataset.
    """
    if spec == "demo":
        from varjax.data.demo import DemoSource
        return DemoSource()
    # -- planted (experiments/train_planted.py's image set; roles in the source strings) --
    if spec == "planted":
        from varjax.data.planted import PlantedSource
        return PlantedSource()
    # -- end planted --
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        from varjax.data.folder import FolderSource
        return FolderSource(path, flat_split=flat_split)
    # An absolute or explicitly relative spec is a path; anything else may be a tfds name
    # (which can contain '/': 'name/config:version'), and TfdsSource says if it is not.
    if spec.startswith(("/", ".", "~")):
        raise DataError(f"data path {spec} does not exist")
    from varjax.data.imagenet_tfds import TfdsSource
    return TfdsSource(spec, data_dir=data_dir, index_dir=index_dir)


def check_splits(splits: Sequence[str]) -> None:
    """Raises DataError for a split name other than train and val."""
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}' (expected one of: {', '.join(SPLITS)})")
