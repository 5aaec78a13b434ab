"""Damaged compressed pixel data never becomes a scan.

For every compressed transfer syntax eyehub reads, a valid fundus photograph and a valid
OCT volume are written (by eyehub's synthetic builders, pydicom's encoders, or GDCM for
JPEG Lossless), then one frame's stream is damaged in its tables and headers, its
entropy-coded data, a marker, or cut short, with the DICOM encapsulation kept valid
(`damage.py`). `read_scan` (the whole volume), the streamed OCT path (`read_header` with
deferred pixels, `inspect_scan`, `iter_oct_frames`) and the in-memory bytes all quarantine
it as `corrupt_pixel_data`; the valid originals still decode to the pixels written.

Damage that no check can see is not here: it is listed in `ingest.reader` above
`_FRAME_CHECKS` (entropy-coded bytes of JPEG and JPEG 2000 overwritten without creating a
marker code; literal bytes inside an RLE run).
"""

from __future__ import annotations

import datetime as dt
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from eyehub.errors import InputError
from eyehub.synth import dicom_io
from eyehub.synth.dicom_io import OctSpacing, uid_for
from eyehub.synth.fundus import render_fundus
from eyehub.synth.phenotype import make_patient
from ingest.reader import inspect_scan, iter_oct_frames, read_header, read_scan
from tests.ingest import damage
from tests.ingest.bad_inputs import PYDICOM_FILES, study

OCT_ORDER = [5, 4, 3, 2, 1, 0]
DAMAGED_FRAME = 2  # of the OCT's six: two good frames stream out before it


def _fundus_image() -> np.ndarray:
    p = make_patient(1, 3, 2)
    signs = p.visits[0][1][0].signs
    image, _ = render_fundus(
        signs, "R", p.identity_seed, p.pigmentation, 96, 128, 0.46, np.random.default_rng(0)
    )
    return image


def _oct_volume() -> np.ndarray:
    """Six B-scans with layered structure and speckle (noise alone would not compress)."""
    z, y, x = np.mgrid[:6, :40, :36]
    layers = 110 + 70 * np.sin(y / 4.0 + z * 0.4) + 25 * np.cos(x / 5.0)
    speckle = np.random.default_rng(1).integers(0, 24, size=layers.shape)
    return np.clip(layers + speckle, 0, 255).astype(np.uint8)


FUNDUS = _fundus_image()
VOLUME = _oct_volume()


def _write_fundus(path: Path, ts: str) -> None:
    ds = dicom_io.build_fundus_op(
        study(), FUNDUS, "R", ts, uid_for(31, ts), uid_for(32), dt.datetime(2021, 5, 6), 0.05, 45.0
    )
    dicom_io.write(ds, path)


def _write_oct(path: Path, ts: str) -> None:
    ds = dicom_io.build_oct_opt(
        study(),
        VOLUME,
        "L",
        ts,
        uid_for(33, ts),
        uid_for(34),
        uid_for(35),
        dt.datetime(2021, 5, 6),
        OctSpacing(0.25, 0.004, 0.03),
        None,
        0.05,
        OCT_ORDER,
    )
    dicom_io.write(ds, path)


def _recompressed(
    write: Callable[[Path, str], None], ts: str, **options: Any
) -> Callable[[Path], None]:
    """A native file re-encoded by pydicom's encoder plugins (lossy syntaxes)."""

    def make(path: Path) -> None:
        write(path, ExplicitVRLittleEndian)
        ds = pydicom.dcmread(path)
        ds.compress(ts, **options)
        ds.LossyImageCompression = "01"
        ds.save_as(path, enforce_file_format=True)

    return make


def _gdcm_jpeg_lossless(path: Path) -> None:
    """pydicom's GDCM-written JPEG Lossless SV1 RGB secondary capture, as an OT export."""
    ds = pydicom.dcmread(PYDICOM_FILES / "SC_rgb_jpeg_gdcm.dcm")
    ds.ImageLaterality = "R"
    ds.save_as(path, enforce_file_format=True)


def _restart_baseline(path: Path) -> None:
    """JPEG Baseline with a restart marker after every MCU row (Pillow's encoder)."""
    buf = io.BytesIO()
    Image.fromarray(FUNDUS).save(buf, "JPEG", quality=92, subsampling=1, restart_marker_rows=1)
    _write_fundus(path, JPEGBaseline8Bit)
    ds, _ = damage.read_frames(path)
    damage.write_frames(ds, [buf.getvalue()], path)


@dataclass(frozen=True)
class Syntax:
    name: str
    ts: str
    family: str  # jpeg | jpeg-ls | j2k | rle: which damages apply
    fundus: Callable[[Path], None]
    oct: Callable[[Path], None] | None
    lossless: bool


SYNTAXES = [
    Syntax(
        "jpeg-baseline",
        JPEGBaseline8Bit,
        "jpeg",
        lambda p: _write_fundus(p, JPEGBaseline8Bit),
        lambda p: _write_oct(p, JPEGBaseline8Bit),
        False,
    ),
    Syntax("jpeg-baseline-restart", JPEGBaseline8Bit, "jpeg", _restart_baseline, None, False),
    Syntax("jpeg-lossless-sv1", JPEGLosslessSV1, "jpeg", _gdcm_jpeg_lossless, None, True),
    Syntax(
        "jpeg-ls",
        JPEGLSLossless,
        "jpeg-ls",
        lambda p: _write_fundus(p, JPEGLSLossless),
        lambda p: _write_oct(p, JPEGLSLossless),
        True,
    ),
    Syntax(
        "jpeg-ls-near-lossless",
        JPEGLSNearLossless,
        "jpeg-ls",
        _recompressed(_write_fundus, JPEGLSNearLossless, jls_error=2),
        _recompressed(_write_oct, JPEGLSNearLossless, jls_error=2),
        False,
    ),
    Syntax(
        "jpeg2000-lossless",
        JPEG2000Lossless,
        "j2k",
        lambda p: _write_fundus(p, JPEG2000Lossless),
        lambda p: _write_oct(p, JPEG2000Lossless),
        True,
    ),
    Syntax(
        "jpeg2000",
        JPEG2000,
        "j2k",
        _recompressed(_write_fundus, JPEG2000, j2k_cr=[4]),
        _recompressed(_write_oct, JPEG2000, j2k_cr=[4]),
        False,
    ),
    Syntax(
        "rle",
        RLELossless,
        "rle",
        lambda p: _write_fundus(p, RLELossless),
        lambda p: _write_oct(p, RLELossless),
        True,
    ),
]
BY_NAME = {s.name: s for s in SYNTAXES}


# -- the damages: (where, what) -> stream -> damaged stream ------------------------------


def _middle(span: tuple[int, int]) -> int:
    return (span[0] + span[1]) // 2


def _jpeg_entropy_marker_run(stream: bytes) -> bytes:
    """64 bytes of the entropy-coded data set to 0xFF (erased flash) where the byte after
    the run is not 0x00 (0xFF 0x00 would read as a stuffed data byte, a valid stream)."""
    start, end = damage.jpeg_scan_data(stream)
    at = _middle((start, end))
    while stream[at + 64] in (0x00, 0xFF) or 0xD0 <= stream[at + 64] <= 0xD7:
        at += 1
    return damage.overwrite(stream, at, b"\xff" * 64)


def _jpeg_sof_width(stream: bytes) -> bytes:
    sof = damage.jpeg_frame_header(stream)
    width = struct.unpack(">H", stream[sof + 7 : sof + 9])[0]
    return damage.overwrite(stream, sof + 7, struct.pack(">H", width + 8))


def _restart_marker(stream: bytes, replace: bytes) -> bytes:
    start, end = damage.jpeg_scan_data(stream)
    at = stream.index(b"\xff\xd3", start, end)  # the fourth restart marker
    return damage.overwrite(stream, at, replace)


def _j2k_siz_width(stream: bytes) -> bytes:
    siz = damage.j2k_marker(stream, 0xFF51)
    xsiz = struct.unpack(">L", stream[siz + 6 : siz + 10])[0]
    return damage.overwrite(stream, siz + 6, struct.pack(">L", xsiz + 16))


def _j2k_psot(stream: bytes) -> bytes:
    sot = damage.j2k_marker(stream, 0xFF90)
    psot = struct.unpack(">L", stream[sot + 6 : sot + 10])[0]
    return damage.overwrite(stream, sot + 6, struct.pack(">L", psot - 40))


def _over_j2k_data(stream: bytes, data: Callable[[int], bytes]) -> bytes:
    """Bytes written over the middle of the first tile-part's packet data (a run of at most
    64 bytes, a third of the data in the small lossy frames)."""
    start, end = damage.j2k_tile_data(stream)
    n = min(64, (end - start) // 3)
    return damage.overwrite(stream, start + (end - start - n) // 2, data(n))


def _rle_offset(stream: bytes) -> bytes:
    second = struct.unpack("<L", stream[8:12])[0]
    return damage.overwrite(stream, 8, struct.pack("<L", second + 7))


def _in_rle_segment(data: Callable[[int], bytes]) -> Callable[[bytes], bytes]:
    def hit(stream: bytes) -> bytes:
        return damage.overwrite(stream, _middle(damage.rle_segment(stream, 0)), data(64))

    return hit


def _noise(n: int) -> bytes:
    return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


TRUNCATIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated: cut to half": lambda s: damage.cut(s, 0.5),
    "truncated: cut to 90%": lambda s: damage.cut(s, 0.9),
}

DAMAGES: dict[str, dict[str, Callable[[bytes], bytes]]] = {
    "jpeg": {
        "tables: DHT code counts overwritten": lambda s: damage.overwrite(
            s, damage.jpeg_segment(s, 0xC4) + 5, b"\x09" * 16
        ),
        "header: SOF width changed": _jpeg_sof_width,
        "entropy: run of 0xFF bytes": _jpeg_entropy_marker_run,
        "entropy: misplaced header bytes": lambda s: damage.overwrite(
            s, _middle(damage.jpeg_scan_data(s)), s[:48]
        ),
        "marker: SOS destroyed": lambda s: damage.overwrite(
            s, damage.jpeg_segment(s, 0xDA), b"\xff\x00"
        ),
        "marker: EOI destroyed": lambda s: damage.overwrite(s, s.rindex(b"\xff\xd9"), b"\0\0"),
        "truncated: EOI cut off": lambda s: s[: s.rindex(b"\xff\xd9")],
        **TRUNCATIONS,
    },
    "jpeg-ls": {
        "header: SOF55 overwritten": lambda s: damage.overwrite(
            s, damage.jpeg_segment(s, 0xF7) + 4, _noise(6)
        ),
        "entropy: noise over 64 bytes": lambda s: damage.overwrite(
            s, _middle(damage.jpeg_scan_data(s)), _noise(64)
        ),
        "entropy: zeros over 64 bytes": lambda s: damage.overwrite(
            s, _middle(damage.jpeg_scan_data(s)), bytes(64)
        ),
        "entropy: one bit flipped": lambda s: damage.overwrite(
            s,
            _middle(damage.jpeg_scan_data(s)),
            bytes([s[_middle(damage.jpeg_scan_data(s))] ^ 0x10]),
        ),
        "marker: SOS destroyed": lambda s: damage.overwrite(
            s, damage.jpeg_segment(s, 0xDA), b"\xff\x00"
        ),
        "marker: EOI destroyed": lambda s: damage.overwrite(s, s.rindex(b"\xff\xd9"), b"\0\0"),
        **TRUNCATIONS,
    },
    "j2k": {
        "header: SIZ width changed": _j2k_siz_width,
        "header: COD overwritten": lambda s: damage.overwrite(
            s, damage.j2k_marker(s, 0xFF52) + 4, _noise(6)
        ),
        "header: QCD overwritten": lambda s: damage.overwrite(
            s, damage.j2k_marker(s, 0xFF5C) + 2, _noise(4)
        ),
        "entropy: run of 0xFF bytes": lambda s: _over_j2k_data(s, lambda n: b"\xff" * n),
        "entropy: misplaced tile-part header": lambda s: _over_j2k_data(
            s, lambda n: s[damage.j2k_marker(s, 0xFF90) :][:n]
        ),
        "marker: SOT destroyed": lambda s: damage.overwrite(
            s, damage.j2k_marker(s, 0xFF90), b"\xff\x00"
        ),
        "marker: EOC destroyed": lambda s: damage.overwrite(s, s.rindex(b"\xff\xd9"), b"\0\0"),
        "marker: tile-part length (Psot) shortened": _j2k_psot,
        **TRUNCATIONS,
    },
    "rle": {
        "header: segment count changed": lambda s: damage.overwrite(s, 0, struct.pack("<L", 2)),
        "header: segment offset moved": _rle_offset,
        "entropy: zeros over 64 bytes": _in_rle_segment(bytes),
        "entropy: noise over 64 bytes": _in_rle_segment(_noise),
        **TRUNCATIONS,
    },
}
RESTART_DAMAGES = {
    "marker: restart marker out of sequence": lambda s: _restart_marker(s, b"\xff\xd5"),
    "marker: restart marker lost": lambda s: _restart_marker(s, b"\x12\x34"),
}


def _cases(modality: str) -> list[tuple[str, str]]:
    cases = []
    for syntax in SYNTAXES:
        if modality == "oct" and syntax.oct is None:
            continue
        names = list(DAMAGES[syntax.family])
        if syntax.name == "jpeg-baseline-restart":
            names += list(RESTART_DAMAGES)
        cases += [(syntax.name, name) for name in names]
    return cases


def _damage(name: str, where: str) -> Callable[[bytes], bytes]:
    return {**DAMAGES[BY_NAME[name].family], **RESTART_DAMAGES}[where]


# -- fixtures: the valid originals -------------------------------------------------------


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("integrity")
    made: dict[tuple[str, str], Path] = {}
    for syntax in SYNTAXES:
        made[syntax.name, "fundus"] = folder / f"{syntax.name}-fundus.dcm"
        syntax.fundus(made[syntax.name, "fundus"])
        if syntax.oct is not None:
            made[syntax.name, "oct"] = folder / f"{syntax.name}-oct.dcm"
            syntax.oct(made[syntax.name, "oct"])
    return made


def _assert_corrupt(call: Callable[[], object]) -> InputError:
    with pytest.raises(InputError) as info:
        call()
    assert info.value.reason == "corrupt_pixel_data", info.value.detail
    assert "again" in info.value.detail  # a sentence a person can act on
    return info.value


def _stream_frames(path: Path) -> list[np.ndarray]:
    info = inspect_scan(read_header(path, defer_pixels=True))
    return list(iter_oct_frames(path, info))


# -- the valid originals decode ------------------------------------------------------------


@pytest.mark.parametrize("name", [s.name for s in SYNTAXES])
def test_valid_fundus_decodes_to_the_pixels_written(name: str, originals) -> None:
    syntax = BY_NAME[name]
    path = originals[name, "fundus"]
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax.ts
    scan = read_scan(path)
    if name == "jpeg-lossless-sv1":
        expected = np.moveaxis(
            pydicom.dcmread(PYDICOM_FILES / "SC_rgb_jpeg_gdcm.dcm").pixel_array, -1, 0
        )
    else:
        expected = np.moveaxis(FUNDUS, -1, 0)
    if syntax.lossless:
        np.testing.assert_array_equal(scan.pixels, expected)
    else:
        assert (
            np.abs(scan.pixels.astype(int) - expected.astype(int)).mean() < 8.0
        )  # lossy; garbage or a colour mix-up is off by ~100
    assert read_scan(path.read_bytes()).pixels.tobytes() == scan.pixels.tobytes()


@pytest.mark.parametrize("name", [s.name for s in SYNTAXES if s.oct is not None])
def test_valid_oct_decodes_whole_and_streamed(name: str, originals) -> None:
    path = originals[name, "oct"]
    scan = read_scan(path)
    if BY_NAME[name].lossless:
        np.testing.assert_array_equal(scan.pixels, VOLUME)
    else:
        assert (
            np.abs(scan.pixels.astype(int) - VOLUME.astype(int)).mean() < 8.0
        )  # lossy; garbage or a colour mix-up is off by ~100
    streamed = np.stack(_stream_frames(path))  # stored order
    np.testing.assert_array_equal(streamed[np.argsort(OCT_ORDER)], scan.pixels)


# -- damaged copies are quarantined ---------------------------------------------------------


@pytest.mark.parametrize(("name", "where"), _cases("fundus"))
def test_damaged_fundus_is_corrupt_pixel_data(
    name: str, where: str, originals, tmp_path: Path
) -> None:
    bad = damage.damaged_copy(originals[name, "fundus"], tmp_path / "bad.dcm", _damage(name, where))
    detail = _assert_corrupt(lambda: read_scan(bad)).detail
    assert _assert_corrupt(lambda: read_scan(bad.read_bytes())).detail == detail


@pytest.mark.parametrize(("name", "where"), _cases("oct"))
def test_damaged_oct_frame_is_corrupt_pixel_data_whole_and_streamed(
    name: str, where: str, originals, tmp_path: Path
) -> None:
    bad = damage.damaged_copy(
        originals[name, "oct"], tmp_path / "bad.dcm", _damage(name, where), DAMAGED_FRAME
    )
    _assert_corrupt(lambda: read_scan(bad))
    _assert_corrupt(lambda: read_scan(bad.read_bytes()))
    info = inspect_scan(read_header(bad, defer_pixels=True))
    good: list[np.ndarray] = []

    def consume() -> None:
        good.extend(iter_oct_frames(bad, info))

    _assert_corrupt(consume)
    assert len(good) == DAMAGED_FRAME  # the frames before the damaged one were sound
    stored = VOLUME[OCT_ORDER]
    if BY_NAME[name].lossless:
        np.testing.assert_array_equal(np.stack(good), stored[:DAMAGED_FRAME])


def test_every_damage_leaves_the_encapsulation_valid(originals, tmp_path: Path) -> None:
    """The damaged copies differ from the original in one frame's bytes only: pydicom
    still splits them into the same number of frames, so what the reader reports is the
    stream, not the file."""
    for name, where in _cases("oct"):
        src = originals[name, "oct"]
        bad = damage.damaged_copy(src, tmp_path / "bad.dcm", _damage(name, where), DAMAGED_FRAME)
        (_, before), (_, after) = damage.read_frames(src), damage.read_frames(bad)
        assert len(after) == len(before)
        changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        assert changed == [DAMAGED_FRAME], (name, where)
