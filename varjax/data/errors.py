"""The one exception the data layer raises for bad paths, bad files and bad selections.

Every message is a single line that names the file or folder at fault, so a CLI can print
`str(err)` instead of a traceback.
"""

from __future__ import annotations

from varjax.errors import DataError

__all__ = ["DataError"]
