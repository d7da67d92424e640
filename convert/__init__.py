"""Upstream VAR / VQVAE .pth -> varjax checkpoint directory (`python -m convert`).

Needs torch (the `convert` extra) to read .pth files; varjax itself never imports it, and
neither do the key rule, the layouts and the checks (mapping, layout, detect, verify), so
those import without it.
"""

from convert.errors import ConvertError

__all__ = ["ConvertError", "convert_checkpoints"]


def __getattr__(name: str):
    if name == "convert_checkpoints":  # imported on first use: it brings in torch
        from convert.core import convert_checkpoints

        return convert_checkpoints
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
