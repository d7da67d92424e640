"""Recording sites: which activations the transformer sows, and already reduced how.

The model calls `tap(module, site, x_BLU)` at every place a unit can be recorded; what is
kept is decided here by a `TapConfig`, so asking for another reduction or another site never
touches the model's maths. Values are sown into the `taps` collection already reduced (a
(B, U) vector per site, not a (B, L, 4C) tensor for 48 layers), and `collect` turns the
collection into a flat dict keyed by the PyTorch module path, e.g. `blocks.3.ffn.fc1`.

Sites and what each records: `varjax.names` (the glossary), `SITE_DEFINITIONS`.

Reductions: `mean_abs` (B, U), the mean over tokens of |x| (the study's unit activation);
`scale_mean_abs` (B, K, U), the same over the tokens of each scale separately; `full`
(B, L, U), the signed values (for debugging and parity; large).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from varjax.names import BLOCK_SITES, SITE_DEFINITIONS, TOP_SITES, UNIT_SITES  # noqa: F401 (re-exported)

REDUCTIONS = ("mean_abs", "scale_mean_abs", "full")
COLLECTION = "taps"


@dataclasses.dataclass(frozen=True)
class TapConfig:
    """What to record. The default is the study's: mean |x| of the three unit sites."""

    sites: tuple[str, ...] = UNIT_SITES
    reductions: tuple[str, ...] = ("mean_abs",)
    blocks: tuple[int, ...] | None = None  # None: every block

    def __post_init__(self):
        bad = [s for s in self.sites if s not in BLOCK_SITES + TOP_SITES]
        if bad:
            raise ValueError(f"unknown tap site(s) {bad}; known: {BLOCK_SITES + TOP_SITES}")
        bad = [r for r in self.reductions if r not in REDUCTIONS]
        if bad:
            raise ValueError(f"unknown reduction(s) {bad}; known: {REDUCTIONS}")

    def wants(self, site: str, block: int | None) -> bool:
        if site not in self.sites:
            return False
        return block is None or self.blocks is None or block in self.blocks


NO_TAPS = TapConfig(sites=(), reductions=())


def scale_means_matrix(patch_nums: tuple[int, ...]) -> np.ndarray:
    """(K, L) float32: row k averages the tokens of scale k."""
    L = sum(p * p for p in patch_nums)
    m = np.zeros((len(patch_nums), L), np.float32)
    start = 0
    for k, pn in enumerate(patch_nums):
        m[k, start : start + pn * pn] = 1.0 / (pn * pn)
        start += pn * pn
    return m


def tap(module: nn.Module, cfg: TapConfig, site: str, x_BLU: jnp.ndarray,
        patch_nums: tuple[int, ...], block: int | None = None, name: str | None = None) -> None:
    """Sow the reductions of `x_BLU` that `cfg` asks for, in `module`'s scope.

    `site` is the kind (`ffn.fc1`, `resid`, `head`); the value is sown under `name` (default:
    the site's last component), so the module path plus that name is the PyTorch module path.
    """
    if not cfg.wants(site, block):
        return
    leaf = name or site.rsplit(".", 1)[-1]
    x = x_BLU.astype(jnp.float32)  # reductions in float32 whatever the compute dtype
    for r in cfg.reductions:
        if r == "mean_abs":
            v = jnp.mean(jnp.abs(x), axis=1)
        elif r == "scale_mean_abs":
            v = jnp.einsum("kl,blu->bku", scale_means_matrix(patch_nums), jnp.abs(x))
        else:
            v = x
        module.sow(COLLECTION, f"{leaf}:{r}", v, reduce_fn=lambda _, y: y)


_INDEX = re.compile(r"_(\d+)$")


def collect(taps_tree: Mapping[str, Any], reduction: str = "mean_abs") -> dict[str, jnp.ndarray]:
    """Flatten the sown collection to {'blocks.3.ffn.fc1': array} for one reduction.

    A site sown as `fc1:mean_abs` inside module path (`blocks_3`, `ffn`) becomes
    `blocks.3.ffn.fc1`; the residual stream of block 3 (`resid` in `blocks_3`) becomes `blocks.3`.
    """
    out: dict[str, jnp.ndarray] = {}

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, val in node.items():
            if isinstance(val, Mapping):
                walk(val, path + (_INDEX.sub(r".\1", key),))
                continue
            site, _, red = key.partition(":")
            if red != reduction:
                continue
            parts = path if site == "resid" else path + (site,)
            out[".".join(parts)] = val

    walk(taps_tree, ())
    return out
