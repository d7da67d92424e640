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
  These three are the study's (the default); `SITE_DEFINITIONS` states every site in words,
  and a run stores the definitions of the sites it recorded. Upstream multiplies attn.proj's output by gamma1 IN PLACE
  (`self.attn(...).mul_(gamma1)`); the study's hook computed `torch.abs(output)` inside the
  hook, before that, so it recorded the layer's own output. (A hook that keeps the output
  tensor sees proj * gamma1: the optional site below, never the default; runs recorded
  before 2026-12-01 had it as `attn.proj` and are refused.) Optional: `attn.proj_times_gamma1` (C), `resid` (C, the
  residual stream after the block, named `blocks.{i}`).
Top sites (once, after the last block; in units.csv their block is `depth`, one past the last
transformer block, so per-block tables and relative depth block / depth place them at 1.0)
  head_nm     (C)  output of `head_nm` (AdaLNBeforeHead): the head's input
  head        (V)  the logits, output of the Linear `head`

Units: the global unit order (the column order of every file) is block-major, then site in
the canonical order `SITES` (the study's three first), then index within the site; the top
sites come last, as block `depth`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import numpy as np

UNIT_SITES = ("attn.proj", "ffn.fc1", "ffn.fc2")  # the study's sites, in unit-column order
BLOCK_SITES = UNIT_SITES + ("attn.proj_times_gamma1", "resid")
TOP_SITES = ("head_nm", "head")
SITES = BLOCK_SITES + TOP_SITES  # the canonical order of sites within a block (unit columns)

# What each site records, in words. Stored in every run's fingerprint (record.json, the resume
# checkpoint): a change here is a change of what a number in a run directory means.
SITE_DEFINITIONS = {
    "attn.proj": "output of Linear blocks.{i}.attn.proj, before the in-place * gamma1",
    "ffn.fc1": "tanh-GELU of the output of Linear blocks.{i}.ffn.fc1",
    "ffn.fc2": "output of Linear blocks.{i}.ffn.fc2, before * gamma2",
    "attn.proj_times_gamma1": "blocks.{i}.attn.proj output * gamma1 (the attention branch's residual update)",
    "resid": "residual stream after block {i}",
    "head_nm": "output of head_nm (AdaLNBeforeHead): LayerNorm of the last block's output * (1 + scale) + shift",
    "head": "logits of Linear head",
}


def canonical_sites(sites) -> tuple[str, ...]:
    """`sites` without repeats, in the canonical order `SITES`; raises ValueError on an unknown name."""
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"unknown site(s) {', '.join(bad)}; known: {', '.join(SITES)}")
    return tuple(s for s in SITES if s in set(sites))


def site_units(site: str, embed_dim: int, mlp_dim: int, vocab_size: int) -> int:
    """How many units one site of one block has."""
    return {"ffn.fc1": mlp_dim, "head": vocab_size}.get(site, embed_dim)


def site_path(site: str, block: int) -> str:
    """The PyTorch module path of a site: `blocks.3.ffn.fc1`; the residual stream is `blocks.3`;
    a top site is its module (`head`, `head_nm`)."""
    if site in TOP_SITES:
        return site
    return f"blocks.{block}" if site == "resid" else f"blocks.{block}.{site}"


def bare_site(name: str) -> str:
    """A site name without its block: `blocks.3.ffn.fc1` -> `ffn.fc1`, `blocks.3` -> `resid`."""
    if re.fullmatch(r"blocks\.\d+", name):
        return "resid"
    return re.sub(r"^blocks\.\d+\.", "", name)


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
        """The recording pass's layout: every block, its `sites` in canonical order within a
        block, then the top sites as block `depth`."""
        sites = canonical_sites(sites)
        block, site, index = [], [], []
        cells = [(b, s) for b in range(depth) for s, name in enumerate(sites) if name not in TOP_SITES]
        cells += [(depth, s) for s, name in enumerate(sites) if name in TOP_SITES]
        for b, s in cells:
            n = site_units(sites[s], embed_dim, mlp_dim, vocab_size)
            block.append(np.full(n, b))
            site.append(np.full(n, s))
            index.append(np.arange(n))
        return cls(np.concatenate(block).astype(np.int64), np.concatenate(site).astype(np.int64),
                   tuple(sites), np.concatenate(index).astype(np.int64))

    @classmethod
    def from_columns(cls, block: np.ndarray, site_names: list[str],
                     index: np.ndarray | None = None) -> "UnitLayout":
        """A layout read from units.csv; site names may carry their `blocks.{i}.` prefix or not.

        Sites are in canonical order (`SITES`), then unknown ones as they first appear;
        `index` defaults to the position within each (block, site).
        """
        bare = [bare_site(s) for s in site_names]
        found = list(dict.fromkeys(bare))
        sites = tuple([s for s in SITES if s in found] + [s for s in found if s not in SITES])
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
        """The distinct blocks, ascending (a top site's block is `depth`)."""
        return np.unique(self.block)

    @property
    def top(self) -> np.ndarray:
        """(U,) bool: the unit sits at a top site (`head`, `head_nm`), not in a block."""
        return np.isin(self.site, [i for i, s in enumerate(self.sites) if s in TOP_SITES])

    @property
    def depth(self) -> int:
        """Transformer blocks: one past the last block holding a per-block site."""
        inner = self.block[~self.top]
        return int(inner.max()) + 1 if len(inner) else int(self.block.max(initial=-1)) + 1

    def blocks_of(self, site: int | None = None) -> np.ndarray:
        """The blocks holding `site` (None: the transformer blocks, every per-block site), ascending."""
        sel = ~self.top if site is None else self.site == site
        return np.unique(self.block[sel])

    def site_index(self, suffix: str) -> int | None:
        """The first site whose name ends with `suffix` (e.g. "fc1"), or None."""
        return next((i for i, s in enumerate(self.sites) if s.endswith(suffix)), None)

    def select(self, sites: tuple[str, ...]) -> tuple["UnitLayout", np.ndarray]:
        """The layout of the units at `sites` alone (in this layout's order) and the (U,) bool
        mask of those units."""
        keep = [i for i, s in enumerate(self.sites) if s in sites]
        mask = np.isin(self.site, keep)
        remap = np.full(len(self.sites), -1, np.int64)
        remap[keep] = np.arange(len(keep))
        return (UnitLayout(self.block[mask], remap[self.site[mask]], tuple(self.sites[i] for i in keep),
                           self.index[mask]), mask)

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
