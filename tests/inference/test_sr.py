"""The DICOM SR of a scored exam: valid (dciodvfy), in the patient's own study, and saying
what the result says (model, probabilities, decisions, or ungradable with its reason)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian

from eyehub.labels import label_spec
from inference.registry import LoadedModel, load_model
from inference.score import ExamResult, Scorer
from inference.sr import build_sr
from ingest.keys import HubKey
from tests.inference.models import Registered
from tests.tools import need_tool


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def fundus_loaded(fundus_model: Registered, tracking_uri: str, cache: Path) -> LoadedModel:
    return load_model(f"models:/{fundus_model.name}@champion", tracking_uri, cache)


@pytest.fixture(scope="module")
def oct_loaded(oct_model: Registered, tracking_uri: str, cache: Path) -> LoadedModel:
    return load_model(f"models:/{oct_model.name}@champion", tracking_uri, cache)


def first_file(cohort_files: pd.DataFrame, kind: str) -> Path:
    rows = cohort_files[(cohort_files["kind"] == kind)]
    return Path(rows.iloc[0]["file"])


def score(loaded: LoadedModel, key: HubKey, file: Path) -> ExamResult:
    return Scorer(loaded, key, heatmaps=False).score_files([file])[0]


@pytest.fixture(scope="module")
def fundus_exam(
    fundus_loaded: LoadedModel, hub_key: HubKey, cohort_files: pd.DataFrame
) -> tuple[Path, ExamResult]:
    file = first_file(cohort_files, "fundus")
    result = score(fundus_loaded, hub_key, file)
    assert result.status == "scored"
    return file, result


def write(ds: Dataset, path: Path) -> Dataset:
    """Write the SR as a Part 10 file and read it back, as a PACS would receive it."""
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return pydicom.dcmread(path)


def dciodvfy_errors(path: Path) -> list[str]:
    need_tool("dciodvfy")
    run = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if "Error" in line]


def content_items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of the SR's tree, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def text_values(ds: Dataset, meaning: str) -> list[str]:
    return [
        str(i.get("TextValue", i.get("UID", "")))
        for i in content_items(ds)
        if i.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def groups(ds: Dataset) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The report's measurement groups by tracking identifier (the task), read back with
    highdicom's own reader."""
    report = hd.sr.ComprehensiveSR.from_dataset(ds).content
    return {str(g.tracking_identifier): g for g in report.get_image_measurement_groups()}


def measured(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, float]:
    return {m.name.meaning: float(m.value) for m in group.get_measurements()}


def evaluated(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, str]:
    return {q.name.meaning: str(q.value.value) for q in group.get_qualitative_evaluations()}


def referenced_uids(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> set[str]:
    return {
        str(s.referenced_sop_instance_uid)
        for s in group.source_images
        if isinstance(s, hd.sr.SourceImageForMeasurementGroup)
    }


def test_fundus_sr_passes_dciodvfy(
    fundus_exam: tuple[Path, ExamResult], fundus_loaded: LoadedModel, tmp_path: Path
) -> None:
    _, result = fundus_exam
    path = tmp_path / "sr.dcm"
    write(build_sr(result, fundus_loaded), path)
    assert dciodvfy_errors(path) == []


def test_fundus_sr_is_in_the_patients_study(
    fundus_exam: tuple[Path, ExamResult], fundus_loaded: LoadedModel, tmp_path: Path
) -> None:
    file, result = fundus_exam
    source = pydicom.dcmread(file, stop_before_pixels=True)
    sr = write(build_sr(result, fundus_loaded), tmp_path / "sr.dcm")

    # identifiers kept: the report goes into this patient's record, next to the scan
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID"):
        assert str(sr.get(keyword)) == str(source.get(keyword)), keyword
    assert sr.AccessionNumber == source.AccessionNumber
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == ComprehensiveSRStorage
    # a new instance in a new series of that study
    assert sr.SOPInstanceUID != source.SOPInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert (int(sr.SeriesNumber), sr.SeriesDescription) == (901, "eyehub AI findings")
    assert sr.Manufacturer == "eyehub"
    # the source image is referenced as evidence of the report
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert evidence == {str(source.SOPInstanceUID)}


def test_fundus_sr_holds_the_model_and_every_figure(
    fundus_exam: tuple[Path, ExamResult], fundus_loaded: LoadedModel, tmp_path: Path
) -> None:
    file, result = fundus_exam
    source_uid = str(pydicom.dcmread(file, stop_before_pixels=True).SOPInstanceUID)
    sr = write(build_sr(result, fundus_loaded), tmp_path / "sr.dcm")
    name, version = result.model["name"], result.model["version"]
    assert version is not None

    assert set(text_values(sr, "Algorithm Name")) == {name}
    assert set(text_values(sr, "Algorithm Version")) == {version}
    assert text_values(sr, "Device Observer Name") == [name]
    assert version in text_values(sr, "Device Observer Model Name")[0]

    by_task = groups(sr)
    assert set(by_task) == {t.task for t in result.tasks}
    for task in result.tasks:
        group = by_task[task.task]
        figures = measured(group)
        assert referenced_uids(group) == {source_uid}, task.task
        if task.decision is not None:
            assert figures["Probability"] == pytest.approx(task.probability, abs=1e-6)
            assert figures["Referral threshold of probability"] == pytest.approx(
                task.threshold, abs=1e-6
            )
            assert evaluated(group)["Referral decision"] == task.decision
        if task.grade is not None:
            assert figures["Grade"] == task.grade
        if task.kind == "regression":
            assert list(figures.values()) == [pytest.approx(task.value, abs=1e-6)]
            assert next(iter(group.get_measurements())).unit.value == "a"  # years
        if task.task == "sex":  # a trait: the probability of the value it names
            assert figures == {"Probability of M": pytest.approx(task.value, abs=1e-6)}
    # the disease findings are coded with SNOMED CT, not only the private scheme
    assert by_task["amd"].finding_type.scheme_designator == "SCT"
    assert by_task["dr_grade"].finding_type.value == "4855003"


def test_oct_sr(
    oct_loaded: LoadedModel, hub_key: HubKey, cohort_files: pd.DataFrame, tmp_path: Path
) -> None:
    file = first_file(cohort_files, "oct")
    source = pydicom.dcmread(file, stop_before_pixels=True)
    result = score(oct_loaded, hub_key, file)
    assert result.status == "scored"
    path = tmp_path / "sr.dcm"
    sr = write(build_sr(result, oct_loaded), path)

    assert dciodvfy_errors(path) == []
    assert (sr.PatientID, sr.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
    by_task = groups(sr)
    assert set(by_task) == {t.task for t in result.tasks}
    for task in result.tasks:
        assert referenced_uids(by_task[task.task]) == {str(source.SOPInstanceUID)}
        if task.decision is not None:
            figures = measured(by_task[task.task])
            assert figures["Probability"] == pytest.approx(task.probability, abs=1e-6)


def darkened(source: Path, target: Path, factor: float = 0.12) -> Path:
    """The photograph with its pixels scaled down (an underexposed capture), stored
    uncompressed (Explicit VR Little Endian) with its header otherwise unchanged."""
    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array  # decoded to RGB where the file was YCbCr
    dark = (pixels.astype(np.float64) * factor).round().astype(pixels.dtype)
    ds.PixelData = dark.tobytes()
    if int(ds.SamplesPerPixel) == 3:
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(target, enforce_file_format=True)
    return target


def test_ungradable_exam_sr_says_why_and_gives_no_figures(
    fundus_loaded: LoadedModel, hub_key: HubKey, cohort_files: pd.DataFrame, tmp_path: Path
) -> None:
    file = darkened(first_file(cohort_files, "fundus"), tmp_path / "dark.dcm")
    result = score(fundus_loaded, hub_key, file)
    # an underexposed photograph: mean brightness in its field of view below the recipe's
    # fundus.min_illumination (0.12; about 0.05 here)
    assert (result.status, result.reason) == ("ungradable", "too_dark")
    path = tmp_path / "sr.dcm"
    sr = write(build_sr(result, fundus_loaded), path)

    assert dciodvfy_errors(path) == []
    by_task = groups(sr)
    shown = {t.name for t in fundus_loaded.model.tasks if not label_spec(t.name).control}
    assert set(by_task) == shown
    for group in by_task.values():
        said = evaluated(group)
        assert said["Referral decision"] == "ungradable"
        assert said["Reason ungradable"] == result.reason
        assert said["Image Quality"] == "111235"  # DCM: unusable
        assert list(group.get_measurements()) == []
    # no figure anywhere in the report
    assert [i for i in content_items(sr) if i.ValueType == "NUM"] == []
