"""Read an upstream .pth safely and find the state_dict inside it (the torch side).

A .pth is a pickle: only `torch.load(..., weights_only=True)` is used, which refuses any
object but tensors and plain containers, so a checkpoint never runs code. Checkpoints of
upstream's trainer wrap the state_dict (`ckpt['trainer']['var_wo_ddp']`, `['vae_local']`);
DDP and torch.compile prefix keys with `module.` / `_orig_mod.`: both are unwrapped here.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from convert.detect import part_of
from convert.errors import ConvertError

PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
_MAX_DEPTH = 4  # how deep to look for a state_dict inside nested dicts
_LABEL = {"var": "VAR", "vqvae": "VQVAE"}
_FLAG = {"var": "--var", "vqvae": "--vae"}


def load_pth(path: Path) -> tuple[object, bool]:
    """torch.load with weights_only=True; every failure becomes a one-line ConvertError.

    Returns:
      (checkpoint, mmapped): mmapped tells whether tensors are backed by the file.
    """
    if not path.exists():
        raise ConvertError("no such file")
    if not path.is_file():
        raise ConvertError("not a file")
    # mmap (zip format only) reads tensors lazily: optimizer state in a trainer checkpoint
    # is never read, and the process does not hold a second copy of the weights.
    mmapped = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pickle-protocol notes: stderr stays one line
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmapped), mmapped
    except Exception as err:  # noqa: BLE001 -- any failure here means: not a usable checkpoint
        raise ConvertError(_load_error(err)) from None


def _load_error(err: Exception) -> str:
    text = str(err)
    if m := re.search(r"unsupported GLOBAL (\S+)", text):
        return (f"refused to unpickle {m.group(1)}: a checkpoint may hold only tensors and plain "
                "data (torch.load weights_only=True never runs code from a file)")
    if m := re.search(r"WeightsUnpickler error: \s*(.+)", text):
        return f"not a PyTorch checkpoint (unpickling failed: {m.group(1).strip()})"
    if "PytorchStreamReader" in text or "zip archive" in text:
        first = text.split(". ")[0]
        return f"truncated or corrupt checkpoint ({first})"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a PyTorch checkpoint ({type(err).__name__}: {first[:200]})"


def _strip(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Removes `module.` / `_orig_mod.` from every key while all keys share it."""
    removed = ""
    keys = list(sd)
    while keys:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            break
        removed += prefix
        keys = [k[len(prefix):] for k in keys]
    return dict(zip(keys, sd.values())), removed


def _candidates(obj: object):
    """Breadth-first: (where, tensors) for every dict holding tensors under string keys."""
    queue = collections.deque([("", obj, 0)])
    while queue:
        where, node, depth = queue.popleft()
        if isinstance(node, Mapping):
            tensors = {k: v for k, v in node.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if tensors:
                yield where, tensors
            children = node.items()
        elif isinstance(node, (list, tuple)):
            children = enumerate(node)
        else:
            continue
        if depth < _MAX_DEPTH:
            for k, v in children:
                if isinstance(v, (Mapping, list, tuple)):
                    queue.append((f"{where}['{k}']", v, depth + 1))


def find_state_dict(obj: object, part: str) -> tuple[dict[str, torch.Tensor], str]:
    """The VAR ('var') or VQVAE ('vqvae') state_dict in a loaded checkpoint.

    Returns:
      (state_dict, where): keys stripped of DDP/compile prefixes, and where it was found
      (e.g. "['trainer']['var_wo_ddp']", "" for a plain state_dict), for the manifest.
    """
    others = set()
    for where, tensors in _candidates(obj):
        sd, prefix = _strip(tensors)
        found = part_of(sd)
        if found == part:
            return sd, where + (f" (prefix {prefix!r} removed)" if prefix else "")
        if found is not None:
            others.add(found)
    if others:
        other = others.pop()
        raise ConvertError(f"looks like a {_LABEL[other]} checkpoint, pass it with {_FLAG[other]}")
    if isinstance(obj, torch.Tensor):
        raise ConvertError("holds a single tensor, not a state_dict")
    raise ConvertError(f"no {_LABEL[part]} state_dict in this file (found {_describe(obj)})")


def _describe(obj: object) -> str:
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    if not obj:
        return "an empty dict"
    keys = ", ".join(str(k) for k in list(obj)[:4])
    return f"a dict with keys {keys}{' ...' if len(obj) > 4 else ''}"


def to_array(tensor: torch.Tensor, key: str, axes: tuple[int, ...] | None, mmapped: bool) -> np.ndarray:
    """A float tensor (float32, bf16, fp16, fp64) as a C-contiguous float32 numpy copy.

    Args:
      axes: permutation applied on the way (the mapping's transform), None: unchanged.
      mmapped: the tensor is backed by the checkpoint file; its pages are released after
        the copy, so peak memory stays about one copy of the weights.
    """
    if not tensor.is_floating_point():
        raise ConvertError(f"{key} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected floats")
    t = tensor.detach().to(torch.float32)
    # Always a copy: the converted params never alias the checkpoint file. torch's kernel
    # is ~3x faster than numpy's for the 2-D transposes, numpy's faster for the rest.
    if axes is not None and len(axes) == 2:
        out = t.permute(axes).clone(memory_format=torch.contiguous_format).numpy()
    else:
        view = t.numpy().transpose(axes) if axes else t.numpy()
        out = np.array(view, dtype=np.float32, order="C", copy=True)
    if mmapped:
        _release(tensor)
    return out


_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        _libc = None
_MADV_DONTNEED = 4


def _release(tensor: torch.Tensor) -> None:
    """Drops the file pages of an mmap-loaded tensor from the resident set.

    Only for file-backed (mmap) tensors that are never written: those pages are clean, so
    the kernel re-reads them from the file if touched again. (On anonymous memory the same
    call would zero the data: never call it for a tensor that torch read into memory.)
    """
    if _libc is None:
        return
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    if size:
        lo = start - start % mmap.PAGESIZE
        _libc.madvise(lo, start + size - lo, _MADV_DONTNEED)  # best effort: a failure only costs memory
