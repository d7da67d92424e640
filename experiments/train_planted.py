"""Trains the small VAR of the planted-memorization experiment and writes it as a checkpoint.

What is trained and how: varjax/train_planted.py. Reproducible from the seed: XLA runs
single-threaded here (results do not depend on the core count), and `params_sha256` in
planted.json fingerprints the weights bit for bit.

    python experiments/train_planted.py --out /tmp/planted     # rebuild the shipped model (seed 0)
    python experiments/train_planted.py --out /tmp/seed1 --seed 1

The script ends by saying whether the weights equal the shipped ones (varjax/assets/planted,
whose seeds.json holds the analysis of seeds 0-3; --out there --force would replace it).
About 10 minutes on one core of a laptop-class CPU: 75 s tokenizing, 3000 steps at ~5/s.
"""

from __future__ import annotations

import os
import sys

# Before jax is imported: one thread, so the weights do not depend on the machine's cores
# (and the job stays modest on a shared CPU). --multithread lifts it. Only as a script: an
# importer (a test) keeps its own XLA settings.
if (__name__ == "__main__" and "--multithread" not in sys.argv[1:]
        and "intra_op_parallelism_threads" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from varjax.data.planted import default_checkpoint  # noqa: E402
from varjax.errors import VarjaxError  # noqa: E402
from varjax.runfiles import stderr_log  # noqa: E402
from varjax.train_planted import TrainConfig, save, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d = TrainConfig()
    parser = argparse.ArgumentParser(description="Train the planted-memorization VAR (minutes on a CPU).")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint there")
    parser.add_argument("--seed", type=int, default=d.seed, help="init, batch order, crops, dropout")
    parser.add_argument("--data-seed", type=int, default=d.data_seed, help="the planted set (run.py uses 0)")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument("--multithread", action="store_true",
                        help="let XLA use all cores (faster; the weights may then differ in the last bits)")
    args = parser.parse_args(argv)
    tc = dataclasses.replace(d, seed=args.seed, data_seed=args.data_seed, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr)
    if tc.steps <= tc.warmup_steps:
        print(f"error: --steps must exceed the {tc.warmup_steps} warmup steps", file=sys.stderr)
        return 2
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    log = stderr_log()

    cfg, params, result = train(tc, log)
    command = "python experiments/train_planted.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("seed", tc.seed), ("data_seed", tc.data_seed),
                                                    ("steps", tc.steps), ("batch_size", tc.batch_size),
                                                    ("lr", tc.lr)))
    try:
        save(args.out, cfg, params, result, command, args.force)
    except VarjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = result["info"]
    log(f"wrote {args.out}: final loss {info['training']['final_loss']:.3f}, center-crop loss "
        + ", ".join(f"{g} {v:.3f}" for g, v in info["center_crop_loss"].items()))
    shipped = default_checkpoint() / "planted.json"
    if shipped.is_file():
        same = json.loads(shipped.read_text()).get("params_sha256") == info["params_sha256"]
        log(f"params_sha256 {info['params_sha256']}: "
            + ("identical to the shipped model" if same else "differs from the shipped model"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
