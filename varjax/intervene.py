"""The intervention job on a run directory: scale chosen units down, measure before and after.

`intervene(run_dir, InterveneConfig())` (experiments/intervene.py) rebuilds the run's model and
samples from its own files (run.json, record.json: checked, so a different checkpoint or data
is refused), chooses units from the run's UnitMem (`varjax.intervention`), and measures each
condition: the baseline (no scaling), the chosen units, and `draws` random controls with the
same count per (site, block), all scaled by one factor; with `per_sample`, also each target
sample's own units against controls of their size. Per condition:
  - the recording pass (`varjax.driver.record` with `Options(unit_scaling=...)`, the run's
    views, crops, precision and sites) gives per-sample teacher-forced loss and token accuracy
    on every split, and UnitMem on D' after scaling (the baseline: the run's own files);
  - the extraction attack (`varjax.extraction.extract`: the true tokens of the first k scales
    of upstream's validation view forced, greedy continuation) gives identical tokens and SSIM.
Each condition is saved atomically as `RUN_DIR/intervention/<name>.npz` once complete (its
recording pass, resumable by itself, in `RUN_DIR/intervention/<name>/`); a rerun skips done
conditions, and refuses a directory whose settings differ unless asked to restart.
The summary, files and report section: `varjax.analysis.intervention`.

Shape letters (varjax.names): N samples, U units, K scales, L tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from varjax import intervention as iv
from varjax.errors import InterventionError
from varjax.runfiles import atomic_save_npz, atomic_write_text

WORK_DIR = "intervention"
SETTINGS = "settings.json"
BASELINE = "baseline"


@dataclasses.dataclass(frozen=True)
class InterveneConfig:
    """The intervention's settings (experiments/intervene.py documents each flag)."""

    sites: tuple[str, ...] = ("ffn.fc1",)  # Kasliwal et al.: fc1 units only
    percent: float = 10.0  # top percent of the sites' units by UnitMem on D'
    scope: str = "global"  # "global" or "layer" (varjax.intervention.SCOPES)
    factor: float = 0.5
    mode: str = "weights"  # varjax.scaling.MODES
    draws: int = 5  # control draws
    seed: int = 0  # control draws' seed
    prefix_scales: tuple[int, ...] | None = None  # None: default_prefixes(patch_nums)
    batch_size: int | None = None  # None: the run's
    n_permutations: int = 10_000
    # Also, per sample: the `per_sample` D' samples owning the most chosen units (their argmax),
    # each with only its own units scaled, against `draws` controls of its own size.
    per_sample: int = 0
    checkpoint: str | None = None  # None: the run's own (run.json)
    restart: bool = False

    def check(self) -> None:
        from varjax.scaling import MODES

        if not self.sites:
            raise InterventionError("--sites: name at least one site")
        if not 0 < self.percent <= 100:
            raise InterventionError(f"--top-percent must be in (0, 100], got {self.percent}")
        if self.scope not in iv.SCOPES:
            raise InterventionError(f"--scope {self.scope!r}: expected one of {', '.join(iv.SCOPES)}")
        if not math.isfinite(self.factor) or self.factor < 0:
            raise InterventionError(f"--factor must be a finite number >= 0, got {self.factor}")
        if self.mode not in MODES:
            raise InterventionError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.draws < 1:
            raise InterventionError(f"--draws must be >= 1 (the control), got {self.draws}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InterventionError(f"--batch-size must be positive, got {self.batch_size}")
        if self.per_sample < 0:
            raise InterventionError(f"--per-sample must be >= 0, got {self.per_sample}")
        if self.n_permutations < 0:
            raise InterventionError(f"--permutations must be >= 0, got {self.n_permutations}")


def default_prefixes(patch_nums) -> tuple[int, ...]:
    """One k: the published 4 forced scales (of 10 at 256 px), or K - 2 on a model with fewer
    than 6 scales (2 of the planted model's 4: the shortest prefix from which its 64-copy
    canaries are regenerated; from 1 none is). One k keeps the conditions cheap: the attack
    decodes every sample per k and condition."""
    K = len(patch_nums)
    return (min(4, max(K - 2, 0)),)


@dataclasses.dataclass(frozen=True, eq=False)
class RunInputs:
    """What the conditions need, rebuilt from a run directory and checked against it.

    data: the run's files (varjax.analysis.RunData); model: its checkpoint; plan, views, opts:
    the recording pass as the run ran it (opts without per-scale statistics or activations);
    um: (U,) UnitMem on D' (mean variant); tokens_NL: (N, L) true tokens of upstream's
    validation view of each sample of `data` (row order), for extraction.
    """

    data: object
    model: object
    plan: object
    views: int
    opts: object
    um: np.ndarray
    tokens_NL: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Condition:
    """One measured setting: name ("baseline", "chosen", "control_3", "own_17",
    "own_17_control_0"), kind, draw, unit ids, and the sample whose own units it scales."""

    name: str
    kind: str  # "baseline", "chosen", "control", "own", "own_control"
    draw: int  # control draw index; -1 otherwise
    units: np.ndarray
    target: int = -1  # sample id of an "own" condition or its control; -1 otherwise


def _json(path: Path) -> dict:
    if not path.is_file():
        raise InterventionError(f"{path.parent} lacks {path.name} (not a finished run directory of experiments/run.py)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InterventionError(f"{path} is not valid JSON ({e})") from None


def _rebuild_plan(run_info: dict, record_info: dict):
    """The run's source, samples, its Plan as recorded (to check against record.json) and the
    Plan of the conditions: the same views without an appended center view (that view feeds
    only the membership scores, never the unit statistics, loss or accuracy)."""
    from varjax import data
    from varjax.record import Plan

    view = record_info["fingerprint"].get("view") or {}
    try:
        source = data.open_source(run_info["data"], data_dir=run_info.get("data_dir"))
        samples = data.select(source, n_classes=run_info.get("classes"), per_class=run_info.get("per_class"),
                              seed=run_info.get("seed", 0), splits=run_info.get("splits"))
        augment = data.AugmentConfig(resolution=view["resolution"], mid_reso=view["mid_reso"],
                                     views=view["views"], deterministic=view["deterministic"],
                                     center_view=view.get("center_view", False))
    except (KeyError, TypeError, ValueError) as e:
        raise InterventionError(f"run.json/record.json lack the data settings ({e})") from None
    seed = view.get("crop_seed", 0)
    recorded = Plan.from_samples(source, samples, augment, seed=seed)
    plan = Plan.from_samples(source, samples, dataclasses.replace(augment, center_view=False), seed=seed)
    return source, samples, recorded, plan, augment


def _check_fingerprint(model, plan, views: int, opts, record_info: dict, checkpoint: str) -> None:
    """Refuses a model or sample list other than the run's (record.json's fingerprint)."""
    # The driver's own fingerprint, so the check can never drift from what record.json holds.
    from varjax.driver import _fingerprint as fingerprint

    ours, theirs = fingerprint(model, plan, views, opts), record_info["fingerprint"]
    if ours["weights_sha256"] != theirs.get("weights_sha256") or ours["model"] != theirs.get("model"):
        raise InterventionError(f"checkpoint {checkpoint} is not the model this run was recorded with "
                                "(weights differ from record.json's)")
    for key in ("rows_sha256", "view", "splits"):
        if ours[key] != theirs.get(key):
            raise InterventionError(f"the samples rebuilt from run.json differ from the run's ({key}); "
                                    "the data source changed since the run was recorded")


def _view_tokens(model, source, samples, augment, data, batch: int = 64) -> np.ndarray:
    """(N, L) tokens of upstream's validation view (resize, center crop) of data's samples:
    the run's view_tokens.npy when it has one (the recording pass's), else tokenized here."""
    from varjax.data import AugmentConfig
    from varjax.data.augment import augment as make_views
    from varjax.driver import VIEW_TOKENS

    L = sum(p * p for p in model.config.patch_nums)
    if (data.run_dir / VIEW_TOKENS).is_file():
        tokens = np.load(data.run_dir / VIEW_TOKENS)
        if tokens.ndim != 2 or tokens.shape[1] != L or len(tokens) <= data.acts_rows.max(initial=-1):
            raise InterventionError(f"{VIEW_TOKENS} has shape {tokens.shape}; expected one row of {L} tokens "
                                    "per samples.csv row")
        return np.asarray(tokens[data.acts_rows], np.int32)
    val = AugmentConfig(resolution=augment.resolution, mid_reso=augment.mid_reso, deterministic=True)
    by_id = {s.sample: s for s in samples}
    read = source.reader()
    out = []
    for lo in range(0, len(data.ids), batch):
        imgs = np.stack([make_views(read(by_id[int(i)].locator), int(i), val, 0)[0] for i in data.ids[lo:lo + batch]])
        out.append(np.concatenate([np.asarray(t) for t in model.tokenize(imgs)], axis=1))
    return np.concatenate(out)


def load_inputs(run_dir: Path, cfg: InterveneConfig, log: Callable[[str], None]) -> RunInputs:
    """Reads and checks the run directory, loads its model, rebuilds its samples."""
    import varjax
    from varjax import unitmem
    from varjax.analysis import load_run
    from varjax.errors import CheckpointError
    from varjax.record import Options

    if not run_dir.is_dir():
        raise InterventionError(f"run directory {run_dir} does not exist")
    run_info, record_info = _json(run_dir / "run.json"), _json(run_dir / "record.json")
    data = load_run(run_dir)
    if "val" not in data.stats:
        log("no val split: the utility (held-out loss) is not measured")
    checkpoint = cfg.checkpoint or run_info.get("checkpoint")
    if not checkpoint:
        raise InterventionError(f"{run_dir}/run.json names no checkpoint; pass --checkpoint")
    try:
        model = varjax.load(checkpoint)
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise InterventionError(f"cannot load checkpoint {checkpoint}: {str(e).splitlines()[0]}") from None
    fp = record_info.get("fingerprint", {})
    if fp.get("unit_scaling"):
        raise InterventionError(f"{run_dir} was itself recorded with scaled units; intervene on an unscaled run")
    source, samples, recorded, plan, augment = _rebuild_plan(run_info, record_info)
    run_opts = Options(batch_size=cfg.batch_size or record_info.get("batch_size", 8), precision=fp["precision"],
                       save_activations=fp["save_activations"], per_scale=fp["per_scale"],
                       class_dropout=fp["class_dropout"], seed=fp["seed"], attention=fp["attention"],
                       sites=tuple(fp["sites"]))
    _check_fingerprint(model, recorded, fp["num_views"], run_opts, record_info, checkpoint)
    iv.candidates(data.layout, cfg.sites)  # refuses sites the run did not record
    log(f"true tokens of upstream's validation view of {len(data.ids)} samples, for extraction")
    tokens = _view_tokens(model, source, samples, augment, data)
    opts = dataclasses.replace(run_opts, save_activations=False, per_scale=False)
    um = unitmem.unitmem_mean(data.stats[data.primary])
    return RunInputs(data, model, plan, fp["num_views"], opts, um, tokens)


def conditions(inputs: RunInputs, cfg: InterveneConfig) -> list[Condition]:
    """Baseline, the chosen units, then the control draws."""
    lay = inputs.data.layout
    chosen = iv.choose_top(inputs.um, lay, cfg.sites, cfg.percent, cfg.scope)
    out = [Condition(BASELINE, "baseline", -1, np.zeros(0, np.int64)), Condition("chosen", "chosen", -1, chosen)]
    out += [Condition(f"control_{d}", "control", d, u)
            for d, u in enumerate(iv.control_draws(lay, chosen, cfg.draws, cfg.seed))]
    d = inputs.data
    rows = d.rows_of(d.primary)
    for x, own in iv.own_targets(d.stats[d.primary].argmax, chosen, d.ids[rows], cfg.per_sample):
        out.append(Condition(f"own_{x}", "own", -1, own, x))
        out += [Condition(f"own_{x}_control_{j}", "own_control", j, u, x)
                for j, u in enumerate(iv.control_draws(lay, own, cfg.draws, cfg.seed, (x,)))]
    return out


def settings_key(cfg: InterveneConfig, inputs: RunInputs) -> dict:
    """What a condition's results depend on: a rerun with another key is refused. The number of
    draws is not in it (draw d does not depend on it): more draws add conditions, fewer reuse."""
    return {"sites": list(cfg.sites), "percent": cfg.percent, "scope": cfg.scope, "factor": cfg.factor,
            "mode": cfg.mode, "seed": cfg.seed, "prefix_scales": list(_prefixes(cfg, inputs)),
            "weights_sha256": inputs.data.record_info["fingerprint"]["weights_sha256"]}


def _prefixes(cfg: InterveneConfig, inputs: RunInputs) -> tuple[int, ...]:
    pn = inputs.model.config.patch_nums
    ks = cfg.prefix_scales if cfg.prefix_scales is not None else default_prefixes(pn)
    bad = [k for k in ks if not 0 <= k < len(pn)]
    if bad or not ks:
        raise InterventionError(f"--prefix-scales {list(ks)}: each must be in [0, {len(pn) - 1}] (the model has "
                                f"{len(pn)} scales)")
    return tuple(ks)


def _scaling(inputs: RunInputs, cond: Condition, cfg: InterveneConfig):
    from varjax.scaling import UnitScaling

    if cond.kind == "baseline":
        return None
    return UnitScaling(cfg.mode, iv.scaling_units(inputs.data.layout, cond.units, cfg.factor))


def _per_sample(run: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(loss, acc) per sample of `ids` from a run directory's per_sample.csv (NaN if absent)."""
    import csv

    if not (run / "per_sample.csv").is_file():
        raise InterventionError(f"{run} lacks per_sample.csv (the recording pass writes it)")
    with open(run / "per_sample.csv", newline="") as f:
        rows = {int(r["sample"]): (float(r["loss"]), float(r["acc"])) for r in csv.DictReader(f)}
    vals = np.array([rows.get(int(i), (np.nan, np.nan)) for i in ids], np.float64)
    return vals[:, 0], vals[:, 1]


def _record(inputs: RunInputs, cond: Condition, scaling, out: Path) -> dict[str, np.ndarray]:
    """The recording pass of one condition: per-sample loss and accuracy (data's row order) and
    UnitMem on D' of every unit. The baseline is the run itself: its own files hold exactly
    what an unscaled pass computes (tests/test_intervention.py: factor 1 changes nothing)."""
    from varjax import unitmem
    from varjax.driver import record

    if scaling is None:
        loss, acc = _per_sample(inputs.data.run_dir, inputs.data.ids)
        return {"loss": loss, "acc": acc, "um": inputs.um}
    record(inputs.model, inputs.plan, out, inputs.views, dataclasses.replace(inputs.opts, unit_scaling=scaling))
    loss, acc = _per_sample(out, inputs.data.ids)
    with np.load(out / f"stats_{inputs.data.primary}.npz") as z:
        st = unitmem.UnitStats(z["max"], z["argmax"].astype(np.int64), z["sum"].astype(np.float64), int(z["count"]))
    return {"loss": loss, "acc": acc, "um": unitmem.unitmem_mean(st)}


def _extract(inputs: RunInputs, scaling, ks, batch: int) -> dict[str, np.ndarray]:
    """Greedy continuation from k true scales, per k: identical share, free share, SSIM."""
    from varjax.extraction import extract, split_scales

    d, pn = inputs.data, inputs.model.config.patch_nums
    toks = split_scales(inputs.tokens_NL, pn)
    out = {}
    for k in ks:
        ex = extract(inputs.model, toks, d.label, k, unit_scaling=scaling, batch_size=batch,
                     precision=inputs.opts.precision, sample_ids=d.ids)
        out[f"identical_share_k{k}"] = np.asarray(ex.identical_share, np.float64)
        out[f"free_share_k{k}"] = np.asarray(ex.free_identical_share, np.float64)
        out[f"ssim_k{k}"] = np.asarray(ex.ssim, np.float64)
    return out


def _prepare_dir(work: Path, key: dict, restart: bool) -> None:
    """Creates the work directory, or checks that its conditions used these settings."""
    path = work / SETTINGS
    if path.exists() and not restart:
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old != key:
            changed = sorted(k for k in set(key) | set(old or {}) if old is None or old.get(k) != key.get(k))
            raise InterventionError(f"{work} holds conditions measured with other settings "
                                    f"({', '.join(changed)}); rerun with --restart to discard them")
        return
    if restart and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(key, indent=1))


def _eta(done: int, total: int, elapsed: float) -> str:
    if done == 0:
        return "?"
    s = int(round(elapsed / done * (total - done)))
    return f"{s // 60}m{s % 60:02d}s"


def measure_all(run_dir: Path, inputs: RunInputs, cfg: InterveneConfig, conds: list[Condition],
                log: Callable[[str], None]) -> dict[str, dict[str, np.ndarray]]:
    """Every condition's arrays, measured or read back from `<run_dir>/intervention/`."""
    work = run_dir / WORK_DIR
    key = settings_key(cfg, inputs)
    _prepare_dir(work, key, cfg.restart)
    ks = _prefixes(cfg, inputs)
    results, todo = {}, [c for c in conds if not (work / f"{c.name}.npz").exists()]
    log(f"{len(conds)} conditions ({len(conds) - len(todo)} done before), {len(conds[1].units)} units chosen, "
        f"extraction from k = {', '.join(map(str, ks))} true scales")
    t0 = time.perf_counter()
    for j, cond in enumerate(todo):
        scaling = _scaling(inputs, cond, cfg)
        arrays = _record(inputs, cond, scaling, work / cond.name)
        arrays.update(_extract(inputs, scaling, ks, inputs.opts.batch_size * 4))
        atomic_save_npz(work / f"{cond.name}.npz", ids=inputs.data.ids, units=cond.units, **arrays)
        elapsed = time.perf_counter() - t0
        log(f"condition {cond.name} done ({j + 1}/{len(todo)}; {elapsed / (j + 1):.1f} s/condition, "
            f"ETA {_eta(j + 1, len(todo), elapsed)})")
    for cond in conds:
        with np.load(work / f"{cond.name}.npz") as z:
            if not np.array_equal(z["ids"], inputs.data.ids) or not np.array_equal(z["units"], cond.units):
                raise InterventionError(f"{work / cond.name}.npz belongs to another run or unit set; "
                                        "rerun with --restart")
            results[cond.name] = {k: z[k] for k in z.files}
    return results


def intervene(run_dir: Path | str, cfg: InterveneConfig = InterveneConfig(),
              log: Callable[[str], None] | None = None):
    """Runs (or resumes) the intervention on a run directory and writes its outputs.

    Returns:
      the `varjax.analysis.intervention.InterventionResult` (also in intervention.json).
    Raises:
      InterventionError (or another VarjaxError): bad settings or run directory, one line;
      nothing is written before the inputs are checked.
    """
    from varjax.analysis import intervention as out

    say = log or (lambda m: print(f"[intervene] {m}", file=sys.stderr, flush=True))
    run_dir = Path(run_dir)
    cfg.check()
    inputs = load_inputs(run_dir, cfg, say)
    conds = conditions(inputs, cfg)
    _prefixes(cfg, inputs)
    try:
        results = measure_all(run_dir, inputs, cfg, conds, say)
    except KeyboardInterrupt:
        raise InterventionError("interrupted; run the same command again to resume "
                                "(finished conditions are kept)") from None
    say("summary, tests, figure, report section")
    res = out.summarize(inputs.data, conds, results, cfg, _prefixes(cfg, inputs))
    out.write(run_dir, res)
    return res
