"""Generate images with the VAR sampler into a directory (one PNG each, a grid, the tokens, run.json).

    python experiments/sample.py                     # the shipped planted model, every class
    python experiments/sample.py --checkpoint converted/d16 --classes 1,2,3 --per-class 8 \\
        --cfg 1.5 --top-k 900 --top-p 0.96 --seed 0 --out runs/samples

Image i draws from (seed, i) only: the batch size never changes an image, and running the
same command again resumes an interrupted gallery. The work is done by varjax.gallery.
"""

from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"sample: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a directory from python -m convert (default: the shipped planted model)")
    ap.add_argument("--classes", type=_ints, default=(), help="comma-separated class ids (default: every "
                    "class of a model with at most 16; the null class id conditions on nothing)")
    ap.add_argument("--per-class", type=int, default=8, help="images per class")
    ap.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance ratio (0: off)")
    ap.add_argument("--top-k", type=int, default=900, help="keep the k largest logits (0: all)")
    ap.add_argument("--top-p", type=float, default=0.96, help="keep the nucleus of this mass (0: off)")
    ap.add_argument("--more-smooth", action="store_true", help="upstream's Gumbel smoothing (visualisation only)")
    ap.add_argument("--seed", type=int, default=0, help="image i draws from (seed, i) only")
    ap.add_argument("--batch-size", type=int, default=8, help="images per compiled call")
    ap.add_argument("--precision", choices=("highest", "tf32", "bf16"), default="highest",
                    help="highest: float32; tf32: TF32 matmuls; bf16: the transformer in bfloat16")
    ap.add_argument("--scale-units", metavar="FILE",
                    help="units to scale: rows of a units.csv (block, site, index), or unit ids")
    ap.add_argument("--scale-factor", type=float, default=0.5, help="factor for --scale-units")
    ap.add_argument("--scale-mode", choices=("weights", "output"), default="weights",
                    help="weights: the units' incoming weights (biases kept); output: their values")
    ap.add_argument("--out", default="runs/samples", help="output directory (resumed if unfinished)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from varjax import gallery
    from varjax.errors import VarjaxError
    from varjax.generate import Sampling

    try:
        config = gallery.GalleryConfig(
            classes=args.classes, per_class=args.per_class, seed=args.seed, batch_size=args.batch_size,
            sampling=Sampling(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth),
            precision=args.precision, scale_units=args.scale_units, scale_factor=args.scale_factor, scale_mode=args.scale_mode)
        gallery.run(args.checkpoint, args.out, config)
    except VarjaxError as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
