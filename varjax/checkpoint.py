"""The converted-checkpoint directory: written by `python -m convert`, read by `varjax.load`.

    DIR/params/         orbax checkpoint of {"vqvae": {...}, "var": {...}} (float32 arrays)
    DIR/config.json     varjax.config.ModelConfig
    DIR/manifest.json   sources (path, sha256, keys), detected config, versions, timing

Writing is atomic: everything goes to a hidden sibling directory that is renamed into place
at the end, so an interrupted or failed conversion leaves no DIR behind. Needs no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from varjax.config import ModelConfig
from varjax.errors import CheckpointError

FORMAT = "varjax.converted/1"  # manifest["format"]; bump when the layout changes
PARAMS = "params"
CONFIG = "config.json"
MANIFEST = "manifest.json"


def load_converted(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a converted directory.

    Returns:
      (config, params): params is {"vqvae": tree, "var": tree} with the parts that config
      has, every leaf a float32 numpy array.
    Raises:
      CheckpointError: missing directory, missing or unreadable files, or parts that
      disagree with config.json.
    """
    d = Path(directory)
    if not d.exists():
        raise CheckpointError(f"{d}: no such directory")
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    missing = [n for n in (MANIFEST, CONFIG, PARAMS) if not (d / n).exists()]
    if missing:
        raise CheckpointError(
            f"{d}: not a converted checkpoint (no {', '.join(missing)}); convert with python -m convert"
        )
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        fmt = manifest.get("format")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{d}: unreadable {MANIFEST} ({err})") from None
    if fmt != FORMAT:
        raise CheckpointError(f"{d}: checkpoint format {fmt!r}, this varjax reads {FORMAT!r}; convert again")
    try:
        config = ModelConfig.from_json((d / CONFIG).read_text())
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{d}: unreadable {CONFIG} ({type(err).__name__}: {err})") from None
    params = _restore(d / PARAMS)
    want = {p for p in ("vqvae", "var") if getattr(config, p) is not None}
    if set(params) != want:
        raise CheckpointError(f"{d}: params hold {sorted(params)} but {CONFIG} describes {sorted(want)}")
    return config, params


def _restore(path: Path) -> dict[str, Any]:
    import jax
    import orbax.checkpoint as ocp

    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            meta = ckptr.metadata(path.absolute()).item_metadata.tree
            # Host numpy arrays whatever was saved: no device placement, no sharding info needed.
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
            tree = ckptr.restore(path.absolute(), args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    except Exception as err:  # noqa: BLE001 -- orbax raises many types; report one line
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path}: cannot read params ({type(err).__name__}: {first})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: params are a {type(tree).__name__}, expected a dict")
    return jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), tree)


def check_target(directory: str | os.PathLike, force: bool) -> None:
    """Raises CheckpointError unless `directory` may be written (or replaced, with force).

    Even with force, only an earlier converted checkpoint or an empty directory is replaced:
    a mistyped --out never deletes anything else. The nearest existing ancestor of
    `directory`'s parent must be a writable directory (the output is made beside it).
    """
    d = Path(directory)
    _check_parent(d)
    if not d.exists() and not d.is_symlink():
        return
    if not d.is_dir() or d.is_symlink():
        raise CheckpointError(f"{d} exists and is not a directory; not replacing it")
    if not force:
        raise CheckpointError(f"{d} exists; pass --force to replace it")
    try:
        ours = json.loads((d / MANIFEST).read_text()).get("format", "").startswith("varjax.converted/")
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours and any(d.iterdir()):
        raise CheckpointError(f"{d} is not a converted checkpoint; not replacing it, even with --force")


def _check_parent(d: Path) -> None:
    """Raises CheckpointError unless the nearest existing ancestor of `d` is a writable directory."""
    p = d.absolute().parent
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise CheckpointError(f"cannot write {d}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {d}: {p} is not writable")


def write_converted(
    directory: str | os.PathLike,
    config: ModelConfig,
    params: dict[str, Any],
    manifest: dict[str, Any],
    force: bool = False,
) -> Path:
    """Writes params, config and manifest to `directory`, atomically.

    Args:
      params: {"vqvae": tree, "var": tree} (either may be absent) of float32 arrays (numpy
        or host jax arrays).
      manifest: JSON-able; `format` is added.
      force: replace an existing directory (only once the new one is complete).
    Returns:
      The directory written (absolute).
    """
    import orbax.checkpoint as ocp

    out = Path(directory).absolute()
    check_target(out, force)
    made = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        # A synchronous checkpointer: nothing is still writing once save returns or raises.
        # Uncompressed: float weights shrink by ~8% at the cost of most of the write time.
        handler = ocp.PyTreeCheckpointHandler(use_compression=False, save_concurrent_gb=1)
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(tmp / PARAMS, args=ocp.args.PyTreeSave(params))
        (tmp / CONFIG).write_text(config.to_json() + "\n")
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, **manifest}, indent=1) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:  # put the previous checkpoint back before giving up
                try:
                    os.rename(old, out)
                except OSError:
                    raise CheckpointError(
                        f"{out}: replacing it failed; the previous checkpoint is at {old}") from None
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:  # KeyboardInterrupt included: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return out
