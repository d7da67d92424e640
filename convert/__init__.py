"""Upstream VAR / VQVAE .pth -> varjax checkpoint directory (`python -m convert`).

Needs torch (the `convert` extra); varjax itself never imports it.
"""

from convert.core import convert_checkpoints
from convert.errors import ConvertError

__all__ = ["ConvertError", "convert_checkpoints"]
