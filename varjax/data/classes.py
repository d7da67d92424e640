"""ImageNet-1k class ids: the 1000 WordNet synset ids (wnids) in the standard index order.

The standard class index (the one VAR's class embedding, torchvision's ImageFolder on the
official `train/` tree and tfds' `imagenet2012` all use) is the position of the wnid in the
sorted list of the 1000 wnids. `imagenet_wnids.txt` ships that list; it was copied verbatim
from tensorflow-datasets 4.9.10 `datasets/imagenet2012/labels.txt`, which is that sorted list.
"""

from __future__ import annotations

import functools
import os
import re

NUM_IMAGENET_CLASSES = 1000
_WNIDS_FILE = os.path.join(os.path.dirname(__file__), "imagenet_wnids.txt")
WNID_PATTERN = re.compile(r"n\d{8}")


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """Returns the 1000 ImageNet wnids; position i is class index i."""
    with open(_WNIDS_FILE, encoding="ascii") as f:
        wnids = tuple(line.strip() for line in f if line.strip())
    # A corrupt package would silently shift every label; refuse to run instead.
    if len(wnids) != NUM_IMAGENET_CLASSES or list(wnids) != sorted(set(wnids)):
        raise RuntimeError(f"{_WNIDS_FILE} is not the sorted list of 1000 unique wnids")
    return wnids


@functools.cache
def wnid_to_label() -> dict[str, int]:
    """Returns {wnid: standard class index}."""
    return {wnid: i for i, wnid in enumerate(imagenet_wnids())}
