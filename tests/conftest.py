"""Shared fixtures: small synthetic cohorts made in seconds by `eyehub.synth`."""

from __future__ import annotations

from pathlib import Path

import pytest

from eyehub.synth import generate_cohort
from ingest import HubKey, generate_key_file, load_key, run_ingest
from ingest.run import IngestSettings, IngestSummary


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 patients at --size small, seed 11: every export kind and transfer syntax occurs."""
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, patients=24, seed=11, size="small", workers=2)
    return out


# A fixed test secret: pseudonyms (and so every output) are the same on every run, so a
# test that passes once passes always. keygen's own randomness is tested in test_keys.py.
TEST_SECRET_HEX = "6579656875622d746573742d6b65792d2d6e6f742d666f722d7265616c2d757365"


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "hub.key"
    generate_key_file(path)  # the real writer (mode 0600), then the fixed secret
    path.write_text(f"eyehub-key-v1\n{TEST_SECRET_HEX}\n", encoding="ascii")
    return path


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
