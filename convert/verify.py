"""Check a mapped state_dict against the exact Flax param tree of its config.

The expected tree is `varjax.model.param_shapes` (`jax.eval_shape` of the Flax modules'
init, the tree `init_params` fills): shapes only, no weights are allocated. Any missing, unexpected or misshaped param is one ConvertError line.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from flax.traverse_util import flatten_dict

from convert.errors import ConvertError
from convert.mapping import Entry, torch_key
from varjax.config import ModelConfig

Path_ = tuple[str, ...]
_SHOW = 1  # keys named per problem; the rest are counted ("(+2 more)")


def abstract_params(part: str, config: ModelConfig) -> dict[Path_, tuple[int, ...]]:
    """{Flax path: shape} of the 'var' or 'vqvae' params for this config (all float32)."""
    return dict(_abstract_params(part, config))


@functools.lru_cache(maxsize=8)  # a pure function of the (frozen) config; tracing takes ~1 s
def _abstract_params(part: str, config: ModelConfig) -> dict[Path_, tuple[int, ...]]:
    from varjax.model import param_shapes

    try:
        tree = param_shapes(config)[part]
    except Exception as err:  # noqa: BLE001 -- e.g. a config the Flax module rejects
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConvertError(f"cannot build the Flax {part} for the detected config "
                           f"({type(err).__name__}: {first})") from None
    return {p: tuple(s.shape) for p, s in flatten_dict(tree).items()}


def _some(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _torch_shape(e: Entry, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape that maps to `flax_shape` (the inverse permutation)."""
    if not e.axes:
        return flax_shape
    out = [0] * len(flax_shape)
    for i, a in enumerate(e.axes):
        out[a] = flax_shape[i]
    return tuple(out)


def check(
    entries: Mapping[str, Entry],
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[Path_, tuple[int, ...]],
) -> None:
    """Raises ConvertError unless the mapped keys fill `expected` exactly, shape for shape.

    Args:
      entries: torch key -> Entry (from mapping.plan), the params only.
      shapes: torch key -> torch shape.
      expected: Flax path -> shape, from abstract_params.
    """
    by_path = {e.path: e for e in entries.values()}
    missing = [torch_key(p) for p in expected if p not in by_path]
    unexpected = [e.key for p, e in by_path.items() if p not in expected]
    wrong = []
    for p, e in by_path.items():
        if p in expected:
            got = e.shape(tuple(shapes[e.key]))
            want = expected[p]
            if got != want:
                wrong.append(f"{e.key} is {tuple(shapes[e.key])}, expected {_torch_shape(e, want)}")
    problems = []
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {_some(wrong)}")
    if problems:
        raise ConvertError("; ".join(problems))
