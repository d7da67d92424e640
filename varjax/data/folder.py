"""An ImageNet-style image-folder tree as a source (the layout torchvision's ImageFolder reads).

Layout: `<root>/train/<class>/*.JPEG` and `<root>/val/<class>/*.JPEG` (either split may be
missing; `validation/` is accepted for `val/`), or class folders directly in `<root>` (one
split, `flat_split`). A class folder is named either by its ImageNet synset id (`n01440764`,
mapped to the standard index 0..999 by `classes.py`) or by an integer class id (`0`, `17`);
one tree uses one of the two.

File order within a class is torchvision's `make_dataset` order, which the study used:
`sorted(os.walk(class_dir, followlinks=True))`, then `sorted(file names)`, keeping files with
torchvision's IMG_EXTENSIONS (case-insensitive). Other files are not images; they are listed
in `FolderSource.ignored` and logged, never silently dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from varjax.data.classes import NUM_IMAGENET_CLASSES, WNID_PATTERN, wnid_to_label
from varjax.data.errors import DataError
from varjax.data.source import SPLITS, ImageRef, ImageSource, Locator, check_splits

log = logging.getLogger(__name__)

# torchvision.datasets.folder.IMG_EXTENSIONS, which upstream VAR passes to DatasetFolder.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation")}


def read_file(path: str) -> bytes:
    """Returns the bytes of a file (the folder source's reader; module-level so it pickles)."""
    with open(path, "rb") as f:
        return f.read()


class FolderSource(ImageSource):
    """Images from an ImageFolder tree.

    Attributes:
      root: the folder given.
      split_dirs: {split: folder holding that split's class folders}.
      ignored: (path, reason) of every file inside a listed class folder that was not taken
        as an image (filled as classes are listed).
    """

    def __init__(self, root: str, *, flat_split: str = "train"):
        """Scans the split and class folders (not the images: those are listed per class).

        Args:
          root: the tree's root folder.
          flat_split: the split a root without train/ or val/ subfolders holds.

        Raises:
          DataError: root missing or not a folder, no class folders, or a class folder name
            that is neither a known synset id nor an integer.
        """
        root = os.path.expanduser(root)
        if not os.path.isdir(root):
            raise DataError(f"data path {root} is not a folder")
        check_splits([flat_split])
        self.name = self.root = root
        self.split_dirs: dict[str, str] = {}
        for split in SPLITS:
            for dirname in _SPLIT_DIRS[split]:
                if os.path.isdir(os.path.join(root, dirname)):
                    self.split_dirs[split] = os.path.join(root, dirname)
                    break
        if not self.split_dirs:
            self.split_dirs = {flat_split: root}
        self.splits = tuple(s for s in SPLITS if s in self.split_dirs)
        self._class_dirs = {s: _class_folders(d) for s, d in self.split_dirs.items()}
        max_label = max(max(c) for c in self._class_dirs.values())
        # Integer folders index ImageNet's classes unless they run past them.
        self.num_classes = max(NUM_IMAGENET_CLASSES, max_label + 1)
        self.ignored: list[tuple[str, str]] = []
        self._listed: dict[tuple[str, int], list[ImageRef]] = {}

    def labels(self, split: str) -> list[int]:
        self.check_split(split)
        return sorted(self._class_dirs[split])

    def images(self, split: str, label: int) -> list[ImageRef]:
        self.check_split(split)
        if (split, label) not in self._listed:
            class_dir = self._class_dirs[split].get(label)
            refs = [] if class_dir is None else self._list_class(class_dir)
            self._listed[(split, label)] = refs
        return self._listed[(split, label)]

    def reader(self) -> Callable[[Locator], bytes]:
        return read_file

    def _list_class(self, class_dir: str) -> list[ImageRef]:
        """Lists a class folder's images in torchvision's order; records other files."""
        refs, ignored = [], []
        for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
            for fname in sorted(fnames):
                path = os.path.join(dirpath, fname)
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    refs.append(ImageRef(path, path))
                else:
                    ignored.append((path, "not an image file extension"))
        if ignored:
            log.warning("%d non-image file(s) in %s ignored, e.g. %s", len(ignored), class_dir,
                        ignored[0][0])
            self.ignored.extend(ignored)
        return refs


def _class_folders(split_dir: str) -> dict[int, str]:
    """Returns {label: class folder} for the class folders in `split_dir`.

    Raises:
      DataError: no class folders, a name neither a known wnid nor an integer, a tree mixing
        the two kinds, or two folders with the same label ('7' and '007').
    """
    names = sorted(e.name for e in os.scandir(split_dir)
                   if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"no class folders in {split_dir}")
    wnids = wnid_to_label()
    by_label: dict[int, str] = {}
    kinds = set()
    for name in names:
        if WNID_PATTERN.fullmatch(name):
            if name not in wnids:
                raise DataError(f"class folder {os.path.join(split_dir, name)} is not one of "
                                "the 1000 ImageNet-1k synset ids")
            label, kind = wnids[name], "synset"
        elif name.isdigit():
            label, kind = int(name), "integer"
        else:
            raise DataError(f"class folder {os.path.join(split_dir, name)} is named neither by "
                            "an ImageNet synset id (n01440764) nor by an integer class id")
        kinds.add(kind)
        if label in by_label:
            raise DataError(f"class folders {by_label[label]} and {os.path.join(split_dir, name)}"
                            f" both mean class {label}")
        by_label[label] = os.path.join(split_dir, name)
    if len(kinds) > 1:
        raise DataError(f"{split_dir} mixes synset-id and integer class folders")
    return by_label
