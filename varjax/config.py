"""Model configurations: frozen dataclasses for the VQVAE and the VAR transformer.

Ports the constructor arguments of upstream `models/vqvae.py` (VQVAE) and `models/var.py`
(VAR) as plain data, with named presets for every released checkpoint (d16, d20, d24, d30 at
256 px; d36 at 512 px with shared_aln) and a small config matching the test fixtures.
A `ModelConfig` bundles the two with the scale pyramid (`patch_nums`) they share.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """The multi-scale VQVAE (upstream `VQVAE(vocab_size, z_channels, ch, ...)`)."""

    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 32  # Cvae, the latent and codebook width
    vocab_size: int = 4096
    share_quant_resi: int = 4  # number of partially shared Phi convs
    quant_resi: float = 0.5  # Phi(h) = (1 - r) * h + r * conv(h)
    using_sa: bool = True
    using_mid_sa: bool = True

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclasses.dataclass(frozen=True)
class VARConfig:
    """The VAR transformer (upstream `VAR(depth, embed_dim, num_heads, ...)`)."""

    depth: int = 16
    embed_dim: int = 1024  # C (and D, the condition width)
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the null (unconditional) class is index num_classes
    shared_aln: bool = False
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6
    vocab_size: int = 4096  # V
    z_channels: int = 32  # Cvae
    patch_nums: tuple[int, ...] = PATCH_NUMS_256

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a converted checkpoint directory holds: either part may be absent."""

    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    vqvae: VQVAEConfig | None = None
    var: VARConfig | None = None

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    @property
    def resolution(self) -> int:
        down = self.vqvae.downsample if self.vqvae is not None else 16
        return self.patch_nums[-1] * down

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        def tup(x: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in x.items()}

        return cls(
            patch_nums=tuple(d["patch_nums"]),
            vqvae=VQVAEConfig(**tup(d["vqvae"])) if d.get("vqvae") else None,
            var=VARConfig(**tup(d["var"])) if d.get("var") else None,
        )

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


def var_preset(depth: int) -> VARConfig:
    """The released VAR-d{depth} (width 64*depth, depth heads; d36 is the 512-px model)."""
    if depth not in (16, 20, 24, 30, 36):
        raise ValueError(f"no released VAR with depth {depth}; choose 16, 20, 24, 30 or 36")
    big = depth == 36
    return VARConfig(
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        shared_aln=big,
        patch_nums=PATCH_NUMS_512 if big else PATCH_NUMS_256,
    )


def released(depth: int) -> ModelConfig:
    """A released VAR-d{depth} together with the released VQVAE (vae_ch160v4096z32)."""
    var = var_preset(depth)
    return ModelConfig(patch_nums=var.patch_nums, vqvae=VQVAEConfig(), var=var)


def tiny(shared_aln: bool = False) -> ModelConfig:
    """The fixture models (tests/data/upstream_var): depth 2, width 128, V=512, ch=32."""
    var = VARConfig(depth=2, embed_dim=128, num_heads=2, shared_aln=shared_aln, vocab_size=512)
    return ModelConfig(patch_nums=PATCH_NUMS_256, vqvae=VQVAEConfig(ch=32, vocab_size=512), var=var)


def micro(shared_aln: bool = False) -> ModelConfig:
    """A model small enough for multi-process tests and CPU demos: 64 px, 4 scales, 2 blocks.

    Same architecture as the released models (5 VQVAE levels, downsampling 16), smaller in
    every dimension: latent 4x4, Cvae 8, V 64, width 64 (one head of 64).
    """
    pn = (1, 2, 3, 4)
    var = VARConfig(depth=2, embed_dim=64, num_heads=1, shared_aln=shared_aln, vocab_size=64,
                    z_channels=8, patch_nums=pn)
    return ModelConfig(patch_nums=pn, vqvae=VQVAEConfig(ch=32, z_channels=8, vocab_size=64), var=var)


PRESETS = {f"d{d}": (lambda d=d: released(d)) for d in (16, 20, 24, 30, 36)}
PRESETS["tiny"] = tiny
PRESETS["micro"] = micro
