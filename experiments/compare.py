"""Several runs side by side: other depths (d16 .. d36) or one model at several precisions.

    python experiments/compare.py runs/d16 runs/d20 runs/d24 --out runs/compare_depths
    python experiments/compare.py runs/d16_highest runs/d16_bf16 --out runs/compare_precision

Writes report.md, comparison.json and figures/ into --out (varjax.analysis.compare); runs that
cannot be compared are refused with one line saying why, and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from varjax.analysis.compare import compare_runs
from varjax.errors import VarjaxError
from varjax.runfiles import stderr_log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare UnitMem runs side by side.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished run directories (two or more)")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md, comparison.json, figures/")
    parser.add_argument("--variant", choices=("mean", "median"),
                        help="mu_-max of UnitMem (default: the variant the runs were analysed with)")
    parser.add_argument("--quantile", type=float, default=90.0, help="percentile defining U10")
    parser.add_argument("--top-k", type=int, default=10, help="top units per block for diversity by depth")
    parser.add_argument("--permutations", type=int, default=10_000, help="permutations of the diversity tests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutation tests")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.permutations < 0 or not 0 <= args.quantile <= 100:
        parser.error("--top-k must be positive, --permutations non-negative, --quantile in [0, 100]")
    log = stderr_log()
    try:
        compare_runs(args.run_dirs, args.out, args.variant, args.quantile, args.top_k, args.permutations,
                     args.seed, log=log)
    except VarjaxError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
