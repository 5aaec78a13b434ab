"""External tools a test needs (dicom3tools, Orthanc, ...): skipped where they are not
installed on a developer's machine, a failure in CI (CI=true), where a missing tool must
never turn a test into a silent skip."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def need_tool(*names: str) -> None:
    """Skip the test (fail it under CI=true) unless every tool is there: a command found
    on PATH, or a path (a name with a slash, e.g. an Orthanc plugin) that exists."""
    missing = [name for name in names if not _present(name)]
    if not missing:
        return
    message = f"not installed: {', '.join(missing)} (make install installs them where it can)"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _present(name: str) -> bool:
    if "/" in name:
        return Path(name).exists()
    return shutil.which(name) is not None
