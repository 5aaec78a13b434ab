"""Damage a file's compressed pixel stream while its DICOM encapsulation stays valid.

A damaged copy has the same data elements and a well-formed Pixel Data sequence (offset
table, one item per frame, delimiter); only the bytes of one frame's JPEG, JPEG-LS,
JPEG 2000 or RLE stream differ. So what a reader sees is a pixel-stream problem, not a
cut file. The locators find the parts of a stream to hit (a table, the entropy-coded
data, a marker) by walking it as its standard lays it out.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames


def read_frames(path: Path) -> tuple[Dataset, list[bytes]]:
    """The dataset and its compressed frames, one bytes object each."""
    ds = pydicom.dcmread(path)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    return ds, list(generate_frames(ds.PixelData, number_of_frames=count))


def write_frames(ds: Dataset, frames: list[bytes], path: Path) -> Path:
    """`ds` with `frames` encapsulated again (with an offset table), written to `path`."""
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def damaged_copy(src: Path, dst: Path, damage: Callable[[bytes], bytes], frame: int = 0) -> Path:
    """A copy of `src` whose frame `frame` is `damage(stream)`."""
    ds, frames = read_frames(src)
    frames[frame] = damage(frames[frame])
    return write_frames(ds, frames, dst)


def overwrite(stream: bytes, at: int, data: bytes) -> bytes:
    """`stream` with `len(data)` bytes from `at` replaced (its length unchanged)."""
    assert at >= 0 and at + len(data) <= len(stream), "damage outside the stream"
    return stream[:at] + data + stream[at + len(data) :]


def cut(stream: bytes, keep: float) -> bytes:
    """The first `keep` share of `stream`, to an even length (a fragment stays even)."""
    n = int(len(stream) * keep) & ~1
    return stream[:n]


# -- JPEG and JPEG-LS (ITU-T T.81 B, T.87): marker segments, then entropy-coded data


def jpeg_segment(stream: bytes, marker: int) -> int:
    """Offset of the first marker segment `marker` (e.g. 0xC4 DHT, 0xDB DQT, 0xDA SOS)."""
    pos = 2
    while pos + 4 <= len(stream):
        assert stream[pos] == 0xFF, "not at a marker"
        if stream[pos + 1] == marker:
            return pos
        if stream[pos + 1] == 0xDA:
            break
        pos += 2 + struct.unpack(">H", stream[pos + 2 : pos + 4])[0]
    raise LookupError(f"no marker 0xFF{marker:02X} before the first scan")


def jpeg_frame_header(stream: bytes) -> int:
    """Offset of the frame header (SOF0 baseline, SOF1 extended, SOF3 lossless, SOF55 LS)."""
    for marker in (0xC0, 0xC1, 0xC3, 0xF7):
        try:
            return jpeg_segment(stream, marker)
        except LookupError:
            continue
    raise LookupError("no frame header")


def jpeg_scan_data(stream: bytes) -> tuple[int, int]:
    """[start, end) of the first scan's entropy-coded data (after SOS, before EOI)."""
    sos = jpeg_segment(stream, 0xDA)
    start = sos + 2 + struct.unpack(">H", stream[sos + 2 : sos + 4])[0]
    end = stream.rindex(b"\xff\xd9")
    return start, end


# -- JPEG 2000 codestream (ITU-T T.800 A): main header, tile-parts (SOT ... SOD data), EOC


def j2k_marker(stream: bytes, marker: int) -> int:
    """Offset of the first marker segment `marker` of the main header, or the first SOT."""
    pos = 2
    while pos + 4 <= len(stream):
        code = struct.unpack(">H", stream[pos : pos + 2])[0]
        if code == marker:
            return pos
        if code == 0xFF90:
            break
        pos += 2 + struct.unpack(">H", stream[pos + 2 : pos + 4])[0]
    raise LookupError(f"no marker 0x{marker:04X} in the main header")


def j2k_tile_data(stream: bytes) -> tuple[int, int]:
    """[start, end) of the first tile-part's packet data (after SOD)."""
    sot = j2k_marker(stream, 0xFF90)
    psot = struct.unpack(">L", stream[sot + 6 : sot + 10])[0]
    sod = stream.index(b"\xff\x93", sot)
    return sod + 2, sot + psot if psot else stream.rindex(b"\xff\xd9")


# -- RLE (PS3.5 G): a 64-byte header of segment count and offsets, then the segments


def rle_segment(stream: bytes, index: int) -> tuple[int, int]:
    """[start, end) of segment `index`."""
    count, *offsets = struct.unpack("<16L", stream[:64])
    ends = [*offsets[:count], len(stream)]
    return ends[index], ends[index + 1]
