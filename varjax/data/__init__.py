"""The data layer: image sources, the study's selection and augmentation, batched loading.

Typical use (the study's D' + D_val, 8 random crops per image):

    from varjax import data
    source = data.open_source("imagenet2012")          # or "demo", or "/path/to/imagenet"
    samples = data.select(source, n_classes=32, per_class=256, seed=0)
    data.write_samples_csv("run/samples.csv", samples)
    loader = data.make_loader(source, samples, batch_size=64,
                              augment_config=data.AugmentConfig(views=8), seed=0,
                              shard_index=jax.process_index(), shard_count=jax.process_count())
    for batch in loader:   # images (B, A, S, S, 3) uint8, label, sample, valid
        ...
    data.write_skipped_csv("run/skipped.csv", loader.skipped)

Files: `source.py` (the interface), `open.py` (open_source: the table of sources), `folder.py`, `imagenet_tfds.py`, `demo.py` (the
sources), `classes.py` (ImageNet wnids), `selection.py` (classes, first-n, sample ids,
samples.csv), `augment.py` (PIL decode, Lanczos resize, crops), `loader.py` (grain).
"""

from varjax.data.augment import AugmentConfig, augment, crop_offsets
from varjax.data.classes import imagenet_wnids, wnid_to_label
from varjax.data.demo import DEMO_CLASSES
from varjax.data.errors import DataError
from varjax.data.imagenet_tfds import IMAGENET_HOWTO
from varjax.data.loader import (
    Loader,
    Skipped,
    make_loader,
    shard_bounds,
    write_skipped_csv,
)
from varjax.data.open import open_source
from varjax.data.selection import Sample, select, study_classes, write_samples_csv
from varjax.data.source import SPLITS, ImageSource

__all__ = [
    "AugmentConfig", "DEMO_CLASSES", "DataError", "IMAGENET_HOWTO", "ImageSource", "Loader",
    "SPLITS", "Sample", "Skipped", "augment", "crop_offsets", "imagenet_wnids", "make_loader",
    "open_source", "select", "shard_bounds", "study_classes", "wnid_to_label",
    "write_samples_csv", "write_skipped_csv",
]
