"""The converter's one exception type: its message is the whole error, printed as one line."""


class ConvertError(Exception):
    """A checkpoint that cannot be converted; `str(err)` names the file and the keys."""
