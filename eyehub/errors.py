"""The project's error hierarchy.

Every error a user can cause is an `EyehubError` whose message says what to do. Each
subclass also inherits the matching built-in exception, so callers that only know the
built-ins still catch them (the zarr-python pattern).

Each class carries the exit code the command line ends with (`exit_code`) and the HTTP
status the scoring service answers with (`http_status`):

| error | meaning | exit code | HTTP status |
| --- | --- | --- | --- |
| `EyehubError` | anything else raised on purpose | 1 | 500 |
| `UsageError` | arguments that cannot work | 2 | 400 |
| `ConfigError` | an invalid configuration key or value | 2 | 400 |
| `InputError` | one input (a DICOM file, a labels file) cannot be used | 1 | 400 |
| `NotFoundError` | a path, dataset, model or key file does not exist | 2 | 404 |
| `PayloadTooLargeError` | an upload or scan over the configured limit | 2 | 413 |
| `DatasetError` | a dataset breaks the dataset contract | 2 | 422 |
| `ModelError` | a model cannot be loaded, or cannot take an input | 2 | 422 |
| `KeyMissingError` | the hub's pseudonymisation key was not given | 2 | 500 |
| `ServiceUnavailableError` | no model loaded yet, or a PACS unreachable or refusing | 1 | 503 |
| `PromotionRefusedError` | the promotion guard refused; nothing changed | 4 | 409 |

The 5xx statuses are the server's fault, not the request's: a missing key is a service
misconfiguration, and a model that fails to load when the service starts leaves it
answering 503 (`ServiceUnavailableError`), while per request a `ModelError` is an input
the loaded model cannot take (422). The command line's own codes (3 quarantined, 130
interrupted) are not errors and are in `eyehub.cli`.
"""

from __future__ import annotations

from typing import Any


class EyehubError(Exception):
    """Base class of every error eyehub raises on purpose."""

    exit_code = 1
    http_status = 500


class UsageError(EyehubError, ValueError):
    """A command was called with arguments that cannot work (bad count, bad path)."""

    exit_code = 2
    http_status = 400


class ConfigError(EyehubError, ValueError):
    """A configuration file or `--set` override is invalid; the message names the key."""

    exit_code = 2
    http_status = 400


class NotFoundError(EyehubError, FileNotFoundError):
    """An input path, dataset, model or key file does not exist."""

    exit_code = 2
    http_status = 404


class KeyMissingError(EyehubError, LookupError):
    """The hub's secret pseudonymisation key was not given."""

    exit_code = 2
    http_status = 500


class InputError(EyehubError, ValueError):
    """One input (a DICOM file, a labels file) cannot be used; carries a stable reason code."""

    http_status = 400

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class PayloadTooLargeError(EyehubError, ValueError):
    """An upload or a scan is larger than the configured limit; the message names it."""

    exit_code = 2
    http_status = 413


class DatasetError(EyehubError, ValueError):
    """A dataset directory is missing parts or breaks the dataset contract."""

    exit_code = 2
    http_status = 422


class ModelError(EyehubError, ValueError):
    """A model cannot be loaded (damaged, foreign, of a newer format) or cannot take an
    input (missing, of the wrong shape or type)."""

    exit_code = 2
    http_status = 422


class ServiceUnavailableError(EyehubError, RuntimeError):
    """The service cannot answer yet (no model is loaded, or it failed to load), or a
    service eyehub depends on (a PACS) cannot be reached, refuses, or fails."""

    http_status = 503


class PromotionRefusedError(EyehubError, RuntimeError):
    """The promotion guard refused (a version measured worse than the champion, or tested
    on other samples); nothing changed. The message says why and how to promote anyway;
    `comparison` holds the figures."""

    exit_code = 4
    http_status = 409

    def __init__(self, message: str, comparison: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.comparison = comparison
