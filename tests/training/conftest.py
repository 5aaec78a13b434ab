"""The small cohort's dataset prepared once with the training configs' recipe (`small`):
each training test copies it, so none prepares it again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ingest.run import IngestSummary


@pytest.fixture(scope="session")
def prepared_small(
    ingested: tuple[Path, IngestSummary], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from training.config import load_train_config
    from training.run import TrainSettings, ensure_prepared

    dataset = tmp_path_factory.mktemp("prepared-small") / "ds"
    shutil.copytree(ingested[0], dataset)
    home = tmp_path_factory.mktemp("prepared-home")
    ensure_prepared(
        dataset, load_train_config("fundus_demo"), TrainSettings(home=home), lambda _: None
    )
    return dataset


@pytest.fixture
def dataset(prepared_small: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(prepared_small, copy)
    return copy
