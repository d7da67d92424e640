"""Formatting shared by the reports (one run's report.md, a comparison's): numbers, markdown
tables, and results -> JSON (numpy to Python, NaN and inf to null)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """numpy -> Python, frozen dataclasses -> dicts; NaN and inf -> None (JSON has neither)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable({f.name: getattr(x, f.name) for f in dataclasses.fields(x)})
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def to_json(summary: dict) -> str:
    return json.dumps(jsonable(summary), indent=1, allow_nan=False) + "\n"


def pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals; n/a for None or NaN."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}%"


def num(x: Any, digits: int = 4) -> str:
    """Integers with thousands separators, floats to `digits` significant digits; n/a for None/NaN."""
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    return "n/a" if not math.isfinite(x) else f"{x:.{digits}g}"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table (cells escaped: `|` and newlines)."""
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
