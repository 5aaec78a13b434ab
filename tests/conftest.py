"""Shared fixtures: small synthetic cohorts made in seconds by `eyehub.synth`."""

from __future__ import annotations

from pathlib import Path

import pytest

from eyehub.synth import generate_cohort


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 patients at --size small, seed 11: every export kind and transfer syntax occurs."""
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, patients=24, seed=11, size="small", workers=2)
    return out
