"""The project's vocabulary: shape letters, recording-site names and the unit layout.

Every module uses these names and no letter for anything else (as penzai's model_parts
glossary). Modules that use shape suffixes (`x_BLC`) repeat the letters they use.

Shape letters
  B  batch: images (or views) in one call or step
  A  augmented views per image
  L  tokens of the whole pyramid, sum of pn^2 over scales (680 at 256 px)
  K  scales (10 at 256 and 512 px); pn the side of one scale's token map
  C  transformer width; D condition width (= C); H heads; c head width (64)
  V  vocabulary (codebook size); Cv latent channels of the VQVAE
  N  samples of a dataset; U recorded units; S splits (train, val)
Blocks and sites (layer types) have no letter: they are spelled `blocks` and `sites`.

Recording sites (per block i, named by the PyTorch module path `blocks.{i}.<site>`)
  attn.proj   (C)  output of the Linear `attn.proj`, before the block multiplies it by gamma1
  ffn.fc1     (4C) the tanh-GELU of the output of `ffn.fc1`
  ffn.fc2     (C)  output of `ffn.fc2`, before gamma2
  These three are the study's; `SITE_DEFINITIONS` states every site in words, and a run
  stores the definitions it used. Upstream multiplies attn.proj's output by gamma1 IN PLACE
  (`self.attn(...).mul_(gamma1)`); the study's hook computed `torch.abs(output)` inside the
  hook, before that, so it recorded the layer's own output. (A hook that keeps the output
  tensor sees proj * gamma1: the optional site below, never the default; runs recorded
  before 2026-12-01 had it as `attn.proj` and are refused.) Optional: `attn.proj_times_gamma1` (C), `resid` (C, the
  residual stream after the block, named `blocks.{i}`), and at the top `head` (V, the logits).

Units: the global unit order (the column order of every file) is block-major, then site in
the order recorded (the study's: attn.proj, ffn.fc1, ffn.fc2), then index within the site.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import numpy as np

UNIT_SITES = ("attn.proj", "ffn.fc1", "ffn.fc2")  # the study's sites, in unit-column order
BLOCK_SITES = UNIT_SITES + ("attn.proj_times_gamma1", "resid")
TOP_SITES = ("head",)

# What each site records, in words. Stored in every run's fingerprint (record.json, the resume
# checkpoint): a change here is a change of what a number in a run directory means.
SITE_DEFINITIONS = {
    "attn.proj": "output of Linear blocks.{i}.attn.proj, before the in-place * gamma1",
    "ffn.fc1": "tanh-GELU of the output of Linear blocks.{i}.ffn.fc1",
    "ffn.fc2": "output of Linear blocks.{i}.ffn.fc2, before * gamma2",
    "attn.proj_times_gamma1": "blocks.{i}.attn.proj output * gamma1 (the attention branch's residual update)",
    "resid": "residual stream after block {i}",
    "head": "logits of Linear head",
}


def site_units(site: str, embed_dim: int, mlp_dim: int, vocab_size: int) -> int:
    """How many units one site of one block has."""
    return {"ffn.fc1": mlp_dim, "head": vocab_size}.get(site, embed_dim)


def site_path(site: str, block: int) -> str:
    """The PyTorch module path of a site: `blocks.3.ffn.fc1`; the residual stream is `blocks.3`."""
    return f"blocks.{block}" if site == "resid" else f"blocks.{block}.{site}"


@dataclasses.dataclass(frozen=True, eq=False)
class UnitLayout:
    """Where each of the U units sits: the writer (the recording pass) and every reader use it.

    Attributes:
      block: (U,) int block of each unit.
      site: (U,) int index into `sites`.
      sites: site names without the block prefix ("attn.proj", "ffn.fc1", ...).
      index: (U,) int position of the unit within its site (its output channel).
    """

    block: np.ndarray
    site: np.ndarray
    sites: tuple[str, ...]
    index: np.ndarray

    @classmethod
    def for_var(cls, depth: int, embed_dim: int, mlp_dim: int, vocab_size: int,
                sites: tuple[str, ...] = UNIT_SITES) -> "UnitLayout":
        """The recording pass's layout: every block, `sites` in that order within a block."""
        block, site, index = [], [], []
        for b in range(depth):
            for s, name in enumerate(sites):
                n = site_units(name, embed_dim, mlp_dim, vocab_size)
                block.append(np.full(n, b))
                site.append(np.full(n, s))
                index.append(np.arange(n))
        return cls(np.concatenate(block).astype(np.int64), np.concatenate(site).astype(np.int64),
                   tuple(sites), np.concatenate(index).astype(np.int64))

    @classmethod
    def from_columns(cls, block: np.ndarray, site_names: list[str],
                     index: np.ndarray | None = None) -> "UnitLayout":
        """A layout read from units.csv; site names may carry their `blocks.{i}.` prefix or not.

        Sites are ordered as the study's first (attn.proj, ffn.fc1, ffn.fc2), then others as
        they first appear; `index` defaults to the position within each (block, site).
        """
        bare = [re.sub(r"^blocks\.\d+\.", "", s) for s in site_names]
        found = list(dict.fromkeys(bare))
        sites = tuple([s for s in UNIT_SITES if s in found] + [s for s in found if s not in UNIT_SITES])
        lookup = {s: i for i, s in enumerate(sites)}
        block = np.asarray(block, np.int64)
        site = np.array([lookup[s] for s in bare], np.int64)
        if index is None:
            seen: dict[tuple[int, int], int] = {}
            index = np.empty(len(site), np.int64)
            for u, key in enumerate(zip(block.tolist(), site.tolist())):
                index[u] = seen.get(key, 0)
                seen[key] = index[u] + 1
        return cls(block, site, sites, np.asarray(index, np.int64))

    @property
    def n_units(self) -> int:
        return len(self.block)

    @property
    def blocks(self) -> np.ndarray:
        """The distinct blocks, ascending."""
        return np.unique(self.block)

    def site_index(self, suffix: str) -> int | None:
        """The first site whose name ends with `suffix` (e.g. "fc1"), or None."""
        return next((i for i, s in enumerate(self.sites) if s.endswith(suffix)), None)

    def segments(self) -> Iterator[tuple[str, int, str, int]]:
        """(module path, block, site, units) of each contiguous run of units, in column order."""
        start = 0
        while start < self.n_units:
            b, s = int(self.block[start]), int(self.site[start])
            stop = start + 1
            while stop < self.n_units and self.block[stop] == b and self.site[stop] == s:
                stop += 1
            yield site_path(self.sites[s], b), b, self.sites[s], stop - start
            start = stop

    def rows(self) -> Iterator[tuple[int, int, str, int]]:
        """units.csv rows: (unit, block, site, index)."""
        for u in range(self.n_units):
            yield u, int(self.block[u]), self.sites[int(self.site[u])], int(self.index[u])
