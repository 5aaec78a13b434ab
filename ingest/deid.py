"""De-identification per DICOM PS3.15 Annex E, applied to what leaves ingest.

eyehub never writes DICOM back out: what leaves ingest is pixels plus an allow-list of
attributes. So the Basic Application Level Confidentiality Profile (E.2) is applied as
"keep only these, transformed so": every attribute not listed is removed (names, IDs,
birth date, addresses, institution, physicians, accession numbers, station names,
serial numbers, free text, private tags). Options applied on top:

- Retain Longitudinal Temporal Information with Modified Dates (E.3.6): every date moves
  back by one shift per patient, derived from the key; times are dropped.
- Retain Device Identity (E.3.3): Manufacturer and model kept; serial numbers removed.
- Retain UIDs is NOT applied: every UID is replaced by a keyed hash (2.25 form),
  consistently, so references between instances (OCT -> fundus) survive.
- Clean Pixel Data (E.3.1), fundus only: pixels outside the field of view are cleared.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.valuerep import DA

from eyehub.errors import InputError
from ingest.keys import HubKey

# PS3.16 CID 7050 De-identification Method
METHOD_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_pixels": ("113101", "Clean Pixel Data Option"),
    "modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "device_identity": ("113109", "Retain Device Identity Option"),
}

# attributes kept verbatim: device identity and technical description only
_KEEP = (
    "Modality",
    "SOPClassUID",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "SamplesPerPixel",
    "LossyImageCompression",
    "LossyImageCompressionMethod",
    "HorizontalFieldOfView",
    "NumberOfFrames",
    "Rows",
    "Columns",
)
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


@dataclass(frozen=True)
class Deidentified:
    patient_id: str
    scan_id: str
    study_date: dt.date | None  # shifted
    acquisition_date: dt.date | None  # shifted
    attributes: dict[str, Any]  # the de-identified DICOM attributes (JSON-able)
    linked_scan_ids: list[str]  # scan_ids of the instances this one references


def _parse_da(value: Any) -> dt.date | None:
    """A DICOM DA value (pydicom's parser; also the old ACR-NEMA YYYY.MM.DD) as a date."""
    if isinstance(value, dt.date):
        return dt.date(value.year, value.month, value.day)
    text = str(value or "").strip()
    try:
        parsed = DA(text) if text else None
    except (ValueError, TypeError):
        return None
    return None if parsed is None else dt.date(parsed.year, parsed.month, parsed.day)


def _plain(value: Any) -> Any:
    """A DICOM value as JSON: multi-values to lists, numbers to numbers, the rest to str."""
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, int | float):
        return value
    try:
        return float(value) if type(value).__name__ in ("DSfloat", "DSdecimal") else str(value)
    except (TypeError, ValueError):
        return str(value)


def deidentify(
    ds: Dataset,
    key: HubKey,
    modality: str,
    eye: str,
    references: list[tuple[str, str]],
    pixels_cleaned: bool,
) -> Deidentified:
    """Build the de-identified record of one instance (the header, pixels aside)."""
    mrn = str(ds.get("PatientID", "") or "").strip()
    if not mrn:
        raise InputError(
            "missing_patient_id",
            "the file has no PatientID, so its patient "
            "cannot be pseudonymised or linked to labels; fix the export.",
        )
    sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not sop_uid:
        raise InputError("unreadable", "the file has no SOP Instance UID.")
    patient_id = key.patient_id(mrn)
    scan_id = key.scan_id(sop_uid)
    attrs: dict[str, Any] = {}
    for keyword in _KEEP:
        if keyword in ds and ds.get(keyword) not in (None, ""):
            attrs[keyword] = _plain(ds.get(keyword))
    for keyword in _UIDS:
        if ds.get(keyword):
            attrs[keyword] = key.uid(str(ds.get(keyword)))
    dates: dict[str, dt.date] = {}
    for keyword in _DATES:
        d = _parse_da(ds.get(keyword))
        if d is not None:
            dates[keyword] = key.shift_date(patient_id, d)
    acq = _parse_da(str(ds.get("AcquisitionDateTime", "") or "")[:8])
    if acq is not None:
        dates["AcquisitionDate"] = key.shift_date(patient_id, acq)
    for keyword, d in dates.items():
        attrs[keyword] = d.strftime("%Y%m%d")
    attrs["ImageLaterality"] = eye
    attrs["TransferSyntaxUID"] = str(ds.file_meta.get("TransferSyntaxUID", ""))
    attrs["ReferencedInstances"] = [
        {"ReferencedSOPClassUID": cls, "ReferencedSOPInstanceUID": key.uid(uid)}
        for cls, uid in references
    ]
    # what was done, as PS3.15 E.1.1 asks: Patient Identity Removed and the method codes
    methods = ["basic", "modified_dates", "device_identity"]
    if pixels_cleaned:
        methods.insert(1, "clean_pixels")
        attrs["BurnedInAnnotation"] = "NO"
    attrs["PatientIdentityRemoved"] = "YES"
    attrs["LongitudinalTemporalInformationModified"] = "MODIFIED"
    attrs["DeidentificationMethod"] = "eyehub ingest: PS3.15 Annex E " + "; ".join(
        METHOD_CODES[m][1] for m in methods
    )
    attrs["DeidentificationMethodCodeSequence"] = [
        {
            "CodeValue": METHOD_CODES[m][0],
            "CodingSchemeDesignator": "DCM",
            "CodeMeaning": METHOD_CODES[m][1],
        }
        for m in methods
    ]
    study_date = dates.get("StudyDate") or dates.get("SeriesDate")
    acquisition_date = dates.get("AcquisitionDate") or dates.get("ContentDate") or study_date
    return Deidentified(
        patient_id=patient_id,
        scan_id=scan_id,
        study_date=study_date or acquisition_date,
        acquisition_date=acquisition_date,
        attributes=attrs,
        linked_scan_ids=[key.scan_id(uid) for _, uid in references],
    )
