"""The run directory as the analysis reads it: `load_run(path) -> RunData`.

Reads what the recording pass wrote (docs/design.md, "Run directory"): `units.csv`,
`samples.csv`, and either `stats_{split}.npz` (streamed statistics) or `activations.npy`
(the full (N, U) matrix, needed for the median variant), plus the optional
`per_sample.csv`, `skipped.csv`, `run.json` and `record.json`; checks them against each
other and refuses a run recorded under other site definitions. Also reads directories that
other tools wrote (only `activations.npy`, `units.csv` and `samples.csv`).

Shape letters (varjax.names): N samples, U units, K scales.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from varjax import unitmem
from varjax.errors import AnalysisError, RecordError
from varjax.names import UnitLayout


@dataclasses.dataclass(frozen=True, eq=False)
class RunData:
    """The inputs of one run directory, validated against each other.

    Attributes:
      run_dir: where they were read.
      layout: where each of the U units sits.
      ids, split, label: (N,) per samples.csv row, less the rows listed in skipped.csv (the
        recording pass could not read those images; they are in no statistic); source: N strings.
      acts_rows: (N,) the row of each sample in activations.npy (= samples.csv row).
      stats: per split, UnitStats of shape (U,) (from stats_*.npz, else from the matrix).
      scale_stats: per split, UnitStats of shape (K, U) when the npz holds scale_* arrays.
      acts: (N_all, U) memmap of activations.npy, or None.
      loss: (N,) per-sample loss (NaN where unknown), or None without per_sample.csv.
      run_info: run.json, or None; record_info: record.json (the recording pass), or None.
      n_skipped: samples of samples.csv left out because skipped.csv lists them.
      stats_source: "stats_npz" or "activations".
      membership: {column: (N,) float} from membership.csv (varjax.membership.columns; NaN
        where a sample has no row), or None without the file.
    """

    run_dir: Path
    layout: UnitLayout
    ids: np.ndarray
    split: np.ndarray
    label: np.ndarray
    source: list[str]
    stats: dict[str, unitmem.UnitStats]
    scale_stats: dict[str, unitmem.UnitStats]
    acts: np.ndarray | None
    acts_rows: np.ndarray
    loss: np.ndarray | None
    run_info: dict | None
    record_info: dict | None
    n_skipped: int
    stats_source: str
    membership: dict[str, np.ndarray] | None = None

    @property
    def primary(self) -> str:
        """The study's dataset D': split `train`, else the first split present."""
        return "train" if "train" in self.stats else next(iter(self.stats))

    def rows_of(self, split: str) -> np.ndarray:
        """(n,) positions (into ids, label, ...) of the samples of one split."""
        return np.flatnonzero(self.split == split)


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise AnalysisError(f"missing {path.name} in {path.parent}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise AnalysisError(f"{path.name} lacks column(s) {', '.join(missing)}")
        return list(reader)


def _int(text: str, what: str) -> int:
    try:
        return int(text) if text.strip() != "" else -1  # an unknown label is -1
    except ValueError:
        raise AnalysisError(f"{what}: {text!r} is not an integer") from None


def _load_npz_stats(path: Path, n_units: int,
                    n_samples: int) -> tuple[unitmem.UnitStats, unitmem.UnitStats | None]:
    """One stats_{split}.npz, checked against units.csv and samples.csv; scale stats or None."""
    with np.load(path) as z:
        missing = [k for k in ("max", "argmax", "sum", "count") if k not in z]
        if missing:
            raise AnalysisError(f"{path.name} lacks {', '.join(missing)}")
        st = unitmem.UnitStats(z["max"], z["argmax"].astype(np.int64), z["sum"].astype(np.float64),
                               int(z["count"]))
        scale = None
        if all(f"scale_{k}" in z for k in ("max", "argmax", "sum")):
            scale = unitmem.UnitStats(z["scale_max"], z["scale_argmax"].astype(np.int64),
                                      z["scale_sum"].astype(np.float64), st.count)
    for name, arr in (("max", st.max), ("argmax", st.argmax), ("sum", st.sum)):
        if arr.shape != (n_units,):
            raise AnalysisError(f"{path.name}: {name} has shape {arr.shape}, units.csv has {n_units} units")
    if st.count != n_samples:
        raise AnalysisError(f"{path.name}: count {st.count} but samples.csv has {n_samples} such samples")
    if scale is not None and (scale.max.ndim != 2 or scale.max.shape[1] != n_units
                              or scale.argmax.shape != scale.max.shape or scale.sum.shape != scale.max.shape):
        raise AnalysisError(f"{path.name}: scale_* arrays must be (K, {n_units}), got {scale.max.shape}")
    return st, scale


def _read_layout(run_dir: Path) -> UnitLayout:
    units = _read_csv(run_dir / "units.csv", ("unit", "block", "site", "index"))
    if not units:
        raise AnalysisError("units.csv and samples.csv must each have at least one row")
    if [_int(u["unit"], "units.csv unit") for u in units] != list(range(len(units))):
        raise AnalysisError("units.csv: row u must describe unit (column) u, in order 0..U-1")
    return UnitLayout.from_columns(np.array([_int(u["block"], "units.csv block") for u in units]),
                                   [u["site"] for u in units],
                                   np.array([_int(u["index"], "units.csv index") for u in units]))


def _read_split_stats(run_dir: Path, split: np.ndarray, n_units: int):
    """{split: UnitStats} and {split: per-scale UnitStats} from the stats_*.npz files."""
    stats, scale_stats = {}, {}
    for path in sorted(run_dir.glob("stats_*.npz")):
        name = path.stem[len("stats_"):]
        n = int((split == name).sum())
        if n == 0:
            raise AnalysisError(f"{path.name} present but samples.csv has no '{name}' samples")
        stats[name], sc = _load_npz_stats(path, n_units, n)
        if sc is not None:
            scale_stats[name] = sc
    return stats, scale_stats


def _read_infos(run_dir: Path) -> tuple[dict | None, dict | None]:
    """run.json and record.json (None where absent); refuses other site definitions."""
    infos = {}
    for name in ("run.json", "record.json"):
        infos[name] = None
        if (run_dir / name).is_file():
            try:
                infos[name] = json.loads((run_dir / name).read_text())
            except json.JSONDecodeError as e:
                raise AnalysisError(f"{name} is not valid JSON: {e}") from None
    if infos["record.json"] is not None:
        from varjax.driver import check_sites

        try:
            check_sites(infos["record.json"].get("fingerprint", {}), run_dir)
        except RecordError as e:
            raise AnalysisError(str(e)) from None
    return infos["run.json"], infos["record.json"]


def load_run(run_dir: Path | str) -> RunData:
    """Reads and cross-checks a run directory.

    Raises:
      AnalysisError: a missing or inconsistent file (one-line message naming it).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"run directory {run_dir} does not exist")
    layout = _read_layout(run_dir)
    n_units = layout.n_units
    rows = _read_csv(run_dir / "samples.csv", ("sample", "split", "label", "source"))
    if not rows:
        raise AnalysisError("units.csv and samples.csv must each have at least one row")
    ids = np.array([_int(r["sample"], "samples.csv sample") for r in rows], np.int64)
    if len(np.unique(ids)) != len(ids):
        raise AnalysisError("samples.csv: sample ids are not unique")
    acts = None
    if (run_dir / "activations.npy").is_file():
        acts = np.load(run_dir / "activations.npy", mmap_mode="r")
        if acts.shape != (len(ids), n_units):
            raise AnalysisError(f"activations.npy has shape {acts.shape} but samples.csv has "
                                f"{len(ids)} rows and units.csv {n_units} units")
    skipped = set()
    if (run_dir / "skipped.csv").is_file():
        skipped = {_int(r["sample"], "skipped.csv sample")
                   for r in _read_csv(run_dir / "skipped.csv", ("sample",))}
    acts_rows = np.array([r for r, i in enumerate(ids) if int(i) not in skipped], np.int64)
    n_all = len(ids)
    rows = [rows[r] for r in acts_rows]
    ids = ids[acts_rows]
    split = np.array([r["split"] for r in rows])
    label = np.array([_int(r["label"], "samples.csv label") for r in rows], np.int64)
    stats, scale_stats = _read_split_stats(run_dir, split, n_units)
    stats_source = "stats_npz"
    if not stats:
        if acts is None:
            raise AnalysisError(f"{run_dir} has neither stats_*.npz nor activations.npy")
        stats_source = "activations"
        stats = {s: unitmem.stats_from_matrix(acts, ids[split == s], acts_rows[split == s])
                 for s in dict.fromkeys(split.tolist())}
    missing = [s for s in dict.fromkeys(split.tolist()) if s not in stats]
    if missing:
        raise AnalysisError(f"samples.csv has split(s) {', '.join(missing)} without stats_*.npz")
    for name, st in stats.items():
        if st.count < 2:
            raise AnalysisError(f"split '{name}' has {st.count} sample(s); UnitMem needs at least 2")

    loss = None
    if (run_dir / "per_sample.csv").is_file():
        per = _read_csv(run_dir / "per_sample.csv", ("sample", "loss"))
        by_id = {_int(r["sample"], "per_sample.csv sample"): r["loss"] for r in per}
        loss = np.array([float(by_id[i]) if by_id.get(i, "") != "" else np.nan for i in ids])
    run_info, record_info = _read_infos(run_dir)
    recorded = (record_info or {}).get("fingerprint", {}).get("sites")
    if recorded is not None and set(recorded) != set(layout.sites):
        raise AnalysisError(f"units.csv has the sites {', '.join(layout.sites)} but record.json recorded "
                            f"{', '.join(recorded)}")
    return RunData(run_dir, layout, ids, split, label, [r["source"] for r in rows], stats, scale_stats,
                   acts, acts_rows, loss, run_info, record_info, n_all - len(acts_rows), stats_source,
                   _read_membership(run_dir, ids))


def _read_membership(run_dir: Path, ids: np.ndarray) -> dict[str, np.ndarray] | None:
    """membership.csv's columns aligned with `ids` (NaN where absent), or None without it."""
    path = run_dir / "membership.csv"
    if not path.is_file():
        return None
    rows = _read_csv(path, ("sample", "acc_last"))
    by_id = {_int(r["sample"], "membership.csv sample"): r for r in rows}
    out = {}
    for col in [c for c in rows[0] if c != "sample"] if rows else ["acc_last"]:
        try:
            out[col] = np.array([float(by_id[i][col]) if i in by_id else np.nan for i in ids])
        except (TypeError, ValueError):
            raise AnalysisError(f"membership.csv: column {col} holds a value that is not a number") from None
    return out


def default_load_image(source: str, base: Path | None = None) -> np.ndarray | None:
    """Opens `source` with PIL if it names an existing file (as is, or relative to base)."""
    from PIL import Image

    for path in (Path(source), (base / source) if base else None):
        if path is not None and path.is_file():
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
    return None
