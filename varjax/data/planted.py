"""The `planted` source: a generated image set with known roles, for planted memorization.

A small VAR is trained on this set with a few canary images duplicated many times
(experiments/train_planted.py); the shipped model (`default_checkpoint()`) is the default
model of experiments/run.py, and experiments/planted.py checks that UnitMem finds the canaries.

Every image is generated from (seed, class, pool index) alone, 80 x 80 RGB, PNG-encoded on the
fly like the demo set. Classes (label: name): 0 discs, 1 boxes, 2 waves, 3 blobs, each a
random background (flat, gradient, smooth noise or fine stripes) under class-specific content.
Per class, a pool of images is split at random (seeded) into roles, so a canary is a typical
draw from the same distribution as a singleton or a held-out image:
  - canaries: one per duplication count in `DUPLICATES` (4, 16, 64); training sees each
    `dup` times per epoch;
  - singletons: `SINGLES_PER_CLASS`, seen once per epoch;
  - held-out: `HELDOUT_PER_CLASS`, never trained on.
Splits: `train` = the members (each canary ONCE, plus the singletons); `val` = the held-out
images. The training set with its duplicates is built by `training_list`.

Source strings (samples.csv) name the role, so any analysis recovers it from samples.csv
alone (`parse_role`): `planted:canary/dup64/3`, `planted:single/17`, `planted:heldout/5`
(numbers are global over classes). Within a class the images are listed in pool order,
which mixes the roles: sample-id ties (argmax) favour no role.
"""

from __future__ import annotations

import importlib.resources
import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL.Image

from varjax.data.source import SPLITS, ImageRef, ImageSource, Locator

PLANTED_CLASSES = ("discs", "boxes", "waves", "blobs")
DUPLICATES = (4, 16, 64)  # training copies of each canary, one canary per class and count
SINGLES_PER_CLASS = 40
HELDOUT_PER_CLASS = 16
SIZE = 80  # pixels; the study's resize (mid_reso 1.125 at 64 px) brings it to 72, crops 64
DEFAULT_SEED = 0
ROLES = ("canary", "single", "heldout")
_ROLE_RE = re.compile(r"^planted:(?:canary/dup(?P<dup>\d+)/(?P<c>\d+)|single/(?P<s>\d+)|heldout/(?P<h>\d+))$")


class Role(NamedTuple):
    """What an image is in the planted set.

    kind: 'canary', 'single' or 'heldout'.
    dup: training copies per epoch (the canary's count, 1 for a singleton, 0 held out).
    index: the number in its source string (global over classes within its kind).
    """

    kind: str
    dup: int
    index: int

    @property
    def source(self) -> str:
        if self.kind == "canary":
            return f"planted:canary/dup{self.dup}/{self.index}"
        return f"planted:{self.kind}/{self.index}"


def parse_role(source: str) -> Role | None:
    """The role named by a samples.csv source string, or None if it is not a planted one."""
    m = _ROLE_RE.match(source)
    if m is None:
        return None
    if m["dup"] is not None:
        return Role("canary", int(m["dup"]), int(m["c"]))
    if m["s"] is not None:
        return Role("single", 1, int(m["s"]))
    return Role("heldout", 0, int(m["h"]))


def default_checkpoint() -> Path:
    """The shipped model trained on this set (a converted checkpoint directory)."""
    return Path(str(importlib.resources.files("varjax") / "assets" / "planted"))


def read_planted(locator: Locator) -> bytes:
    """The reader: generates image (seed, label, index) and encodes it as PNG."""
    _, seed, label, index = locator
    buf = io.BytesIO()
    PIL.Image.fromarray(generate(seed, label, index)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _smooth_field(rng: np.random.Generator, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1], (SIZE, SIZE): a cells x cells grid, bicubic-upsampled."""
    grid = rng.random((cells, cells)).astype(np.float32)
    img = PIL.Image.fromarray(grid, mode="F").resize((SIZE, SIZE), PIL.Image.Resampling.BICUBIC)
    f = np.asarray(img)
    return (f - f.min()) / max(float(np.ptp(f)), 1e-6)


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    colors = rng.integers(0, 256, (2, 3)).astype(np.float32)
    kind = int(rng.integers(0, 4))
    if kind == 0:  # flat
        t = np.zeros_like(xx)
    elif kind == 1:  # linear gradient at a random angle
        a = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / np.ptp(t)
    elif kind == 2:  # smooth noise
        t = _smooth_field(rng, int(rng.integers(3, 8)))
    else:  # fine stripes
        a = rng.uniform(0, np.pi)
        t = ((xx * np.cos(a) + yy * np.sin(a)) // rng.integers(2, 6) % 2).astype(np.float32)
    return colors[0] * (1 - t[..., None]) + colors[1] * t[..., None]


def generate(seed: int, label: int, index: int) -> np.ndarray:
    """Image `index` of the pool of class `label`.

    Returns:
      uint8 (SIZE, SIZE, 3).
    """
    if not 0 <= label < len(PLANTED_CLASSES):
        raise ValueError(f"planted class {label} does not exist (0..{len(PLANTED_CLASSES) - 1})")
    rng = np.random.default_rng([seed, label, index, 0x91A])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    img = _background(rng, yy, xx)
    name = PLANTED_CLASSES[label]
    if name == "discs":
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = rng.uniform(0, SIZE, 2)
            r = rng.uniform(6, 24)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    elif name == "boxes":
        for _ in range(int(rng.integers(1, 5))):
            a = rng.uniform(0, np.pi / 2)
            cy, cx = rng.uniform(0, SIZE, 2)
            h, w = rng.uniform(6, 28, 2)
            u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
            v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
            img[(np.abs(u) < w) & (np.abs(v) < h)] = rng.integers(0, 256, 3)
    elif name == "waves":  # two colours mixed by a sum of plane waves (a plaid or ripples)
        t = np.zeros_like(xx)
        for _ in range(int(rng.integers(1, 4))):
            a, f, p = rng.uniform(0, np.pi), rng.uniform(0.05, 0.4), rng.uniform(0, 2 * np.pi)
            t += np.sin(f * (xx * np.cos(a) + yy * np.sin(a)) + p)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        c = rng.integers(0, 256, (2, 3)).astype(np.float32)
        img = 0.3 * img + 0.7 * (c[0] * (1 - t[..., None]) + c[1] * t[..., None])
    else:  # blobs: a smooth field cut into 2-4 colour levels
        levels = int(rng.integers(2, 5))
        t = np.minimum((_smooth_field(rng, int(rng.integers(4, 10))) * levels).astype(int), levels - 1)
        mask = rng.random() < 0.5  # half of them keep the background in the lowest level
        palette = rng.integers(0, 256, (levels, 3)).astype(np.float32)
        img = np.where(mask & (t == 0)[..., None], img, palette[t])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def assign_roles(seed: int, label: int, duplicates: Sequence[int] = DUPLICATES,
                 singles: int = SINGLES_PER_CLASS, heldout: int = HELDOUT_PER_CLASS) -> list[Role]:
    """The role of every pool image of one class, in pool order (a seeded random split).

    Returns:
      A list of pool-size Roles; numbers are global: canary k*C + label for the k-th
      duplication count, singleton label*singles + j, held-out label*heldout + j (C classes).
    """
    n_cls = len(PLANTED_CLASSES)
    pool = len(duplicates) + singles + heldout
    order = np.random.default_rng([seed, label, 0x5EED]).permutation(pool)
    kinds = ([Role("canary", d, k * n_cls + label) for k, d in enumerate(duplicates)]
             + [Role("single", 1, label * singles + j) for j in range(singles)]
             + [Role("heldout", 0, label * heldout + j) for j in range(heldout)])
    roles: list[Role] = [kinds[0]] * pool
    for r, pos in zip(kinds, order):
        roles[int(pos)] = r
    return roles


class PlantedSource(ImageSource):
    """The planted set (see the module docstring); `open_source("planted")` opens seed 0."""

    def __init__(self, seed: int = DEFAULT_SEED, duplicates: Sequence[int] = DUPLICATES,
                 singles_per_class: int = SINGLES_PER_CLASS, heldout_per_class: int = HELDOUT_PER_CLASS):
        """Args:
          seed: the image and role seed.
          duplicates: training copies of the canaries; one canary per class and count.
          singles_per_class, heldout_per_class: images per class of those roles.
        """
        if any(d < 2 for d in duplicates) or len(set(duplicates)) != len(duplicates):
            raise ValueError(f"duplication counts must be distinct and >= 2, got {tuple(duplicates)}")
        self.name = "planted"
        self.num_classes = len(PLANTED_CLASSES)
        self.splits = SPLITS
        self.seed = seed
        self.duplicates = tuple(int(d) for d in duplicates)
        self.roles = [assign_roles(seed, c, self.duplicates, singles_per_class, heldout_per_class)
                      for c in range(self.num_classes)]

    def labels(self, split: str) -> list[int]:
        self.check_split(split)
        return list(range(self.num_classes))

    def images(self, split: str, label: int) -> list[ImageRef]:
        self.check_split(split)
        if not 0 <= label < self.num_classes:
            return []
        member = split == "train"
        return [ImageRef(role.source, ("planted", self.seed, label, i))
                for i, role in enumerate(self.roles[label]) if (role.kind != "heldout") == member]

    def reader(self) -> Callable[[Locator], bytes]:
        return read_planted

    def load_image(self, source: str) -> np.ndarray | None:
        """The pixels a samples.csv source string names (uint8 (SIZE, SIZE, 3)), or None.

        For `experiments.analyze.analyze(load_image=...)`: the image grids of a planted run.
        """
        for label, roles in enumerate(self.roles):
            for index, role in enumerate(roles):
                if role.source == source:
                    return generate(self.seed, label, index)
        return None

    def describe(self) -> dict:
        """What was planted, JSON-able (for planted.json and the report)."""
        count = {k: sum(r.kind == k for roles in self.roles for r in roles) for k in ROLES}
        return {"source": "planted", "seed": self.seed, "classes": list(PLANTED_CLASSES),
                "image_size": SIZE, "duplicates": list(self.duplicates), "canaries": count["canary"],
                "singletons": count["single"], "heldout": count["heldout"],
                "canary_sources": sorted((r.source for roles in self.roles for r in roles
                                          if r.kind == "canary"), key=lambda s: parse_role(s).index)}


def training_list(source: PlantedSource, samples: Sequence) -> list:
    """The training set: every member sample, each canary repeated `dup` times.

    Args:
      source: the planted source the samples were selected from.
      samples: `varjax.data.select` output (val samples are left out: never trained on).
    Returns:
      The samples (repeats included) in selection order, each canary's copies together.
    """
    out = []
    for s in samples:
        role = parse_role(s.source)
        if role is None:
            raise ValueError(f"{s.source} is not a planted sample")
        out.extend([s] * role.dup)  # held-out: dup 0, never trained on
    return out
