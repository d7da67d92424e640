"""The extraction job on a run directory: candidates, greedy continuations, extraction.csv.

`run_extraction(ExtractConfig(run_dir))` is `python experiments/extract.py RUN_DIR`:
  1. reads the run (a finished recording with membership scores: membership.csv and
     view_tokens.npy, the tokens of upstream's validation view) and loads the checkpoint it
     names, refusing one whose weights differ from the recorded ones;
  2. ranks the samples per split and class by the published candidate rule (the share of
     last-scale tokens whose conditional arg-max is the true token), or by NumMemUnits or
     loss, and marks the top N per class of each split as candidates;
  3. for every prefix k, continues each sample greedily from its first k true scales
     (varjax.extraction.extract), batch by batch, saving progress so an interrupted job
     resumes;
  4. writes extraction.csv, the image grids of the best and worst candidates and
     extraction.json (what ran), then refreshes the run's analysis (its report gains the
     "Extraction" section, varjax.analysis.extraction).

Shape letters: N samples, L tokens, K scales, P prefixes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from varjax import extraction
from varjax.errors import VarjaxError
from varjax.runfiles import atomic_save_npz, atomic_write_text, write_csv

CSV = "extraction.csv"
INFO = "extraction.json"
PROGRESS = ".extraction_progress.npz"
COLUMNS = ("sample", "split", "label", "source", "prefix_scales", "identical_tokens", "identical_share",
           "free_identical_share", "ssim", "sscd", "extracted", "candidate", "rank_by", "rank_score", "class_rank")
RANKS = ("accuracy", "nmu", "loss")
SSIM_THRESHOLD = 0.75  # offline stand-in for the published SSCD > 0.75 (see docs/memorization.md)
GRID = 8  # candidates in each best / worst grid


class ExtractionError(VarjaxError):
    """A run directory or setting the extraction job cannot use."""


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """One extraction job (experiments/extract.py documents each flag)."""

    run_dir: str
    checkpoint: str | None = None  # default: the run's own (run.json)
    rank: str = "accuracy"
    per_class: int = 5
    all_samples: bool = False  # continue every sample, not only the candidates
    prefix_scales: tuple[int, ...] | None = None  # default: (4,) with 10 scales, else 1..K-1
    batch_size: int = 64
    sscd: str | None = None
    ssim_threshold: float = SSIM_THRESHOLD
    report: bool = True

    def __post_init__(self):
        if self.rank not in RANKS:
            raise ExtractionError(f"--rank {self.rank!r}: choose one of {', '.join(RANKS)}")
        if self.per_class < 1 or self.batch_size < 1:
            raise ExtractionError("--per-class and --batch-size must be positive")


def default_prefixes(num_scales: int) -> tuple[int, ...]:
    """The published k = 4 on the 10-scale models; 1..K-1 on a smaller one (planted: 1, 2, 3)."""
    return (4,) if num_scales >= 10 else tuple(range(1, num_scales))


@dataclasses.dataclass(frozen=True)
class Candidates:
    """The samples to continue and how they rank.

    rows: (M,) positions in the run's samples (RunData order); score: (M,) the ranking value;
    class_rank: (M,) 1-based rank within (split, class); candidate: (M,) top `per_class`.
    """

    rows: np.ndarray
    score: np.ndarray
    class_rank: np.ndarray
    candidate: np.ndarray


def rank_samples(score: np.ndarray, higher: bool, split: np.ndarray, label: np.ndarray, ids: np.ndarray,
                 per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(class_rank (N,), candidate (N,)): rank by score within each (split, class), ties by lower id;
    NaN scores rank last. The published rule: top 5 per class by the last-scale accuracy."""
    key = np.where(np.isfinite(score), -score if higher else score, np.inf)
    rank = np.zeros(len(score), np.int64)
    for group in set(zip(split.tolist(), label.tolist())):
        sel = np.flatnonzero((split == group[0]) & (label == group[1]))
        order = sel[np.lexsort((ids[sel], key[sel]))]
        rank[order] = np.arange(1, len(order) + 1)
    return rank, rank <= per_class


def _fail(msg: str) -> None:
    raise ExtractionError(msg)


def _open_run(cfg: ExtractConfig):
    """(RunData, view tokens (N, L) in RunData order, rank score, higher is better)."""
    from varjax.analysis import load_run
    from varjax.errors import AnalysisError

    run_dir = Path(cfg.run_dir)
    if not (run_dir / "record.json").is_file():
        _fail(f"{run_dir}: no finished recording (record.json) to extract from")
    try:
        data = load_run(run_dir)
    except AnalysisError as e:
        _fail(str(e))
    if data.membership is None or not (run_dir / "view_tokens.npy").is_file():
        _fail(f"{run_dir} has no membership.csv / view_tokens.npy: record it with --membership conditional or both")
    tokens = np.load(run_dir / "view_tokens.npy", mmap_mode="r")
    if tokens.ndim != 2 or tokens.shape[0] < int(data.acts_rows.max()) + 1:
        _fail(f"view_tokens.npy has shape {tokens.shape}, which does not match samples.csv")
    tokens = np.asarray(tokens[data.acts_rows])
    if cfg.rank == "accuracy":
        return data, tokens, data.membership["acc_last"], True
    if cfg.rank == "loss":
        return data, tokens, data.membership["cond_loss"], False
    from varjax.analysis import compute
    from varjax.analysis.extraction import nmu_of

    return data, tokens, nmu_of(compute(data, n_permutations=0, planted=False)), True


def _load_model(cfg: ExtractConfig, data):
    import varjax
    from varjax.driver import weights_digest
    from varjax.errors import CheckpointError
    from varjax.scaling import UnitScaling

    path = cfg.checkpoint or (data.run_info or {}).get("checkpoint")
    if not path:
        _fail(f"{data.run_dir}/run.json names no checkpoint; pass --checkpoint")
    try:
        model = varjax.load(path)
    except CheckpointError as e:
        _fail(str(e))
    fp = (data.record_info or {}).get("fingerprint", {})
    if model.vqvae is None or model.var is None:
        _fail(f"{path} holds only part of the model; extraction needs the VQVAE and the VAR")
    if fp.get("weights_sha256") not in (None, weights_digest(model.params)):
        _fail(f"{path} is not the checkpoint {data.run_dir} was recorded with (its weights differ)")
    scaling = fp.get("unit_scaling")  # extraction runs the model the run recorded
    scaling = UnitScaling(scaling["mode"], tuple(tuple(u) for u in scaling["units"])) if scaling else None
    return model, path, scaling


def _sscd_embedder(path: str | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """The SSCD TorchScript file as a numpy function, loaded only when the user passes one."""
    if path is None:
        return None
    if not Path(path).is_file():
        _fail(f"--sscd {path}: no such file")
    try:
        import torch

        net = torch.jit.load(path, map_location="cpu").eval()
        probe = net(torch.zeros(1, 3, extraction.SSCD_SIZE, extraction.SSCD_SIZE))
        if probe.ndim != 2:
            raise ValueError(f"it returns shape {tuple(probe.shape)}, not (batch, dim)")
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is that file's problem
        _fail(f"--sscd {path}: not a usable SSCD TorchScript file ({str(e).splitlines()[0] if str(e) else type(e).__name__})")

    def embed(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.array(x, np.float32))).numpy()  # a writable copy

    return embed


class _Meter:
    """One progress line every few seconds: samples done, rate, ETA."""

    def __init__(self, total: int, done: int):
        self.total, self.start, self.t0, self.last = total, done, time.perf_counter(), 0.0

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < 5 and done < self.total:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        print(f"[extract] {done}/{self.total} continuations ({100 * done / self.total:.1f}%)  {rate:.1f}/s  "
              f"ETA {eta:.0f}s", file=sys.stderr, flush=True)


def _fingerprint(cfg: ExtractConfig, data, path: str, prefixes, rows: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(data.ids[rows], np.int64).tobytes()).hexdigest()
    fp = {"record": (data.record_info or {}).get("fingerprint", {}).get("rows_sha256"),
          "checkpoint": str(path), "prefixes": list(prefixes), "rows": h, "sscd": cfg.sscd}
    return json.dumps(fp, sort_keys=True)


@dataclasses.dataclass
class _Results:
    """Per prefix and continued sample: identical tokens, free share, SSIM, SSCD, done."""

    identical: np.ndarray  # int (P, M)
    free: np.ndarray  # (P, M)
    ssim: np.ndarray  # (P, M)
    sscd: np.ndarray  # (P, M), NaN without --sscd
    done: np.ndarray  # bool (P, M)

    @classmethod
    def fresh(cls, P: int, M: int) -> "_Results":
        nan = lambda: np.full((P, M), np.nan)  # noqa: E731
        return cls(np.zeros((P, M), np.int64), nan(), nan(), nan(), np.zeros((P, M), bool))

    def save(self, path: Path, fingerprint: str) -> None:
        atomic_save_npz(path, fingerprint=np.array(fingerprint), **dataclasses.asdict(self))

    @classmethod
    def resume(cls, path: Path, fingerprint: str, P: int, M: int) -> "_Results":
        if path.is_file():
            with np.load(path) as z:
                if str(z["fingerprint"]) == fingerprint and z["done"].shape == (P, M):
                    print(f"[extract] resuming: {int(z['done'].sum())} of {P * M} continuations done",
                          file=sys.stderr)
                    return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})
            print("[extract] the saved progress is for other settings; starting over", file=sys.stderr)
        return cls.fresh(P, M)


def _continue(model, scaling, tokens_K, labels, ids, prefixes, res: _Results, cfg: ExtractConfig, embed,
              save: Callable[[], None]) -> None:
    """Every continuation not yet done, in chunks of a few batches, saving after each chunk."""
    P, M = res.done.shape
    meter = _Meter(P * M, int(res.done.sum()))
    chunk = cfg.batch_size * 4
    try:
        for p, k in enumerate(prefixes):
            for lo in range(0, M, chunk):
                sel = np.arange(lo, min(lo + chunk, M))
                if res.done[p, sel].all():
                    continue
                ex = extraction.extract(model, [t[sel] for t in tokens_K], labels[sel], k, unit_scaling=scaling,
                                        batch_size=min(cfg.batch_size, M), return_images=embed is not None,
                                        sample_ids=ids[sel])
                res.identical[p, sel], res.free[p, sel], res.ssim[p, sel] = (ex.identical_tokens,
                                                                             ex.free_identical_share, ex.ssim)
                if embed is not None:
                    res.sscd[p, sel] = extraction.sscd_cosine(embed, ex.images, ex.originals)
                res.done[p, sel] = True
                save()
                meter(int(res.done.sum()))
    except KeyboardInterrupt:
        save()
        raise ExtractionError("interrupted; run the same command again to resume") from None


def _rows_csv(data, cand: Candidates, prefixes, res: _Results, cfg: ExtractConfig, L: int):
    # Published: SSCD cosine > 0.75; the offline stand-in: SSIM >= the threshold.
    extracted = res.sscd > extraction.SSCD_THRESHOLD if cfg.sscd else res.ssim >= cfg.ssim_threshold
    for p, k in enumerate(prefixes):
        for j, r in enumerate(cand.rows):
            yield [int(data.ids[r]), data.split[r], int(data.label[r]), data.source[r], k, int(res.identical[p, j]),
                   f"{res.identical[p, j] / L:.6g}", f"{res.free[p, j]:.6g}", f"{res.ssim[p, j]:.6g}",
                   "" if not cfg.sscd else f"{res.sscd[p, j]:.6g}", int(extracted[p, j]),
                   int(cand.candidate[j]), cfg.rank, f"{cand.score[j]:.6g}", int(cand.class_rank[j])]


def _grids(model, scaling, tokens_K, labels, ids, data, cand: Candidates, prefixes, res: _Results,
           out: Path) -> dict[str, str]:
    """figures/extraction_k{k}_{best,worst}.png: the candidates with the highest and lowest SSIM."""
    from varjax.analysis import F
    from varjax.analysis.memfigures import side_by_side

    (out / "figures").mkdir(exist_ok=True)
    paths = {}
    pool = np.flatnonzero(cand.candidate)
    for p, k in enumerate(prefixes):
        order = pool[np.lexsort((data.ids[cand.rows[pool]], -res.ssim[p, pool]))]
        for name, pick in (("best", order[:GRID]), ("worst", order[::-1][:GRID])):
            if len(pick) == 0:
                continue
            ex = extraction.extract(model, [t[pick] for t in tokens_K], labels[pick], k, unit_scaling=scaling,
                                    batch_size=len(pick), return_images=True, sample_ids=ids[pick])
            caps = [f"id {data.ids[cand.rows[j]]} {data.split[cand.rows[j]]} c{labels[j]}\n"
                    f"SSIM {res.ssim[p, j]:.3f}, same {res.identical[p, j]}/{model.config.var.seq_len}"
                    for j in pick]
            rel = f"figures/extraction_k{k}_{name}.png"
            F.save(side_by_side(ex.originals, ex.images, caps, f"Extraction, {k} scales forced: {name} {len(pick)}"),
                   out / rel)
            paths[f"k{k}_{name}"] = rel
    return paths


def run_extraction(cfg: ExtractConfig) -> dict:
    """The whole job (module docstring); returns extraction.json's content.

    Raises:
      ExtractionError (a VarjaxError): a run directory without what extraction needs, a
        checkpoint that is not the run's, a bad SSCD file, a prefix the model cannot take.
    """
    data, tokens, score, higher = _open_run(cfg)
    model, path, scaling = _load_model(cfg, data)
    embed = _sscd_embedder(cfg.sscd)
    pn = model.config.patch_nums
    prefixes = cfg.prefix_scales or default_prefixes(len(pn))
    bad = [k for k in prefixes if not 0 <= k <= len(pn)]
    if bad or tokens.shape[1] != model.config.var.seq_len:
        _fail(f"prefix scales must be in [0, {len(pn)}]" if bad else
              f"view_tokens.npy has {tokens.shape[1]} tokens per sample; the model has {model.config.var.seq_len}")
    rank, is_cand = rank_samples(score, higher, data.split, data.label, data.ids, cfg.per_class)
    rows = np.arange(len(data.ids)) if cfg.all_samples else np.flatnonzero(is_cand)
    cand = Candidates(rows, score[rows], rank[rows], is_cand[rows])
    out = Path(cfg.run_dir)
    fp = _fingerprint(cfg, data, path, prefixes, rows)
    finished = _finished(out, fp, cfg)
    if finished is not None:
        print("[extract] this extraction is done; rerun with other settings to recompute", file=sys.stderr)
        return _refresh(out, finished, cfg)
    res = _Results.resume(out / PROGRESS, fp, len(prefixes), len(rows))
    tokens_K = extraction.split_scales(tokens[rows], pn)
    labels, ids = data.label[rows], data.ids[rows]
    print(f"[extract] {len(rows)} samples ({int(cand.candidate.sum())} candidates by {cfg.rank}, top "
          f"{cfg.per_class} per class and split) x prefixes {list(prefixes)}", file=sys.stderr)
    t0 = time.perf_counter()
    _continue(model, scaling, tokens_K, labels, ids, prefixes, res, cfg, embed, lambda: res.save(out / PROGRESS, fp))
    seconds = time.perf_counter() - t0
    figures = _grids(model, scaling, tokens_K, labels, ids, data, cand, prefixes, res, out)
    write_csv(out / CSV, COLUMNS, _rows_csv(data, cand, prefixes, res, cfg, model.config.var.seq_len))
    info = {"checkpoint": str(path), "prefix_scales": list(prefixes), "rank": cfg.rank, "per_class": cfg.per_class,
            "all_samples": cfg.all_samples, "n_continued": len(rows), "n_candidates": int(cand.candidate.sum()),
            "view": "upstream's validation view: resize to round(1.125 S) (Lanczos), center crop S",
            "continuation": "the arg-max of the conditional logits (greedy, no CFG)",
            "extracted": (f"SSCD cosine > {extraction.SSCD_THRESHOLD} ({cfg.sscd})" if cfg.sscd else
                          f"SSIM >= {cfg.ssim_threshold} (an offline stand-in for SSCD cosine > 0.75)"),
            "unit_scaling": scaling.describe() if scaling else None, "seconds": round(seconds, 1),
            "figures": figures, "fingerprint": fp, "ssim_threshold": cfg.ssim_threshold}
    atomic_write_text(out / INFO, json.dumps(info, indent=1))
    (out / PROGRESS).unlink(missing_ok=True)
    return _refresh(out, info, cfg)


def _finished(out: Path, fp: str, cfg: ExtractConfig) -> dict | None:
    """extraction.json of a finished job with these settings, or None."""
    try:
        info = json.loads((out / INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = info.get("fingerprint") == fp and info.get("ssim_threshold") == cfg.ssim_threshold
    return info if same and (out / CSV).is_file() else None


def _refresh(out: Path, info: dict, cfg: ExtractConfig) -> dict:
    """The run's analysis again (its report gains or updates the Extraction section)."""
    if cfg.report:
        from varjax.study import reanalyze

        reanalyze(out)
    return info
