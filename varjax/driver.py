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
  memory-mapped `activations.npy`; device memory does not grow with N. With membership
  scores (record.Options.membership) their rows and the view's tokens (`view_tokens.npy`)
  are written the same way, and `membership.csv` at the end.
"""

from __future__ import annotations

import dataclasses
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

from varjax import membership
from varjax import stats as stats_lib
from varjax.model import Model
from varjax.names import UnitLayout
from varjax.record import (
    CompiledStep,
    Options,
    Plan,
    RecordError,
    check_backend,
    check_scaling,
    compile_step,
    unit_layout,
)
from varjax.runfiles import (
    SKIPPED_COLUMNS,
    atomic_save_npz,
    atomic_write_text,
    write_csv,
    write_units_csv,
)
from varjax.taps import SITE_DEFINITIONS

PROGRESS = "progress.npz"
DONE = "record.json"
MEMBERSHIP_CSV = "membership.csv"  # per-sample membership scores (varjax.membership.columns)
VIEW_TOKENS = "view_tokens.npy"  # int32 (N, L): each sample's tokens of the center view


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
        "sites": recorded_sites(opts.sites),
    }
    if opts.unit_scaling is not None:  # only then: runs without scaling keep their fingerprint
        fp["unit_scaling"] = opts.unit_scaling.describe()
    if opts.membership != "none":  # likewise
        fp["membership"] = {"mode": opts.membership, "center_view": plan.center_view,
                            "columns": list(membership.columns(opts.membership == "both"))}
    return fp


def weights_digest(params) -> str:
    """sha256 of every tensor's path and leading values: tells two checkpoints apart cheaply."""
    w = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        w.update(jax.tree_util.keystr(path).encode())
        w.update(np.asarray(leaf).reshape(-1)[:4096].astype(np.float32).tobytes())
    return w.hexdigest()


def recorded_sites(sites: tuple[str, ...]) -> dict[str, str]:
    """What each recorded site means (`varjax.taps.SITE_DEFINITIONS`), as a run stores it."""
    return {s: SITE_DEFINITIONS[s] for s in sites}


def check_sites(fingerprint: dict[str, Any], where: Path | str) -> None:
    """Raises RecordError if a run recorded one of its sites under another definition than
    today's (`SITE_DEFINITIONS`); the run's own sites are checked, whichever they are.

    Runs from before 2026-12-01 have no `sites` entry: their `attn.proj` was proj(x) * gamma1,
    not the layer's own output that the study recorded, so their numbers mean something else.
    """
    sites = fingerprint.get("sites")
    if sites is None:
        raise RecordError(f"{where} was recorded before 2026-12-01, when attn.proj was proj(x) * gamma1 "
                          "instead of the layer's own output; record it again into a new --out")
    changed = sorted(k for k, v in sites.items() if SITE_DEFINITIONS.get(k) != v)
    if changed:
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


def _finished(out: Path, fp: dict[str, Any]) -> dict[str, Any] | None:
    """record.json of a finished run with this fingerprint; None if there is none."""
    if not (out / DONE).exists():
        return None
    info = json.loads((out / DONE).read_text())
    check_sites(info.get("fingerprint", {}), out)
    if info.get("fingerprint") == fp:
        return info
    raise RecordError(f"{out} holds a finished run with other settings; choose another --out")


@dataclasses.dataclass
class _Resume:
    """Where the run stands: host statistics, rows of this host's shard done, skipped rows."""

    state: dict
    position: int
    skipped: list[tuple[int, str]]


def _resume(out: Path, resume_key: dict[str, Any], fresh_state: dict) -> _Resume:
    """The saved progress of an unfinished run with this key, or a fresh start.

    Position = rows of this host's shard done (the same on every host: they step together);
    shard boundaries depend on the process count, so the key holds it.
    """
    if not (out / PROGRESS).exists():
        return _Resume(fresh_state, 0, [])
    with np.load(out / PROGRESS) as z:
        check_sites(json.loads(str(z["fingerprint"])), out)
        if json.loads(str(z["fingerprint"])) != resume_key:
            raise RecordError(f"{out} holds an unfinished run with other settings "
                              "(data, views, precision, model or process count); choose another --out")
        state = {k: z["state_" + k] for k in fresh_state}
        resumed = _Resume(state, int(z["position"]), [tuple(x) for x in json.loads(str(z["skipped"]))])
    if jax.process_index() == 0:
        print(f"[record] resuming after {resumed.position} images per process", file=sys.stderr)
    return resumed


class _Rows:
    """The per-sample row files (process 0 only): per-sample loss/accuracy and, if asked,
    activations, memory-mapped and written as the steps' outputs arrive; and the skipped rows.

    Rows are addressed by sample id, so a resumed run overwrites exactly the rows it recomputes.
    """

    def __init__(self, out: Path, plan: Plan, n_units: int, n_scales: int, save_activations: bool,
                 resume: _Resume, batch_sharding, mia_columns: tuple[str, ...] = (), seq_len: int = 0):
        self.main = jax.process_index() == 0
        self.row_of = {int(i): r for r, i in enumerate(plan.ids)}
        self.skipped = list(resume.skipped)
        self.sharding = batch_sharding
        self.acts = self.per_sample = self.mia = self.tokens = None
        if self.main:
            N = len(plan)
            self.acts = (_open_rows(out / "activations.npy", (N, n_units), resume.position)
                         if save_activations else None)
            self.per_sample = _open_rows(out / ".per_sample.npy", (N, 2 + 2 * n_scales), resume.position)
            if mia_columns:
                self.mia = _open_rows(out / ".membership.npy", (N, len(mia_columns)), resume.position)
                self.tokens = _open_rows(out / VIEW_TOKENS, (N, seq_len), resume.position, np.int32)

    def _gather(self, x) -> np.ndarray:
        if jax.process_count() == 1:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def write(self, pending) -> None:
        """One step's outputs: (ids, valid, device outputs, this host's skipped images)."""
        ids, valid, out_dev, local_skips = pending
        got = {k: self._gather(v) for k, v in out_dev.items()}
        reasons = dict(local_skips)
        if jax.process_count() > 1:
            for sid, why in local_skips:
                print(f"[record] skipped sample {sid}: {why}", file=sys.stderr)
            to_global = lambda a: jax.make_array_from_process_local_data(self.sharding, a)  # noqa: E731
            ids, valid = self._gather(to_global(ids)), self._gather(to_global(valid))
        if not self.main:
            return
        # Rows of real samples that could not be read: listed, never counted.
        self.skipped.extend((self.row_of[int(i)], reasons.get(int(i), "unreadable (see that host's log)"))
                            for i, v in zip(ids, valid) if i >= 0 and not v)
        r = np.array([self.row_of[int(i)] for i in ids[valid]], np.int64)
        self.per_sample[r] = np.concatenate([got["loss"][valid, None], got["acc"][valid, None],
                                             got["loss_s"][valid], got["acc_s"][valid]], axis=1)
        if self.acts is not None:
            self.acts[r] = got["mu"][valid]
        if self.mia is not None:
            fams = [got[f][valid] for f in ("cond", "diff") if f in got]
            toks = got["tokens"][valid]
            self.tokens[r] = toks
            self.mia[r] = [membership.host_row(a, t, [f[j] for f in fams])
                           for j, (a, t) in enumerate(zip(got["acc_last"][valid], toks))]

    def flush(self) -> None:
        for mm in (self.acts, self.per_sample, self.mia, self.tokens):
            if mm is not None:
                mm.flush()


def _save_progress(out: Path, resume_key: dict, rows: _Rows, dev_state, position: int) -> None:
    """The statistics, the position and the skipped rows, after the row files are flushed."""
    if not rows.main:
        return
    host_state = stats_lib.to_host(dev_state)
    rows.flush()
    atomic_save_npz(out / PROGRESS, fingerprint=np.array(json.dumps(resume_key)), position=np.array(position),
                    skipped=np.array(json.dumps(rows.skipped)),
                    **{"state_" + k: v for k, v in host_state.items()})


def _steps(plan: Plan, step: CompiledStep, rows: _Rows, opts: Options, position: int, num_views: int,
           out: Path, resume_key: dict):
    """Runs the compiled step over every remaining batch; returns the final device state and
    the progress meter. A step's outputs are fetched while the next step runs; every
    `checkpoint_every` steps and on Ctrl-C the progress is saved."""
    nproc, N = jax.process_count(), len(plan)
    b = opts.batch_size // nproc
    batches = plan.open_batches(position, b, jax.process_index(), nproc)
    progress = _Progress(N, min(position * nproc, N), num_views, rows.main)
    split_of = dict(zip((int(i) for i in plan.ids), plan.splits.astype(np.int32)))
    to_global = lambda a: jax.make_array_from_process_local_data(step.batch_sharding, a)  # noqa: E731
    dev_state, pending, pos = step.state, None, position
    try:
        for t, batch in enumerate(batches):
            ids = np.asarray(batch["sample"], np.int64)
            splits = np.array([split_of.get(int(i), 0) for i in ids], np.int32)
            valid = np.asarray(batch["valid"], bool) & (ids >= 0)
            arrays = [to_global(a) for a in (batch["images"], np.asarray(batch["label"], np.int32),
                                             ids.astype(np.int32), splits, valid)]
            dev_state, out_dev = step.fn(step.params, dev_state, *arrays)
            if pending is not None:
                rows.write(pending)  # the previous step's outputs, while this one runs
            pending = (ids, valid, out_dev, batch.get("skipped", []))
            pos += b
            if (t + 1) % opts.checkpoint_every == 0:
                rows.write(pending)
                pending = None
                _save_progress(out, resume_key, rows, dev_state, pos)
            progress.update(min(pos * nproc, N))
        if pending is not None:
            rows.write(pending)
    except KeyboardInterrupt:
        if pending is not None:
            rows.write(pending)
        _save_progress(out, resume_key, rows, dev_state, pos)
        raise RecordError(f"interrupted after {pos} images per process; run the same command again "
                          "to resume") from None
    if progress.last_printed != N:
        progress.update(N, force=True)
    return dev_state, progress


def _finish(out: Path, plan: Plan, rows: _Rows, layout: UnitLayout, host_state: dict, n_scales: int,
            info: dict) -> None:
    """The final files (process 0): units.csv, stats, per_sample.csv, skipped.csv, then
    record.json last; the progress checkpoint goes."""
    write_units_csv(out / "units.csv", layout)
    for s, name in enumerate(plan.split_names):
        if host_state["count"][s] > 0:
            atomic_save_npz(out / f"stats_{name}.npz", **stats_lib.split_arrays(host_state, s))
    _write_per_sample(out, plan, rows.per_sample, n_scales, {r for r, _ in rows.skipped})
    write_csv(out / "skipped.csv", SKIPPED_COLUMNS,
              [(int(plan.ids[r]), plan.sources[r] if plan.sources else f"row {r}", why)
               for r, why in sorted(rows.skipped)])
    if rows.mia is not None:
        skipped = {r for r, _ in rows.skipped}
        cols = info["fingerprint"]["membership"]["columns"]
        write_csv(out / MEMBERSHIP_CSV, ["sample"] + cols,
                  ([int(plan.ids[r])] + [f"{v:.7g}" for v in rows.mia[r]] for r in range(len(plan)) if r not in skipped))
    rows.flush()
    atomic_write_text(out / DONE, json.dumps(info, indent=1))
    (out / PROGRESS).unlink(missing_ok=True)
    (out / ".per_sample.npy").unlink(missing_ok=True)
    (out / ".membership.npy").unlink(missing_ok=True)


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
    Raises:
      RecordError: bad settings, or the directory holds another run (nothing is written then).
    """
    out = Path(out_dir)
    check_backend(opts)
    check_scaling(model, opts)
    fp = _fingerprint(model, plan, num_views, opts)
    finished = _finished(out, fp)
    if finished is not None:
        return finished
    devices = jax.devices()
    G = opts.batch_size
    if G % len(devices) or G % jax.process_count():
        raise RecordError(f"--batch-size {G} must be a multiple of the {len(devices)} devices "
                          f"and the {jax.process_count()} processes")
    if opts.membership != "none" and plan.center_view is None:
        raise RecordError("membership scores need upstream's validation view (a center crop): record with "
                          "--deterministic or with the center view appended (AugmentConfig.center_view)")
    layout = unit_layout(model, opts.sites)
    K, S = len(model.config.patch_nums), len(plan.split_names)
    resume_key = {**fp, "processes": jax.process_count()}
    resume = _resume(out, resume_key, stats_lib.init_state(S, layout.n_units, K if opts.per_scale else 0))
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)  # only now: bad settings above leave nothing behind
    step = compile_step(model, num_views, opts, image_shape or (model.config.resolution,) * 2, resume.state,
                        center_view=plan.center_view)
    mia_cols = tuple(fp["membership"]["columns"]) if "membership" in fp else ()
    rows = _Rows(out, plan, layout.n_units, K, opts.save_activations, resume, step.batch_sharding, mia_cols,
                 model.config.var.seq_len)
    dev_state, progress = _steps(plan, step, rows, opts, resume.position, num_views, out, resume_key)
    info = {
        "fingerprint": fp, "images": len(plan), "num_views": num_views, "precision": opts.precision,
        "batch_size": G, "devices": [str(d.device_kind) for d in devices][:1] + [f"x{len(devices)}"],
        "processes": jax.process_count(), "compile_s": round(step.compile_s, 3),
        "images_per_s": round(progress.rate(), 4), "skipped": len(rows.skipped),
    }
    if rows.main:
        _finish(out, plan, rows, layout, stats_lib.to_host(dev_state), K, info)
    return info


def _open_rows(path: Path, shape: tuple[int, int], position: int, dtype=np.float32) -> np.ndarray:
    """A row file (float32 unless asked), created for a new run or reopened (rows < position kept)."""
    if position > 0 and path.exists():
        mm = np.load(path, mmap_mode="r+")
        if mm.shape == shape:
            return mm
        raise RecordError(f"{path} has shape {mm.shape}, expected {shape}; choose another --out")
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _write_per_sample(out: Path, plan: Plan, rows: np.ndarray, K: int, skipped: set[int]) -> None:
    # Columns of the row file: loss, acc, loss_s0..loss_s{K-1}, acc_s0..acc_s{K-1}.
    header = ["sample", "loss", "acc"] + [f"loss_s{k}" for k in range(K)] + [f"acc_s{k}" for k in range(K)]
    body = ([int(plan.ids[r])] + [f"{v:.7g}" for v in rows[r]]
            for r in range(len(plan)) if r not in skipped)
    write_csv(out / "per_sample.csv", header, body)
