"""UnitMem analysis of a run directory: figures, summary.json and report.md (varjax.analysis).

    python experiments/analyze.py RUN_DIR [--variant median] [--quantile 90]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from varjax.analysis import analyze
from varjax.errors import VarjaxError
from varjax.runfiles import stderr_log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="UnitMem analysis of a run directory.")
    parser.add_argument("run_dir", type=Path, help="directory written by the recording pass")
    parser.add_argument("--variant", choices=("mean", "median"), default="mean",
                        help="mu_-max: mean of the other samples (the study's) or their median")
    parser.add_argument("--quantile", type=float, default=90.0, help="percentile defining U10")
    parser.add_argument("--top-k", type=int, default=10, help="top units per block (item 8)")
    parser.add_argument("--permutations", type=int, default=10_000, help="train/val permutation test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutation test")
    args = parser.parse_args(argv)
    log = stderr_log()
    try:
        summary = analyze(args.run_dir, variant=args.variant, q=args.quantile, top_k=args.top_k,
                          n_permutations=args.permutations, seed=args.seed, log=log)
    except VarjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {args.run_dir / 'report.md'}: |U10| = {summary['u10_count']}, "
        f"{100 * summary['samples_with_memunits_frac']:.2f}% of samples with NumMemUnits > 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
