"""The DICOM Structured Report of a scored exam (highdicom), for the patient's record.

SKELETON: to be implemented (see build_sr's docstring)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from inference.registry import LoadedModel
from inference.score import ExamResult


def build_sr(result: ExamResult, loaded: LoadedModel) -> Dataset:
    """A Comprehensive SR (TID 1500 measurement report) of `result`, in the scanned
    patient's own study and patient (identifiers copied from the source header), referencing
    every source image, with the model's name and version as the algorithm / observer
    device. Passes dciodvfy with no Error line."""
    raise NotImplementedError
