"""Unit scaling: multiply chosen units of the transformer by a factor, without touching the
parameters on disk and without slowing the unscaled path.

No upstream counterpart (upstream VAR has no interventions). The intervention the
memorization literature uses (Kasliwal et al.) multiplies the *incoming weights* of chosen
fc1 units by 0.5 and leaves their biases: the unit computes gelu(f * (x . w_u) + b_u),
which, because of the GELU and the bias, is not f * gelu(x . w_u + b_u). Both are offered:

- mode "weights": column u of the unit's Linear kernel is multiplied by f, its bias is
  not (a parameter edit made in memory on every call: `UnitScaling.apply`);
- mode "output": the unit's value at its recording site is multiplied by f (fc1 after its
  GELU, attn.proj and ffn.fc2 before their gates), inside the forward (`scale_output`).

Either way the recorded activations (varjax.taps) are those of the scaled model. A unit is
(site, block, index) with a site of `varjax.names.UNIT_SITES`; `from_unit_ids` and `from_file`
take the unit columns of a units.csv (docs/design.md). With no scaling (None) nothing is added
to the computation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np

from varjax.config import VARConfig
from varjax.errors import ScalingError
from varjax.names import UNIT_SITES, UnitLayout, site_units

MODES = ("weights", "output")
# The Linear layer whose kernel column u computes unit u of each site.
_LAYER = {"attn.proj": ("attn", "proj"), "ffn.fc1": ("ffn", "fc1"), "ffn.fc2": ("ffn", "fc2")}


@dataclasses.dataclass(frozen=True)
class UnitScaling:
    """Which units to scale, by how much, and how.

    mode: "weights" (scale the unit's incoming weights) or "output" (scale its value).
    units: ((site, block, index, factor), ...), each unit at most once.
    """

    mode: str
    units: tuple[tuple[str, int, int, float], ...]

    def __post_init__(self):
        if self.mode not in MODES:
            raise ScalingError(f"unit scaling mode {self.mode!r}: expected one of {', '.join(MODES)}")
        units = tuple((str(s), int(b), int(i), float(f)) for s, b, i, f in self.units)
        object.__setattr__(self, "units", units)
        for site, block, index, factor in units:
            if site not in UNIT_SITES:
                raise ScalingError(f"unit scaling: unknown site {site!r}; known: {', '.join(UNIT_SITES)}")
            if block < 0 or index < 0:
                raise ScalingError(f"unit scaling: negative block or index in {(site, block, index)}")
            if not math.isfinite(factor):
                raise ScalingError(f"unit scaling: factor {factor} of {site} {block}/{index} is not finite")
        keys = [(s, b, i) for s, b, i, _ in units]
        if len(set(keys)) != len(keys):
            raise ScalingError("unit scaling: a unit is listed twice")

    @classmethod
    def from_unit_ids(cls, config: VARConfig, unit_ids: Iterable[int], factor: float, mode: str,
                      sites: tuple[str, ...] = UNIT_SITES) -> "UnitScaling":
        """Scale the units with these global ids (columns of a units.csv recorded at `sites`)."""
        layout = _layout(config, sites)
        return cls(mode, tuple((*_unit(layout, u), factor) for u in unit_ids))

    @classmethod
    def from_file(cls, path: str | Path, config: VARConfig, factor: float, mode: str,
                  sites: tuple[str, ...] = UNIT_SITES) -> "UnitScaling":
        """Scale the units a file lists (`read_units`) by one factor."""
        return cls(mode, tuple((site, b, i, factor) for site, b, i in read_units(path, config, sites)))

    def check(self, config: VARConfig) -> None:
        """Raises ScalingError if a unit does not exist in a model of this config."""
        size = site_sizes(config)
        for site, block, index, _ in self.units:
            if block >= config.depth or index >= size[site]:
                raise ScalingError(f"unit scaling: blocks.{block}.{site} unit {index} does not exist "
                                   f"(depth {config.depth}, {size[site]} units)")

    def factors(self, site: str, block: int, size: int) -> np.ndarray | None:
        """float32 (size,) factors of one site of one block (1 where unscaled); None if none."""
        hits = [(i, f) for s, b, i, f in self.units if s == site and b == block]
        if not hits:
            return None
        out = np.ones(size, np.float32)
        for i, f in hits:
            out[i] = f
        return out

    def apply(self, var, params: dict[str, Any]):
        """The module and parameters that compute the scaled model.

        Args:
          var: a `varjax.var.VAR` module; params: its parameter tree (not modified).
        Returns:
          (var, params): in mode "output" the module carries the scaling; in mode "weights"
          the kernels are edited copies (a jnp computation, fine inside jit).
        """
        self.check(var.config)
        if self.mode == "output":
            return var.clone(scaling=self), params
        params = dict(params)
        for (site, block), hits in _by_layer(self.units).items():
            first, second = _LAYER[site]
            blk = dict(params[f"blocks_{block}"])
            sub = dict(blk[first])
            layer = dict(sub[second])
            idx = np.array([i for i, _ in hits])
            f = np.array([f for _, f in hits], np.float32)
            kernel = jnp.asarray(layer["kernel"])
            layer["kernel"] = kernel.at[:, idx].multiply(f.astype(kernel.dtype))  # bias untouched
            sub[second], blk[first] = layer, sub
            params[f"blocks_{block}"] = blk
        return var, params

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of this scaling (for run.json and run fingerprints)."""
        return {"mode": self.mode, "units": [list(u) for u in self.units]}


def prepare(var, params: dict[str, Any], scaling: UnitScaling | None):
    """`scaling.apply(var, params)`, or (var, params) unchanged when scaling is None."""
    return (var, params) if scaling is None else scaling.apply(var, params)


def scale_output(scaling: UnitScaling | None, site: str, block: int, x_BLU: jnp.ndarray) -> jnp.ndarray:
    """x_BLU with its units multiplied by their output-mode factors (x_BLU itself if none)."""
    if scaling is None or scaling.mode != "output":
        return x_BLU
    f = scaling.factors(site, block, x_BLU.shape[-1])
    return x_BLU if f is None else x_BLU * f.astype(x_BLU.dtype)


def site_sizes(config: VARConfig) -> dict[str, int]:
    return {s: site_units(s, config.embed_dim, config.mlp_dim, config.vocab_size) for s in UNIT_SITES}


def unit_of(config: VARConfig, unit: int, sites: tuple[str, ...] = UNIT_SITES) -> tuple[str, int, int]:
    """Global unit id -> (site, block, index), in the unit order of a run recorded at `sites`
    (varjax.names.UnitLayout: block-major, then site, then index)."""
    return _unit(_layout(config, sites), unit)


def read_units(path: str | Path, config: VARConfig, sites: tuple[str, ...] = UNIT_SITES) -> list[tuple[str, int, int]]:
    """The units a file names, as (site, block, index).

    A CSV with `block`, `site` and `index` columns (a units.csv, or rows of one) names them
    directly; otherwise the file holds unit ids (a CSV with a `unit` column, or integers
    separated by commas, spaces or newlines, '#' starting a comment), read in the layout of a
    run recorded at `sites`.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ScalingError(f"{p}: cannot read the unit list ({e.strerror or e})") from None
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    header = [c.strip() for c in lines[0].split(",")] if lines else []
    try:
        if {"block", "site", "index"} <= set(header):
            cols = [header.index(c) for c in ("site", "block", "index")]
            rows = [[c.strip() for c in ln.split(",")] for ln in lines[1:]]
            units = [(r[cols[0]], int(r[cols[1]]), int(r[cols[2]])) for r in rows]
        else:
            if "unit" in header:
                tokens = [ln.split(",")[header.index("unit")].strip() for ln in lines[1:]]
            else:
                tokens = [t for ln in lines for t in re.split(r"[,\s]+", ln) if t]
            layout = _layout(config, sites)
            units = [_unit(layout, int(t)) for t in tokens]
    except (ValueError, IndexError) as e:
        raise ScalingError(f"{p}: not a list of units ({e})") from None
    if not units:
        raise ScalingError(f"{p}: no units")
    return units


def _layout(config: VARConfig, sites: tuple[str, ...]) -> UnitLayout:
    return UnitLayout.for_var(config.depth, config.embed_dim, config.mlp_dim, config.vocab_size, sites)


def _unit(layout: UnitLayout, unit: int) -> tuple[str, int, int]:
    if not 0 <= unit < layout.n_units:
        raise ScalingError(f"unit {unit} does not exist (the model has {layout.n_units} units)")
    return layout.sites[layout.site[unit]], int(layout.block[unit]), int(layout.index[unit])


def _by_layer(units) -> dict[tuple[str, int], list[tuple[int, float]]]:
    out: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for site, block, index, factor in units:
        out.setdefault((site, block), []).append((index, factor))
    return out
