"""Extraction on a run directory: does the model regenerate its candidates from a short prefix?

    python experiments/extract.py runs/demo                    # the planted run: k = 1, 2, 3, all samples with --all
    python experiments/extract.py runs/d16 --per-class 5       # ImageNet: top 5 per class, k = 4
    python experiments/extract.py runs/d16 --sscd sscd_disc_mixup.torchscript.pt

Writes RUN_DIR/extraction.csv, extraction.json, figures/extraction_k*_{best,worst}.png and
refreshes report.md ("Extraction"). Running it again resumes an interrupted job. The steps:
varjax/extraction_job.py; the attack itself: varjax/extraction.py.
"""

from __future__ import annotations

import argparse
import sys

from varjax.errors import VarjaxError
from varjax.extraction_job import RANKS, SSIM_THRESHOLD, ExtractConfig, run_extraction


def _prefixes(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one prefix")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Greedy extraction from forced prefixes on a recorded run.")
    ap.add_argument("run_dir", help="a run directory recorded with --membership conditional or both")
    ap.add_argument("--checkpoint", help="the model (default: the run's own checkpoint, from run.json)")
    ap.add_argument("--rank", choices=RANKS, default="accuracy",
                    help="candidate rule: accuracy = share of last-scale tokens whose conditional arg-max is "
                         "the true token (published); nmu = NumMemUnits; loss = conditional loss (lowest first)")
    ap.add_argument("--per-class", type=int, default=5, help="candidates per class and split (published: 5)")
    ap.add_argument("--all", dest="all_samples", action="store_true",
                    help="continue every sample, not only the candidates (they stay marked)")
    ap.add_argument("--prefix-scales", type=_prefixes,
                    help="comma-separated k (default: 4 on 10-scale models, else 1..K-1: 1,2,3 on the planted model)")
    ap.add_argument("--batch-size", type=int, default=64, help="samples per compiled sampler call")
    ap.add_argument("--sscd", metavar="PATH",
                    help="SSCD TorchScript file (sscd_disc_mixup.torchscript.pt): extracted = cosine > 0.75")
    ap.add_argument("--ssim-threshold", type=float, default=SSIM_THRESHOLD,
                    help="without --sscd: extracted = SSIM >= this (an offline stand-in)")
    ap.add_argument("--no-report", dest="report", action="store_false", help="do not refresh report.md")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        info = run_extraction(ExtractConfig(**vars(args)))
    except VarjaxError as e:
        print(f"extract: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("extract: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"extraction: {info['n_continued']} samples x k = {info['prefix_scales']} -> {args.run_dir}/extraction.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
