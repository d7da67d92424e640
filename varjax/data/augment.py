"""Decoding and augmentation of one image, exactly as the study's PIL/torchvision pipeline did.

Ports upstream VAR `utils/data.py` (`pil_loader`, and `build_dataset`'s train transform
`Resize(round(mid_reso * final_reso), LANCZOS)` + `RandomCrop(final_reso)`, and its validation
transform, the same resize + `CenterCrop(final_reso)`), reproducing torchvision's arithmetic
on PIL images:
  - decode with PIL and `.convert('RGB')` (grayscale, CMYK, RGBA, palette -> RGB; EXIF
    orientation is NOT applied, as torchvision's loader never applies it);
  - Resize(int): the shorter side becomes `size`, the longer `int(size * long / short)`
    (truncated), PIL Lanczos;
  - RandomCrop: top then left offset, uniform over all positions inside the image;
  - CenterCrop: offsets `int(round((H - crop) / 2))`, `int(round((W - crop) / 2))`.
Each image is decoded and resized once and cropped A times. Crop offsets come from
`np.random.default_rng([seed, sample, view])` alone, so they do not depend on batch order,
batch size, worker count or restarts; view v is the same crop whatever A is.

Shapes: A views, S = output resolution; an augmented image is uint8 (A, S, S, 3).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import PIL.Image


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """How each image becomes A views of S x S pixels.

    Attributes:
      resolution: S, the output side (256 for the released models).
      mid_reso: the shorter side is resized to round(mid_reso * S) first (both modes); the
        study's code used upstream's 1.125, its write-up says 1.25.
      views: A, views per image; None means 8 in random mode and 1 in deterministic mode.
      deterministic: one center-cropped view instead of random crops: upstream's validation
        transform (for reproducible checks and extraction; the training resize, so the
        model sees the scale it was trained on).
      center_view: in random mode, also that center crop, after the A random views (the
        view the membership scores and extraction use, beside the study's crops; in
        deterministic mode view 0 already is it).
    """

    resolution: int = 256
    mid_reso: float = 1.125
    views: int | None = None
    deterministic: bool = False
    center_view: bool = False

    def __post_init__(self):
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        # Below 1 the resized image could be smaller than the crop.
        if self.mid_reso < 1:
            raise ValueError(f"mid_reso must be >= 1, got {self.mid_reso}")
        if self.views is not None and self.views < 1:
            raise ValueError(f"views must be positive, got {self.views}")
        if self.deterministic and self.views not in (None, 1):
            raise ValueError("deterministic mode has exactly one view (center crop)")

    @property
    def num_views(self) -> int:
        """A, the number of views per image."""
        if self.views is not None:
            return self.views
        return 1 if self.deterministic else 8

    @property
    def total_views(self) -> int:
        """Views per image as loaded: A, plus the center view in random mode when asked."""
        return self.num_views + (1 if self.center_view and not self.deterministic else 0)

    @property
    def center_index(self) -> int | None:
        """Which loaded view is the center crop (None: none is)."""
        if self.deterministic:
            return 0
        return self.num_views if self.center_view else None

    @property
    def resize_to(self) -> int:
        """The shorter side after the resize."""
        # Upstream: both transforms of utils/data.py resize to round(mid_reso * S). Before
        # 2026-12-01 the deterministic mode resized to S, a scale the model never trained on.
        return round(self.mid_reso * self.resolution)


def decode_rgb(data: bytes) -> PIL.Image.Image:
    """Decodes encoded image bytes to an RGB PIL image, as upstream's `pil_loader`.

    Raises:
      OSError / PIL.UnidentifiedImageError / ValueError: unreadable or truncated data
        (`.convert` forces the full decode, so truncation is caught here, not later).
    """
    with PIL.Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def resize_shorter(img: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """torchvision `Resize(size, LANCZOS)` on a PIL image: shorter side -> size."""
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return img  # torchvision returns the image untouched in this case
    return img.resize((new_w, new_h), PIL.Image.Resampling.LANCZOS)


def crop_offsets(height: int, width: int, crop: int, *, seed: int, sample: int,
                 view: int) -> tuple[int, int]:
    """Returns the (top, left) of view `view` of sample `sample`, a function of those alone.

    Args:
      height, width: the resized image's size (each >= crop).
      crop: the crop side S.
      seed, sample, view: non-negative integers.
    """
    rng = np.random.default_rng([seed, sample, view])
    # torchvision RandomCrop draws i (top) then j (left), each uniform over valid offsets.
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    return top, left


def center_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """torchvision CenterCrop's (top, left); Python's round, as torchvision uses."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def augment(data: bytes, sample: int, config: AugmentConfig, seed: int) -> np.ndarray:
    """Decodes, resizes once and crops the views of one image.

    Args:
      data: the encoded image (JPEG, PNG, ...).
      sample: the image's stable sample id (seeds its crops).
      config: resolution, resize and views.
      seed: the run's augmentation seed.

    Returns:
      uint8 (A, S, S, 3), or (A + 1, S, S, 3) with the center view appended.

    Raises:
      OSError, ValueError, ...: the image cannot be decoded (the caller names the file).
    """
    img = resize_shorter(decode_rgb(data), config.resize_to)
    pixels = np.asarray(img)  # (H, W, 3) uint8
    height, width, _ = pixels.shape
    s = config.resolution
    out = np.empty((config.total_views, s, s, 3), np.uint8)
    for view in range(config.total_views):
        if config.deterministic or view == config.center_index:
            top, left = center_offsets(height, width, s)
        else:
            top, left = crop_offsets(height, width, s, seed=seed, sample=sample, view=view)
        out[view] = pixels[top:top + s, left:left + s]
    return out
