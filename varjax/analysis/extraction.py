"""The extraction results of a run in its analysis: rates by split, NumMemUnits and role.

Reads `extraction.csv` and `extraction.json` (written by `experiments/extract.py`,
varjax/extraction_job.py) and summarises, per forced prefix k: the share extracted among
candidates and among every continued sample of each split, by NumMemUnits bins (U10(D_all)
when val samples are present, else U10(D')), and on a planted run per role and per canary.

Shape letters: N samples.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np

from varjax.analysis.rundir import RunData
from varjax.errors import AnalysisError

NMU_BINS = (0, 1, 3, 6, 11)  # lower edges: 0, 1-2, 3-5, 6-10, 11+


def nmu_of(a) -> np.ndarray:
    """(N,) NumMemUnits per sample of the run (RunData order): over U10(D_all) with val
    samples, else over U10(D') (NaN for samples outside those sets)."""
    data = a.data
    out = np.full(len(data.ids), np.nan)
    if a.d_all is not None:
        rows = np.flatnonzero(np.isin(data.split, ["train", "val"]))
        out[rows] = a.d_all.dataset.nmu
    else:
        out[a.rows] = a.d_prime.nmu
    return out


def _bin_label(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else (str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}")


@dataclasses.dataclass(frozen=True)
class Rate:
    """n samples, of which `extracted`; mean SSIM and mean share of generated tokens equal."""

    n: int
    extracted: int
    ssim: float
    free_identical: float

    @property
    def rate(self) -> float:
        return self.extracted / self.n if self.n else float("nan")


def _rate(sel: np.ndarray, ext: np.ndarray, ssim: np.ndarray, free: np.ndarray) -> Rate:
    n = int(sel.sum())
    mean = lambda v: float(np.nanmean(v[sel])) if n else float("nan")  # noqa: E731
    return Rate(n, int(ext[sel].sum()), mean(ssim), mean(free))


@dataclasses.dataclass(frozen=True, eq=False)
class ExtractionAnalysis:
    """Per prefix k: {group: Rate} for splits (candidates and all continued), NumMemUnits
    bins and planted roles; per canary its rows. info: extraction.json."""

    info: dict
    prefixes: tuple[int, ...]
    by_split: dict[int, dict[str, Rate]]
    by_nmu: dict[int, dict[str, Rate]]
    by_role: dict[int, dict[str, Rate]] | None
    canaries: list[dict] | None


def _read(run_dir) -> tuple[dict, dict[str, np.ndarray]] | None:
    path, info_path = run_dir / "extraction.csv", run_dir / "extraction.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        cols = {k: np.array([r[k] for r in rows]) for k in ("sample", "split", "source", "prefix_scales",
                                                            "ssim", "free_identical_share", "extracted", "candidate")}
        for k in ("sample", "prefix_scales", "extracted", "candidate"):
            cols[k] = cols[k].astype(np.int64)
        for k in ("ssim", "free_identical_share"):
            cols[k] = cols[k].astype(np.float64)
    except (KeyError, ValueError, json.JSONDecodeError) as e:
        raise AnalysisError(f"extraction.csv / extraction.json cannot be read: {e}") from None
    return info, cols


def analyze_extraction(data: RunData, nmu: np.ndarray) -> ExtractionAnalysis | None:
    """The extraction section's numbers; None without extraction.csv.

    Args:
      data: the run; nmu: (N,) NumMemUnits per sample in RunData order (`nmu_of`).
    """
    got = _read(data.run_dir)
    if got is None:
        return None
    info, c = got
    pos = {int(i): p for p, i in enumerate(data.ids)}
    nmu_row = np.array([nmu[pos[i]] if i in pos else np.nan for i in c["sample"]])
    prefixes = tuple(sorted(set(c["prefix_scales"].tolist())))
    by_split, by_nmu, by_role, canaries = {}, {}, {}, []
    from varjax.data.planted import parse_role

    roles = [parse_role(s) for s in c["source"]]
    planted = all(r is not None for r in roles)
    for k in prefixes:
        at = c["prefix_scales"] == k
        r = lambda sel: _rate(at & sel, c["extracted"], c["ssim"], c["free_identical_share"])  # noqa: E731
        by_split[k] = {}
        for sp in dict.fromkeys(c["split"].tolist()):
            by_split[k][f"{sp}, candidates"] = r((c["split"] == sp) & (c["candidate"] == 1))
            by_split[k][f"{sp}, all continued"] = r(c["split"] == sp)
        edges = list(NMU_BINS) + [None]
        by_nmu[k] = {_bin_label(lo, hi): r((nmu_row >= lo) & ((nmu_row < hi) if hi is not None else True))
                     for lo, hi in zip(edges[:-1], edges[1:])}
        if planted:
            names = np.array([f"canary dup{x.dup}" if x.kind == "canary" else x.kind for x in roles])
            by_role[k] = {g: r(names == g) for g in sorted(set(names), key=lambda g: -max(
                x.dup for x, n in zip(roles, names) if n == g))}
    if planted:
        for i in dict.fromkeys(c["sample"][[x.kind == "canary" for x in roles]].tolist()):
            sel = c["sample"] == i
            j = np.flatnonzero(sel)
            canaries.append({"sample": i, "source": str(c["source"][j[0]]), "dup": roles[j[0]].dup,
                             "num_mem_units": float(nmu_row[j[0]]),
                             "by_prefix": {int(c["prefix_scales"][x]): {"ssim": float(c["ssim"][x]),
                                                                        "free_identical_share": float(c["free_identical_share"][x]),
                                                                        "extracted": bool(c["extracted"][x])}
                                           for x in j}})
        canaries.sort(key=lambda d: (-d["dup"], d["sample"]))
    return ExtractionAnalysis(info, prefixes, by_split, by_nmu, by_role if planted else None,
                              canaries if planted else None)


def summary(e: ExtractionAnalysis | None) -> dict:
    """summary.json's `extraction` entry (None without extraction.csv)."""
    if e is None:
        return {"extraction": None}
    conv = lambda d: {str(k): {g: {**dataclasses.asdict(v), "rate": v.rate} for g, v in groups.items()}  # noqa: E731
                      for k, groups in d.items()}
    return {"extraction": {"info": e.info, "by_split": conv(e.by_split), "by_num_mem_units": conv(e.by_nmu),
                           "by_role": conv(e.by_role) if e.by_role else None, "canaries": e.canaries}}


def markdown(e: ExtractionAnalysis | None) -> list[str]:
    """The report's extraction section (empty without extraction.csv)."""
    from varjax.analysis.fmt import num, pct, table

    if e is None:
        return []
    i = e.info
    lines = ["## Extraction", "",
             f"`python experiments/extract.py RUN_DIR`: each sample's first k scales of true tokens forced "
             f"(k = {', '.join(map(str, e.prefixes))}), every later scale takes {i.get('continuation', 'the greedy choice')}, "
             f"decoded and compared with the decode of its own true tokens. View: {i.get('view', 'n/a')}. "
             f"Candidates: top {i.get('per_class')} per class and split by {i.get('rank')} "
             f"({i.get('n_candidates')} of {i.get('n_continued')} continued). Extracted: {i.get('extracted')}. "
             "`free same` is the share of the generated (not forced) tokens equal to the true ones.", ""]

    def block(title: str, groups: dict[int, dict[str, Rate]]) -> list[str]:
        names = list(dict.fromkeys(g for d in groups.values() for g in d))
        rows = [[g] + [f"{pct(groups[k][g].rate)} ({groups[k][g].extracted}/{groups[k][g].n}); SSIM "
                       f"{num(groups[k][g].ssim, 3)}; free same {num(groups[k][g].free_identical, 3)}"
                       if g in groups[k] and groups[k][g].n else "n/a" for k in e.prefixes] for g in names]
        return [f"{title}:", ""] + table(["group"] + [f"k = {k}" for k in e.prefixes], rows) + [""]

    lines += block("By split", e.by_split) + block("By NumMemUnits (bins of its value)", e.by_nmu)
    if e.by_role:
        lines += block("By planted role", e.by_role)
    if e.canaries:
        rows = [[f"`{c['source']}`", c["dup"], num(c["num_mem_units"])]
                + [f"{'yes' if c['by_prefix'][k]['extracted'] else 'no'} (SSIM {num(c['by_prefix'][k]['ssim'], 3)})"
                   if k in c["by_prefix"] else "n/a" for k in e.prefixes] for c in e.canaries]
        lines += ["Per canary (extracted at each k):", ""]
        lines += table(["source", "copies", "NumMemUnits"] + [f"k = {k}" for k in e.prefixes], rows) + [""]
    for name, rel in (i.get("figures") or {}).items():
        lines += [f"![extraction {name}]({rel})", ""]
    return lines
