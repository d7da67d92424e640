"""Opening an image source by name or path: the one table of source kinds.

`open_source('demo' | 'planted' | a folder | a tfds name)`. The sources themselves live in
their own modules (demo.py, planted.py, folder.py, imagenet_tfds.py) and depend only on
source.py's interface, so this is the only module that knows them all.
"""

from __future__ import annotations

import os
from typing import Callable

from varjax.data.demo import DemoSource
from varjax.data.errors import DataError
from varjax.data.folder import FolderSource
from varjax.data.imagenet_tfds import TfdsSource
from varjax.data.planted import PlantedSource
from varjax.data.source import ImageSource

# Sources opened by name (bundled, generated in memory; no path, no download).
NAMED: dict[str, Callable[[], ImageSource]] = {
    "demo": DemoSource,  # a few hundred procedural images (demo.py)
    "planted": PlantedSource,  # the planted-memorization set (planted.py; roles in the source strings)
}


def open_source(spec: str, *, data_dir: str | None = None, flat_split: str = "train",
                index_dir: str | None = None) -> ImageSource:
    """Opens an image source from a spec.

    Args:
      spec: a name of `NAMED` ('demo', 'planted'), a folder path (an ImageFolder tree, see
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
    if spec in NAMED:
        return NAMED[spec]()
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        return FolderSource(path, flat_split=flat_split)
    # An absolute or explicitly relative spec is a path; anything else may be a tfds name
    # (which can contain '/': 'name/config:version'), and TfdsSource says if it is not.
    if spec.startswith(("/", ".", "~")):
        raise DataError(f"data path {spec} does not exist")
    return TfdsSource(spec, data_dir=data_dir, index_dir=index_dir)
