"""A PACS over DICOMweb: retrieve a study's instances (WADO-RS), store reports (STOW-RS).

SKELETON: to be implemented."""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset


def retrieve_study(url: str, study_uid: str, token: str | None = None) -> list[bytes]:
    """Every instance of the study at the DICOMweb base `url` (e.g.
    http://127.0.0.1:8042/dicom-web), as Part 10 file bytes."""
    raise NotImplementedError


def store_instances(url: str, datasets: Sequence[Dataset], token: str | None = None) -> None:
    """Store `datasets` with STOW-RS at the DICOMweb base `url`."""
    raise NotImplementedError
