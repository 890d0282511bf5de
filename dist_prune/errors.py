"""Errors a user can fix. The CLI turns them into one message and a non-zero exit."""


class DistPruneError(Exception):
    """Bad input or an impossible request: reported as one line, exit code 2."""

    exit_code = 2


class ConfigError(DistPruneError):
    """A configuration value that is missing, unknown or out of range."""


class CheckpointError(DistPruneError):
    """A checkpoint that is missing, truncated, corrupt or of an unsupported architecture."""


class CalibrationError(DistPruneError):
    """Calibration text or tokens that cannot provide what the run asks for."""
