"""The project's error hierarchy.

Every error a user can cause is an `EyehubError` whose message says what to do. Each
subclass also inherits the matching built-in exception, so callers that only know the
built-ins still catch them (the zarr-python pattern).
"""

from __future__ import annotations


class EyehubError(Exception):
    """Base class of every error eyehub raises on purpose."""

    exit_code = 1


class UsageError(EyehubError, ValueError):
    """A command was called with arguments that cannot work (bad count, bad path)."""

    exit_code = 2


class ConfigError(EyehubError, ValueError):
    """A configuration file or `--set` override is invalid; the message names the key."""

    exit_code = 2


class NotFoundError(EyehubError, FileNotFoundError):
    """An input path, dataset, model or key file does not exist."""

    exit_code = 2


class KeyMissingError(EyehubError, LookupError):
    """The hub's secret pseudonymisation key was not given."""

    exit_code = 2


class InputError(EyehubError, ValueError):
    """One input (a DICOM file, a labels file) cannot be used; carries a stable reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class DatasetError(EyehubError, ValueError):
    """A dataset directory is missing parts or breaks the dataset contract."""

    exit_code = 2
