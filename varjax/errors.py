"""The errors a user of varjax sees: one base class, one subclass per layer.

Every message is a single line that names what is at fault (a file, a key, a flag) and,
where there is one, what to do; a command-line script catches `VarjaxError` once and prints
`str(err)` instead of a traceback. Anything else that escapes is a bug in varjax.
"""

from __future__ import annotations


class VarjaxError(Exception):
    """Base class: a problem the user can fix; `str(err)` is the whole, one-line message."""


class CheckpointError(VarjaxError):
    """A directory that is not a readable converted checkpoint (varjax.checkpoint)."""


class DataError(VarjaxError):
    """A data problem: a missing path, an unreadable image, a bad layout (varjax.data)."""


class RecordError(VarjaxError):
    """Bad settings for the recording pass, or a run directory holding another run (varjax.record)."""


class AnalysisError(VarjaxError):
    """A run directory whose files cannot be analysed (varjax.analysis)."""


class RunError(VarjaxError):
    """A study run that cannot start as asked: bad flag combination, wrong model (varjax.study)."""


class GenerateError(VarjaxError):
    """Settings the sampler cannot run with, or a gallery directory in the way (varjax.generate,
    varjax.gallery)."""


class ScalingError(VarjaxError):
    """A unit scaling that names no unit of the model, or an unreadable unit list (varjax.scaling)."""


class InterventionError(VarjaxError):
    """Intervention settings or a run directory an intervention cannot use (varjax.intervention,
    varjax.intervene)."""
