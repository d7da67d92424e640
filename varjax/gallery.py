"""A gallery of generated images in a directory (what experiments/sample.py writes).

No upstream counterpart (upstream's demo notebook draws a grid in memory). Files:

    DIR/{i:05d}_class{c}.png  image i, of class c (i = class position * per_class + j)
    DIR/grid.png              one row per class (at most 16 images per row, 32 rows)
    DIR/tokens.npz            labels (N,), sample_ids (N,), idx0..idx{K-1} (N, pn^2) int32
    DIR/run.json              what was generated and how (checkpoint, sampling, seed,
                              precision, unit scaling), timings, versions

Image i draws from (seed, i) only (varjax.generate), so the batch size never changes an
image, and an interrupted run resumes from its last batch (`.progress.npz`) and ends with
the same files. Every file is written atomically (varjax.runfiles).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from PIL import Image

from varjax import generate as gen_lib
from varjax.driver import weights_digest
from varjax.runfiles import atomic_path, atomic_save_npz, atomic_write_text
from varjax.errors import GenerateError, ScalingError
from varjax.scaling import UnitScaling

PROGRESS = ".progress.npz"
RUN = "run.json"
GRID_MAX = (32, 16)  # rows (classes), columns (images per class) shown in grid.png


@dataclasses.dataclass(frozen=True)
class GalleryConfig:
    """What to generate. Unit scaling is given as a file of units (varjax.scaling.read_units), a
    factor and a mode, and built against the loaded model (UnitScaling.from_file)."""

    classes: tuple[int, ...]
    per_class: int = 8
    sampling: gen_lib.Sampling = gen_lib.Sampling(cfg=1.5, top_k=900, top_p=0.96)
    seed: int = 0
    batch_size: int = 8
    precision: str | None = "highest"
    scale_units: str | None = None
    scale_factor: float = 0.5
    scale_mode: str = "weights"


def run(checkpoint: str | Path | None, out: Path | str, config: GalleryConfig,
        log: Callable[[str], None] | None = None) -> dict:
    """Load `checkpoint` (default: the shipped planted model) and `make_gallery`. With no
    classes given, every class of a model that has at most 16.

    Raises VarjaxError (GenerateError, CheckpointError, ...) with a one-line message, before
    anything is written.
    """
    import varjax
    from varjax.data.planted import default_checkpoint

    path = Path(checkpoint) if checkpoint else default_checkpoint()
    model = varjax.load(path)
    if not config.classes:
        n = model.config.var.num_classes if model.config.var is not None else 0
        if n > 16:
            raise GenerateError(f"the model has {n} classes: name the ones to draw with --classes")
        config = dataclasses.replace(config, classes=tuple(range(n)))
    return make_gallery(model, str(path.resolve()), out, config, log)


def make_gallery(model, model_name: str, out: Path | str, config: GalleryConfig,
                 log: Callable[[str], None] | None = None) -> dict:
    """Generate config.per_class images of every class into `out`; returns run.json's dict.

    Everything is checked before `out` is created; a finished gallery with the same settings
    is returned as it is, an unfinished one is resumed.
    """
    log = log or (lambda m: print(f"[sample] {m}", file=sys.stderr, flush=True))
    out = Path(out)
    scaling = _check(model, config)
    labels = np.repeat(np.array(config.classes, np.int64), config.per_class)
    N, B = len(labels), config.batch_size
    program = gen_lib.program_for(model, config.sampling, return_images=True, unit_scaling=scaling,
                                  precision=config.precision)
    fp = _fingerprint(model, model_name, config, scaling)
    done, tokens = _resume(out, fp)
    if done is None:
        log(f"{out} already holds this gallery")
        return json.loads((out / RUN).read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    compile_s = gen_lib.compiled_for(model, program, B).compile_s
    log(f"{model_name}: {N} images ({len(config.classes)} classes x {config.per_class}), batch {B}, "
        f"compiled in {compile_s:.1f} s" + (f"; resuming after {done}" if done else ""))
    t_gen, start_done = time.perf_counter(), done
    try:
        while done < N:
            ids = np.arange(done, done + B)  # the last batch is padded with ids >= N, dropped
            g = gen_lib.generate(model, labels[np.minimum(ids, N - 1)], config.sampling, config.seed,
                                 sample_ids=ids, return_images=True, unit_scaling=scaling,
                                 precision=config.precision)
            n = min(B, N - done)
            for j in range(n):
                _write_png(out / image_name(done + j, labels[done + j]), np.asarray(g.images[j]))
            tokens.append(np.concatenate([np.asarray(t)[:n] for t in g.tokens], axis=1))
            done += n
            atomic_save_npz(out / PROGRESS, fingerprint=np.array(json.dumps(fp)), done=np.array(done),
                            tokens=np.concatenate(tokens))
            rate = (done - start_done) / (time.perf_counter() - t_gen)
            log(f"{done}/{N} images  {rate:.3g} img/s  ETA {_fmt_time((N - done) / rate)}")
    except KeyboardInterrupt:
        raise GenerateError(f"interrupted after {done} of {N} images; run the same command again to resume") from None
    rate = (done - start_done) / max(time.perf_counter() - t_gen, 1e-9)
    info = _finish(model, out, labels, np.concatenate(tokens), fp, config, scaling,
                   {"compile_s": round(compile_s, 2), "images_per_s": round(rate, 4) if done > start_done else None,
                    "total_s": round(time.perf_counter() - t0, 1)})
    log(f"wrote {N} images, grid.png, tokens.npz, run.json to {out}")
    return info


def image_name(i: int, label: int) -> str:
    return f"{i:05d}_class{int(label)}.png"


def _check(model, config: GalleryConfig) -> UnitScaling | None:
    cfg = model.config
    if model.vqvae is None or model.var is None:
        raise GenerateError("the checkpoint holds only part of the model; convert it with both --var and --vae")
    bad = [c for c in config.classes if not 0 <= c <= cfg.var.num_classes]
    if not config.classes or bad:
        raise GenerateError(f"classes {bad or '(none)'}: the model has classes 0..{cfg.var.num_classes - 1} "
                           f"({cfg.var.num_classes} = the null class)")
    if config.per_class < 1 or config.batch_size < 1:
        raise GenerateError("--per-class and --batch-size must be positive")
    if not 0 <= config.seed < 2**32:
        raise GenerateError(f"--seed must be in [0, 2^32), got {config.seed}")
    if not config.scale_units:
        return None
    try:
        return UnitScaling.from_file(config.scale_units, cfg.var, config.scale_factor, config.scale_mode)
    except ScalingError as e:
        raise GenerateError(str(e)) from None


def _fingerprint(model, model_name: str, config: GalleryConfig, scaling: UnitScaling | None) -> dict:
    """What must not change between a gallery and its resumption (the batch size may)."""
    return {"model": model_name, "weights_sha256": weights_digest(model.params),
            "classes": list(config.classes), "per_class": config.per_class,
            "sampling": dataclasses.asdict(config.sampling), "seed": config.seed, "precision": config.precision,
            "unit_scaling": scaling.describe() if scaling else None}


def _resume(out: Path, fp: dict) -> tuple[int | None, list[np.ndarray]]:
    """(images done, their tokens) of an unfinished gallery in `out`; (None, []) if finished."""
    if (out / RUN).exists():
        if json.loads((out / RUN).read_text()).get("fingerprint") == fp:
            return None, []
        raise GenerateError(f"{out} holds a gallery with other settings; choose another --out")
    if (out / PROGRESS).exists():
        with np.load(out / PROGRESS) as z:
            if json.loads(str(z["fingerprint"])) != fp:
                raise GenerateError(f"{out} holds an unfinished gallery with other settings; choose another --out")
            return int(z["done"]), [z["tokens"]]
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GenerateError(f"{out} exists and is not a gallery; choose another --out")
    return 0, []


def _finish(model, out: Path, labels, tokens, fp, config: GalleryConfig, scaling, timing: dict) -> dict:
    pn = model.config.patch_nums
    split = np.cumsum([p * p for p in pn])[:-1]
    idx = {f"idx{s}": t.astype(np.int32) for s, t in enumerate(np.split(tokens, split, axis=1))}
    atomic_save_npz(out / "tokens.npz", labels=labels.astype(np.int32),
                    sample_ids=np.arange(len(labels), dtype=np.int32), **idx)
    _write_grid(out, labels, config)
    info = {
        "fingerprint": fp, "checkpoint": fp["model"], "config": json.loads(model.config.to_json()),
        "classes": list(config.classes), "per_class": config.per_class, "images": len(labels),
        "sampling": dataclasses.asdict(config.sampling), "seed": config.seed, "precision": config.precision,
        "unit_scaling": scaling.describe() if scaling else None, "batch_size": config.batch_size,
        **timing, "device": jax.devices()[0].device_kind, "devices": len(jax.devices()),
        "python": platform.python_version(), "jax": jax.__version__,
    }
    atomic_write_text(out / RUN, json.dumps(info, indent=1))
    (out / PROGRESS).unlink(missing_ok=True)
    return info


def _to_uint8(image_HW3: np.ndarray) -> np.ndarray:
    return np.clip(np.round((image_HW3 + 1.0) * 127.5), 0, 255).astype(np.uint8)  # [-1, 1] -> [0, 255]


def _write_png(path: Path, image_HW3: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(_to_uint8(image_HW3)).save(tmp, format="PNG")


def _write_grid(out: Path, labels: np.ndarray, config: GalleryConfig, pad: int = 2) -> None:
    rows, cols = min(len(config.classes), GRID_MAX[0]), min(config.per_class, GRID_MAX[1])
    first = np.asarray(Image.open(out / image_name(0, labels[0])))
    H, W = first.shape[:2]
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            i = r * config.per_class + c
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            grid[y:y + H, x:x + W] = np.asarray(Image.open(out / image_name(i, labels[i])).convert("RGB"))
    with atomic_path(out / "grid.png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
