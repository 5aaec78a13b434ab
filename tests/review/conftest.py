"""The review tests' tracking store: four runs made once per session (`tests/review/runs.py`),
and for each test that changes aliases or tags a copy of the store of its own."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.review.runs import Store, make_store


@pytest.fixture(scope="session")
def review_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Versions 1-4 of eyehub-review_demo: strong, weak, shifted (other samples), same."""
    return make_store(tmp_path_factory.mktemp("review-store"))


@pytest.fixture
def store_uri(review_store: Store, tmp_path: Path) -> str:
    """A copy of the review store's database for this test alone (the runs' artifacts stay
    where they are: the database names them by absolute path)."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(review_store.db, db)
    return review_store.uri(db)
