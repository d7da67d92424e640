"""The study end to end: record unit activations, then UnitMem analysis, figures and report.

    python experiments/run.py                       # the built-in demo: no downloads, minutes on a CPU
    python experiments/run.py --preset study --checkpoint converted/d16   # the study (GPU, ImageNet)
    python experiments/run.py --reanalyze runs/demo # numbers, figures, report from the files alone

Running the same command again resumes an interrupted run (and a finished one is not
recomputed; only the analysis is redone). A run directory holds what docs/design.md lists;
`report.md` is the entry point. The presets and the run itself: varjax/study.py.
"""

from __future__ import annotations

import argparse
import sys

from varjax.errors import VarjaxError
from varjax.names import SITES, UNIT_SITES
from varjax.study import PRESETS, StudyConfig, reanalyze, run


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Record VAR unit activations and analyse UnitMem.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="defaults for the flags below")
    ap.add_argument("--checkpoint", help="a directory written by `python -m convert`")
    ap.add_argument("--data", help="'demo', 'planted', a tfds name (imagenet2012) or an image folder")
    ap.add_argument("--data-dir", help="tfds data directory (default: tfds' own)")
    ap.add_argument("--out", help="run directory (resumed if it holds an unfinished run)")
    ap.add_argument("--augs", type=int, help="augmented views per image (the study: 8)")
    ap.add_argument("--batch-size", type=int, help="images per step over all devices (x augs views)")
    ap.add_argument("--classes", type=int, help="draw this many classes with the study's rule")
    ap.add_argument("--per-class", type=int, help="first N images per class (sorted file order)")
    ap.add_argument("--splits", default="train,val", help="splits to record (D' = train, D_val = val)")
    ap.add_argument("--seed", type=int, default=0, help="class-drawing and augmentation seed")
    ap.add_argument("--precision", choices=("highest", "tf32", "bf16", "bf16_full"),
                    help="highest: float32 (parity); tf32: TF32 matmuls and convolutions; bf16: the "
                         "transformer in bfloat16, tokenizer TF32 (upstream's training setup); "
                         "bf16_full: the tokenizer's encoder in bfloat16 too (README: what each costs)")
    ap.add_argument("--attention", choices=("auto", "einsum", "blocked", "fused", "cudnn"), default="auto",
                    help="attention kernel: spelled-out softmax (parity), the same by scale groups and "
                         "one head at a time (blocked: fast on a CPU), jax.nn.dot_product_attention "
                         "(XLA), or the same through cuDNN's flash kernel (GPU, a bf16 precision); "
                         "auto: cudnn where it can run, blocked on a CPU (256+ px pyramids), else "
                         "einsum (all compute the same function)")
    ap.add_argument("--save-activations", action=argparse.BooleanOptionalAction,
                    help="also write the full (N x units) activations.npy (enables the median variant)")
    ap.add_argument("--per-scale", action=argparse.BooleanOptionalAction, help="per-scale unit statistics")
    ap.add_argument("--mid-reso", type=float, default=1.125,
                    help="resize the shorter side to round(mid_reso * resolution) before cropping "
                         "(study code 1.125, its write-up 1.25)")
    ap.add_argument("--deterministic", action="store_true",
                    help="one view: upstream's validation transform (the training resize, then a center crop)")
    ap.add_argument("--class-dropout", type=float, default=0.0,
                    help="drop labels to the null class at this rate (the study ran upstream's 0.1)")
    ap.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                    help="an unreadable image is skipped (and listed) or stops the run")
    ap.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    ap.add_argument("--threads", type=int, default=4, help="data loader threads per process")
    ap.add_argument("--variant", choices=("mean", "median"), default="mean",
                    help="mu_-max as the mean (study) or median (official UnitMem) of the other samples")
    ap.add_argument("--sites", default=",".join(UNIT_SITES),
                    help=f"comma-separated recording sites, of {', '.join(SITES)} (default: the study's three; "
                         "head = the logits, head_nm = AdaLNBeforeHead's output, resid = the residual stream "
                         "after each block; docs/design.md)")
    ap.add_argument("--top-k", type=int, default=10,
                    help="top-UnitMem units per block for item 8 and diversity by depth (the study: 10)")
    ap.add_argument("--scale-units", metavar="FILE",
                    help="multiply these units (rows of a units.csv with block, site, index, or unit ids "
                         "of this run's layout) by --scale-factor while recording (stored in record.json)")
    ap.add_argument("--scale-factor", type=float, default=0.5, help="factor for --scale-units")
    ap.add_argument("--scale-mode", choices=("weights", "output"), default="weights",
                    help="weights: the units' incoming weights (biases kept); output: their values")
    ap.add_argument("--membership", choices=("none", "conditional", "both"),
                    help="per-sample membership scores and the extraction candidates' statistic on upstream's "
                         "validation view (appended to the random crops): from the conditional logits, or both "
                         "those and conditional minus unconditional logits (one more transformer forward of that "
                         "view); presets: both")
    ap.add_argument("--reanalyze", metavar="RUN_DIR", help="recompute the analysis from RUN_DIR's files only")
    ap.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0 (jax.distributed)")
    ap.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    ap.add_argument("--process-id", type=int, help="multi-host: this process's index")
    args = ap.parse_args(argv)
    for name in ("augs", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error("--augs and --batch-size must be positive")
    if args.top_k < 1:
        ap.error("--top-k must be positive")
    args.sites = tuple(s.strip() for s in args.sites.split(",") if s.strip())
    unknown = [s for s in args.sites if s not in SITES]
    if unknown or not args.sites:
        ap.error(f"--sites: unknown site(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SITES)}")
    return args


def _print_summary(out, summary: dict) -> None:
    keys = ("n_samples", "u10_count", "p90", "samples_with_memunits_frac", "top1pct_coverage",
            "top5pct_coverage", "top10pct_coverage")
    print(" ".join(f"{k}={summary.get(k)}" for k in keys), file=sys.stderr)
    print(f"report: {out / 'report.md'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.reanalyze:
            from pathlib import Path

            out, summary = Path(args.reanalyze), reanalyze(args.reanalyze, args.variant, top_k=args.top_k)
        else:
            config = StudyConfig(**{k: v for k, v in vars(args).items() if k != "reanalyze"})
            out, summary = run(config)
        if summary is not None:
            _print_summary(out, summary)
    except VarjaxError as e:
        print(f"run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
