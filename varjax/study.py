"""The study end to end: record unit activations, then the UnitMem analysis and report.

`StudyConfig` holds every setting of a run (experiments/run.py's flags); `PRESETS` the two
named defaults; `run(config)` records (or resumes) and analyses; `reanalyze(run_dir)`
recomputes the analysis from a run directory's files alone.

Presets (every setting overrides them):
- demo: the shipped planted-memorization model (varjax/assets/planted) on its own image set
  (members and held-out images); without it, a random-weight `micro` model on the demo set.
- study: the study's D' (32 ImageNet classes drawn with seed 0 x the first 256 train images)
  plus D_val (the same classes from validation), 8 random crops each (Lanczos resize of the
  shorter side to round(1.125 * 256)), teacher-forced, class dropout off.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from varjax.errors import RunError
from varjax.names import UNIT_SITES

PRESETS = {
    "demo": dict(data=None, checkpoint=None, out="runs/demo", augs=8, batch_size=16, classes=None,
                 per_class=None, precision="highest", save_activations=True, per_scale=True, membership="both"),
    # 16 images x 8 views = 128 views a step: what upstream ran in 48-64 GiB on an 80 GB card
    # (docs/performance.md); a step holds the VQVAE's 256-px activations of every view.
    "study": dict(data="imagenet2012", checkpoint=None, out="runs/study", augs=8, batch_size=16,
                  classes=32, per_class=256, precision="highest", save_activations=False, per_scale=True,
                  membership="both"),
}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One run's settings (experiments/run.py documents each flag). None: the preset's value."""

    preset: str = "demo"
    checkpoint: str | None = None
    data: str | None = None
    data_dir: str | None = None
    out: str | None = None
    augs: int | None = None
    batch_size: int | None = None
    classes: int | None = None
    per_class: int | None = None
    splits: str = "train,val"
    seed: int = 0
    precision: str | None = None
    attention: str = "auto"
    save_activations: bool | None = None
    per_scale: bool | None = None
    mid_reso: float = 1.125
    deterministic: bool = False
    class_dropout: float = 0.0
    on_error: str = "skip"
    workers: int = 0
    threads: int = 4
    variant: str = "mean"
    top_k: int = 10
    sites: tuple[str, ...] = UNIT_SITES
    scale_units: str | None = None  # a file of unit ids to scale while recording (varjax.scaling)
    scale_factor: float = 0.5
    scale_mode: str = "weights"
    # Membership scores on upstream's validation view (varjax.membership): none, conditional
    # or both (also conditional minus unconditional logits); the view is appended to the
    # random crops (or is the one view with --deterministic).
    membership: str | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def with_preset(self) -> "StudyConfig":
        """This config with the preset's values where it has None (deterministic: one view)."""
        if self.preset not in PRESETS:
            raise RunError(f"unknown preset {self.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        filled = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **filled)
        if cfg.augs < 1 or cfg.batch_size < 1:
            raise RunError("--augs and --batch-size must be positive")
        return dataclasses.replace(cfg, augs=1) if cfg.deterministic else cfg


def _load_model(cfg: StudyConfig):
    """(model, its name, cfg with the checkpoint and data the model implies)."""
    import varjax
    from varjax.config import micro
    from varjax.data.planted import default_checkpoint

    if cfg.checkpoint:
        path = str(Path(cfg.checkpoint).resolve())
        return varjax.load(path), path, dataclasses.replace(cfg, checkpoint=path)
    if cfg.preset == "study":
        raise RunError("the study preset needs --checkpoint (a VAR-d16 + VQVAE directory from python -m convert)")
    planted = default_checkpoint()
    if planted.exists():
        cfg = dataclasses.replace(cfg, checkpoint=str(planted), data=cfg.data or "planted")
        return varjax.load(planted), str(planted), cfg
    cfg = dataclasses.replace(cfg, data=cfg.data or "demo")
    m = micro()
    return varjax.Model(m, varjax.init_params(m, seed=0)), "random micro (seed 0)", cfg


def image_loader(run_dir: Path, samples=None, source=None) -> Callable[[str], Any]:
    """source string (samples.csv) -> uint8 image, for the report's image grids."""
    from varjax import data
    from varjax.analysis import default_load_image
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


def versions() -> dict:
    import flax
    import jax

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "numpy": np.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "processes": jax.process_count()}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def reanalyze(run_dir: Path | str, variant: str = "mean", load_image=None, top_k: int = 10) -> dict:
    """The analysis, figures and report from the run directory's files alone; the summary.
    The sites are the run's own (units.csv, checked against record.json)."""
    from varjax.analysis import analyze

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    return analyze(run_dir, load_image=load_image or image_loader(run_dir), variant=variant, top_k=top_k,
                   log=lambda m: _log(f"[analyze] {m}"))


def _select(cfg: StudyConfig, model):
    """(source, samples, splits) of the run; refuses labels the model does not have."""
    from varjax import data

    source = data.open_source(cfg.data, data_dir=cfg.data_dir)
    splits = [s for s in cfg.splits.split(",") if s in source.splits]
    if not splits:
        raise RunError(f"{cfg.data} has none of the splits {cfg.splits}")
    samples = data.select(source, n_classes=cfg.classes, per_class=cfg.per_class, seed=cfg.seed, splits=splits)
    num_classes = model.config.var.num_classes
    if any(not 0 <= s.label < num_classes for s in samples):
        raise RunError(f"{cfg.data} has labels outside the model's {num_classes} classes")
    return source, samples, splits


def _record_options(cfg: StudyConfig, model):
    import jax.numpy as jnp

    from varjax import attention as attention_lib
    from varjax.record import Options
    from varjax.scaling import UnitScaling

    # the concrete kernel ("auto": cuDNN's for bf16 on a GPU, blocked on a CPU), so run.json
    # names what ran
    dtype = jnp.bfloat16 if cfg.precision in ("bf16", "bf16_full") else jnp.float32
    attention = attention_lib.resolve(cfg.attention, dtype, model.config.patch_nums)
    scaling = None
    if cfg.scale_units:
        scaling = UnitScaling.from_file(cfg.scale_units, model.config.var, cfg.scale_factor, cfg.scale_mode,
                                        tuple(cfg.sites))
    return Options(batch_size=cfg.batch_size, precision=cfg.precision, save_activations=cfg.save_activations,
                   per_scale=cfg.per_scale, class_dropout=cfg.class_dropout, seed=cfg.seed, attention=attention,
                   sites=tuple(cfg.sites), unit_scaling=scaling, membership=cfg.membership)


def _run_info(cfg: StudyConfig, model, model_name: str, splits, samples, opts, info: dict) -> dict:
    return {
        "model": model_name, "checkpoint": cfg.checkpoint, "config": json.loads(model.config.to_json()),
        "data": cfg.data,
        "data_dir": cfg.data_dir, "splits": splits, "classes": cfg.classes, "per_class": cfg.per_class,
        "seed": cfg.seed, "augs": cfg.augs, "mid_reso": cfg.mid_reso, "deterministic": cfg.deterministic,
        "class_dropout": cfg.class_dropout, "precision": cfg.precision, "attention": opts.attention,
        "batch_size": cfg.batch_size, "sites": list(opts.sites), "membership": opts.membership,
        "unit_scaling": opts.unit_scaling.describe() if opts.unit_scaling else None,
        "n_images": len(samples), "skipped": info["skipped"], "record_compile_s": info["compile_s"],
        "record_images_per_s": info["images_per_s"], "patch_nums": list(model.config.patch_nums),
        **versions(),
    }


def run(config: StudyConfig) -> tuple[Path, dict | None]:
    """Record (or resume) and analyse.

    Returns:
      (run directory, summary); the summary is None on processes other than 0, which only
      record.
    Raises:
      VarjaxError: any problem the user can fix (one-line message).
    """
    import jax

    from varjax import data
    from varjax.driver import record
    from varjax.record import Plan
    from varjax.runfiles import atomic_write_text

    cfg = config.with_preset()
    if cfg.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)
    t0 = time.perf_counter()
    model, model_name, cfg = _load_model(cfg)
    if model.vqvae is None or model.var is None:
        raise RunError(f"{model_name} holds only part of the model; convert it with both --var and --vae")
    source, samples, splits = _select(cfg, model)
    res = model.config.resolution
    augment = data.AugmentConfig(resolution=res, mid_reso=cfg.mid_reso, views=cfg.augs,
                                 deterministic=cfg.deterministic,
                                 center_view=cfg.membership != "none" and not cfg.deterministic)
    plan = Plan.from_samples(source, samples, augment, seed=cfg.seed, on_error=cfg.on_error,
                             num_workers=cfg.workers, threads=cfg.threads)
    out = Path(cfg.out)  # created by `record`, once the settings are checked
    opts = _record_options(cfg, model)  # reads --scale-units: a bad file is refused before any output
    main_process = jax.process_index() == 0
    if main_process:
        counts = {sp: sum(s.split == sp for s in samples) for sp in splits}
        _log(f"[run] {model_name}: {len(samples)} images ({counts}) x {cfg.augs} views -> {out}")
    info = record(model, plan, out, cfg.augs, opts, image_shape=(res, res))
    if not main_process:
        return out, None
    # Only now: a directory that `record` refused (another run's) keeps its own samples.csv.
    data.write_samples_csv(str(out / "samples.csv"), samples)
    run_info = _run_info(cfg, model, model_name, splits, samples, opts, info)
    atomic_write_text(out / "run.json", json.dumps(run_info, indent=1))
    summary = reanalyze(out, cfg.variant, image_loader(out, samples, source), cfg.top_k)
    run_info["total_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "run.json", json.dumps(run_info, indent=1))
    return out, summary


def record_planted(checkpoint: Path, run_dir: Path, views: int = 8, seed: int = 0, batch_size: int = 16,
                   precision: str = "highest") -> None:
    """Records a planted checkpoint on the whole planted set, as the default run does.

    For checks without experiments/run.py (multi-seed studies, the tests): every member and
    held-out image, `views` random crops each (the study's augmentation at 64 px, crop seed
    `seed`), activations saved, in `precision`; then samples.csv. Resumes or returns at once like the driver.
    """
    import varjax
    from varjax.data import AugmentConfig, open_source, select, write_samples_csv
    from varjax.driver import record
    from varjax.record import Options, Plan
    from varjax.runfiles import atomic_write_text

    model = varjax.load(checkpoint)
    source = open_source("planted")
    samples = select(source)
    plan = Plan.from_samples(source, samples, AugmentConfig(resolution=model.config.resolution, views=views),
                             seed=seed)
    opts = Options(batch_size=batch_size, save_activations=True, precision=precision)
    info = record(model, plan, run_dir, num_views=views, opts=opts)
    write_samples_csv(str(Path(run_dir) / "samples.csv"), samples)
    # The checkpoint by name: the planted analysis reads what was planted from it (a run that
    # names none would be taken for the shipped model).
    run_info = {"model": str(checkpoint), "checkpoint": str(Path(checkpoint).resolve()), "data": "planted",
                "augs": views, "seed": seed, "precision": opts.precision, "batch_size": batch_size,
                "n_images": len(samples), "skipped": info["skipped"], "patch_nums": list(model.config.patch_nums),
                **versions()}
    atomic_write_text(Path(run_dir) / "run.json", json.dumps(run_info, indent=1))
