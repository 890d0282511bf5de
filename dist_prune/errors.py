"""Errors a user can fix. The CLI turns them into one message and a non-zero exit."""

import reprlib


class DistPruneError(Exception):
    """Bad input or an impossible request: reported as one line, exit code 2."""

    exit_code = 2


class ConfigError(DistPruneError):
    """A configuration value that is missing, unknown or out of range."""


class CheckpointError(DistPruneError):
    """A checkpoint that is missing, truncated, corrupt or of an unsupported architecture."""


class CalibrationError(DistPruneError):
    """Calibration text or tokens that cannot provide what the run asks for."""


class KeptForResume(DistPruneError):
    """A run that ended with its finished layers kept for --resume (other bad input removes them: its result
    would be wrong)."""


# A user's value in an error message: a YAML alias bomb or a 64 MB list would make the message itself the
# hang (a billion expanded items), so at most a few items, levels and characters of it are shown.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 2, 4, 4, 60, 60
_SHOWN.maxlong = 40


def shown(value) -> str:
    """repr(value), cut short: what error messages print of values that come from user files."""
    return _SHOWN.repr(value)
