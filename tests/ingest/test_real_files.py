"""Files made by another toolkit get the right outcome: converted, or the right reason.

dcmtk writes them (img2dcm, dcmcjpeg, dcmcjpls, dcmcrle, dcmconv, dcmodify) from eyehub's
synthetic native files, and a few are then edited as bytes the way real devices and
transfers leave them:

- Pixel Data written after a private group whose tags are higher (a device that writes its
  pixels last): complete and decodable, it used to be quarantined as `truncated`;
- data set trailing padding cut off: nothing the image needs is missing;
- Part 10 files without the 128-byte preamble (starting with "DICM", or with the File
  Meta group): pydicom reads them with force=True, they used to be `not_dicom`;
- files cut in their header or their pixel data: `truncated`;
- bytes that are not DICOM at all: `not_dicom`, never another reason.

Each case goes through `read_scan` with a path and with the file's bytes (the in-memory
DICOM a web service receives), and OCT through the streamed path as ingest reads it.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from eyehub.errors import InputError
from ingest.reader import DecodedScan, inspect_scan, iter_oct_frames, read_header, read_scan
from tests.ingest import damage
from tests.ingest.bad_inputs import good_fundus, good_oct

PIXEL_DATA = Tag(0x7FE0, 0x0010)
TOOLS = ("img2dcm", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv", "dcmodify")


@pytest.fixture(scope="module")
def dcmtk() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:  # `make install` installs dcmtk where it can (root + apt)
        pytest.skip(f"dcmtk not installed ({', '.join(missing)})")


def _run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """eyehub's synthetic fundus (RGB) and OCT (6 frames, stored out of order), native."""
    folder = tmp_path_factory.mktemp("native")
    good_fundus(folder / "fundus.dcm", n=80)
    good_oct(folder / "oct.dcm", n=81)
    return {"fundus": folder / "fundus.dcm", "oct": folder / "oct.dcm"}


def _reference(path: Path) -> np.ndarray:
    return read_scan(path).pixels


def _outcome(call: Callable[[], object]) -> str:
    try:
        call()
    except InputError as exc:
        return exc.reason
    return "converted"


def _streamed(source: Path | bytes) -> np.ndarray:
    """The OCT as ingest converts it: header with deferred pixels, frames one at a time,
    put in anatomical order."""
    defer = isinstance(source, Path)
    info = inspect_scan(read_header(source, defer_pixels=defer))
    assert info.order is not None
    return np.stack(list(iter_oct_frames(source, info)))[info.order]


def _all_paths_agree(path: Path) -> DecodedScan:
    """read_scan from the path and from the bytes, and the streamed OCT path, give the
    same pixels."""
    scan = read_scan(path)
    np.testing.assert_array_equal(read_scan(path.read_bytes()).pixels, scan.pixels)
    np.testing.assert_array_equal(read_scan(bytearray(path.read_bytes())).pixels, scan.pixels)
    if scan.modality == "oct":
        np.testing.assert_array_equal(_streamed(path), scan.pixels)
        np.testing.assert_array_equal(_streamed(path.read_bytes()), scan.pixels)
    return scan


# -- dcmtk's encoders ----------------------------------------------------------------------

LOSSLESS = [
    ("dcmcjpeg", "+el", "+sv", "1"),  # JPEG Lossless process 14, predictor 1 (.57)
    ("dcmcjpeg", "+el", "+sv", "6"),
    ("dcmcjpeg", "+e1"),  # JPEG Lossless SV1 (.70)
    ("dcmcjpeg", "+e1", "+fs", "1"),  # frames split into 1 KiB fragments
    ("dcmcjpls", "+el"),  # JPEG-LS lossless (.80)
    ("dcmcjpls", "+el", "+pz"),  # padded with a zero byte (non-standard)
    ("dcmcjpls", "+el", "+fs", "1", "-ot"),  # fragments, empty offset table
    ("dcmcrle",),  # RLE lossless
]
LOSSY = [
    ("dcmcjpeg", "+eb"),  # JPEG Baseline (.50), YBR_FULL_422
    ("dcmcjpeg", "+ee"),  # JPEG Extended (.51)
    ("dcmcjpls", "+en"),  # JPEG-LS near-lossless (.81)
]


@pytest.mark.parametrize("modality", ["fundus", "oct"])
@pytest.mark.parametrize("command", LOSSLESS, ids=" ".join)
def test_dcmtk_lossless_files_convert_with_unchanged_pixels(
    command: tuple[str, ...], modality: str, native, dcmtk, tmp_path: Path
) -> None:
    out = tmp_path / "encoded.dcm"
    _run(*command, native[modality], out)
    assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID != (
        pydicom.dcmread(native[modality], stop_before_pixels=True).file_meta.TransferSyntaxUID
    )
    scan = _all_paths_agree(out)
    np.testing.assert_array_equal(scan.pixels, _reference(native[modality]))


@pytest.mark.parametrize("modality", ["fundus", "oct"])
@pytest.mark.parametrize("command", LOSSY, ids=" ".join)
def test_dcmtk_lossy_files_convert_close_to_the_original(
    command: tuple[str, ...], modality: str, native, dcmtk, tmp_path: Path
) -> None:
    out = tmp_path / "encoded.dcm"
    _run(*command, native[modality], out)
    scan = _all_paths_agree(out)
    diff = np.abs(scan.pixels.astype(int) - _reference(native[modality]).astype(int))
    assert diff.mean() < 12.0  # lossy on noise; a colour mix-up or garbage is off by ~100


def test_img2dcm_ophthalmic_photograph_converts(dcmtk, tmp_path: Path) -> None:
    """img2dcm wraps a camera's JPEG as an OP image without re-encoding it."""
    rgb = np.zeros((96, 128, 3), np.uint8)
    yy, xx = np.mgrid[:96, :128]
    rgb[np.hypot(yy - 48, xx - 64) < 44] = (190, 80, 40)
    Image.fromarray(rgb).save(tmp_path / "camera.jpg", quality=92)
    out = tmp_path / "op.dcm"
    code = "AcquisitionDeviceTypeCodeSequence[0]"
    _run(
        "img2dcm", "-i", "JPEG", "-oph", tmp_path / "camera.jpg", out,
        "-k", "ImageLaterality=L", "-k", "PatientID=IMG2DCM1",
        "-k", f"{code}.CodeValue=R-1021A", "-k", f"{code}.CodingSchemeDesignator=SRT",
        "-k", f"{code}.CodeMeaning=Fundus Camera",
    )  # fmt: skip
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    scan = _all_paths_agree(out)
    assert (scan.modality, scan.eye) == ("fundus", "L")
    expected = np.moveaxis(np.asarray(Image.open(tmp_path / "camera.jpg").convert("RGB")), -1, 0)
    assert np.abs(scan.pixels.astype(int) - expected.astype(int)).mean() < 3.0


# -- damaged dcmtk streams -------------------------------------------------------------------


LOSSLESS_JPEG_DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "DHT code counts zeroed": lambda s: damage.overwrite(
        s, damage.jpeg_segment(s, 0xC4) + 5, bytes(16)
    ),
    "SOS destroyed": lambda s: damage.overwrite(s, damage.jpeg_segment(s, 0xDA), b"\xff\x00"),
    "header bytes over the entropy data": lambda s: damage.overwrite(s, len(s) // 2, s[:40]),
    "EOI destroyed": lambda s: damage.overwrite(s, s.rindex(b"\xff\xd9"), b"\0\0"),
    "cut to 80%": lambda s: damage.cut(s, 0.8),
}


@pytest.mark.parametrize("where", list(LOSSLESS_JPEG_DAMAGES))
def test_damaged_dcmtk_jpeg_lossless_oct_is_corrupt(
    where: str, native, dcmtk, tmp_path: Path
) -> None:
    """JPEG Lossless process 14 (.57), which only pylibjpeg-libjpeg decodes: its stream is
    walked for what that decoder lets through."""
    _run("dcmcjpeg", "+el", "+sv", "1", native["oct"], tmp_path / "ll.dcm")
    hit = LOSSLESS_JPEG_DAMAGES[where]
    bad = damage.damaged_copy(tmp_path / "ll.dcm", tmp_path / "bad.dcm", hit, frame=3)
    assert _outcome(lambda: read_scan(bad)) == "corrupt_pixel_data"
    assert _outcome(lambda: read_scan(bad.read_bytes())) == "corrupt_pixel_data"
    assert _outcome(lambda: _streamed(bad)) == "corrupt_pixel_data"


# -- completeness: what the file really lacks -------------------------------------------------


def _pixel_element_span(data: bytes, path: Path) -> tuple[int, int]:
    """[start, end) of the encapsulated Pixel Data element, header to delimiter."""
    elem = pydicom.dcmread(path, defer_size=64)._dict[PIXEL_DATA]
    assert isinstance(elem, RawDataElement) and elem.length == 0xFFFFFFFF
    end = data.index(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", elem.value_tell) + 8
    return elem.value_tell - 12, end


@pytest.fixture(scope="module")
def pixels_last(native, dcmtk, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JPEG-LS OCT (dcmcjpls) with a private group (7FE1,xxxx) added by dcmodify, written
    as some ultrasound devices do: the private group before Pixel Data, so the element with
    the highest tag is not the last one in the file."""
    folder = tmp_path_factory.mktemp("pixels_last")
    src = folder / "sorted.dcm"
    _run("dcmcjpls", "+el", native["oct"], src)
    _run("dcmodify", "-nb", "-i", "(7fe1,0010)=EYEHUB TEST DEVICE", src)
    _run("dcmodify", "-nb", "-i", "(7fe1,1001)=1\\2\\3\\4", src)
    data = src.read_bytes()
    start, end = _pixel_element_span(data, src)
    assert end < len(data)  # dcmtk wrote the private group after Pixel Data, in tag order
    out = folder / "pixels_last.dcm"
    out.write_bytes(data[:start] + data[end:] + data[start:end])
    return out


def test_a_complete_file_whose_highest_tag_is_not_last_converts(pixels_last, native) -> None:
    ds = pydicom.dcmread(pixels_last, defer_size=64)
    highest = max(ds._dict)
    assert highest > PIXEL_DATA and highest.group == 0x7FE1
    last = max(ds._dict.values(), key=lambda e: getattr(e, "value_tell", 0))
    assert last.tag == PIXEL_DATA  # Pixel Data is last in the file, not the highest tag
    scan = _all_paths_agree(pixels_last)
    np.testing.assert_array_equal(scan.pixels, _reference(native["oct"]))


def test_a_file_cut_in_its_trailing_padding_converts(native, dcmtk, tmp_path: Path) -> None:
    """dcmconv +p writes data set trailing padding (FFFC,FFFC) after Pixel Data; a copy cut
    inside it lacks nothing the image needs."""
    padded = tmp_path / "padded.dcm"
    _run("dcmcjpls", "+el", native["fundus"], tmp_path / "jls.dcm")
    _run("dcmconv", "+p", "512", "0", tmp_path / "jls.dcm", padded)
    data = padded.read_bytes()
    assert pydicom.dcmread(padded).get((0xFFFC, 0xFFFC)) is not None
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 16])
    scan = _all_paths_agree(cut)
    np.testing.assert_array_equal(scan.pixels, _reference(native["fundus"]))


def _header_cuts(path: Path) -> list[int]:
    """Offsets in the middle of each top-level element before Pixel Data: inside its
    8-byte header and inside its value."""
    ds = pydicom.dcmread(path, defer_size=64)
    cuts = []
    for elem in ds._dict.values():
        if isinstance(elem, RawDataElement) and elem.tag < PIXEL_DATA:
            cuts.append(elem.value_tell - 5)
            if elem.length not in (0, 0xFFFFFFFF) and elem.length >= 2:
                cuts.append(elem.value_tell + elem.length // 2)
    return sorted(set(cuts))


@pytest.mark.parametrize("encoding", ["native", "jpeg-ls"])
def test_files_cut_in_their_header_or_pixel_data_are_truncated(
    encoding: str, native, dcmtk, tmp_path: Path
) -> None:
    src = native["oct"]
    if encoding == "jpeg-ls":
        src = tmp_path / "jls.dcm"
        _run("dcmcjpls", "+el", native["oct"], src)
    data = src.read_bytes()
    elem = pydicom.dcmread(src, defer_size=64)._dict[PIXEL_DATA]
    assert isinstance(elem, RawDataElement)
    pixel_cuts = [elem.value_tell + 3, (elem.value_tell + len(data)) // 2, len(data) - 6]
    header_cuts = _header_cuts(src)
    assert len(header_cuts) > 20
    cut = tmp_path / "cut.dcm"
    for at in header_cuts + pixel_cuts:
        cut.write_bytes(data[:at])
        outcomes = {
            _outcome(lambda: read_scan(cut)),
            _outcome(lambda: read_scan(cut.read_bytes())),
            _outcome(lambda: _streamed(cut)),
        }
        assert outcomes == {"truncated"}, (at, outcomes)


@pytest.mark.parametrize("missing", ["preamble", "preamble and DICM"])
@pytest.mark.parametrize(
    "make", ["dcmcjpls fundus", "dcmcjpls oct", "dcmconv oct", "img2dcm fundus"]
)
def test_part10_files_without_preamble_convert(
    make: str, missing: str, native, dcmtk, tmp_path: Path
) -> None:
    tool, modality = make.split()
    full = tmp_path / "full.dcm"
    if tool == "img2dcm":
        Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(tmp_path / "c.jpg")
        _run("img2dcm", "-i", "JPEG", "-vlp", tmp_path / "c.jpg", full, "-k", "ImageLaterality=R")
    elif tool == "dcmconv":
        _run("dcmconv", "+te", native[modality], full)
    else:
        _run(tool, "+el", native[modality], full)
    data = full.read_bytes()
    assert data[128:132] == b"DICM"
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(data[128:] if missing == "preamble" else data[132:])
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(bare)  # not Part 10 as pydicom reads it without force=True
    scan = _all_paths_agree(bare)
    np.testing.assert_array_equal(scan.pixels, read_scan(full).pixels)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


NOT_DICOM: dict[str, Callable[[], bytes]] = {
    "text": lambda: b"referral letter, not an image\n" * 20,
    "png": _png,
    "jpeg": _jpeg,
    "zeros": lambda: bytes(4096),
    "random bytes": lambda: np.random.default_rng(3).integers(0, 256, 5000, np.uint8).tobytes(),
    "empty": lambda: b"",
    "DICM then zeros": lambda: b"DICM" + bytes(400),
    "a data set without File Meta": lambda: b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + bytes(64),
}


@pytest.mark.parametrize("kind", list(NOT_DICOM))
def test_bytes_that_are_not_dicom_stay_not_dicom(kind: str, tmp_path: Path) -> None:
    data = NOT_DICOM[kind]()
    path = tmp_path / "upload.dcm"
    path.write_bytes(data)
    for source in (path, data):
        assert _outcome(lambda: read_header(source)) == "not_dicom"  # noqa: B023
        assert _outcome(lambda: read_scan(source)) == "not_dicom"  # noqa: B023


def test_a_part10_header_with_nothing_after_it_is_truncated(tmp_path: Path) -> None:
    """A preamble and DICM prefix, then nothing: a DICOM file that ends before its data."""
    data = bytes(128) + b"DICM"
    (tmp_path / "f.dcm").write_bytes(data)
    assert _outcome(lambda: read_scan(tmp_path / "f.dcm")) == "truncated"
    assert _outcome(lambda: read_scan(data)) == "truncated"
