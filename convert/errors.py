"""The converter's one exception type: its message is the whole error, printed as one line."""

from varjax.errors import VarjaxError


class ConvertError(VarjaxError):
    """A checkpoint that cannot be converted; `str(err)` names the file and the keys."""
