"""Batches of augmented images through grain: workers, prefetch, host sharding, resume.

Pipeline: this host's samples (padded) -> grain MapDataset -> load+augment each sample ->
batch -> thread prefetch -> optional worker processes. Batches follow design.md "Data
batches": `images` uint8 (B, A, S, S, 3), `label` int32 (B,), `sample` int64 (B,), `valid`
bool (B,). `valid` is False on padding rows (sample -1, label 0, zero pixels) and on
skipped images (their sample and label kept); such rows must not enter any statistic.

Host sharding: with N samples and H hosts, host h takes the contiguous rows
[h*N//H, (h+1)*N//H) (no overlap, nothing left out) and pads them to
ceil(ceil(N/H) / B) * B rows, so every host yields the same number of batches (what a
multi-host jit step needs). The last, uneven batch is padded, never dropped.

Resume: `start` rows of this host's padded stream are skipped; after k full batches pass
start = k * B. Crops depend on (seed, sample id, view) only (augment.py), so a resumed or
re-sharded run sees the same pixels for the same sample.

Bad images: with on_error='stop' the first one raises DataError naming the file; with
'skip' it becomes an invalid row and (sample, source, reason) is appended to
`Loader.skipped` for `write_skipped_csv`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from varjax.data.augment import AugmentConfig, augment
from varjax.data.errors import DataError
from varjax.runfiles import SKIPPED_COLUMNS, write_csv
from varjax.data.selection import Sample
from varjax.data.source import ImageSource, Locator

ON_ERROR = ("stop", "skip")
_PAD_SAMPLE = -1


class Skipped(NamedTuple):
    """An image the loader could not use: its sample id, its source name and why."""

    sample: int
    source: str
    reason: str


@dataclasses.dataclass(frozen=True)
class _LoadSample:
    """Reads and augments one sample (runs in grain threads/workers, so it must pickle)."""

    read: Callable[[Locator], bytes]
    config: AugmentConfig
    seed: int

    def __call__(self, item: tuple[int, int, str, Locator]) -> dict[str, Any]:
        shape = (self.config.total_views, self.config.resolution, self.config.resolution, 3)
        sample, label, source, locator = item
        if sample == _PAD_SAMPLE:
            return _element(np.zeros(shape, np.uint8), 0, _PAD_SAMPLE, False, None)
        try:
            images = augment(self.read(locator), sample, self.config, self.seed)
        except Exception as e:  # any failure on one file is that file's problem, reported
            skipped = Skipped(sample, source, _one_line(e))
            return _element(np.zeros(shape, np.uint8), label, sample, False, skipped)
        return _element(images, label, sample, True, None)


def _element(images, label, sample, valid, skipped) -> dict[str, Any]:
    return {"images": images, "label": label, "sample": sample, "valid": valid,
            "skipped": skipped}


def _collate(elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks elements into a batch; problems travel beside it under `skipped`."""
    return {
        "images": np.stack([e["images"] for e in elements]),
        "label": np.array([e["label"] for e in elements], np.int32),
        "sample": np.array([e["sample"] for e in elements], np.int64),
        "valid": np.array([e["valid"] for e in elements], bool),
        "skipped": tuple(tuple(e["skipped"]) for e in elements if e["skipped"] is not None),
    }


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    # PIL's message embeds the BytesIO repr (an address); say what it means instead.
    if type(e).__name__ == "UnidentifiedImageError":
        text = "not a readable image (unknown format or corrupt data)"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _allow_unparsed_absl_flags() -> None:
    """Lets grain's worker processes start in a program that never parsed absl flags.

    grain 0.2.18 reads an absl flag when it starts workers and fails with
    UnparsedFlagAccessError unless flags were parsed (google/grain#1355, fixed upstream in
    #1362); marking them parsed keeps every flag at its default, the documented workaround.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def shard_bounds(n: int, shard_index: int, shard_count: int) -> tuple[int, int]:
    """Returns [lo, hi) of the rows host `shard_index` of `shard_count` takes out of n."""
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard index {shard_index} is not in [0, {shard_count})")
    return shard_index * n // shard_count, (shard_index + 1) * n // shard_count


class Loader:
    """An iterable of batches for one host (see the module docstring for the rules).

    Attributes:
      samples: this host's samples, in stream order, from `start` on (padding excluded).
      num_batches: batches one pass yields (also `len(loader)`).
      skipped: (sample, source, reason) of every image skipped so far in the current pass.
    """

    def __init__(self, samples: Sequence[Sample], read: Callable[[Locator], bytes], *,
                 batch_size: int, augment_config: AugmentConfig, seed: int, num_workers: int,
                 num_threads: int, prefetch: int, shard_index: int, shard_count: int,
                 start: int, on_error: str):
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        if on_error not in ON_ERROR:
            raise DataError(f"on_error must be one of {ON_ERROR}, got '{on_error}'")
        if start < 0:
            raise DataError(f"start must be >= 0, got {start}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        lo, hi = shard_bounds(len(samples), shard_index, shard_count)
        steps = math.ceil(math.ceil(len(samples) / shard_count) / batch_size)
        rows: list[Sample | None] = list(samples[lo:hi])
        rows += [None] * (steps * batch_size - len(rows))
        rows = rows[start:]
        rows += [None] * (-len(rows) % batch_size)  # a start off the batch grid
        self.samples = [s for s in rows if s is not None]
        self.num_batches = len(rows) // batch_size
        self.skipped: list[Skipped] = []
        # Padding is an item too: grain reads a None element as "filtered out".
        self._items = [(_PAD_SAMPLE, 0, "", None) if s is None
                       else (s.sample, s.label, s.source, s.locator) for s in rows]
        self._batch_size = batch_size
        self._load = _LoadSample(read, augment_config, seed)
        self._num_workers, self._num_threads, self._prefetch = num_workers, num_threads, prefetch
        self._on_error = on_error

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.skipped = []
        if not self._items:
            return
        ds = grain.MapDataset.source(self._items).map(self._load)
        ds = ds.batch(self._batch_size, drop_remainder=False, batch_fn=_collate)
        # Threads overlap whole batches (PIL releases the GIL while decoding and resizing);
        # the buffer bounds memory, as one batch of 64 x 8 views at 256 px is 100 MB.
        it = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=max(self._num_threads, 1),
            prefetch_buffer_size=max(self._prefetch, self._num_threads, 1)))
        if self._num_workers > 0:
            _allow_unparsed_absl_flags()
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._num_workers, per_worker_buffer_size=max(self._prefetch, 1)))
        for batch in it:
            for skipped in batch.pop("skipped"):
                skipped = Skipped(*skipped)
                if self._on_error == "stop":
                    raise DataError(f"cannot use image {skipped.source} (sample "
                                    f"{skipped.sample}): {skipped.reason}")
                self.skipped.append(skipped)
            # Worker batches arrive as views of shared memory; plain copies free it at once
            # and keep the contract (plain numpy arrays) for callers that hold batches.
            # In-process batches are fresh arrays already (about 100 MB a step at 64 x 8 views).
            yield {k: np.array(v) for k, v in batch.items()} if self._num_workers > 0 else batch


def make_loader(source: ImageSource, samples: Sequence[Sample], *, batch_size: int,
                augment_config: AugmentConfig | None = None, seed: int = 0,
                num_workers: int = 0, num_threads: int = 2, prefetch: int = 2,
                shard_index: int = 0, shard_count: int = 1, start: int = 0,
                on_error: str = "stop") -> Loader:
    """Makes this host's batch iterator over selected samples.

    Args:
      source: the source the samples were selected from (it supplies the reader).
      samples: the selection (`select(...)`), in sample-id order.
      batch_size: B, rows per batch on this host.
      augment_config: resolution, mid_reso, views, deterministic mode (default: the study's
        random crops, 256 px, mid_reso 1.125, 8 views).
      seed: augmentation seed; crops depend on (seed, sample id, view) only.
      num_workers: grain worker processes (0: load in this process).
      num_threads: threads per process loading batches concurrently.
      prefetch: batches buffered ahead (per process).
      shard_index, shard_count: this host and the number of hosts.
      start: rows of this host's stream already done (k * B after k batches).
      on_error: 'stop' (DataError at the first bad image) or 'skip' (record and go on).

    Returns:
      A `Loader`; iterate it for dicts images (B, A, S, S, 3) uint8, label (B,) int32,
      sample (B,) int64, valid (B,) bool.
    """
    return Loader(samples, source.reader(), batch_size=batch_size,
                  augment_config=augment_config or AugmentConfig(), seed=seed,
                  num_workers=num_workers, num_threads=num_threads, prefetch=prefetch,
                  shard_index=shard_index, shard_count=shard_count, start=start,
                  on_error=on_error)


def write_skipped_csv(path: str, skipped: Sequence[Skipped]) -> None:
    """Writes `skipped.csv` (columns sample,source,reason), atomically."""
    write_csv(path, SKIPPED_COLUMNS, skipped)
