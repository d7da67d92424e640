"""The analysis of a run directory, as a library: UnitMem tables, figures, the report.

In a notebook:

    from varjax import analysis
    run = analysis.load_run("runs/demo")          # the run's files, checked (RunData)
    a = analysis.compute(run)                      # every number of the report (Analysis)
    a.d_prime.table.u10                            # (blocks, sites) U10 counts, items 1-5
    a.d_prime.coverage.top[0].share                # share of U10 held by the top 1% of samples
    a.planted.groups["canary dup64"]               # on a planted run
    figs = analysis.figures(a, analysis.default_load_image)   # name -> matplotlib Figure
    analysis.F.u10_per_block(a.d_prime.table)      # one figure

and `analysis.analyze(run_dir)` writes them all (figures/, summary.json, report.md;
planted.json on a planted run), which is what `python experiments/run.py` does. Several runs
side by side (other depths, precisions): `analysis.compare(["runs/d16", "runs/d20"])` and
`analysis.compare_runs(run_dirs, out)` (experiments/compare.py).

Files: `rundir.py` (RunData, load_run), `compute.py` (Analysis, compute), `planted.py` (the
canary tests), `figures.py` (one function per figure), `report.py` (summary.json and
report.md), `questions.py` (the report's open questions), `fmt.py` (numbers, tables, JSON),
`outputs.py` (analyze: everything written), `compare.py` (runs side by side).
"""

from varjax.analysis import figures as F
from varjax.analysis.compare import Comparison, CompareError, compare, compare_runs
from varjax.analysis.compute import Analysis, DAllResult, DatasetResult, compute
from varjax.analysis.outputs import (
    analyze,
    analyze_planted_run,
    figures,
    planted_figure,
    write_planted,
)
from varjax.analysis.planted import PlantedAnalysis, analyze_planted, summary_text
from varjax.analysis.rundir import RunData, default_load_image, load_run
from varjax.errors import AnalysisError

__all__ = [
    "Analysis", "AnalysisError", "CompareError", "Comparison", "DAllResult", "DatasetResult", "F", "PlantedAnalysis",
    "RunData", "analyze", "analyze_planted", "analyze_planted_run", "compare", "compare_runs", "compute",
    "default_load_image", "figures", "load_run", "planted_figure", "summary_text", "write_planted",
]
