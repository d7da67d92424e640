"""Random-weight checkpoints in the upstream layout, for tests and benchmarks.

`python -m convert.synthetic --tsv tests/data/checkpoint_keys/var_d16.tsv --out var_d16.pth`
writes a plain `torch.save(state_dict)` with every key and shape of the listing, so the
converter can be exercised at real size without the released weights.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Mapping
from pathlib import Path

import torch

from convert.layout import INT_BUFFERS
from convert.mapping import is_ignored


def read_tsv(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """A key listing (columns key, shape, dtype; header row) -> {key: (shape, dtype)}."""
    rows = Path(path).read_text().splitlines()
    out = {}
    for line in rows[1:]:
        if line.strip():
            key, shape, dtype = line.split("\t")
            out[key] = (tuple(ast.literal_eval(shape)), dtype)
    return out


def tsv_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """A key listing -> {key: shape}."""
    return {k: shape for k, (shape, _) in read_tsv(path).items()}


def state_dict(
    shapes: Mapping[str, tuple[int, ...]], seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random params N(0, 0.02^2) of the given shapes; buffers zero (int64 for `lvl_1L`).

    Args:
      shapes: key -> shape, in the order the state_dict should have.
      seed: seeds a torch.Generator, so equal arguments give equal tensors.
      dtype: of the float tensors (bf16/fp16 to exercise the converter's cast).
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key in INT_BUFFERS:
            out[key] = torch.zeros(shape, dtype=torch.int64)
        elif is_ignored(key):
            out[key] = torch.zeros(shape, dtype=dtype)
        else:
            out[key] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    return out


def state_dict_from_tsv(tsv_path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """`state_dict` with every key and shape of a key listing."""
    return state_dict(tsv_shapes(tsv_path), seed, dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m convert.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--tsv", required=True, help="key listing (tests/data/checkpoint_keys/*.tsv)")
    parser.add_argument("--out", required=True, help="the .pth file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args(argv)
    sd = state_dict_from_tsv(args.tsv, args.seed, getattr(torch, args.dtype))
    torch.save(sd, args.out)
    print(f"wrote {args.out}: {len(sd)} tensors, {sum(t.numel() for t in sd.values()) / 1e6:.1f}M values")


if __name__ == "__main__":
    main()
