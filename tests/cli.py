"""Run the `eyehub` command as a user would: a subprocess, wide plain output."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping


def run_eyehub(
    *args: str,
    timeout: float = 600,
    drop_env: Iterable[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m eyehub.cli ARGS`, with `drop_env` removed from and `extra_env` added to
    this process's environment; never raises on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k not in set(drop_env)}
    env.update({"COLUMNS": "200", "NO_COLOR": "1", **(extra_env or {})})
    if "EYEHUB_HOME" not in (extra_env or {}):  # logs and MLflow out of the checkout
        env["EYEHUB_HOME"] = tempfile.mkdtemp(prefix="eyehub-test-home-")
    return subprocess.run(
        [sys.executable, "-m", "eyehub.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
