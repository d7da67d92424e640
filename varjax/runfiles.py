"""Files of a run directory (docs/design.md), each written atomically.

Every file goes to a temporary name in the same directory first and is renamed into place
(`os.replace` is atomic on POSIX), so an interrupted run never leaves a truncated file that
looks complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from varjax.names import UnitLayout


# skipped.csv: one row per image that could not be read (docs/design.md)
SKIPPED_COLUMNS = ("sample", "source", "reason")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_save_npz(path: Path | str, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_csv(path: Path | str, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_units_csv(path: Path | str, layout: "UnitLayout") -> None:
    """units.csv: unit, block, site, index, one row per unit column (a varjax.names.UnitLayout)."""
    write_csv(path, ("unit", "block", "site", "index"), layout.rows())


def stderr_log():
    """A `log(msg)` that prints msg to stderr behind the seconds since this call."""
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return log
