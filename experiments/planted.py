"""Planted memorization: canaries vs singletons vs held-out images in a planted run.

Writes RUN_DIR/planted.json and figures/planted_separation.png and prints a summary; the
tests themselves: varjax/analysis/planted.py (run.py's report has them too).

    python experiments/planted.py RUN_DIR [--checkpoint DIR]           # a recorded run
    python experiments/planted.py RUN_DIR --record [--checkpoint DIR]  # record it first
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from varjax.analysis import analyze_planted_run, summary_text
from varjax.data.planted import default_checkpoint
from varjax.errors import VarjaxError
from varjax.runfiles import stderr_log
from varjax.study import record_planted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Canaries vs singletons vs held-out in a planted run.")
    parser.add_argument("run_dir", type=Path, help="run directory recorded on --data planted")
    parser.add_argument("--checkpoint", type=Path, default=None, help="the model (for what was planted)")
    parser.add_argument("--record", action="store_true",
                        help="first record --checkpoint (default: the shipped model) on the planted set "
                             "into RUN_DIR (8 views, crop seed 0), then analyze")
    parser.add_argument("--quantile", type=float, default=90.0, help="percentile defining U10")
    parser.add_argument("--permutations", type=int, default=10_000, help="per permutation test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutation tests")
    args = parser.parse_args(argv)
    log = stderr_log()
    try:
        checkpoint = args.checkpoint
        if args.record:
            checkpoint = checkpoint or default_checkpoint()
            log(f"recording {checkpoint} on the planted set into {args.run_dir}")
            record_planted(checkpoint, args.run_dir)
        out = analyze_planted_run(args.run_dir, checkpoint, args.quantile, args.permutations, args.seed, log)
    except VarjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out is None:
        print(f"error: {args.run_dir} was not recorded on the planted set", file=sys.stderr)
        return 2
    print(summary_text(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
