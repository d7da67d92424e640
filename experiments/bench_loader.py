"""Measures the data loader's throughput on a folder of ImageNet-sized JPEGs.

Generates (once, in --folder or a temporary folder) --images JPEGs of 500 x 375 pixels with
photo-like content (smooth shapes plus grain, about 100 KB each at quality 90, like
ImageNet's average), then times one pass of `varjax.data.make_loader` with the study's
augmentation (Lanczos resize to round(1.125 * S), A random crops). Prints one JSON line:
images/s (decoded images; each gives A views) and views/s, excluding the first batch
(worker start-up), which is reported separately.

    python experiments/bench_loader.py --images 512 --views 8 --batch-size 32 --num-workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import PIL.Image

from varjax import data

IMAGE_SIZE = (500, 375)  # (width, height): the most common ImageNet size


def write_jpegs(folder: str, n_images: int, n_classes: int = 4) -> None:
    """Writes n_images JPEGs into folder/train/<class>/ unless they are already there."""
    for i in range(n_images):
        class_dir = os.path.join(folder, "train", str(i % n_classes))
        path = os.path.join(class_dir, f"img_{i:06d}.JPEG")
        if os.path.exists(path):
            continue
        os.makedirs(class_dir, exist_ok=True)
        rng = np.random.default_rng(i)
        width, height = IMAGE_SIZE
        # Low-frequency colour field (upsampled noise) plus fine grain: JPEG sizes and
        # decode costs close to real photos, unlike flat colour or pure noise.
        coarse = rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8)
        smooth = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BICUBIC)
        pixels = np.asarray(smooth, np.float32) + rng.normal(0, 12, (height, width, 3))
        PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def bench(folder: str, *, batch_size: int, views: int, resolution: int, num_workers: int,
          num_threads: int) -> dict:
    """Runs one pass over the folder's images and returns the timings."""
    source = data.open_source(folder)
    samples = data.select(source)
    loader = data.make_loader(
        source, samples, batch_size=batch_size, num_workers=num_workers,
        num_threads=num_threads,
        augment_config=data.AugmentConfig(resolution=resolution, views=views))
    start = time.perf_counter()
    first = None
    n_after_first = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
            start_rest = time.perf_counter()
        else:
            n_after_first += int(batch["valid"].sum())
    rest = time.perf_counter() - start_rest
    return {
        "images_per_s": round(n_after_first / rest, 1) if rest > 0 else None,
        "views_per_s": round(n_after_first * views / rest, 1) if rest > 0 else None,
        "first_batch_s": round(first, 2),
        "images": len(samples), "views": views, "resolution": resolution,
        "batch_size": batch_size, "num_workers": num_workers, "num_threads": num_threads,
        "image_size": list(IMAGE_SIZE), "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="number of JPEGs")
    parser.add_argument("--views", type=int, default=8, help="augmentations A per image")
    parser.add_argument("--resolution", type=int, default=256, help="crop side S")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0, help="grain worker processes")
    parser.add_argument("--num-threads", type=int, default=2, help="loading threads per process")
    parser.add_argument("--folder", help="keep the generated JPEGs here (default: a temp folder)")
    args = parser.parse_args()
    if args.images < 2 * args.batch_size:
        parser.error("--images must be at least two batches (the first one is not timed)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or tmp
        write_jpegs(folder, args.images)
        result = bench(folder, batch_size=args.batch_size, views=args.views,
                       resolution=args.resolution, num_workers=args.num_workers,
                       num_threads=args.num_threads)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
