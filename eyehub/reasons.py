"""The closed sets of reason codes: why ingest quarantined a file, why a scan is ungradable.

A reason is a short stable code a script can count on; the sentence a person acts on goes
in the record's `detail`. Every code written anywhere is one of these (a test checks the
code and the docs against them), so nothing is invented at run time.
"""

from __future__ import annotations

from collections.abc import Mapping

# ingest: quarantine.parquet `reason` (docs/ingest.md, "Quarantine reasons")
QUARANTINE_REASONS: Mapping[str, str] = {
    "not_dicom": "not a DICOM file",
    "truncated": "the file ends before its data elements (or its pixel data) do",
    "no_pixel_data": "no Pixel Data element",
    "pixel_data_short": "Pixel Data shorter than Rows x Columns x Frames says",
    "corrupt_pixel_data": "the compressed pixel stream is damaged or cannot be decoded",
    "unsupported_transfer_syntax": "no decoder installed for the transfer syntax",
    "too_large": "declared decoded size above --max-decoded-bytes",
    "missing_laterality": "no ImageLaterality, FrameLaterality or Laterality",
    "inconsistent_geometry": "multi-frame geometry that cannot be put in order",
    "not_ophthalmic": "not a fundus photograph or OCT volume",
    "missing_patient_id": "no PatientID to pseudonymise",
    "burned_in_annotation": "burned-in annotation that cannot be cleared",
    "duplicate_instance": "another file holds the same SOP Instance UID with other bytes",
    "unreadable": "the file cannot be read from storage (permissions, I/O error)",
    "worker_lost": "the worker converting the file died (e.g. killed for memory)",
    "internal_error": "a programming error in eyehub; the traceback is in the log file",
}

# preprocess: prepared/<recipe_id>.parquet `reason` of an ungradable scan (docs/preprocess.md)
UNGRADABLE_REASONS: Mapping[str, str] = {
    "no_fov": "no lit field of view found in the photograph",
    "too_dark": "mean brightness inside the FOV below fundus.min_illumination",
    "overexposed": "mean brightness inside the FOV above fundus.max_illumination",
    "fov_too_small": "share of the photograph inside the FOV below fundus.min_fov_fraction",
    "uneven_illumination": "low-passed brightness varies more than fundus.max_unevenness",
    "blurred": "variance of the Laplacian below fundus.min_sharpness",
    "low_signal": "OCT signal below oct.min_signal",
    "empty_bscans": "share of B-scans without signal above oct.max_empty_share",
    "saturated_bscans": "share of saturated B-scans above oct.max_saturated_share",
    "bad_geometry": "the stored scan's shape or spacing is not an image or volume eyehub prepares",
    "store_unreadable": "the stored scan's array cannot be read (damaged or removed)",
    "internal_error": "a programming error in eyehub; the traceback is in the log file",
}

# scoring: why a scan sent to be scored was refused (HTTP 400, the CLI's error line); a bad
# DICOM file is refused with its QUARANTINE_REASONS code, an ungradable one is scored as
# "ungradable" with its UNGRADABLE_REASONS code (docs/inference.md)
SCORING_REASONS: Mapping[str, str] = {
    "wrong_modality": "the model does not take this kind of scan (a fundus model and an OCT)",
    "incomplete_exam": "a fusion model needs a fundus photograph and an OCT of the same eye "
    "and visit",
    "not_an_upload": "the request carried no DICOM file",
}


def check_reason(code: str, reasons: Mapping[str, str]) -> str:
    """`code` if it is in `reasons`; otherwise a programming error (never bad input)."""
    if code not in reasons:
        raise ValueError(f"reason code {code!r} is not in the closed set {sorted(reasons)}")
    return code
