"""The study end to end: record unit activations, then UnitMem analysis, figures and report.

    python experiments/run.py                       # the built-in demo: no downloads, minutes on a CPU
    python experiments/run.py --preset study --checkpoint converted/d16   # the study (GPU, ImageNet)
    python experiments/run.py --reanalyze runs/demo # numbers, figures, report from the files alone

Running the same command again resumes an interrupted run (and a finished one is not
recomputed; only the analysis is redone). A run directory holds what docs/design.md lists;
`report.md` is the entry point.

Presets (every flag overrides them):
- demo: the shipped planted-memorization model (varjax/assets/planted) on its own image set
  (members and held-out images); without it, a random-weight `micro` model on the demo set.
- study: the study's D' (32 ImageNet classes drawn with seed 0 x the first 256 train images)
  plus D_val (the same classes from validation), 8 random crops each (Lanczos resize of the
  shorter side to round(1.125 * 256)), teacher-forced, class dropout off.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    "demo": dict(data=None, checkpoint=None, out="runs/demo", augs=8, batch_size=16, classes=None,
                 per_class=None, precision="highest", save_activations=True, per_scale=True),
    # 16 images x 8 views = 128 views a step: what upstream ran in 48-64 GiB (shared/perf.md);
    # a step holds the VQVAE's 256-px activations of every view, so memory grows with it.
    "study": dict(data="imagenet2012", checkpoint=None, out="runs/study", augs=8, batch_size=16,
                  classes=32, per_class=256, precision="highest", save_activations=False, per_scale=True),
}


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
                         "auto: cudnn where it can run, blocked on a CPU, else einsum (all compute "
                         "the same function)")
    ap.add_argument("--save-activations", action=argparse.BooleanOptionalAction,
                    help="also write the full (N x units) activations.npy (enables the median variant)")
    ap.add_argument("--per-scale", action=argparse.BooleanOptionalAction, help="per-scale unit statistics")
    ap.add_argument("--mid-reso", type=float, default=1.125,
                    help="resize the shorter side to round(mid_reso * resolution) before cropping "
                         "(study code 1.125, its write-up 1.25)")
    ap.add_argument("--deterministic", action="store_true", help="resize + center crop, one view")
    ap.add_argument("--class-dropout", type=float, default=0.0,
                    help="drop labels to the null class at this rate (the study ran upstream's 0.1)")
    ap.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                    help="an unreadable image is skipped (and listed) or stops the run")
    ap.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    ap.add_argument("--threads", type=int, default=4, help="data loader threads per process")
    ap.add_argument("--variant", choices=("mean", "median"), default="mean",
                    help="mu_-max as the mean (study) or median (official UnitMem) of the other samples")
    ap.add_argument("--reanalyze", metavar="RUN_DIR", help="recompute the analysis from RUN_DIR's files only")
    ap.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0 (jax.distributed)")
    ap.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    ap.add_argument("--process-id", type=int, help="multi-host: this process's index")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.augs < 1 or args.batch_size < 1:
        ap.error("--augs and --batch-size must be positive")
    if args.deterministic:
        args.augs = 1
    return args


class RunError(Exception):
    """A problem the user can fix; printed as one line."""


def _planted_checkpoint() -> Path | None:
    from varjax.data.planted import default_checkpoint

    path = default_checkpoint()
    return path if path.exists() else None


def _load_model(args):
    import varjax
    from varjax.config import micro

    if args.checkpoint:
        args.checkpoint = str(Path(args.checkpoint).resolve())
        return varjax.load(args.checkpoint), args.checkpoint
    if args.preset == "study":
        raise RunError("the study preset needs --checkpoint (a VAR-d16 + VQVAE directory from python -m convert)")
    planted = _planted_checkpoint()
    if planted is not None:
        if args.data is None:
            args.data = "planted"
        args.checkpoint = str(planted)
        return varjax.load(planted), str(planted)
    if args.data is None:
        args.data = "demo"
    cfg = micro()
    return varjax.Model(cfg, varjax.init_params(cfg, seed=0)), "random micro (seed 0)"


def _image_loader(run_dir: Path, samples=None, source=None):
    """source string (samples.csv) -> uint8 image, for the report's image grids."""
    import numpy as np

    from experiments.analyze import default_load_image
    from varjax import data
    from varjax.data.augment import decode_rgb

    if source is None:
        info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
        spec = info.get("data")
        if spec:
            try:
                source = data.open_source(spec, data_dir=info.get("data_dir"))
            except data.DataError:
                source = None
    locators = {}
    if source is not None and samples is None:
        # Only the run's classes: listing every class of ImageNet would read its whole index.
        import csv

        with open(run_dir / "samples.csv", newline="") as f:
            labels = sorted({int(r["label"]) for r in csv.DictReader(f)})
        try:
            samples = data.select(source, classes=labels, splits=list(source.splits))
        except data.DataError:
            samples = []
    for s in samples or []:
        locators[s.source] = s.locator
    read = source.reader() if source is not None else None

    def load(name: str):
        if read is not None and name in locators:
            return np.asarray(decode_rgb(read(locators[name])))
        return default_load_image(name, run_dir)

    return load


def _versions() -> dict:
    import flax
    import jax
    import numpy as np

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "numpy": np.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "processes": jax.process_count()}


def _analyze(run_dir: Path, args, load_image) -> dict:
    from experiments import analyze

    return analyze.analyze(run_dir, load_image=load_image, variant=args.variant,
                           log=lambda m: print(f"[analyze] {m}", file=sys.stderr))


def run(args) -> Path:
    """Record (or resume) and analyse; returns the run directory."""
    import jax

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    import jax.numpy as jnp

    from varjax import attention as attention_lib
    from varjax import data
    from varjax.driver import record
    from varjax.record import Options, Plan
    from varjax.runfiles import atomic_write_text

    t0 = time.perf_counter()
    model, model_name = _load_model(args)
    if model.vqvae is None or model.var is None:
        raise RunError(f"{model_name} holds only part of the model; convert it with both --var and --vae")
    source = data.open_source(args.data, data_dir=args.data_dir)
    splits = [s for s in args.splits.split(",") if s in source.splits]
    if not splits:
        raise RunError(f"{args.data} has none of the splits {args.splits}")
    samples = data.select(source, n_classes=args.classes, per_class=args.per_class, seed=args.seed,
                          splits=splits)
    num_classes = model.config.var.num_classes
    if any(not 0 <= s.label < num_classes for s in samples):
        raise RunError(f"{args.data} has labels outside the model's {num_classes} classes")
    res = model.config.resolution
    augment = data.AugmentConfig(resolution=res, mid_reso=args.mid_reso, views=args.augs,
                                 deterministic=args.deterministic)
    plan = Plan.from_samples(source, samples, augment, seed=args.seed, on_error=args.on_error,
                             num_workers=args.workers, threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    main_process = jax.process_index() == 0
    if main_process:
        data.write_samples_csv(str(out / "samples.csv"), samples)
        counts = {sp: sum(s.split == sp for s in samples) for sp in splits}
        print(f"[run] {model_name}: {len(samples)} images ({counts}) x {args.augs} views -> {out}",
              file=sys.stderr)
    # the concrete kernel, so run.json names what ran
    args.attention = attention_lib.resolve(
        args.attention, jnp.bfloat16 if args.precision in ("bf16", "bf16_full") else jnp.float32,
        model.config.patch_nums)
    opts = Options(batch_size=args.batch_size, precision=args.precision,
                   save_activations=args.save_activations, per_scale=args.per_scale,
                   class_dropout=args.class_dropout, seed=args.seed, attention=args.attention)
    info = record(model, plan, out, args.augs, opts, image_shape=(res, res))
    if not main_process:
        return out
    run_info = {
        "model": model_name, "checkpoint": args.checkpoint, "config": json.loads(model.config.to_json()),
        "data": args.data,
        "data_dir": args.data_dir, "splits": splits, "classes": args.classes, "per_class": args.per_class,
        "seed": args.seed, "augs": args.augs, "mid_reso": args.mid_reso, "deterministic": args.deterministic,
        "class_dropout": args.class_dropout, "precision": args.precision, "attention": args.attention,
        "batch_size": args.batch_size,
        "n_images": len(samples), "skipped": info["skipped"], "record_compile_s": info["compile_s"],
        "record_images_per_s": info["images_per_s"], "patch_nums": list(model.config.patch_nums),
        **_versions(),
    }
    atomic_write_text(out / "run.json", json.dumps(run_info, indent=1))
    summary = _analyze(out, args, _image_loader(out, samples, source))
    run_info["total_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "run.json", json.dumps(run_info, indent=1))
    _print_summary(out, summary)
    return out


def _print_summary(out: Path, summary: dict) -> None:
    keys = ("n_samples", "u10_count", "p90", "samples_with_memunits_frac", "top1pct_coverage",
            "top5pct_coverage", "top10pct_coverage")
    print(" ".join(f"{k}={summary.get(k)}" for k in keys), file=sys.stderr)
    print(f"report: {out / 'report.md'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from experiments.analyze import AnalysisError
    from varjax.checkpoint import CheckpointError
    from varjax.data import DataError
    from varjax.record import RecordError

    try:
        if args.reanalyze:
            run_dir = Path(args.reanalyze)
            if not run_dir.is_dir():
                raise RunError(f"{run_dir}: no such run directory")
            _print_summary(run_dir, _analyze(run_dir, args, _image_loader(run_dir)))
        else:
            run(args)
    except (RunError, AnalysisError, CheckpointError, DataError, RecordError) as e:
        print(f"run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
