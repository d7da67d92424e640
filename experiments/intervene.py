"""Scale a run's memorizing units down and measure what it does, against a random control.

    python experiments/intervene.py runs/demo                  # after python experiments/run.py
    python experiments/intervene.py runs/d16 --top-percent 5 --scope layer --draws 10

Writes RUN_DIR/intervention.json, intervention.csv, figures/intervention.png, intervention.md
and its section in report.md; each condition's work in RUN_DIR/intervention/. Running the same
command again resumes (finished conditions are kept); other settings are refused unless
--restart. The job itself: varjax/intervene.py; the summary and tests:
varjax/analysis/intervention.py.
"""

from __future__ import annotations

import argparse
import sys

from varjax.errors import VarjaxError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Scale the top-UnitMem units of a run down; measure loss, "
                                             "accuracy, UnitMem and extraction against random controls.")
    ap.add_argument("run_dir", help="a run directory of experiments/run.py")
    ap.add_argument("--sites", default="ffn.fc1", help="comma-separated sites to choose units from "
                    "(default ffn.fc1, as Kasliwal et al.)")
    ap.add_argument("--top-percent", type=float, default=10.0, help="scale the top this percent by UnitMem on D'")
    ap.add_argument("--scope", choices=("global", "layer"), default="global",
                    help="rank all units of the sites at once (global), or each site and block apart (layer); "
                         "the paper does not say which it did")
    ap.add_argument("--factor", type=float, default=0.5, help="scaling factor (Kasliwal et al.: 0.5)")
    ap.add_argument("--mode", choices=("weights", "output"), default="weights",
                    help="weights: the units' incoming weights (biases kept; the paper's); output: their values")
    ap.add_argument("--draws", type=int, default=5, help="control draws of random units (same count per site, block)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the control draws and the permutation tests")
    ap.add_argument("--per-sample", type=int, default=0,
                    help="also the N D' samples owning the most chosen units, each with only its own units "
                         "scaled, against --draws controls of its size (N x (1 + draws) more conditions)")
    ap.add_argument("--prefix-scales", type=_ints, help="extraction: true scales forced, comma-separated "
                    "(default: 4 of 10 scales, as published; K - 2 with fewer than 6 scales, 2 on the planted model)")
    ap.add_argument("--batch-size", type=int, help="images per recording step (default: the run's)")
    ap.add_argument("--permutations", type=int, default=10_000, help="permutations per test (0: none)")
    ap.add_argument("--checkpoint", help="the run's model, if run.json's path moved (must be the same weights)")
    ap.add_argument("--restart", action="store_true", help="discard conditions measured with other settings")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from varjax.intervene import InterveneConfig, intervene

    try:
        cfg = InterveneConfig(
            sites=tuple(s.strip() for s in args.sites.split(",") if s.strip()), percent=args.top_percent,
            scope=args.scope, factor=args.factor, mode=args.mode, draws=args.draws, seed=args.seed,
            prefix_scales=args.prefix_scales, per_sample=args.per_sample, batch_size=args.batch_size,
            n_permutations=args.permutations, checkpoint=args.checkpoint, restart=args.restart)
        intervene(args.run_dir, cfg)
    except VarjaxError as e:
        print(f"intervene: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {args.run_dir}/report.md (section 'Interventions'), {args.run_dir}/intervention.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
