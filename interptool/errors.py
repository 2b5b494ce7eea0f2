"""User-facing errors.

Every problem caused by the user's input (a file, a flag, a config field) is raised as an
:class:`InterptoolError` subclass whose message names the file or field, what was expected
and how to fix it. The CLI prints the message and exits with status 2, without a traceback.
"""

from __future__ import annotations


class InterptoolError(Exception):
    """Base class for errors the user can fix; the CLI prints them and exits with code 2."""

    exit_code = 2


class CheckpointError(InterptoolError):
    """A weight file or architecture that cannot be loaded as asked."""


class DataError(InterptoolError):
    """A data set spec, folder, CSV or image that is missing or malformed."""


class CacheError(InterptoolError):
    """An activation cache that is missing, incomplete or does not match the request."""


class ConfigError(InterptoolError):
    """A configuration file or field that is invalid."""


class AnalysisError(InterptoolError):
    """Inputs to an analyzer that do not fit together (layers, label spaces, sizes)."""


class ParamsError(ConfigError, AnalysisError):
    """A bad analyzer parameter (from Python, a CLI flag or a config field).

    Raised by every analyzer's ``Params`` dataclass; the message names the field, the value,
    what was expected and the fix. It is both a :class:`ConfigError` (a setting the user chose)
    and an :class:`AnalysisError` (what analyzers raised for bad arguments before), so existing
    ``except`` clauses keep catching it. ``field`` is the dotted field name.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field

