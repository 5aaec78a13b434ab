"""Convert one source file into the dataset: the unit of work a Ray task runs.

Plain Python (no Ray): read, check, decode, de-identify, clean pixels, write atomically.
Returns a small result record; never raises for a bad input (it becomes a quarantine
result), so one bad file can never stop a batch.
"""

from __future__ import annotations

import hashlib
import logging
import resource
from pathlib import Path
from typing import Any

import numpy as np

from eyehub.errors import InputError
from ingest.deid import deidentify
from ingest.keys import HubKey
from ingest.pixels import clear_outside_fov
from ingest.reader import (
    DirectoryRecord,
    classify,
    decode_fundus,
    inspect_scan,
    iter_oct_frames,
    read_header,
)
from ingest.store import read_scan_attributes, scan_path, write_scan, write_scan_frames

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> int | None:
    """Reset this process's RSS high-water mark (Linux); returns the RSS now, in bytes."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return None
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def _growth_since(rss_before: int | None) -> int | None:
    """How far this process's RSS rose above `rss_before` since the last reset, in bytes."""
    hwm = _status_kib("VmHWM")
    if rss_before is None or hwm is None:
        return None
    return max(0, hwm * 1024 - rss_before)


def convert_file(path: Path, dataset: Path, key: HubKey, max_decoded_bytes: int) -> dict[str, Any]:
    """Convert `path`; returns {'outcome': converted|present|quarantined|ignored, ...}."""
    result: dict[str, Any] = {"path": str(path), "outcome": "quarantined", "sha256": None}
    rss_before = _reset_peak()
    try:
        stat = path.stat()
        result.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        result["sha256"] = sha = file_sha256(path)
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
        row: dict[str, Any] = {
            "scan_id": deid.scan_id,
            "patient_id": deid.patient_id,
            "eye": info.eye,
            "modality": info.modality,
            "sop_class_uid": attrs.get("SOPClassUID"),
            "axes": "".join(info.axes),
            "spacing_mm": list(info.spacing_mm) if info.spacing_mm else None,
            "manufacturer": attrs.get("Manufacturer"),
            "model": attrs.get("ManufacturerModelName"),
            "acquisition_date": deid.acquisition_date.isoformat()
            if deid.acquisition_date
            else None,
            "study_date": deid.study_date.isoformat() if deid.study_date else None,
            "study_uid": attrs.get("StudyInstanceUID"),
            "transfer_syntax_uid": attrs.get("TransferSyntaxUID"),
            "lossy": attrs.get("LossyImageCompression") == "01",
            "fov_fraction": None,
            "linked_scan_ids": deid.linked_scan_ids,
            "source_sha256": sha,
        }
        if fundus:
            pixels, row["fov_fraction"] = clear_outside_fov(decode_fundus(info))
            row.update(shape=list(pixels.shape), dtype=str(pixels.dtype))
            decoded_bytes = pixels.nbytes
            written = write_scan(
                dataset,
                deid.scan_id,
                pixels,
                info.axes,
                info.spacing_mm,
                {"dicom": attrs, "catalog": row},
            )
        else:
            if info.order is None:  # inspect_scan orders every OCT; never expected here
                raise InputError("inconsistent_geometry", "the OCT frames have no order.")
            shape = (len(info.order), int(ds.Rows), int(ds.Columns))
            dtype = np.dtype(np.uint16 if int(ds.BitsAllocated) > 8 else np.uint8)
            row.update(shape=list(shape), dtype=str(dtype))
            decoded_bytes = int(np.prod(shape)) * dtype.itemsize
            written = write_scan_frames(
                dataset,
                deid.scan_id,
                iter_oct_frames(path, info),
                shape,
                dtype,
                info.order,
                info.axes,
                info.spacing_mm,
                {"dicom": attrs, "catalog": row},
            )
        if not written:
            existing = read_scan_attributes(scan_path(dataset, deid.scan_id)) or {}
            return _existing(result, existing, deid.scan_id, sha)
        result.update(outcome="converted", scan_id=deid.scan_id, decoded_bytes=decoded_bytes)
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
    except Exception as exc:  # a bad file must never stop the batch
        log.debug("unexpected %s converting %s", type(exc).__name__, path)
        result.update(
            outcome="quarantined",
            reason="unreadable",
            detail=f"unexpected {type(exc).__name__} while reading; report this "
            "file's export settings to the eyehub maintainers.",
        )
    finally:
        result["peak_rss_bytes"] = _peak_rss_bytes()
        result["memory_growth_bytes"] = _growth_since(rss_before)
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
