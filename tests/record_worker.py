"""A small recording run for the multi-device, multi-process and kill/resume tests.

Run as a script (each test needs a fresh process: the device count is fixed at start-up):
    python tests/record_worker.py OUT --batch-size 4 [--devices 4] [--processes 2 --process-id 0 --port P]
The model is `varjax.config.micro()` with seeded random weights; the images are seeded noise
with structure, so every row differs; the views are shifted copies (deterministic per view).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

N_ROWS = 11  # not a multiple of any batch size used: the last batch is padded
NUM_VIEWS = 2


def image(row: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + row)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img[: 8 * (row % 5)] //= 3  # rows differ in structure, not only noise
    return img


def views(row: int) -> np.ndarray:
    delay = float(os.environ.get("RECORD_WORKER_DELAY", "0"))
    if delay:
        time.sleep(delay)  # lets the kill test catch the run mid-way
    base = image(row)
    return np.stack([np.roll(base, 5 * a, axis=1) for a in range(NUM_VIEWS)])


def plan():
    from varjax.record import Plan

    ids = np.arange(N_ROWS) * 3 + 7  # ids are not row numbers
    labels = np.arange(N_ROWS) % 4
    splits = (np.arange(N_ROWS) >= 8).astype(np.int64)  # 8 train rows, 3 val rows
    return Plan.from_views(ids, labels, splits, ("train", "val"), views, (NUM_VIEWS, 64, 64, 3), threads=2)


def model():
    from varjax.config import micro
    from varjax.model import Model, init_params

    cfg = micro()
    return Model(cfg, init_params(cfg, seed=0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=2)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                                   num_processes=args.processes, process_id=args.process_id)
    jax.config.update("jax_default_matmul_precision", "highest")
    from varjax.driver import record
    from varjax.record import Options

    opts = Options(batch_size=args.batch_size, save_activations=True, per_scale=True,
                   checkpoint_every=args.checkpoint_every)
    record(model(), plan(), args.out, NUM_VIEWS, opts, image_shape=(64, 64))
    print("worker done", file=sys.stderr)


if __name__ == "__main__":
    main()
