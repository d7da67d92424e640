"""ImageNet-1k (or another tfds image dataset) through a tensorflow-datasets ArrayRecord data source.

Reading needs no TensorFlow: `tfds.data_source` reads ArrayRecord files and parses the
records with NumPy. Images are NOT decoded by tfds (`SkipDecoding`): tfds would decode with
OpenCV when installed, while the study's pipeline decoded with PIL, so the loader decodes
the raw JPEG bytes with PIL itself.

The study's selection needs every image's class and file name (per class, the first n in
sorted file-name order), which tfds stores only inside the records. The first use of a split
therefore reads every record once (for ImageNet train about 140 GB: minutes on a fast disk)
and caches a small CSV index (`record,label,file_name`) under `index_dir`.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from varjax.data.errors import DataError
from varjax.data.source import ImageRef, ImageSource, Locator
from varjax.runfiles import atomic_path

log = logging.getLogger(__name__)

IMAGENET_HOWTO = """\
Preparing ImageNet-1k (tfds `imagenet2012`) once:
1. Register at https://image-net.org/download-images and download ILSVRC2012_img_train.tar
   (138 GB) and ILSVRC2012_img_val.tar (6.3 GB) into ~/tensorflow_datasets/downloads/manual/
2. Build it as ArrayRecord. Building (not reading) needs TensorFlow, e.g. in a separate
   environment:
     pip install tensorflow tensorflow-datasets
     tfds build imagenet2012 --file_format=array_record
   Options: --manual_dir=DIR if the tars are elsewhere, --data_dir=DIR to write somewhere
   other than ~/tensorflow_datasets. The result is <data_dir>/imagenet2012/5.1.0/.
3. Use it: varjax.data.open_source('imagenet2012', data_dir=DIR). The first use of each
   split reads all its records once to index labels and file names, cached in
   ~/.cache/varjax/tfds_index.
Note: while building, tfds re-encodes 22 CMYK train JPEGs as RGB JPEGs and 1 PNG as JPEG,
so those 23 images differ slightly from the files an image-folder tree holds.
"""

DEFAULT_INDEX_DIR = os.path.join("~", ".cache", "varjax", "tfds_index")
# Our split names -> tfds split names.
_TFDS_SPLITS = {"train": "train", "val": "validation"}
_SCAN_CHUNK = 1024


@contextlib.contextmanager
def _quiet_absl():
    """Holds tfds' absl warnings (logged, not raised) back while it looks for a dataset."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _not_prepared(spec: str, builder) -> DataError:
    where = getattr(builder, "data_path", builder.data_dir)
    return DataError(f"tfds dataset {spec} is not prepared: nothing in {where} (pass --data-dir if it is "
                     "elsewhere, or --data /path/to/ImageFolder); to prepare it, see "
                     "`python -c 'import varjax.data as d; print(d.IMAGENET_HOWTO)'`")


class TfdsReader:
    """Fetches the encoded image bytes of (tfds split, record); pickles into grain workers."""

    def __init__(self, data_sources: dict[str, Sequence[dict[str, Any]]]):
        self.data_sources = data_sources

    def __call__(self, locator: Locator) -> bytes:
        tfds_split, record = locator
        return bytes(self.data_sources[tfds_split][record]["image"])


class TfdsSource(ImageSource):
    """A tfds image-classification dataset prepared as ArrayRecord (features image, label,
    and optionally file_name, as imagenet2012 has).

    Attributes:
      data_sources: {tfds split: the tfds data source, images left encoded}.
      index_dir: where the per-split (record, label, file name) index is cached.
    """

    def __init__(self, spec: str, *, data_dir: str | None = None, index_dir: str | None = None):
        """Opens the dataset's train and validation splits (whichever are prepared).

        Args:
          spec: tfds name, e.g. 'imagenet2012' or 'imagenet2012:5.1.0'.
          data_dir: tfds data directory (default: tfds' default).
          index_dir: index cache folder (default: ~/.cache/varjax/tfds_index).

        Raises:
          DataError: unknown name, dataset not prepared, or not prepared as ArrayRecord.
        """
        import tensorflow_datasets as tfds  # slow-ish import, needed only for this source
        from tensorflow_datasets.core.registered import DatasetNotFoundError

        self.name = spec
        try:
            with _quiet_absl():  # tfds warns about the folder it is about to find missing
                builder = tfds.builder(spec, data_dir=data_dir)
        except DatasetNotFoundError:
            raise DataError(f"'{spec}' is neither an existing folder nor a tfds dataset name") \
                from None
        except Exception as e:  # e.g. an unknown version: tfds' message says which exist
            raise DataError(f"tfds cannot open '{spec}': {_first_line(e)}") from None
        self.tfds_name = builder.name
        self.version = str(builder.version)
        try:
            with _quiet_absl():
                by_tfds_split = tfds.data_source(
                    spec, split=None, data_dir=data_dir, download=False,
                    decoders={"image": tfds.decode.SkipDecoding()})
        except Exception as e:
            with _quiet_absl():
                prepared = builder.is_prepared()
            if prepared:
                raise DataError(f"{spec} in {builder.data_dir} cannot be read without TensorFlow"
                                f" ({_first_line(e)}); rebuild it with "
                                "--file_format=array_record") from None
            raise _not_prepared(spec, builder) from None
        self.data_sources = {s: by_tfds_split[t] for s, t in _TFDS_SPLITS.items()
                             if t in by_tfds_split}
        self.splits = tuple(self.data_sources)
        if not self.splits:
            # tfds answers an unprepared dataset with no splits rather than an error.
            with _quiet_absl():
                prepared = builder.is_prepared()
            if not prepared:
                raise _not_prepared(spec, builder)
            raise DataError(f"tfds dataset {spec} has neither a train nor a validation split")
        self.num_classes = int(builder.info.features["label"].num_classes)
        self.index_dir = os.path.expanduser(index_dir or DEFAULT_INDEX_DIR)
        self._by_class: dict[str, dict[int, list[ImageRef]]] = {}

    def labels(self, split: str) -> list[int]:
        return sorted(self._class_index(split))

    def images(self, split: str, label: int) -> list[ImageRef]:
        return self._class_index(split).get(label, [])

    def reader(self) -> Callable[[Locator], bytes]:
        return TfdsReader({_TFDS_SPLITS[s]: ds for s, ds in self.data_sources.items()})

    def _class_index(self, split: str) -> dict[int, list[ImageRef]]:
        """Returns {label: images sorted by file name} for a split, from the cached index."""
        self.check_split(split)
        if split not in self._by_class:
            records, labels, names = self._index(split)
            tfds_split = _TFDS_SPLITS[split]
            by_class: dict[int, list[ImageRef]] = {}
            # Sort by (file name, record) so ties (no file names) keep record order.
            for i in sorted(range(len(records)), key=lambda i: (names[i], records[i])):
                ref = ImageRef(f"{self.tfds_name}/{tfds_split}/{names[i]}",
                               (tfds_split, int(records[i])))
                by_class.setdefault(int(labels[i]), []).append(ref)
            self._by_class[split] = by_class
        return self._by_class[split]

    def _index(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Returns (record, label, file name) of every record of a split, cached on disk."""
        ds = self.data_sources[split]
        n = len(ds)
        path = os.path.join(self.index_dir, self.tfds_name, self.version,
                            f"{_TFDS_SPLITS[split]}-{n}.csv")
        if not os.path.exists(path):
            _write_index(path, ds, f"{self.tfds_name} {split}")
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
        if len(rows) != n:
            raise DataError(f"index {path} has {len(rows)} rows for {n} records; delete it")
        records = np.array([int(r[0]) for r in rows], np.int64)
        labels = np.array([int(r[1]) for r in rows], np.int64)
        return records, labels, [r[2] for r in rows]


def _write_index(path: str, ds: Sequence[dict[str, Any]], what: str) -> None:
    """Reads every record of `ds` once and writes `record,label,file_name` to `path`."""
    n, start = len(ds), time.monotonic()
    log.info("indexing %s: reading %d records once (cached in %s)", what, n, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    getitems = getattr(ds, "__getitems__", None)
    # atomic, and an interrupted scan leaves no temporary file behind
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["record", "label", "file_name"])
        for lo in range(0, n, _SCAN_CHUNK):
            keys = list(range(lo, min(lo + _SCAN_CHUNK, n)))
            examples = getitems(keys) if getitems else [ds[k] for k in keys]
            for key, ex in zip(keys, examples):
                name = ex.get("file_name")
                name = f"{key:08d}" if name is None else _text(name)
                out.writerow([key, int(ex["label"]), name])
            if lo // _SCAN_CHUNK % 50 == 49:
                done, secs = lo + len(keys), time.monotonic() - start
                log.info("indexing %s: %d/%d records, %.0f/s, ETA %.0f s", what, done, n,
                         done / secs, (n - done) * secs / done)


def _text(value: Any) -> str:
    """tfds Text features come back as bytes (or a 0-d bytes array); returns str."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
