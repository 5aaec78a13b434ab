"""Decoding: every syntax synth writes and devices send, bytes round-tripped through files."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from eyehub.synth import dicom_io
from eyehub.synth.dicom_io import OctSpacing, uid_for
from eyehub.synth.fundus import render_fundus
from eyehub.synth.phenotype import make_patient
from ingest import read_scan
from ingest.reader import classify, laterality
from tests.ingest.bad_inputs import PYDICOM_FILES, study


def _fundus() -> np.ndarray:
    p = make_patient(1, 3, 2)
    ev = p.visits[0][1][0]
    image, _ = render_fundus(
        ev.signs, "R", p.identity_seed, p.pigmentation, 120, 160, 0.46, np.random.default_rng(0)
    )
    return image


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless]
)
def test_lossless_fundus_syntaxes_round_trip_exactly(tmp_path: Path, ts: str) -> None:
    image = _fundus()
    ds = dicom_io.build_fundus_op(
        study(), image, "R", ts, uid_for(1, ts), uid_for(2, ts), dt.datetime(2021, 1, 1), 0.05, 45.0
    )
    dicom_io.write(ds, tmp_path / "f")
    scan = read_scan(tmp_path / "f")
    assert scan.modality == "fundus" and scan.eye == "R"
    assert scan.pixels.dtype == np.uint8
    np.testing.assert_array_equal(scan.pixels, np.moveaxis(image, -1, 0))
    assert scan.spacing_mm == (0.05, 0.05)
    assert "PixelData" not in scan.header


def test_jpeg_baseline_ybr_is_converted_to_rgb(tmp_path: Path) -> None:
    image = _fundus()
    ds = dicom_io.build_fundus_op(
        study(),
        image,
        "L",
        JPEGBaseline8Bit,
        uid_for(3),
        uid_for(4),
        dt.datetime(2021, 1, 1),
        0.05,
        45.0,
    )
    dicom_io.write(ds, tmp_path / "f")
    assert pydicom.dcmread(tmp_path / "f").PhotometricInterpretation == "YBR_FULL_422"
    scan = read_scan(tmp_path / "f")
    diff = np.abs(scan.pixels.astype(int) - np.moveaxis(image, -1, 0).astype(int))
    assert diff.mean() < 3.0  # lossy, but RGB (a YBR mix-up is off by ~100)
    assert scan.eye == "L"


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, JPEG2000Lossless])
def test_oct_frames_are_put_in_anatomical_order_with_spacing(tmp_path: Path, ts: str) -> None:
    volume = np.random.default_rng(0).integers(0, 255, size=(7, 40, 36), dtype=np.uint8)
    order = [3, 6, 0, 1, 5, 2, 4]
    ds = dicom_io.build_oct_opt(
        study(),
        volume,
        "L",
        ts,
        uid_for(5, ts),
        uid_for(6),
        uid_for(7),
        dt.datetime(2021, 1, 1),
        OctSpacing(0.25, 0.004, 0.03),
        ("1.2.3", "1.2.3.4", (10, 10)),
        0.05,
        order,
    )
    dicom_io.write(ds, tmp_path / "o")
    scan = read_scan(tmp_path / "o")
    assert scan.modality == "oct" and scan.eye == "L"
    np.testing.assert_array_equal(scan.pixels, volume)
    assert scan.spacing_mm == pytest.approx((0.25, 0.004, 0.03))
    assert scan.references == [("1.2.3", "1.2.3.4")]


def test_oct_without_stack_positions_is_ordered_by_plane_position(tmp_path: Path) -> None:
    volume = np.random.default_rng(1).integers(0, 255, size=(5, 12, 10), dtype=np.uint8)
    ds = dicom_io.build_oct_opt(
        study(),
        volume,
        "R",
        ExplicitVRLittleEndian,
        uid_for(8),
        uid_for(9),
        uid_for(10),
        dt.datetime(2021, 1, 1),
        OctSpacing(0.3, 0.004, 0.03),
        None,
        0.05,
        [4, 2, 0, 1, 3],
    )
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.FrameContentSequence[0].InStackPositionNumber
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
    dicom_io.write(ds, tmp_path / "o")
    scan = read_scan(tmp_path / "o")
    np.testing.assert_array_equal(scan.pixels, volume)
    assert scan.spacing_mm == pytest.approx((0.3, 0.004, 0.03))


def test_sixteen_bit_photographs_stay_sixteen_bit(tmp_path: Path) -> None:
    # an OP 16 Bit Image made from an 8-bit one: samples scaled by 257, written native
    image = _fundus().astype(np.uint16) * 257
    ds = dicom_io.build_fundus_op(
        study(),
        _fundus(),
        "R",
        ExplicitVRLittleEndian,
        uid_for(11),
        uid_for(12),
        dt.datetime(2021, 1, 1),
        0.05,
        45.0,
    )
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = image.tobytes()
    ds.save_as(tmp_path / "f16", enforce_file_format=True)
    scan = read_scan(tmp_path / "f16")
    assert scan.pixels.dtype == np.uint16
    np.testing.assert_array_equal(scan.pixels, np.moveaxis(image, -1, 0))


def test_big_endian_colour_export_reads_as_fundus(tmp_path: Path) -> None:
    # pydicom's SC_rgb_small_odd_big_endian.dcm (Explicit VR Big Endian, RGB secondary
    # capture), relabelled as an OP-modality export with a laterality
    src = pydicom.dcmread(PYDICOM_FILES / "SC_rgb_small_odd_big_endian.dcm")
    reference = src.pixel_array
    src.Modality = "OP"
    src.ImageLaterality = "R"
    src.PatientID = "MRNBIG"
    src.save_as(tmp_path / "be")
    assert pydicom.dcmread(tmp_path / "be").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
    scan = read_scan(tmp_path / "be")
    np.testing.assert_array_equal(scan.pixels, np.moveaxis(reference, -1, 0))


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="dcmtk (dcmcjpeg) not installed")
def test_jpeg_lossless_process_14_decodes_exactly(tmp_path: Path) -> None:
    # an OP written native by synth, then compressed by dcmtk: dcmcjpeg --encode-lossless-sv1 (JPEG
    # Lossless, Non-Hierarchical, First-Order Prediction, 1.2.840.10008.1.2.4.70)
    image = _fundus()
    ds = dicom_io.build_fundus_op(
        study(),
        image,
        "R",
        ExplicitVRLittleEndian,
        uid_for(13),
        uid_for(14),
        dt.datetime(2021, 1, 1),
        0.05,
        45.0,
    )
    dicom_io.write(ds, tmp_path / "native")
    subprocess.run(
        ["dcmcjpeg", "--encode-lossless-sv1", str(tmp_path / "native"), str(tmp_path / "ll")],
        check=True,
        capture_output=True,
    )
    ts = pydicom.dcmread(tmp_path / "ll", stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts == "1.2.840.10008.1.2.4.70"
    scan = read_scan(tmp_path / "ll")
    np.testing.assert_array_equal(scan.pixels, np.moveaxis(image, -1, 0))


def test_laterality_falls_back_to_frame_and_series_laterality(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    ds.SharedFunctionalGroupsSequence = [pydicom.Dataset()]
    anatomy = pydicom.Dataset()
    anatomy.FrameLaterality = "L"
    ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    assert laterality(ds) == "L"
    ds2 = pydicom.Dataset()
    ds2.Laterality = "R"
    assert laterality(ds2) == "R"


def test_grey_secondary_capture_is_not_a_fundus(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    with pytest.raises(Exception, match="not a colour fundus export") as info:
        classify(ds)
    assert getattr(info.value, "reason", None) == "not_ophthalmic"


def test_a_jpeg_photograph_with_fewer_frames_than_declared_is_corrupt(tmp_path: Path) -> None:
    """libjpeg-turbo decodes frame by frame: a missing frame is refused, never stored as
    the first row of the image."""
    from eyehub.errors import InputError

    ds = dicom_io.build_fundus_op(
        study(), _fundus(), "L", JPEGBaseline8Bit, uid_for(5), uid_for(6),
        dt.datetime(2021, 1, 1), 0.05, 45.0,
    )  # fmt: skip
    ds.NumberOfFrames = 2
    dicom_io.write(ds, tmp_path / "f")
    with pytest.raises(InputError) as refused:
        read_scan(tmp_path / "f")
    assert refused.value.reason == "corrupt_pixel_data"


def test_the_longest_files_go_first(tmp_path: Path) -> None:
    """A JPEG 2000 volume is decoded at a tenth of the speed native pixels are written:
    it goes before a larger uncompressed file, so no worker is left with it at the end."""
    from ingest.run import _expected_work

    vol = np.random.default_rng(0).integers(0, 255, size=(4, 64, 64), dtype=np.uint8)
    sizes = {}
    for name, ts in (("native", ExplicitVRLittleEndian), ("j2k", JPEG2000Lossless),
                     ("jls", JPEGLSLossless), ("rle", RLELossless)):  # fmt: skip
        ds = dicom_io.build_oct_opt(
            study(), vol, "R", ts, uid_for(7, name), uid_for(8, name), uid_for(9, name),
            dt.datetime(2021, 1, 1), OctSpacing(0.1, 0.01, 0.02), None, 0.02, [0, 1, 2, 3],
        )  # fmt: skip
        dicom_io.write(ds, tmp_path / name)
        sizes[name] = (tmp_path / name).stat().st_size
    work = {name: _expected_work(tmp_path / name) for name in sizes}
    assert work["native"] == sizes["native"]
    assert work["j2k"] == 12.0 * sizes["j2k"]
    assert work["jls"] == 3.0 * sizes["jls"] and work["rle"] == 1.5 * sizes["rle"]
    (tmp_path / "text").write_text("not DICOM")
    assert _expected_work(tmp_path / "text") == 9.0
