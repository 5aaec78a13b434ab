"""Bad inputs, each made from real DICOM bytes; each function says how its file is made."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit

from eyehub.synth import dicom_io
from eyehub.synth.dicom_io import Device, OctSpacing, StudyInfo, uid_for

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def study(seed: int = 99) -> StudyInfo:
    return StudyInfo(
        patient_name="QUARANTINE^TEST",
        patient_id=f"MRNBAD{seed}",
        other_patient_id="X1",
        birth_date=dt.date(1950, 1, 1),
        sex="F",
        address="1 Test Lane",
        institution="Test Eye Clinic",
        referring_physician="DOC^TEST",
        accession=f"ACCBAD{seed}",
        study_uid=uid_for(seed, "study"),
        study_date=dt.date(2021, 5, 6),
        study_time="101000",
        device=Device("SYNTHOPTIX", "RetinaCam 3D", "SN1", "1.0", "ST1"),
    )


def fundus_image(h: int = 64, w: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    inside = np.hypot(yy - h / 2, xx - w / 2) < 0.45 * h
    img = np.zeros((h, w, 3), np.uint8)
    img[inside] = (180, 70, 30)
    return img


def good_fundus(path: Path, ts: str = ExplicitVRLittleEndian, n: int = 0) -> pydicom.Dataset:
    """An OP fundus written by the synth builder: the baseline the others break."""
    ds = dicom_io.build_fundus_op(
        study(),
        fundus_image(),
        "R",
        ts,
        uid_for(99, "op", n),
        uid_for(99, "series", n),
        dt.datetime(2021, 5, 6, 10, 10),
        0.05,
        45.0,
    )
    dicom_io.write(ds, path)
    return ds


def good_oct(
    path: Path,
    ts: str = ExplicitVRLittleEndian,
    n: int = 0,
    shape: tuple[int, int, int] = (6, 40, 36),
    name: str = "oct",
) -> pydicom.Dataset:
    """An OPT of random speckle written by the synth builder, frames stored in reverse."""
    vol = np.random.default_rng(n).integers(0, 255, size=shape, dtype=np.uint8)
    ds = dicom_io.build_oct_opt(
        study(),
        vol,
        "L",
        ts,
        uid_for(99, name, n),
        uid_for(99, name, "series", n),
        uid_for(99, name, "for", n),
        dt.datetime(2021, 5, 6, 10, 10),
        OctSpacing(0.2, 0.01, 0.05),
        None,
        0.05,
        list(range(shape[0]))[::-1],
    )
    dicom_io.write(ds, path)
    return ds


def make_all(folder: Path) -> dict[str, Path]:
    """One file per quarantine reason; returns {reason: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    # not DICOM: a text file with an innocent-looking name
    p = folder / "notes.dcm"
    p.write_text("referral letter, not an image\n")
    out["not_dicom"] = p

    # truncated: a valid OPT cut in the middle of its functional groups
    full = folder / "tmp_full"
    good_oct(full, n=1)
    data = full.read_bytes()
    p = folder / "truncated"
    p.write_bytes(data[: len(data) // 20])
    full.unlink()
    out["truncated"] = p

    # no pixel data: an OP with its Pixel Data element removed
    p = folder / "no_pixels"
    ds = good_fundus(p, n=2)
    del ds.PixelData
    ds.save_as(p, enforce_file_format=True)
    out["no_pixel_data"] = p

    # pixel data shorter than the header says: native OP, Rows doubled
    p = folder / "short_pixels"
    ds = good_fundus(p, n=3)
    ds.Rows = ds.Rows * 2
    ds.save_as(p, enforce_file_format=True)
    out["pixel_data_short"] = p

    # corrupt compressed stream: a JPEG 2000 OCT whose frames are overwritten with noise
    p = folder / "corrupt_j2k"
    ds = good_oct(p, ts=JPEG2000Lossless, n=4)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    rng = np.random.default_rng(4)
    broken = [f[:8] + rng.integers(0, 255, len(f) - 8, dtype=np.uint8).tobytes() for f in frames]
    ds.PixelData = encapsulate(broken)
    ds.save_as(p, enforce_file_format=True)
    out["corrupt_pixel_data"] = p

    # unsupported transfer syntax: an OP relabelled as MPEG2 video
    p = folder / "mpeg"
    ds = good_fundus(p, ts=JPEGBaseline8Bit, n=5)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.save_as(p, enforce_file_format=True)
    out["unsupported_transfer_syntax"] = p

    # missing laterality: an OP with ImageLaterality deleted
    p = folder / "no_laterality"
    ds = good_fundus(p, n=6)
    del ds.ImageLaterality
    ds.save_as(p, enforce_file_format=True)
    out["missing_laterality"] = p

    # inconsistent multi-frame geometry: two frames claim In-Stack Position 1
    p = folder / "bad_geometry"
    ds = good_oct(p, n=7)
    for item in ds.PerFrameFunctionalGroupsSequence[:2]:
        item.FrameContentSequence[0].InStackPositionNumber = 1
    ds.save_as(p, enforce_file_format=True)
    out["inconsistent_geometry"] = p

    # not ophthalmic: pydicom's CT test file, as shipped
    p = folder / "ct_slice"
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", p)
    out["not_ophthalmic"] = p

    # declared decoded size over the limit: a large OP (checked with a small limit)
    p = folder / "big_fundus"
    ds = dicom_io.build_fundus_op(
        study(),
        fundus_image(600, 800),
        "L",
        ExplicitVRLittleEndian,
        uid_for(99, "big"),
        uid_for(99, "bigseries"),
        dt.datetime(2021, 5, 6),
        0.01,
        45.0,
    )
    dicom_io.write(ds, p)
    out["too_large"] = p
    return out


TOO_LARGE_LIMIT = 600 * 800 * 3 - 1  # bytes: the big fundus declares 600*800*3


def big_oct(path: Path, frames: int = 256, rows: int = 512, cols: int = 1024, n: int = 7) -> int:
    """A native OPT large enough to take a worker about a second (and to show its memory
    stays far below the volume); returns the decoded bytes."""
    good_oct(path, n=n, shape=(frames, rows, cols), name="big-oct")
    return frames * rows * cols
