"""Scoring fixtures: models registered once per session in a real MLflow store (SQLite),
and the small cohort's files by kind."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.inference.models import Registered, register


@pytest.fixture(scope="session")
def scoring_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EYEHUB_HOME of the scoring tests: its MLflow store holds the registered models."""
    return tmp_path_factory.mktemp("scoring-home")


@pytest.fixture(scope="session")
def tracking_uri(scoring_home: Path) -> str:
    return f"sqlite:///{scoring_home / 'mlflow.db'}"


@pytest.fixture(scope="session")
def fundus_model(scoring_home: Path, tracking_uri: str) -> Registered:
    """fundus_demo (DenseNet121 at 128 px), untrained, calibrated, alias champion."""
    return register("fundus_demo", tracking_uri, scoring_home / "models")


@pytest.fixture(scope="session")
def oct_model(scoring_home: Path, tracking_uri: str) -> Registered:
    """oct_demo (B-scan attention), untrained, calibrated, alias champion."""
    return register("oct_demo", tracking_uri, scoring_home / "models")


@pytest.fixture(scope="session")
def cohort_files(small_cohort: Path) -> pd.DataFrame:
    """The small cohort's files (truth.csv): `file` (absolute path), `kind` (fundus/oct),
    `export`, `patient_index`, `visit`, `eye`, and the planted geometry."""
    truth = pd.read_csv(small_cohort / "truth.csv")
    truth["file"] = [str(small_cohort / p) for p in truth["path"]]
    return truth


@pytest.fixture(scope="session")
def planted_identifiers(small_cohort: Path) -> list[str]:
    """Every identifier the synthetic cohort planted (names, MRNs, dates of birth, ...)."""
    values: list[str] = []

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and len(x) >= 6:
            values.append(x)

    walk(json.loads((small_cohort / "phi.json").read_text()))
    return sorted(set(values))


@pytest.fixture
def scoring_env(scoring_home: Path, tracking_uri: str, key_file: Path) -> Iterator[dict[str, str]]:
    """Environment of an `eyehub score`/`serve` subprocess: the scoring store, the test key."""
    env = {
        "EYEHUB_HOME": str(scoring_home),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "EYEHUB_KEY_FILE": str(key_file),
    }
    yield env
    shutil.rmtree(scoring_home / "logs", ignore_errors=True)
