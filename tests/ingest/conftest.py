"""Ingest fixtures: a key, a small synthetic cohort ingested once, and bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest import HubKey, generate_key_file, load_key, run_ingest
from ingest.run import IngestSettings, IngestSummary


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_key_file(tmp_path_factory.mktemp("key") / "hub.key")


@pytest.fixture(scope="session")
def hub_key(key_file: Path) -> HubKey:
    return load_key(key_file)


@pytest.fixture(scope="session")
def ingested(
    small_cohort: Path, hub_key: HubKey, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, IngestSummary]:
    """The small cohort ingested once (local Ray, 2 workers), with its labels."""
    dataset = tmp_path_factory.mktemp("dataset") / "ds"
    summary = run_ingest(
        [small_cohort / "dicom"],
        dataset,
        hub_key,
        small_cohort / "labels.csv",
        IngestSettings(workers=2),
    )
    return dataset, summary
