"""User-facing errors: the CLI prints them as one line and exits with status 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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


class NonFiniteError(Exception):
    """Training stopped because updates stayed NaN/Inf after its rollback (train/nonfinite.py):
    not the input's fault, so not a UserError; the CLI exits with status 3."""


class WriteError(UserError):
    """A file could not be written: disk full, an I/O error, a path that is not writable."""


@contextlib.contextmanager
def writing(path: str, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turns an OSError in the block, or one of `also` (how a library reports a failed
    write), into one WriteError line naming `path` (or the file the error names) and the
    reason: `with writing(path): ...`."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"cannot write {e.filename or path}: {e.strerror or e}") from e
    except also as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise WriteError(f"cannot write {path}: {reason}") from e
