"""Logging set-up shared by the command line and library code.

Library modules call `logging.getLogger(__name__)` and never configure handlers; the
command line calls `configure_logging` once.
"""

from __future__ import annotations

import logging

from rich.logging import RichHandler

_CONFIGURED = False


def configure_logging(level: str | int = "INFO", *, force: bool = False) -> None:
    """Send eyehub's log records to stderr through rich, once per process."""
    global _CONFIGURED
    if _CONFIGURED and not force:
        return
    handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for noisy in (
        "ray",
        "mlflow",
        "urllib3",
        "alembic",
        "numcodecs",
        "PIL",
        "openjpeg",
        "pydicom",
        "highdicom",
        "libjpeg",
        "rle",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    _CONFIGURED = True
