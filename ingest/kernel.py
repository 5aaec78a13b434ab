"""The scan kernel: one DICOM file (or its bytes) to the pixels and geometry ingest stores.

Plain Python, no Ray, no store. Ingest's converter writes what these functions give, and
scoring calls `load_scan` on a clinician's file, so a scan is decoded, ordered and cleaned
(Clean Pixel Data outside the fundus field of view) the same way on both paths:

- fundus: (c, y, x) as stored (uint8, or uint16 for 16-bit photographs), RGB or grey,
  everything outside the lit field of view zeroed;
- OCT: (z, y, x) = (B-scan, depth, A-scan) in anatomical order, spacing in mm.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ingest.pixels import clear_outside_fov
from ingest.reader import ScanInfo, decode_fundus, inspect_scan, iter_oct_frames, read_header

DEFAULT_MAX_DECODED_BYTES = 4 * 2**30


@dataclass
class ScanPixels:
    """A scan as ingest stores it (what preprocess reads back from the store)."""

    modality: str  # fundus | oct
    eye: str  # R | L
    axes: tuple[str, str, str]
    spacing_mm: tuple[float, ...] | None
    pixels: np.ndarray
    fov_mask_fraction: float | None = None  # fundus: share kept by Clean Pixel Data
    # load_scan: the file's attributes without Pixel Data, identifiers included (scoring
    # writes its DICOM report into the scan's own study; ingest stores none of them)
    header: Dataset | None = None


def fundus_pixels(info: ScanInfo) -> tuple[np.ndarray, float]:
    """Decode an inspected photograph and clear outside its field of view: (c, y, x) and
    the share of the image kept."""
    return clear_outside_fov(decode_fundus(info))


def oct_frames(source: Path | bytes, info: ScanInfo) -> Iterator[np.ndarray]:
    """An inspected OCT's B-scans one at a time, in stored order (`info.order[k]` is the
    stored frame at anatomical position k)."""
    return iter_oct_frames(source, info)


def oct_shape(info: ScanInfo) -> tuple[tuple[int, int, int], np.dtype]:
    """The stored volume's shape and dtype, from the header alone."""
    ds = info.header
    assert info.order is not None  # inspect_scan orders every OCT
    dtype = np.dtype(np.uint16 if int(ds.BitsAllocated) > 8 else np.uint8)
    return (len(info.order), int(ds.Rows), int(ds.Columns)), dtype


def load_scan(
    source: Path | bytes, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> ScanPixels:
    """Read, check, decode and clean one DICOM file or its bytes, as ingest would store
    it. Bad input raises `InputError` with a quarantine reason code."""
    info = inspect_scan(read_header(source, isinstance(source, Path)), max_decoded_bytes)
    if info.modality == "fundus":
        pixels, kept = fundus_pixels(info)
        return ScanPixels(
            info.modality, info.eye, info.axes, info.spacing_mm, pixels, kept, info.header
        )
    assert info.order is not None
    volume = np.stack(list(oct_frames(source, info)))[info.order]
    if "PixelData" in info.header:
        del info.header.PixelData
    return ScanPixels(
        info.modality, info.eye, info.axes, info.spacing_mm, volume, None, info.header
    )
