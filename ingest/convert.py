"""Convert one source file into the dataset: the unit of work a Ray task runs.

Plain Python (no Ray): read, check, de-identify, decode and clean with the scan kernel
(`ingest.kernel`, the same functions scoring uses), write atomically. Returns a small
result record; never raises for a bad input (it becomes a quarantine result), so one bad
file can never stop a batch. An exception nobody planned for is a programming error, not
bad input: the file is quarantined as `internal_error` and its traceback travels back to
the driver, which writes it to the log file.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from eyehub.errors import InputError
from eyehub.failures import internal_traceback
from ingest import gpu_decode
from ingest.deid import deidentify
from ingest.kernel import fundus_pixels, oct_frames, oct_shape
from ingest.keys import HubKey
from ingest.reader import DirectoryRecord, classify, inspect_scan, read_header
from ingest.row import CatalogRow
from ingest.store import read_scan_attributes, scan_path, write_scan, write_scan_frames

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def convert_file(path: Path, dataset: Path, key: HubKey, max_decoded_bytes: int) -> dict[str, Any]:
    """Convert `path`; returns {'outcome': converted|present|quarantined|ignored, ...}."""
    result: dict[str, Any] = {"path": str(path), "outcome": "quarantined", "sha256": None}
    on_nvimgcodec = gpu_decode.frames_decoded()
    try:
        try:
            stat = path.stat()
            result.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
            result["sha256"] = sha = file_sha256(path)
        except OSError as exc:
            raise InputError(
                "unreadable",
                f"cannot read the file ({type(exc).__name__}); check permissions and storage.",
            ) from None
        ds = read_header(path, defer_pixels=True)
        classify(ds)
        sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if sop_uid:  # already in the store? then nothing is decoded
            scan_id = key.scan_id(sop_uid)
            existing = read_scan_attributes(scan_path(dataset, scan_id))
            if existing is not None:
                return _existing(result, existing, scan_id, sha)
        info = inspect_scan(ds, max_decoded_bytes)
        fundus = info.modality == "fundus"
        # de-identify first: a file that cannot be pseudonymised is not decoded at all
        deid = deidentify(info.header, key, info.modality, info.eye, info.references, fundus)
        attrs = deid.attributes

        def row(shape: tuple[int, ...], dtype: str, kept: float | None) -> dict[str, Any]:
            return CatalogRow(
                scan_id=deid.scan_id,
                patient_id=deid.patient_id,
                eye=info.eye,
                modality=info.modality,
                sop_class_uid=attrs.get("SOPClassUID"),
                shape=list(shape),
                axes="".join(info.axes),
                dtype=dtype,
                spacing_mm=list(info.spacing_mm) if info.spacing_mm else None,
                manufacturer=attrs.get("Manufacturer"),
                model=attrs.get("ManufacturerModelName"),
                acquisition_date=deid.acquisition_date,
                study_date=deid.study_date,
                study_uid=attrs.get("StudyInstanceUID"),
                transfer_syntax_uid=attrs.get("TransferSyntaxUID"),
                lossy=attrs.get("LossyImageCompression") == "01",
                fov_mask_fraction=kept,
                linked_scan_ids=deid.linked_scan_ids,
                source_sha256=sha,
            ).to_stored()

        if fundus:
            pixels, kept = fundus_pixels(info)
            decoded_bytes = pixels.nbytes
            written = write_scan(
                dataset,
                deid.scan_id,
                pixels,
                info.axes,
                info.spacing_mm,
                {"dicom": attrs, "catalog": row(pixels.shape, str(pixels.dtype), kept)},
            )
        else:
            shape, dtype = oct_shape(info)
            decoded_bytes = int(shape[0] * shape[1] * shape[2]) * dtype.itemsize
            assert info.order is not None  # inspect_scan orders every OCT
            written = write_scan_frames(
                dataset,
                deid.scan_id,
                oct_frames(path, info),
                shape,
                dtype,
                info.order,
                info.axes,
                info.spacing_mm,
                {"dicom": attrs, "catalog": row(shape, str(dtype), None)},
            )
        if not written:
            existing = read_scan_attributes(scan_path(dataset, deid.scan_id)) or {}
            return _existing(result, existing, deid.scan_id, sha)
        result.update(outcome="converted", scan_id=deid.scan_id, decoded_bytes=decoded_bytes)
        now = gpu_decode.frames_decoded()
        result["nvimgcodec"] = next((b for b in now if now[b] > on_nvimgcodec[b]), None)
    except DirectoryRecord:
        result.update(outcome="ignored")
    except InputError as exc:
        result.update(outcome="quarantined", reason=exc.reason, detail=exc.detail)
    except MemoryError:
        result.update(
            outcome="quarantined",
            reason="too_large",
            detail="decoding ran out of memory; lower --workers or raise memory.",
        )
    except Exception as exc:  # a programming error: keep the file safe, say where to look
        result.update(
            outcome="quarantined",
            reason="internal_error",
            detail=f"eyehub failed on this file ({type(exc).__name__}): a bug, not a bad "
            "file. The traceback is in the log file; please report it.",
            traceback=internal_traceback(exc),
        )
    return result


def _existing(
    result: dict[str, Any], attrs: dict[str, Any], scan_id: str, sha: str
) -> dict[str, Any]:
    stored_sha = attrs.get("eyehub", {}).get("catalog", {}).get("source_sha256")
    if stored_sha == sha:
        result.update(outcome="present", scan_id=scan_id)
    else:
        result.update(
            outcome="quarantined",
            reason="duplicate_instance",
            detail="another file with different bytes already holds this SOP "
            "Instance UID; keep one of the two exports.",
        )
    return result


def convert_batch(
    paths: list[str], dataset: str, secret: bytes, max_decoded_bytes: int
) -> list[dict[str, Any]]:
    """Convert a few files in one task (amortises task overhead on small files)."""
    key = HubKey(secret)
    return [convert_file(Path(p), Path(dataset), key, max_decoded_bytes) for p in paths]
