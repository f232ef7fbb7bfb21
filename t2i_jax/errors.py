"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user (config, paths, files); never a bug in the code."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type, or a required key is missing."""


class DataError(UserError):
    """A data set, caption or image cannot be read or is malformed."""


class MetricError(UserError, ValueError):
    """A metric cannot be computed from these inputs (too few samples, mismatched features)."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not match the run's config."""
