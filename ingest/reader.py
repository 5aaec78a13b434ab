"""Read one DICOM file: decide what it is, check it, decode it. No Ray, no writing.

`read_scan` returns a `DecodedScan` or raises `InputError(reason, detail)`; the reasons are
the stable codes of the quarantine table (see `REASONS`). Details never quote attribute
values, so no identifier can reach a log or the quarantine table through them.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, iter_pixels
from pydicom.tag import Tag
from pydicom.uid import UID

from eyehub.errors import InputError

# PS3.4 B.5 storage SOP classes eyehub reads
OP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.5": "Wide Field Ophthalmic Photography Stereographic",
    "1.2.840.10008.5.1.4.1.1.77.1.5.6": "Wide Field Ophthalmic Photography 3D Coordinates",
}
OPT_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
EXPORT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image",
}
# modalities under which PACS re-export colour fundus photographs
EXPORT_MODALITIES = {"OP", "XC", "OT", "SC"}
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA_TAG = Tag(0x7FE0, 0x0010)
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: not an image, ignored

REASONS = {
    "not_dicom": "not a DICOM file (no DICM preamble)",
    "truncated": "the file ends before its data elements do",
    "no_pixel_data": "no Pixel Data element",
    "pixel_data_short": "Pixel Data shorter than Rows x Columns x Frames says",
    "corrupt_pixel_data": "the compressed pixel stream cannot be decoded",
    "unsupported_transfer_syntax": "no decoder installed for the transfer syntax",
    "too_large": "declared decoded size above --max-decoded-bytes",
    "missing_laterality": "no ImageLaterality, FrameLaterality or Laterality",
    "inconsistent_geometry": "multi-frame geometry that cannot be put in order",
    "not_ophthalmic": "not a fundus photograph or OCT volume",
    "missing_patient_id": "no PatientID to pseudonymise",
    "burned_in_annotation": "burned-in annotation that cannot be cleared",
    "duplicate_instance": "another file holds the same SOP Instance UID with other bytes",
    "unreadable": "unexpected error reading the file",
}


class DirectoryRecord(Exception):
    """A DICOMDIR: not an image, not an error; the walk ignores it."""


@dataclass
class ScanInfo:
    """What a checked file is, before any pixel is decoded."""

    modality: str
    eye: str
    spacing_mm: tuple[float, ...] | None
    order: np.ndarray | None  # OCT: stored frame index at each anatomical position
    references: list[tuple[str, str]]
    header: Dataset

    @property
    def axes(self) -> tuple[str, str, str]:
        return ("c", "y", "x") if self.modality == "fundus" else ("z", "y", "x")


@dataclass
class DecodedScan(ScanInfo):
    """A checked scan with its pixels: fundus (c, y, x); OCT (z, y, x) = (B-scan, depth,
    A-scan) already in anatomical order (so `order` is None). Pixel Data is dropped from
    `header`."""

    pixels: np.ndarray


def _corrupt(exc: Exception) -> InputError:
    return _fail(
        "corrupt_pixel_data",
        f"the pixel data cannot be decoded ({type(exc).__name__})"
        "; the compressed stream is damaged. Export the image again.",
    )


def _fail(reason: str, detail: str) -> InputError:
    return InputError(reason, detail)


def read_header(path: Path, defer_pixels: bool = False) -> Dataset:
    """Parse a file (Pixel Data not decoded; with `defer_pixels`, not even loaded until
    used, for frames streamed from the file); classify read failures."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd VRs in device exports are not our errors
            ds = pydicom.dcmread(path, defer_size=2**20 if defer_pixels else None)
    except InvalidDicomError:
        raise _fail(
            "not_dicom",
            "not a DICOM file: it has no DICM preamble. Remove it or "
            "export the image as DICOM Part 10.",
        ) from None
    except (
        EOFError,
        ValueError,
        OSError,
        struct.error,
        KeyError,
        TypeError,
        IndexError,
        AttributeError,
        NotImplementedError,
    ) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, EOFError) and exc.errno is not None:
            raise _fail(
                "unreadable",
                f"cannot read the file ({type(exc).__name__}); check permissions and storage.",
            ) from None
        raise _fail(
            "truncated",
            "the file ends before its data elements do "
            f"({type(exc).__name__}); copy it again from the source.",
        ) from None
    _check_complete(ds, path.stat().st_size)
    if ds.get("SOPClassUID") is None and "file_meta" in ds:
        ds.SOPClassUID = ds.file_meta.get("MediaStorageSOPClassUID")
    return ds


def _check_complete(ds: Dataset, file_size: int) -> None:
    """pydicom stops quietly where a cut file runs out; the last element tells.

    The last top-level element, when its length is defined, must end exactly at the end of
    the file and hold as many bytes as it declares.
    """
    if not ds._dict:
        raise _fail(
            "truncated",
            "the file holds no data elements after its header; copy it again from the source.",
        )
    last = ds._dict[max(ds._dict)]
    if isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH:
        end = last.value_tell + last.length
        short_value = last.value is not None and len(last.value) < last.length
        if end != file_size or short_value:
            raise _fail(
                "truncated",
                "the file ends before its data elements do; copy it again from the source.",
            )


def classify(ds: Dataset) -> str:
    """'fundus' or 'oct', or raise not_ophthalmic / DirectoryRecord."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "") or "none")
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        raise DirectoryRecord()
    if sop_class in OP_CLASSES:
        return "fundus"
    if sop_class == OPT_CLASS:
        return "oct"
    if sop_class in EXPORT_CLASSES:
        colour = int(ds.get("SamplesPerPixel", 1) or 1) == 3
        if colour and modality.upper() in EXPORT_MODALITIES:
            return "fundus"
        raise _fail(
            "not_ophthalmic",
            f"a {EXPORT_CLASSES[sop_class]} with modality "
            f"{_safe_code(modality)} and {'colour' if colour else 'monochrome'} pixels "
            "is not a colour fundus export; eyehub reads OP, OPT and colour OP/XC "
            "exports.",
        )
    name = pydicom.uid.UID(sop_class).name if sop_class else "no SOP Class UID"
    raise _fail(
        "not_ophthalmic",
        f"modality {_safe_code(modality)} ({_safe_code(name)}) is "
        "not ophthalmic; eyehub reads OP, OPT and colour OP/XC exports.",
    )


def _safe_code(text: str) -> str:
    """Code strings only (CS/UI-like): keeps a detail free of anything a person typed."""
    cleaned = "".join(ch for ch in str(text) if ch.isalnum() or ch in " ._-()")
    return cleaned[:64] or "none"


def laterality(ds: Dataset) -> str:
    """R or L from ImageLaterality, FrameLaterality (Frame Anatomy) or Laterality."""
    candidates: list[Any] = [ds.get("ImageLaterality")]
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if seq:
            anatomy = seq[0].get("FrameAnatomySequence")
            if anatomy:
                candidates.append(anatomy[0].get("FrameLaterality"))
    candidates.append(ds.get("Laterality"))
    for value in candidates:
        if value and str(value).strip().upper() in ("R", "L"):
            return str(value).strip().upper()
    raise _fail(
        "missing_laterality",
        "no ImageLaterality, FrameLaterality or Laterality says "
        "which eye this is (R or L); fix the export or add the laterality.",
    )


def declared_size(ds: Dataset) -> int:
    rows = int(ds.get("Rows", 0) or 0)
    cols = int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    return rows * cols * samples * frames * max(1, math.ceil(bits / 8))


def _check_pixels(ds: Dataset, max_decoded_bytes: int) -> None:
    if "PixelData" not in ds:
        raise _fail(
            "no_pixel_data",
            "the file has no Pixel Data; it is not an image (a report or a structured document?).",
        )
    if not ds.get("Rows") or not ds.get("Columns"):
        raise _fail("no_pixel_data", "Rows or Columns is missing or zero.")
    size = declared_size(ds)
    if size > max_decoded_bytes:
        raise _fail(
            "too_large",
            f"declared decoded size {size / 2**30:.2f} GiB exceeds "
            f"--max-decoded-bytes ({max_decoded_bytes / 2**30:.2f} GiB); raise the "
            "limit if a scan this size is expected.",
        )
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise _fail(
            "unsupported_transfer_syntax",
            f"no decoder for transfer syntax "
            f"{_safe_code(ts)} ({_safe_code(ts.name)}); convert the file to a "
            "standard syntax (e.g. with dcmdjpeg) and ingest it again.",
        ) from None
    if not decoder.is_available:
        raise _fail(
            "unsupported_transfer_syntax",
            f"the decoder for {_safe_code(ts.name)} "
            "is not installed; install the pylibjpeg plugins (make install).",
        )
    if not ts.is_compressed:
        # the raw element's declared length: reading it must not load deferred pixel data
        # (Dataset.get_item does, in pydicom 3)
        raw = ds._dict.get(PIXEL_DATA_TAG)
        length = getattr(raw, "length", None)
        have = length if length not in (None, UNDEFINED_LENGTH) else len(ds.PixelData)
        bits = int(ds.get("BitsAllocated", 8))
        need = size if bits >= 8 else math.ceil(size * bits / 8)
        if have < need:
            raise _fail(
                "pixel_data_short",
                f"Pixel Data holds {have} bytes but Rows x "
                f"Columns x Samples x Frames needs {need}; the file was cut short or "
                "the header is wrong.",
            )


def _ybr_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """YBR_FULL to RGB (PS3.3 C.7.6.3.1.2), via OpenCV: far faster than pydicom's numpy."""
    if pixels.ndim == 3:
        return cv2.cvtColor(np.ascontiguousarray(pixels[..., [0, 2, 1]]), cv2.COLOR_YCrCb2RGB)
    return np.stack([_ybr_to_rgb(f) for f in pixels])


def _decode(ds: Dataset) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", ""))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.pixel_array_options(as_rgb=False)
            pixels = ds.pixel_array
    except Exception as exc:
        raise _corrupt(exc) from None
    if photometric in ("YBR_FULL", "YBR_FULL_422") and pixels.shape[-1] == 3:
        pixels = _ybr_to_rgb(pixels)
    return pixels


def _frame_items(ds: Dataset) -> Sequence[Dataset]:
    return ds.get("PerFrameFunctionalGroupsSequence") or []


def _macro(ds: Dataset, frame: Dataset | None, name: str) -> Dataset | None:
    """A functional-group macro item, per-frame first, then shared (PS3.3 C.7.6.16)."""
    for holder in (frame, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if holder is not None and holder.get(name):
            return holder.get(name)[0]
    return None


def oct_geometry(ds: Dataset) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Frame order (indices in anatomical order) and (B-scan, depth, A-scan) spacing in mm."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = _frame_items(ds)
    if len(frames) != n:
        raise _fail(
            "inconsistent_geometry",
            f"NumberOfFrames is {n} but there are {len(frames)} per-frame functional group items.",
        )
    positions: list[int] = []
    plane: list[list[float]] = []
    spacings: set[tuple[float, float]] = set()
    thickness: set[float] = set()
    for item in frames:
        content = item.get("FrameContentSequence")
        if content and content[0].get("InStackPositionNumber") is not None:
            positions.append(int(content[0].InStackPositionNumber))
        pos = _macro(ds, item, "PlanePositionSequence")
        if pos is not None and pos.get("ImagePositionPatient"):
            plane.append([float(v) for v in pos.ImagePositionPatient])
        measures = _macro(ds, item, "PixelMeasuresSequence")
        if measures is not None and measures.get("PixelSpacing"):
            ps = measures.PixelSpacing
            spacings.add((round(float(ps[0]), 9), round(float(ps[1]), 9)))
            if measures.get("SliceThickness"):
                thickness.add(round(float(measures.SliceThickness), 9))
    if len(positions) == n:
        if sorted(positions) != list(range(1, n + 1)):
            raise _fail(
                "inconsistent_geometry",
                "InStackPositionNumber values are not 1..N "
                "once each: frames are missing or repeated.",
            )
        order = np.argsort(positions)
    elif len(plane) == n and n > 1:
        # no stack positions: order along the frames' normal (row x column direction
        # cosines, PS3.3 C.7.6.2.1.1), as viewers stack slices
        pts = np.array(plane)
        orient = _macro(ds, frames[0], "PlaneOrientationSequence")
        if orient is not None and orient.get("ImageOrientationPatient"):
            iop = np.array([float(v) for v in orient.ImageOrientationPatient])
            normal = np.cross(iop[:3], iop[3:])
        else:
            normal = pts[-1] - pts[0]
        along = pts @ normal
        if len(set(np.round(along, 6))) != n:
            raise _fail(
                "inconsistent_geometry",
                "frames share plane positions and there is no InStackPositionNumber to order them.",
            )
        order = np.argsort(along)
    elif n == 1:
        order = np.zeros(1, dtype=np.int64)
    else:
        raise _fail(
            "inconsistent_geometry",
            "frames have neither InStackPositionNumber nor "
            "plane positions, so B-scans cannot be put in order.",
        )
    if len(spacings) != 1:
        raise _fail(
            "inconsistent_geometry",
            "PixelSpacing is missing or differs between "
            "frames; the volume has no single in-plane geometry.",
        )
    depth_mm, ascan_mm = next(iter(spacings))
    if len(thickness) == 1:
        bscan_mm = next(iter(thickness))
    elif len(plane) == n and n > 1:
        pts = np.array(plane)[order]
        bscan_mm = float(np.median(np.linalg.norm(np.diff(pts, axis=0), axis=1)))
    else:
        raise _fail(
            "inconsistent_geometry",
            "no SliceThickness or plane positions give the distance between B-scans.",
        )
    if not all(v > 0 for v in (bscan_mm, depth_mm, ascan_mm)):
        raise _fail(
            "inconsistent_geometry", "a pixel spacing or B-scan distance is zero or negative."
        )
    return order, (float(bscan_mm), float(depth_mm), float(ascan_mm))


def _references(ds: Dataset) -> list[tuple[str, str]]:
    refs: list[tuple[str, str]] = []
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    holders = [ds, shared, *list(_frame_items(ds))]
    for holder in holders:
        if holder is None:
            continue
        for seq_name in ("ReferencedImageSequence", "OphthalmicFrameLocationSequence"):
            for item in holder.get(seq_name) or []:
                uid = item.get("ReferencedSOPInstanceUID")
                if uid:
                    ref = (str(item.get("ReferencedSOPClassUID", "")), str(uid))
                    if ref not in refs:
                        refs.append(ref)
    return refs


def inspect_scan(ds: Dataset, max_decoded_bytes: int = 4 * 2**30) -> ScanInfo:
    """Every check that needs no decoding (the order of the quarantine reasons)."""
    modality = classify(ds)
    eye = laterality(ds)
    _check_pixels(ds, max_decoded_bytes)
    order = None
    spacing: tuple[float, ...] | None = None
    if modality == "oct":
        if str(ds.get("BurnedInAnnotation", "NO")).upper() == "YES":
            raise _fail(
                "burned_in_annotation",
                "the OCT declares burned-in annotation, which "
                "eyehub cannot locate and clear; export it without annotation.",
            )
        order, spacing = oct_geometry(ds)
    else:
        ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        if ps is not None and len(ps) == 2 and float(ps[0]) > 0 and float(ps[1]) > 0:
            spacing = (float(ps[0]), float(ps[1]))
    return ScanInfo(modality, eye, spacing, order, _references(ds), ds)


def read_scan(path: Path, max_decoded_bytes: int = 4 * 2**30) -> DecodedScan:
    """Read, check and decode one file (see the module docstring for the contract)."""
    ds = read_header(path)
    return decode_scan(ds, max_decoded_bytes)


def decode_scan(ds: Dataset, max_decoded_bytes: int = 4 * 2**30) -> DecodedScan:
    """Check and decode a parsed dataset; OCT frames in anatomical order."""
    info = inspect_scan(ds, max_decoded_bytes)
    pixels = _decode(ds)
    if info.modality == "oct":
        if pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.ndim != 3:
            raise _fail("inconsistent_geometry", "OCT frames are not single-channel images.")
        pixels = np.ascontiguousarray(pixels[info.order])
    else:
        pixels = fundus_planes(ds, pixels)
    del ds.PixelData
    return DecodedScan(info.modality, info.eye, info.spacing_mm, None, info.references, ds, pixels)


def fundus_planes(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """A decoded photograph as (c, y, x); a multi-frame export gives its first frame."""
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return np.ascontiguousarray(np.moveaxis(pixels, -1, 0))


def decode_fundus(info: ScanInfo) -> np.ndarray:
    """The photograph of an inspected fundus file, as (c, y, x) RGB (or grey)."""
    pixels = fundus_planes(info.header, _decode(info.header))
    del info.header.PixelData
    return pixels


def iter_oct_frames(path: Path, info: ScanInfo) -> Iterator[np.ndarray]:
    """Decode an inspected OCT one B-scan at a time, in stored order, reading each frame
    from the file: the volume is never held in memory whole."""
    ds = info.header
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for frame in iter_pixels(path, as_rgb=False):
                if frame.shape != (rows, cols):
                    raise _fail(
                        "inconsistent_geometry",
                        "OCT frames are not single-channel images of Rows x Columns.",
                    )
                n += 1
                yield frame
    except InputError:
        raise
    except Exception as exc:
        raise _corrupt(exc) from None
    if n != int(ds.get("NumberOfFrames", 1) or 1):
        raise _fail(
            "inconsistent_geometry", "the file holds fewer frames than NumberOfFrames says."
        )
