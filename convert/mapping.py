"""Torch state_dict key -> Flax param path, by the rule in docs/design.md.

The rule, not a table of guesses (upstream key names: FoundationVision/VAR `models/`):
1. split the key on `.`, glue each purely numeric component to the one before it with `_`
   (`blocks.3.ada_lin.1.weight` -> `blocks_3/ada_lin_1/weight`);
2. the leaf `weight` becomes `kernel` (Linear, transposed; Conv2d, OIHW -> HWIO), `scale`
   (GroupNorm) or `embedding` (the three embedding tables, unchanged);
3. everything else (`bias`, raw parameters such as `pos_1LC`) keeps its name and shape;
4. buffers that the model recomputes from its config are ignored, by an explicit list.

Every transform is an axis permutation, so the same entry maps shapes (a TSV of keys, the
check against the Flax tree) and arrays (convert/load.py `to_array`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from convert.errors import ConvertError

# Persistent buffers in upstream checkpoints; the Flax modules recompute them from the config.
IGNORED = (
    "lvl_1L",  # level id of each token
    "attn_bias_for_masking",  # the block-causal mask
    "blocks.*.attn.zero_k_bias",  # all zeros: attention has no key bias
    "quantize.ema_vocab_hit_SV",  # codebook usage statistics of training
)

# Modules whose 2-D `weight` is a lookup table (nn.Embedding), not a Linear.
EMBEDDINGS = ("class_emb", "lvl_embed", "quantize.embedding")

# Torch names that contain `_<digit>` themselves: upstream `mid.block_1`, `mid.attn_1`
# (while `down.0.block.1` becomes `down_0/block_1` too); the inverse map keeps them whole.
_LITERAL = {"mid": ("block_1", "block_2", "attn_1")}

# Axis permutations from the torch layout to the Flax layout.
_LINEAR = (1, 0)  # (out, in) -> (in, out)
_CONV = (2, 3, 1, 0)  # OIHW -> HWIO


@dataclasses.dataclass(frozen=True)
class Entry:
    """How one torch tensor becomes one Flax param."""

    key: str  # torch key, e.g. `blocks.0.ffn.fc1.weight`
    path: tuple[str, ...]  # Flax path, e.g. ('blocks_0', 'ffn', 'fc1', 'kernel')
    transform: str  # 'linear', 'conv', 'norm', 'embedding' or 'copy'
    axes: tuple[int, ...] | None  # permutation applied to the torch tensor, None: unchanged

    def shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The Flax shape of a torch tensor of this shape (the data: load.to_array)."""
        return tuple(torch_shape[a] for a in self.axes) if self.axes else tuple(torch_shape)


_IGNORED_RE = re.compile("|".join(re.escape(p).replace(r"\*", r"\d+") for p in IGNORED))


def is_ignored(key: str) -> bool:
    """True for a buffer on the ignore list (`*` matches one block index)."""
    return _IGNORED_RE.fullmatch(key) is not None


def entry(key: str, ndim: int) -> Entry:
    """The rule for one key whose tensor has `ndim` dimensions."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    if not parts or any(not p for p in parts):
        raise ConvertError(f"cannot map key {key!r}: empty name component")
    leaf, module = parts[-1], key.rsplit(".", 1)[0]
    if leaf != "weight":
        return Entry(key, tuple(parts), "copy", None)
    if module in EMBEDDINGS:
        if ndim != 2:
            raise ConvertError(f"cannot map key {key}: an embedding table must be 2-D, got {ndim}-D")
        return Entry(key, (*parts[:-1], "embedding"), "embedding", None)
    kinds = {1: ("scale", "norm", None), 2: ("kernel", "linear", _LINEAR), 4: ("kernel", "conv", _CONV)}
    if ndim not in kinds:
        raise ConvertError(f"cannot map key {key}: no rule for a {ndim}-D weight")
    name, transform, axes = kinds[ndim]
    return Entry(key, (*parts[:-1], name), transform, axes)


def torch_key(path: Iterable[str]) -> str:
    """The inverse rule: Flax path -> torch key (to name missing params in torch terms)."""
    out: list[str] = []
    for part in path:
        head, sep, tail = part.rpartition("_")
        literal = part in _LITERAL.get(out[-1] if out else "", ())
        if sep and tail.isdigit() and head and not literal:
            out += [head, tail]
        else:
            out.append(part)
    if out and out[-1] in ("kernel", "scale", "embedding"):
        out[-1] = "weight"
    return ".".join(out)


def plan(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, Entry], list[str]]:
    """Maps every key of a state_dict given as key -> shape.

    Returns:
      (entries, ignored): entries by torch key for the params, and the ignored buffer keys.
    Raises:
      ConvertError: a key without a rule, or two keys that map to the same param path.
    """
    entries: dict[str, Entry] = {}
    ignored: list[str] = []
    seen: dict[tuple[str, ...], str] = {}
    for key, shape in shapes.items():
        if is_ignored(key):
            ignored.append(key)
            continue
        e = entry(key, len(shape))
        if e.path in seen:
            raise ConvertError(f"keys {seen[e.path]} and {key} map to the same param {'/'.join(e.path)}")
        seen[e.path] = key
        entries[key] = e
    return entries, ignored

