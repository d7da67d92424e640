"""A small bundled demo set that needs no download: generated patterns plus shipped photos.

Classes (label: name): 0 stripes, 1 checkerboard, 2 smooth (gradients and flat colour
areas), 3 noise, 4 photo. The labels double as VAR class ids in a demo run (they are
ImageNet classes 0..4, which the pictures do not show; the demo exercises the pipeline, not
the semantics). The patterns are the kinds of images the study found most memorized
(repeating high-frequency patterns, large constant areas).

Splits: train has 8 images of each pattern class and 2 photos (34), val 4 of each pattern
class and 1 photo (17). Patterns are generated from (seed, class, split, index) alone, at
ImageNet-like sizes, some grayscale and one per class smaller than a 256 crop, and encoded
as PNG so the loader decodes them like files. Photos are matplotlib's sample images
(mpl-data/sample_data; matplotlib is a varjax dependency): grace_hopper.jpg and
Minduka_Present_Blue_Pack.png (RGBA, 128 px) in train, logo2.png (RGBA, 542 x 130) in val.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import numpy as np
import PIL.Image

from varjax.data.errors import DataError
from varjax.data.folder import read_file
from varjax.data.source import SPLITS, ImageRef, ImageSource, Locator

DEMO_CLASSES = ("stripes", "checkerboard", "smooth", "noise", "photo")
PATTERNS_PER_CLASS = {"train": 8, "val": 4}
PHOTOS = {"train": ("Minduka_Present_Blue_Pack.png", "grace_hopper.jpg"), "val": ("logo2.png",)}
_PHOTO_LABEL = DEMO_CLASSES.index("photo")


def read_demo(locator: Locator) -> bytes:
    """The demo's reader: a shipped file, or a pattern generated and PNG-encoded on the fly."""
    kind, *args = locator
    if kind == "file":
        return read_file(args[0])
    img = PIL.Image.fromarray(pattern(*args))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # lossless, fast; size does not matter
    return buf.getvalue()


def pattern(seed: int, label: int, split: str, index: int) -> np.ndarray:
    """Generates pattern image `index` of class `label` in `split`.

    Returns:
      uint8 (H, W, 3), or (H, W) for a grayscale image.
    """
    rng = np.random.default_rng([seed, label, SPLITS.index(split), index])
    # Index 0 of every class is small (upsampled by the resize), the rest ImageNet-like.
    if index == 0:
        height, width = int(rng.integers(48, 120)), int(rng.integers(48, 120))
    else:
        height, width = int(rng.integers(240, 500)), int(rng.integers(240, 500))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    colors = rng.integers(0, 256, (2, 3)).astype(np.float32)
    name = DEMO_CLASSES[label]
    if name == "stripes":
        angle = rng.choice([0.0, 90.0, 45.0, 135.0]) * np.pi / 180
        period = rng.integers(4, 40)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) // (period / 2) % 2
        img = colors[phase.astype(int)]
    elif name == "checkerboard":
        cell = rng.integers(4, 48)
        img = colors[((yy // cell + xx // cell) % 2).astype(int)]
    elif name == "smooth" and index % 2:  # gradient at a random angle
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = colors[0] * (1 - t[..., None]) + colors[1] * t[..., None]
    elif name == "smooth":  # a few large flat-coloured rectangles
        img = np.empty((height, width, 3), np.float32)
        img[:] = colors[0]
        for _ in range(rng.integers(1, 4)):
            y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
            img[y0:y0 + height // 2, x0:x0 + width // 2] = rng.integers(0, 256, 3)
    elif name == "noise":
        img = rng.normal(colors[0], 60.0, (height, width, 3))
    else:
        raise ValueError(f"class {label} is not a pattern class")
    img = np.clip(img, 0, 255).astype(np.uint8)
    # Every third image is grayscale, to exercise the L -> RGB conversion.
    if index % 3 == 2:
        img = img.mean(axis=-1).astype(np.uint8)
    return img


class DemoSource(ImageSource):
    """The demo set (see the module docstring)."""

    def __init__(self, seed: int = 0):
        """Args: seed: the pattern generator seed (the photos do not change)."""
        import matplotlib  # only for its data path; pyplot is never imported

        self.name = "demo"
        self.num_classes = len(DEMO_CLASSES)
        self.splits = SPLITS
        self.seed = seed
        self.photo_dir = os.path.join(matplotlib.get_data_path(), "sample_data")
        for names in PHOTOS.values():
            for name in names:
                if not os.path.isfile(os.path.join(self.photo_dir, name)):
                    raise DataError(f"demo photo {os.path.join(self.photo_dir, name)} is "
                                    "missing (broken matplotlib install?)")

    def labels(self, split: str) -> list[int]:
        self.check_split(split)
        return list(range(len(DEMO_CLASSES)))

    def images(self, split: str, label: int) -> list[ImageRef]:
        self.check_split(split)
        if label == _PHOTO_LABEL:
            paths = [os.path.join(self.photo_dir, name) for name in sorted(PHOTOS[split])]
            return [ImageRef(p, ("file", p)) for p in paths]
        if not 0 <= label < len(DEMO_CLASSES):
            return []
        return [ImageRef(f"demo/{split}/{DEMO_CLASSES[label]}_{i:02d}.png",
                         ("pattern", self.seed, label, split, i))
                for i in range(PATTERNS_PER_CLASS[split])]

    def reader(self) -> Callable[[Locator], bytes]:
        return read_demo
