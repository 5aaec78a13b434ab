"""Nothing that identifies a patient leaves ingest: every byte written is searched for the
identifiers the synthetic cohort planted (docs/architecture.md, "Privacy")."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from ingest import HubKey
from tests.cli import run_eyehub


def _planted(cohort: Path) -> set[str]:
    """Identifiers searched for everywhere (real study dates are checked per patient)."""
    values: set[str] = set()
    for p in json.loads((cohort / "phi.json").read_text()):
        for field in (
            "patient_name",
            "mrn",
            "other_patient_id",
            "birth_date",
            "address",
            "institution",
            "referring_physician",
            "device_serial",
            "station_name",
        ):
            values.add(p[field])
        values.update(p["accession_numbers"])
        values.update(p["patient_name"].split("^"))  # surname and given name apart
        values.add(p["birth_date"][:4] + "-" + p["birth_date"][4:6] + "-" + p["birth_date"][6:])
    with open(cohort / "truth.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            ds = pydicom.dcmread(cohort / r["path"], stop_before_pixels=True)
            values.update({ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID})
    return {v for v in values if len(v) >= 4}


@pytest.fixture(scope="module")
def cli_run(small_cohort: Path, key_file: Path, tmp_path_factory: pytest.TempPathFactory):
    dataset = tmp_path_factory.mktemp("privacy") / "ds"
    out = run_eyehub(
        "--verbose",
        "ingest",
        str(small_cohort / "dicom"),
        "--out",
        str(dataset),
        "--labels",
        str(small_cohort / "labels.csv"),
        "--key-file",
        str(key_file),
    )
    assert out.returncode == 0, out.stderr
    return dataset, out.stdout + out.stderr


def test_no_planted_identifier_in_any_byte_written_or_logged(small_cohort: Path, cli_run) -> None:
    dataset, log_text = cli_run
    planted = _planted(small_cohort)
    assert len(planted) > 100
    needles = [v.encode() for v in planted] + [v.upper().encode() for v in planted]
    files = [p for p in dataset.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and len(files) > 100
    for path in files:
        data = path.read_bytes()
        hits = [n.decode() for n in needles if n in data]
        assert not hits, f"{path.relative_to(dataset)} holds {hits[:3]}"
    hits = [v for v in planted if v in log_text]
    assert not hits, f"the log holds {hits[:3]}"


def test_no_scan_carries_its_patients_real_dates(
    small_cohort: Path, cli_run, hub_key: HubKey
) -> None:
    # a shifted date may equal another patient's real date by chance; what must never
    # appear is a patient's own real date next to their scans
    dataset, _ = cli_run
    phi = {p["patient_index"]: p for p in json.loads((small_cohort / "phi.json").read_text())}
    catalog = pd.read_parquet(dataset / "catalog.parquet").set_index("scan_id")
    with open(small_cohort / "truth.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            real = phi[int(r["patient_index"])]["study_dates"]
            ds = pydicom.dcmread(small_cohort / r["path"], stop_before_pixels=True)
            scan_id = hub_key.scan_id(ds.SOPInstanceUID)
            meta = (dataset / "scans.zarr" / scan_id / "zarr.json").read_text()
            row = catalog.loc[scan_id]
            for d in real:
                iso = f"{d[:4]}-{d[4:6]}-{d[6:]}"
                assert d not in meta and iso not in meta
                assert iso not in (str(row.study_date), str(row.acquisition_date))


def test_nothing_but_the_dataset_is_written(small_cohort: Path, cli_run) -> None:
    dataset, _ = cli_run
    top = {p.name for p in dataset.iterdir()}
    assert top == {"scans.zarr", "catalog.parquet", "quarantine.parquet", ".ingest"}
