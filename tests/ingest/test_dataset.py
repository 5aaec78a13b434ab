"""The dataset directory keeps the contract (docs/architecture.md, "The dataset directory")."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models.v05.image import Image

from eyehub.synth import LABEL_COLUMNS
from ingest import HubKey, read_pixels
from ingest.run import IngestSummary

CONTRACT_COLUMNS = {
    "scan_id",
    "patient_id",
    "eye",
    "modality",
    "sop_class_uid",
    "shape",
    "spacing_mm",
    "manufacturer",
    "model",
    "acquisition_date",
    "source_sha256",
}
LABELS = LABEL_COLUMNS


def _truth(cohort: Path) -> list[dict[str, str]]:
    with open(cohort / "truth.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_file_is_converted_into_one_catalog_row(
    ingested: tuple[Path, IngestSummary], small_cohort: Path
) -> None:
    dataset, summary = ingested
    n = len(_truth(small_cohort))
    assert summary.converted == n and summary.quarantined_total == 0
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    assert len(catalog) == n and catalog.scan_id.is_unique
    assert CONTRACT_COLUMNS | set(LABELS) <= set(catalog.columns)
    assert set(catalog.modality) == {"fundus", "oct"} and set(catalog.eye) == {"R", "L"}
    assert pd.read_parquet(dataset / "quarantine.parquet").empty


def test_scans_are_ome_zarr_0_5_images_standard_readers_open(
    ingested: tuple[Path, IngestSummary],
) -> None:
    dataset, _ = ingested
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    with_unit = 0
    for _, row in catalog.iterrows():
        axes = ["c", "y", "x"] if row.modality == "fundus" else ["z", "y", "x"]
        group = zarr.open_group(dataset / "scans.zarr" / row.scan_id, mode="r")
        Image.from_zarr(group)  # ome-zarr-models validates the 0.5 metadata
        multiscales = group.attrs["ome"]["multiscales"][0]
        assert [a["name"] for a in multiscales["axes"]] == axes
        assert list(group["0"].metadata.dimension_names) == axes
        scale = multiscales["datasets"][0]["coordinateTransformations"][0]["scale"]
        spatial = [a for a in multiscales["axes"] if a["name"] != "c"]
        if row.spacing_mm is not None:  # millimetres wherever the file gave a spacing
            assert all(a.get("unit") == "millimeter" for a in spatial)
            assert scale[1:] == list(row.spacing_mm)[-2:]
            with_unit += 1
        else:  # PACS exports without PixelSpacing: no unit claimed
            assert row.modality == "fundus" and all("unit" not in a for a in spatial)
        if row.modality == "oct":
            assert group["0"].chunks == (1, *row["shape"][1:])  # one B-scan per chunk
        codecs = json.loads((dataset / "scans.zarr" / row.scan_id / "0" / "zarr.json").read_text())
        assert any(
            c["name"] == "blosc" and c["configuration"]["cname"] == "zstd" for c in codecs["codecs"]
        )
    assert with_unit >= 0.8 * len(catalog)
    for modality in ("fundus", "oct"):  # ome-zarr-py opens them
        row = catalog[(catalog.modality == modality) & catalog.spacing_mm.notna()].iloc[0]
        nodes = list(Reader(parse_url(str(dataset / "scans.zarr" / row.scan_id)))())
        assert nodes[0].data[0].shape == tuple(row["shape"])


def test_lossless_pixels_and_oct_geometry_survive_exactly(
    ingested: tuple[Path, IngestSummary], small_cohort: Path, hub_key: HubKey
) -> None:
    dataset, _ = ingested
    for r in _truth(small_cohort):
        if r["kind"] != "oct":
            continue
        ds = pydicom.dcmread(small_cohort / r["path"])
        positions = [
            int(f.FrameContentSequence[0].InStackPositionNumber)
            for f in ds.PerFrameFunctionalGroupsSequence
        ]
        expected = ds.pixel_array[np.argsort(positions)]
        stored = read_pixels(dataset, hub_key.scan_id(ds.SOPInstanceUID))
        np.testing.assert_array_equal(stored, expected)


def test_burned_in_text_is_cleared_and_the_retina_kept(
    ingested: tuple[Path, IngestSummary], small_cohort: Path, hub_key: HubKey
) -> None:
    dataset, _ = ingested
    for r in _truth(small_cohort):
        if r["kind"] != "fundus":
            continue
        ds = pydicom.dcmread(small_cohort / r["path"])
        stored = read_pixels(dataset, hub_key.scan_id(ds.SOPInstanceUID))
        yy, xx = np.mgrid[: stored.shape[1], : stored.shape[2]]
        d = np.hypot(xx - float(r["fov_cx"]), yy - float(r["fov_cy"]))
        # the mask keeps a pixel or two of rim (JPEG ringing there is dim, never text)
        assert stored[:, d > float(r["fov_radius"]) + 1].max() < 40
        assert stored[:, d > float(r["fov_radius"]) + 5].max() == 0
        original = np.moveaxis(ds.pixel_array, -1, 0)
        inside = d < float(r["fov_radius"]) - 2
        # lossless: every retinal pixel as stored. Lossy JPEG: libjpeg-turbo's IDCT and
        # chroma upsampling differ from pydicom's default decoder by a few grey levels,
        # within what the JPEG standard leaves to decoders (docs/ingest.md)
        lossy = str(ds.get("LossyImageCompression", "00")) == "01"
        difference = np.abs(stored[:, inside].astype(int) - original[:, inside]).max()
        assert difference <= (8 if lossy else 0), (r["path"], difference)


def test_labels_join_by_pseudonymised_mrn_eye_and_shifted_date(
    ingested: tuple[Path, IngestSummary], small_cohort: Path, hub_key: HubKey
) -> None:
    dataset, _ = ingested
    catalog = pd.read_parquet(dataset / "catalog.parquet").set_index("scan_id")
    with open(small_cohort / "labels.csv", newline="") as fh:
        labels = {(r["mrn"], r["eye"], r["study_date"]): r for r in csv.DictReader(fh)}
    checked = 0
    for r in _truth(small_cohort):
        ds = pydicom.dcmread(small_cohort / r["path"], stop_before_pixels=True)
        date = f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}"
        expected = labels[(ds.PatientID, r["eye"], date)]
        row = catalog.loc[hub_key.scan_id(ds.SOPInstanceUID)]
        assert row.patient_id == hub_key.patient_id(ds.PatientID)
        shift = hub_key.date_shift_days(row.patient_id)
        assert (pd.Timestamp(date) - pd.Timestamp(row.study_date)).days == shift
        for col in LABELS:
            value = row[col]
            if expected[col] == "":
                assert pd.isna(value), col
            else:
                assert str(value) == expected[col] or float(value) == float(expected[col]), col
                checked += 1
    assert checked > 500


def test_oct_links_to_the_fundus_of_the_same_eye_and_visit_survive(
    ingested: tuple[Path, IngestSummary],
) -> None:
    dataset, _ = ingested
    catalog = pd.read_parquet(dataset / "catalog.parquet").set_index("scan_id")
    octs = catalog[catalog.modality == "oct"]
    assert len(octs) > 0
    for _, row in octs.iterrows():
        (fundus_id,) = list(row.linked_scan_ids)
        fundus = catalog.loc[fundus_id]
        assert fundus.modality == "fundus"
        assert (fundus.patient_id, fundus.eye, fundus.study_uid) == (
            row.patient_id,
            row.eye,
            row.study_uid,
        )
        attrs = zarr.open_group(dataset / "scans.zarr" / row.name, mode="r").attrs["eyehub"]
        fundus_attrs = zarr.open_group(dataset / "scans.zarr" / fundus_id, mode="r").attrs
        assert (
            attrs["dicom"]["ReferencedInstances"][0]["ReferencedSOPInstanceUID"]
            == fundus_attrs["eyehub"]["dicom"]["SOPInstanceUID"]
        )


def test_attributes_record_the_deidentification(ingested: tuple[Path, IngestSummary]) -> None:
    dataset, _ = ingested
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    for _, row in catalog.groupby("modality").head(1).iterrows():
        attrs = zarr.open_group(dataset / "scans.zarr" / row.scan_id, mode="r").attrs["eyehub"]
        dicom = attrs["dicom"]
        assert dicom["PatientIdentityRemoved"] == "YES"
        codes = {c["CodeValue"] for c in dicom["DeidentificationMethodCodeSequence"]}
        assert {"113100", "113107", "113109"} <= codes
        assert ("113101" in codes) == (row.modality == "fundus")  # clean pixel data
        assert dicom["Manufacturer"] and dicom["ManufacturerModelName"]
        assert "DeviceSerialNumber" not in dicom and "PatientID" not in dicom
