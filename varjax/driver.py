"""The resumable, sharded driver around the recording step (`varjax.record`).

`record(model, plan, out_dir, num_views, opts)` runs the compiled step over every row of a
`Plan` and writes the run directory of docs/design.md. What it guarantees:
- Parallelism: one jit-compiled step on a mesh of all devices of all processes (batch axis
  sharded, parameters and statistics replicated); each process loads only its slice of every
  global batch. The next batch is dispatched before the previous one's outputs are fetched,
  so the host never waits on the device between steps.
- Resume: every `checkpoint_every` steps the statistics, the row position and the skipped
  rows are saved atomically (after the row files are flushed). Running the same call again
  continues from there; rows past the checkpoint are recomputed and overwritten, so the end
  result equals an uninterrupted run. A finished run returns at once.
- Host memory is O(units) unless activations are saved, and then rows go straight to a
  memory-mapped `activations.npy`; device memory does not grow with N.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from varjax import stats as stats_lib
from varjax.model import Model
from varjax.record import Options, check_backend, check_scaling, Plan, RecordError, compile_step, unit_layout
from varjax.taps import SITE_DEFINITIONS, UNIT_SITES
from varjax.runfiles import SKIPPED_COLUMNS, atomic_save_npz, atomic_write_text, write_csv, write_units_csv

PROGRESS = "progress.npz"
DONE = "record.json"


def _fingerprint(model: Model, plan: Plan, num_views: int, opts: Options) -> dict[str, Any]:
    """What must not change between a run and its resumption (batch size may)."""
    h = hashlib.sha256()
    for a in (plan.ids, plan.labels, plan.splits):
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    fp = {
        "rows": len(plan), "rows_sha256": h.hexdigest(), "view": plan.view,
        "weights_sha256": weights_digest(model.params), "splits": list(plan.split_names),
        "num_views": num_views, "precision": opts.precision, "per_scale": opts.per_scale,
        "save_activations": opts.save_activations, "class_dropout": opts.class_dropout,
        "attention": opts.attention,
        "seed": opts.seed, "model": json.loads(model.config.to_json()),
        "sites": recorded_sites(),
    }
    if opts.unit_scaling is not None:  # only then: runs without scaling keep their fingerprint
        fp["unit_scaling"] = opts.unit_scaling.describe()
    return fp


def weights_digest(params) -> str:
    """sha256 of every tensor's path and leading values: tells two checkpoints apart cheaply."""
    w = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        w.update(jax.tree_util.keystr(path).encode())
        w.update(np.asarray(leaf).reshape(-1)[:4096].astype(np.float32).tobytes())
    return w.hexdigest()


def recorded_sites() -> dict[str, str]:
    """What each recorded site means (`varjax.taps.SITE_DEFINITIONS`), as a run stores it."""
    return {s: SITE_DEFINITIONS[s] for s in UNIT_SITES}


def check_sites(fingerprint: dict[str, Any], where: Path | str) -> None:
    """Raises RecordError if a run's fingerprint was recorded under other site definitions.

    Runs from before 2026-12-01 have no `sites` entry: their `attn.proj` was proj(x) * gamma1,
    not the layer's own output that the study recorded, so their numbers mean something else.
    """
    sites = fingerprint.get("sites")
    if sites == recorded_sites():
        return
    if sites is None:
        raise RecordError(f"{where} was recorded before 2026-12-01, when attn.proj was proj(x) * gamma1 "
                          "instead of the layer's own output; record it again into a new --out")
    changed = sorted(k for k in set(sites) | set(recorded_sites()) if sites.get(k) != recorded_sites().get(k))
    raise RecordError(f"{where} was recorded with other site definitions ({', '.join(changed)}); "
                      "record it again into a new --out")


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """One line every few seconds: rows done, images/s (x views), ETA; compile time apart."""

    def __init__(self, total: int, done: int, num_views: int, enabled: bool, every_s: float = 5.0):
        self.total, self.start_rows, self.done = total, done, done
        self.views, self.enabled, self.every = num_views, enabled, every_s
        self.t0 = self.last = time.perf_counter()
        self.last_printed = -1

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.every):
            return
        self.last, self.last_printed = now, done
        rate = (done - self.start_rows) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_s = _fmt_time(eta) if math.isfinite(eta) else "?"
        print(f"[record] {done}/{self.total} images ({100 * done / self.total:.1f}%)  "
              f"{rate:.2f} img/s ({rate * self.views:.1f} views/s)  ETA {eta_s}",
              file=sys.stderr, flush=True)

    def rate(self) -> float:
        return (self.done - self.start_rows) / max(time.perf_counter() - self.t0, 1e-9)


def record(model: Model, plan: Plan, out_dir: Path | str, num_views: int, opts: Options = Options(),
           image_shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """Run the pass over `plan` into `out_dir`; returns the run's info (also in record.json).

    Args:
      model: a loaded model with both parts (VQVAE and VAR).
      plan: the samples to record and how to stream their views (`varjax.record.Plan`).
      out_dir: the run directory (created; resumed if it holds an unfinished run).
      num_views: A, the augmentations per image.
      opts: batch size, precision, what to save.
      image_shape: (H, W) of the views (default: the model's resolution).
    """
    out = Path(out_dir)
    check_backend(opts)
    check_scaling(model, opts)
    fp = _fingerprint(model, plan, num_views, opts)
    main = jax.process_index() == 0
    done_file = out / DONE
    if done_file.exists():
        info = json.loads(done_file.read_text())
        check_sites(info.get("fingerprint", {}), out)
        if info.get("fingerprint") == fp:
            return info
        raise RecordError(f"{out} holds a finished run with other settings; choose another --out")

    devices = jax.devices()
    G = opts.batch_size
    if G % len(devices) or G % jax.process_count():
        raise RecordError(f"--batch-size {G} must be a multiple of the {len(devices)} devices "
                          f"and the {jax.process_count()} processes")
    layout = unit_layout(model)
    U = sum(n for *_, n in layout)
    N, K, S = len(plan), len(model.config.patch_nums), len(plan.split_names)
    H = W = model.config.resolution
    if image_shape is not None:
        H, W = image_shape

    # -- state: fresh or resumed -----------------------------------------------------------
    # Position = rows of this host's shard done (the same on every host: they step together);
    # shard boundaries depend on the process count, so a resume must keep it.
    resume_key = {**fp, "processes": jax.process_count()}
    state = stats_lib.init_state(S, U, K if opts.per_scale else 0)
    position, skipped = 0, []
    if (out / PROGRESS).exists():
        with np.load(out / PROGRESS) as z:
            check_sites(json.loads(str(z["fingerprint"])), out)
            if json.loads(str(z["fingerprint"])) != resume_key:
                raise RecordError(f"{out} holds an unfinished run with other settings "
                                  "(data, views, precision, model or process count); choose another --out")
            state = {k: z["state_" + k] for k in state}
            position = int(z["position"])
            skipped = [tuple(x) for x in json.loads(str(z["skipped"]))]
        if main:
            print(f"[record] resuming after {position} images per process", file=sys.stderr)

    row_of = {int(i): r for r, i in enumerate(plan.ids)}
    acts = per_sample = None
    if main:
        out.mkdir(parents=True, exist_ok=True)  # only now: bad settings above leave nothing behind
        acts = _open_rows(out / "activations.npy", (N, U), position) if opts.save_activations else None
        per_sample = _open_rows(out / ".per_sample.npy", (N, 2 + 2 * K), position)

    # -- the compiled step ------------------------------------------------------------------
    step = compile_step(model, num_views, opts, (H, W), state)
    compiled, params, dev_state, data = step.fn, step.params, step.state, step.batch_sharding

    def to_global(a: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(data, a)

    def gather(x) -> np.ndarray:
        if jax.process_count() == 1:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def write_rows(pending) -> None:
        ids, valid, out_dev, local_skips = pending
        got = {k: gather(v) for k, v in out_dev.items()}
        reasons = dict(local_skips)
        if jax.process_count() > 1:
            for sid, why in local_skips:
                print(f"[record] skipped sample {sid}: {why}", file=sys.stderr)
            ids, valid = gather(to_global(ids)), gather(to_global(valid))
        if not main:
            return
        # Rows of real samples that could not be read: listed, never counted.
        skipped.extend((row_of[int(i)], reasons.get(int(i), "unreadable (see that host's log)"))
                       for i, v in zip(ids, valid) if i >= 0 and not v)
        r = np.array([row_of[int(i)] for i in ids[valid]], np.int64)
        per_sample[r] = np.concatenate([got["loss"][valid, None], got["acc"][valid, None],
                                        got["loss_s"][valid], got["acc_s"][valid]], axis=1)
        if acts is not None:
            acts[r] = got["mu"][valid]

    def save_progress(pos: int) -> None:
        if not main:
            return
        host_state = stats_lib.to_host(dev_state)
        for mm in (acts, per_sample):
            if mm is not None:
                mm.flush()
        atomic_save_npz(out / PROGRESS, fingerprint=np.array(json.dumps(resume_key)), position=np.array(pos),
                        skipped=np.array(json.dumps(skipped)),
                        **{"state_" + k: v for k, v in host_state.items()})

    nproc = jax.process_count()
    b = G // nproc
    batches = plan.open_batches(position, b, jax.process_index(), nproc)
    progress = _Progress(N, min(position * nproc, N), num_views, main)
    pending = None
    pos = position
    split_of = dict(zip((int(i) for i in plan.ids), plan.splits.astype(np.int32)))
    try:
        for t, batch in enumerate(batches):
            ids = np.asarray(batch["sample"], np.int64)
            splits = np.array([split_of.get(int(i), 0) for i in ids], np.int32)
            valid = np.asarray(batch["valid"], bool) & (ids >= 0)
            arrays = [to_global(a) for a in (batch["images"], np.asarray(batch["label"], np.int32),
                                             ids.astype(np.int32), splits, valid)]
            dev_state, out_dev = compiled(params, dev_state, *arrays)
            if pending is not None:
                write_rows(pending)  # the previous step's outputs, while this one runs
            pending = (ids, valid, out_dev, batch.get("skipped", []))
            pos += b
            if (t + 1) % opts.checkpoint_every == 0:
                write_rows(pending)
                pending = None
                save_progress(pos)
            progress.update(min(pos * nproc, N))
        if pending is not None:
            write_rows(pending)
            pending = None
    except KeyboardInterrupt:
        if pending is not None:
            write_rows(pending)
        save_progress(pos)
        raise RecordError(f"interrupted after {pos} images per process; run the same command again "
                          "to resume") from None
    if progress.last_printed != N:
        progress.update(N, force=True)

    # -- final files ------------------------------------------------------------------------
    host_state = stats_lib.to_host(dev_state)
    info = {
        "fingerprint": fp, "images": N, "num_views": num_views, "precision": opts.precision,
        "batch_size": G, "devices": [str(d.device_kind) for d in devices][:1] + [f"x{len(devices)}"],
        "processes": jax.process_count(), "compile_s": round(step.compile_s, 3),
        "images_per_s": round(progress.rate(), 4), "skipped": len(skipped),
    }
    if main:
        write_units_csv(out / "units.csv", layout)
        for s, name in enumerate(plan.split_names):
            if host_state["count"][s] > 0:
                atomic_save_npz(out / f"stats_{name}.npz", **stats_lib.split_arrays(host_state, s))
        _write_per_sample(out, plan, per_sample, K, {r for r, _ in skipped})
        write_csv(out / "skipped.csv", SKIPPED_COLUMNS,
                  [(int(plan.ids[r]), plan.sources[r] if plan.sources else f"row {r}", why)
                   for r, why in sorted(skipped)])
        if acts is not None:
            acts.flush()
        atomic_write_text(done_file, json.dumps(info, indent=1))
        (out / PROGRESS).unlink(missing_ok=True)
        (out / ".per_sample.npy").unlink(missing_ok=True)
    return info


def _open_rows(path: Path, shape: tuple[int, int], position: int) -> np.ndarray:
    """A float32 row file, created for a new run or reopened (rows < position kept)."""
    if position > 0 and path.exists():
        mm = np.load(path, mmap_mode="r+")
        if mm.shape == shape:
            return mm
        raise RecordError(f"{path} has shape {mm.shape}, expected {shape}; choose another --out")
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def _write_per_sample(out: Path, plan: Plan, rows: np.ndarray, K: int, skipped: set[int]) -> None:
    # Columns of the row file: loss, acc, loss_s0..loss_s{K-1}, acc_s0..acc_s{K-1}.
    header = ["sample", "loss", "acc"] + [f"loss_s{k}" for k in range(K)] + [f"acc_s{k}" for k in range(K)]
    body = ([int(plan.ids[r])] + [f"{v:.7g}" for v in rows[r]]
            for r in range(len(plan)) if r not in skipped)
    write_csv(out / "per_sample.csv", header, body)
