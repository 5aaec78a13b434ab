"""Read one DICOM file: decide what it is, check it, decode it. No Ray, no writing.

`read_scan` returns a `DecodedScan` or raises `InputError(reason, detail)`; the reasons are
the stable codes of the quarantine table (see `REASONS`). Details never quote attribute
values, so no identifier can reach a log or the quarantine table through them.

A source is a path or the bytes of a file (what a web service receives). A Part 10 file
written without its 128-byte preamble (starting with "DICM" or with the File Meta group)
is read as if the preamble were there; such a file is read into memory whole.

Compressed pixel data is checked before it becomes a scan: every frame's stream is walked
(JPEG and JPEG-LS markers, JPEG 2000 main header and tile-parts, RLE header and segment
lengths) and decoded by a plugin that reports damage (CharLS for JPEG-LS), so a damaged
stream is quarantined as `corrupt_pixel_data` instead of decoding into garbage. What no
check can see is said where the checks are (`_FRAME_CHECKS`).
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, iter_pixels
from pydicom.tag import Tag
from pydicom.uid import UID

from eyehub.errors import InputError
from eyehub.reasons import QUARANTINE_REASONS
from ingest import gpu_decode

log = logging.getLogger(__name__)

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

REASONS = QUARANTINE_REASONS  # the closed set of quarantine reason codes (eyehub/reasons.py)


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


def _damaged(kind: str, problem: str, index: int, frames: int) -> InputError:
    where = f"frame {index + 1} of {frames}: the" if frames > 1 else "the"
    return _fail(
        "corrupt_pixel_data",
        f"{where} {kind} stream {problem}; the compressed pixel data was damaged in "
        "storage or transfer. Copy or export the image again.",
    )


def _fail(reason: str, detail: str) -> InputError:
    return InputError(reason, detail)


# ------------------------------------------------------------------------------ sources

Source = Path | str | bytes | bytearray | memoryview
"""A file's path, or the file's bytes (in-memory DICOM, as a web service receives it)."""

# PS3.5 6.2 value representations; those with a 4-byte length in explicit VR (PS3.5 7.1.2)
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI "
    b"UL UN UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def _is_meta_element(head: bytes) -> bool:
    """Bytes that open a File Meta Information element: group 0002, explicit VR LE."""
    return len(head) >= 8 and head[:2] == b"\x02\x00" and head[4:6] in _VRS


def _missing_preamble(head: bytes) -> bytes | None:
    """What a Part 10 stream lacks before its File Meta Information: b"" for a conformant
    file, the preamble (and the DICM prefix) for one written without them, None for bytes
    that are not DICOM Part 10 at all."""
    if head[128:132] == b"DICM":
        return b""
    if head[:4] == b"DICM" and _is_meta_element(head[4:12]):
        return bytes(128)
    if _is_meta_element(head[:8]):
        return bytes(128) + b"DICM"
    return None


def _not_dicom() -> InputError:
    return _fail(
        "not_dicom",
        "not a DICOM file: it has neither the DICM prefix nor File Meta Information. "
        "Remove it or export the image as DICOM Part 10.",
    )


def _unreadable(exc: OSError) -> InputError:
    return _fail(
        "unreadable",
        f"cannot read the file ({type(exc).__name__}); check permissions and storage.",
    )


@dataclass
class _Opened:
    """A source as pydicom reads it: a conformant file by its path (so deferred values are
    read from the file later), anything else as a buffer with the preamble it lacked."""

    stream: str | BinaryIO
    size: int  # bytes pydicom sees, preamble added


def _open(source: Source) -> _Opened:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        path = Path(source)
        try:
            with path.open("rb") as fh:
                head = fh.read(140)
            prefix = _missing_preamble(head)
            if prefix is None:
                raise _not_dicom()
            if not prefix:
                return _Opened(str(path), path.stat().st_size)
            data = path.read_bytes()
        except OSError as exc:
            raise _unreadable(exc) from None
    prefix = _missing_preamble(data[:140])
    if prefix is None:
        raise _not_dicom()
    if prefix:
        log.debug("DICOM Part 10 stream without its preamble; read with one added")
    return _Opened(io.BytesIO(prefix + data), len(prefix) + len(data))


def read_header(source: Source, defer_pixels: bool = False) -> Dataset:
    """Parse a file or its bytes (Pixel Data not decoded; with `defer_pixels`, a file's
    large values are not even loaded until used, for frames streamed from the file);
    classify read failures."""
    opened = _open(source)
    defer = 2**20 if defer_pixels and isinstance(opened.stream, str) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd VRs in device exports are not our errors
            ds = pydicom.dcmread(opened.stream, defer_size=defer)
    except InvalidDicomError:
        raise _not_dicom() from None
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
            raise _unreadable(exc) from None
        raise _fail(
            "truncated",
            "the file ends before its data elements do "
            f"({type(exc).__name__}); copy it again from the source.",
        ) from None
    _check_complete(ds, opened)
    meta = getattr(ds, "file_meta", None)
    if ds.get("SOPClassUID") is None and meta is not None:
        ds.SOPClassUID = meta.get("MediaStorageSOPClassUID")
    return ds


class _Cut(Exception):
    """The stream ends inside an element."""


class _Malformed(Exception):
    """The element structure is broken in a way that is not a cut (left to the decoder)."""


def _check_complete(ds: Dataset, opened: _Opened) -> None:
    """pydicom stops quietly where a cut file runs out; what the file lacks tells.

    With Pixel Data, its value must be complete: a native value's declared length within
    the file; an encapsulated value's items (offset table, fragments) and its sequence
    delimiter, read from their 8-byte headers only (deferred data is not loaded). What
    follows Pixel Data (trailing padding, signatures) is not needed and not checked.
    Without Pixel Data, the element headers are walked from the start: a file cut in
    the middle of its header runs out inside an element.
    """
    if not ds._dict:
        raise _fail(
            "truncated",
            "the file holds no data elements after its header; copy it again from the source.",
        )
    pixels = ds._dict.get(PIXEL_DATA_TAG)
    try:
        with ExitStack() as stack:
            stream = opened.stream
            fh: BinaryIO = (
                stack.enter_context(open(stream, "rb")) if isinstance(stream, str) else stream
            )
            if pixels is None:
                _walk_file(fh, opened.size, ds)
            else:
                _check_pixel_value(fh, opened.size, pixels)
    except _Cut:
        what = "its data elements do" if pixels is None else "its pixel data is complete"
        raise _fail(
            "truncated", f"the file ends before {what}; copy it again from the source."
        ) from None
    except (_Malformed, RecursionError):
        pass  # not a cut: the decoder (or the next check) says what is wrong
    except OSError as exc:
        raise _unreadable(exc) from None


def _check_pixel_value(fh: BinaryIO, size: int, elem: Any) -> None:
    start = getattr(elem, "value_tell", None)
    length = getattr(elem, "length", None)
    if not isinstance(elem, RawDataElement) or start is None or length is None:
        return  # already converted by pydicom: it was read whole
    if length != UNDEFINED_LENGTH:
        if start + length > size or (elem.value is not None and len(elem.value) < length):
            raise _Cut()
        return
    _skip_items(fh, start, size, little=True)


def _read_at(fh: BinaryIO, pos: int, n: int) -> bytes:
    fh.seek(pos)
    return fh.read(n)


def _element_header(fh: BinaryIO, pos: int, implicit: bool, little: bool) -> tuple[int, int, int]:
    """(tag, value length, header length) of the element at `pos`."""
    head = _read_at(fh, pos, 12)
    if len(head) < 8:
        raise _Cut()
    end = "<" if little else ">"
    group, element = struct.unpack(end + "HH", head[:4])
    tag = group << 16 | element
    if implicit or group == 0xFFFE:
        return tag, struct.unpack(end + "L", head[4:8])[0], 8
    vr = head[4:6]
    if vr in _LONG_VRS:
        if len(head) < 12:
            raise _Cut()
        return tag, struct.unpack(end + "L", head[8:12])[0], 12
    if vr not in _VRS:
        raise _Malformed()
    return tag, struct.unpack(end + "H", head[6:8])[0], 8


def _skip_items(fh: BinaryIO, pos: int, size: int, little: bool, implicit: bool = False) -> int:
    """Past an undefined-length value (sequence items or encapsulated fragments)."""
    while True:
        tag, length, _ = _element_header(fh, pos, True, little)
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Malformed()
        if length == UNDEFINED_LENGTH:
            pos = _skip_elements(fh, pos, size, implicit, little, in_item=True)
        else:
            pos += length
            if pos > size:
                raise _Cut()


def _skip_elements(
    fh: BinaryIO, pos: int, size: int, implicit: bool, little: bool, in_item: bool
) -> int:
    """Past a data set: to the end of the stream, or to its item delimiter."""
    while True:
        if not in_item and pos == size:
            return pos
        tag, length, header = _element_header(fh, pos, implicit, little)
        if in_item and tag == _ITEM_END:
            return pos + 8
        pos += header
        if length == UNDEFINED_LENGTH:
            pos = _skip_items(fh, pos, size, little, implicit)
        else:
            pos += length
            if pos > size:
                raise _Cut()


def _walk_file(fh: BinaryIO, size: int, ds: Dataset) -> None:
    """Raise `_Cut` when the stream ends inside an element (File Meta Information first,
    always explicit VR little endian, then the data set in its transfer syntax)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
        return  # a DICOMDIR is ignored, however many records it holds
    ts = UID(str(meta.get("TransferSyntaxUID", "") or ""))
    if ts.name == ts or ts == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return  # unknown or deflated: the bytes cannot be walked
    pos = 132
    while pos < size and _read_at(fh, pos, 2) == b"\x02\x00":
        _, length, header = _element_header(fh, pos, False, True)
        pos += header + length
    if pos > size:
        raise _Cut()
    _skip_elements(fh, pos, size, ts.is_implicit_VR, ts.is_little_endian, in_item=False)


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


# ------------------------------------------------------------- compressed stream checks
#
# Each check walks one frame's stream and returns what is wrong with it (a phrase a
# person can act on) or None. They read only markers, headers and lengths, vectorised
# with numpy, so they cost little next to decoding. What they cannot see:
#
# - JPEG (Baseline, Extended, Lossless): a run of entropy-coded bytes overwritten without
#   creating a marker. Huffman codes resynchronise, so the damaged stream is a valid
#   stream of other pixels (libjpeg-turbo's own warnings catch about half of such cases;
#   no decoder installed here reports them). Values changed inside a DQT/DHT table that
#   keep it well-formed are likewise a valid, different image.
# - JPEG 2000: code-block bytes overwritten without creating a marker code. The MQ coder
#   has no redundancy unless the encoder wrote error-resilience symbols, so OpenJPEG
#   decodes other pixels.
# - RLE: literal bytes overwritten inside a literal run: the lengths still add up.
# - JPEG-LS is decoded by CharLS (pyjpegls), which rejects a stream whose decoding does
#   not end exactly at its end-of-image marker, so damage anywhere is caught.


@dataclass(frozen=True)
class _Layout:
    """What the header says each frame holds."""

    rows: int
    columns: int
    samples: int
    bytes_per_sample: int

    @classmethod
    def of(cls, ds: Dataset) -> _Layout:
        return cls(
            int(ds.get("Rows", 0) or 0),
            int(ds.get("Columns", 0) or 0),
            int(ds.get("SamplesPerPixel", 1) or 1),
            max(1, math.ceil(int(ds.get("BitsAllocated", 8) or 8) / 8)),
        )


_MISMATCH = "does not match the image size in the header (Rows, Columns, Samples per Pixel)"
_CUT_SHORT = "ends before its end marker (it was cut short)"


@dataclass
class _JpegFrame:
    lossless: bool
    height: int
    width: int
    components: dict[int, tuple[int, int, int]]  # id: (H, V, quantisation table)

    def mcus(self, ids: list[int]) -> int:
        """MCUs in a scan of components `ids` (ITU-T T.81 A.2)."""
        hmax = max(h for h, _, _ in self.components.values())
        vmax = max(v for _, v, _ in self.components.values())
        unit = 1 if self.lossless else 8
        if len(ids) == 1:
            h, v, _ = self.components[ids[0]]
            across = math.ceil(math.ceil(self.width * h / hmax) / unit)
            down = math.ceil(math.ceil(self.height * v / vmax) / unit)
            return across * down
        return math.ceil(self.width / (unit * hmax)) * math.ceil(self.height / (unit * vmax))


def _jpeg_frame_header(marker: int, seg: bytes, layout: _Layout) -> _JpegFrame | str:
    if len(seg) < 6 or len(seg) != 6 + 3 * seg[5] or seg[5] == 0:
        return "has a damaged frame header"
    precision, nf = seg[0], seg[5]
    height, width = struct.unpack(">HH", seg[1:5])
    components: dict[int, tuple[int, int, int]] = {}
    for i in range(nf):
        cid, hv, tq = seg[6 + 3 * i : 9 + 3 * i]
        if cid in components or not (1 <= hv >> 4 <= 4 and 1 <= hv & 15 <= 4) or tq > 3:
            return "has a damaged frame header"
        components[cid] = (hv >> 4, hv & 15, tq)
    lossless = marker == 0xC3
    if not (2 <= precision <= 16 if lossless else precision in (8, 12)):
        return "has a damaged frame header"
    if width != layout.columns or height not in (0, layout.rows) or nf != layout.samples:
        return _MISMATCH
    return _JpegFrame(lossless, height, width, components)


def _jpeg_huffman_tables(seg: bytes, defined: set[tuple[int, int]]) -> str | None:
    p = 0
    while p < len(seg):
        if p + 17 > len(seg):
            return "has a damaged Huffman table"
        tc, th = seg[p] >> 4, seg[p] & 15
        counts = seg[p + 1 : p + 17]
        total = sum(counts)
        if tc > 1 or th > 3 or not 0 < total <= 256 or p + 17 + total > len(seg):
            return "has a damaged Huffman table"
        code = 0
        for bits, count in enumerate(counts, 1):  # the canonical codes must fit (T.81 C)
            code += count
            if code >= 1 << bits and count:
                return "has a damaged Huffman table"
            code <<= 1
        if tc == 0 and max(seg[p + 17 : p + 17 + total]) > 16:
            return "has a damaged Huffman table"
        defined.add((tc, th))
        p += 17 + total
    return None


def _jpeg_quantisation_tables(seg: bytes, defined: set[int]) -> str | None:
    p = 0
    while p < len(seg):
        pq, tq = seg[p] >> 4, seg[p] & 15
        size = 64 * (pq + 1)
        if pq > 1 or tq > 3 or p + 1 + size > len(seg):
            return "has a damaged quantisation table"
        values = np.frombuffer(seg[p + 1 : p + 1 + size], ">u2" if pq else np.uint8)
        if not values.all():
            return "has a damaged quantisation table"
        defined.add(tq)
        p += 1 + size
    return None


def _jpeg_scan_header(
    seg: bytes, frame: _JpegFrame, quant: set[int], scanned: set[int]
) -> list[int] | str:
    ns = seg[0] if seg else 0
    if not 1 <= ns <= 4 or len(seg) != 4 + 2 * ns:
        return "has a damaged scan header"
    ids: list[int] = []
    for i in range(ns):
        cid, tables = seg[1 + 2 * i], seg[2 + 2 * i]
        if cid not in frame.components or cid in scanned or cid in ids:
            return "has a damaged scan header"
        if tables >> 4 > 3 or tables & 15 > 3:
            return "has a damaged scan header"
        if not frame.lossless and frame.components[cid][2] not in quant:
            return "uses a quantisation table it does not define"
        ids.append(cid)
    # spectral selection and approximation are not checked for DCT scans: some encoders
    # write Se=0, which libjpeg only warns about; a lossless scan needs its predictor
    if frame.lossless and not 1 <= seg[1 + 2 * ns] <= 7:
        return "has a damaged scan header"
    return ids


_JPEG_SEQUENTIAL = {0xC0, 0xC1, 0xC3}  # Huffman baseline, extended, lossless (T.81 B.1.1.3)
_JPEG_OTHER_FRAMES = {0xC2, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_SKIPPED = {0xDC, 0xFE, *range(0xE0, 0xF0)}  # DNL, COM, APPn


def _jpeg_problem(buf: bytes, layout: _Layout) -> str | None:
    """JPEG (T.81) Huffman sequential streams: SOI, tables, one frame, scans whose
    entropy-coded data holds no marker but restart markers in sequence and in the number
    the restart interval gives, every component scanned, then EOI."""
    a = np.frombuffer(buf, np.uint8)
    n = a.size
    if n < 4 or a[0] != 0xFF or a[1] != 0xD8:
        return "does not start with a start-of-image marker"
    ff = np.flatnonzero(a[:-1] == 0xFF)
    follower = a[ff + 1]
    markers = ff[(follower != 0) & (follower != 0xFF)]  # stuffed 0xFF00 and fill excluded
    frame: _JpegFrame | None = None
    huffman: set[tuple[int, int]] = set()
    quant: set[int] = set()
    scanned: set[int] = set()
    restart = 0
    pos = 2
    while True:
        while pos + 1 < n and a[pos] == 0xFF and a[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 1 >= n:
            return _CUT_SHORT
        if a[pos] != 0xFF:
            return "has a damaged marker segment"
        marker = int(a[pos + 1])
        if marker == 0xD9:
            if frame is None or not scanned:
                return "ends before its compressed image data"
            if scanned != set(frame.components):
                return "lacks the compressed data of a colour component"
            return None
        if frame is not None and scanned == set(frame.components) and marker != 0xDC:
            return "holds a marker where its end-of-image marker belongs"
        if pos + 4 > n:
            return _CUT_SHORT
        length = int(a[pos + 2]) << 8 | int(a[pos + 3])
        end = pos + 2 + length
        if length < 2 or end > n:
            return "has a marker segment that runs past its end (cut short, or a damaged length)"
        seg = buf[pos + 4 : end]
        problem: str | None = None
        if marker in _JPEG_SEQUENTIAL:
            if frame is not None:
                return "has a second frame header"
            parsed = _jpeg_frame_header(marker, seg, layout)
            if isinstance(parsed, str):
                return parsed
            frame = parsed
        elif marker in _JPEG_OTHER_FRAMES:
            return None  # progressive, arithmetic, hierarchical: left to the decoder
        elif marker == 0xC4:
            problem = _jpeg_huffman_tables(seg, huffman)
        elif marker == 0xDB:
            problem = _jpeg_quantisation_tables(seg, quant)
        elif marker == 0xDD:
            if length != 4:
                return "has a damaged restart interval"
            restart = int(a[pos + 4]) << 8 | int(a[pos + 5])
        elif marker == 0xDA:
            if frame is None:
                return "has a scan before its frame header"
            ids = _jpeg_scan_header(seg, frame, quant, scanned)
            if isinstance(ids, str):
                return ids
            scanned.update(ids)
            # the entropy-coded data: up to the first marker that is not RSTn
            first = int(np.searchsorted(markers, end))
            codes = a[markers[first:] + 1]
            others = np.flatnonzero((codes < 0xD0) | (codes > 0xD7))
            if not others.size:
                return _CUT_SHORT
            count = int(others[0])
            expected = 0xD0 + np.arange(count) % 8
            if count and not np.array_equal(codes[:count], expected):
                return "has restart markers out of sequence"
            if frame.height and count != (
                math.ceil(frame.mcus(ids) / restart) - 1 if restart else 0
            ):
                return "has restart markers missing or in excess"
            pos = int(markers[first + count])
            continue
        elif marker not in _JPEG_SKIPPED:
            return "holds a marker that has no place in it"
        if problem:
            return problem
        pos = end


def _jpegls_problem(buf: bytes, layout: _Layout) -> str | None:
    """JPEG-LS: starts with SOI and ends with EOI (a pad byte allowed); the rest is CharLS's
    to check while decoding."""
    if buf[:2] != b"\xff\xd8":
        return "does not start with a start-of-image marker"
    if b"\xff\xd9" not in (buf[-2:], buf[-3:-1]):
        return _CUT_SHORT
    return None


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# markers a main header / tile-part header may hold (T.800 A.2), with their segments
_J2K_MAIN = {0xFF50, 0xFF51, 0xFF52, 0xFF53, 0xFF55, 0xFF57, 0xFF59, 0xFF5C, 0xFF5D,
             0xFF5E, 0xFF5F, 0xFF60, 0xFF63, 0xFF64}  # fmt: skip
_J2K_TILE = {0xFF52, 0xFF53, 0xFF58, 0xFF5C, 0xFF5D, 0xFF5E, 0xFF5F, 0xFF61, 0xFF64}


def _jp2_codestream(buf: bytes) -> bytes | None:
    """The contiguous codestream box of a JP2 file (some encoders put JP2 in DICOM)."""
    pos = 0
    while pos + 8 <= len(buf):
        size, kind = struct.unpack(">L4s", buf[pos : pos + 8])
        head = 8
        if size == 1 and pos + 16 <= len(buf):
            size, head = struct.unpack(">Q", buf[pos + 8 : pos + 16])[0], 16
        elif size == 0:
            size = len(buf) - pos
        if kind == b"jp2c":
            return buf[pos + head : pos + size]
        if size < head:
            return None
        pos += size
    return None


def _j2k_main_header(buf: bytes, layout: _Layout) -> tuple[int, int] | str:
    """(first tile-part offset, tile count), or the problem."""
    n = len(buf)
    if buf[:4] != b"\xff\x4f\xff\x51" or n < 42:
        return "does not start with its SOC and SIZ markers"
    lsiz, _ = struct.unpack(">HH", buf[4:8])
    xsiz, ysiz, xo, yo, xt, yt, xto, yto = struct.unpack(">8L", buf[8:40])
    csiz = struct.unpack(">H", buf[40:42])[0]
    if lsiz != 38 + 3 * csiz or n < 4 + lsiz:
        return "has a damaged image header (SIZ)"
    comps = buf[42 : 42 + 3 * csiz]
    if (
        not (xsiz > xo and ysiz > yo and xt and yt)
        or not (xto <= xo < xto + xt and yto <= yo < yto + yt)
        or any(comps[3 * i] & 0x7F > 37 or not comps[3 * i + 1] or not comps[3 * i + 2]
               for i in range(csiz))
    ):  # fmt: skip
        return "has a damaged image header (SIZ)"
    if xsiz - xo != layout.columns or ysiz - yo != layout.rows or csiz != layout.samples:
        return _MISMATCH
    tiles = math.ceil((xsiz - xto) / xt) * math.ceil((ysiz - yto) / yt)
    pos = 4 + lsiz
    levels: int | None = None
    qcd: bytes | None = None
    while True:
        if pos + 4 > n:
            return _CUT_SHORT
        marker, length = struct.unpack(">HH", buf[pos : pos + 4])
        if marker == 0xFF90:
            break
        if marker not in _J2K_MAIN or marker == 0xFF51:
            return "holds a marker that has no place in its main header"
        if length < 2 or pos + 2 + length > n:
            return "has a marker segment that runs past its end (cut short, or a damaged length)"
        seg = buf[pos + 4 : pos + 2 + length]
        if marker == 0xFF52:  # COD (T.800 A.6.1)
            if len(seg) < 10:
                return "has a damaged coding style (COD)"
            scod, progression, layers, mct, levels, xcb, ycb, _, wavelet = struct.unpack(
                ">BBHBBBBBB", seg[:10]
            )
            precincts = len(seg) - 10
            if (
                progression > 4
                or not layers
                or mct > 1
                or levels > 32
                or xcb > 8
                or ycb > 8
                or xcb + ycb > 8
                or wavelet > 1
                or precincts != (levels + 1 if scod & 1 else 0)
            ):
                return "has a damaged coding style (COD)"
        elif marker == 0xFF5C:  # QCD (T.800 A.6.4)
            qcd = seg
        pos += 2 + length
    if levels is None or qcd is None:
        return "lacks its coding style (COD) or quantisation (QCD)"
    style = qcd[0] & 0x1F if qcd else 0xFF
    bands = 3 * levels + 1
    if len(qcd) != {0: 1 + bands, 1: 3, 2: 1 + 2 * bands}.get(style, -1):
        return "has a damaged quantisation (QCD)"
    return pos, tiles


def _j2k_problem(buf: bytes, layout: _Layout) -> str | None:
    """JPEG 2000 (T.800 A): SOC, SIZ matching the header, COD and QCD, then tile-parts whose
    lengths (Psot) chain exactly from one SOT to the next and to EOC, every tile present
    with all its parts, and no marker code (0xFF90-0xFFFF) inside packet data but SOP/EPH."""
    if buf.startswith(_JP2_SIGNATURE):
        inner = _jp2_codestream(buf)
        if inner is None:
            return "has no codestream in its JP2 boxes"
        buf = inner
    main = _j2k_main_header(buf, layout)
    if isinstance(main, str):
        return main
    pos, tiles = main
    a = np.frombuffer(buf, np.uint8)
    n = len(buf)
    # the codestream ends at its EOC: the last 0xFFD9, a pad byte after it allowed
    eoc = n - 2 if buf[-2:] == b"\xff\xd9" else n - 3 if buf[-3:-1] == b"\xff\xd9" else -1
    if eoc < 0:
        return _CUT_SHORT
    parts: dict[int, list[int]] = {}
    announced: dict[int, int] = {}  # TNsot: some encoders write one part too few
    while pos != eoc:
        if pos + 12 > eoc or buf[pos : pos + 4] != b"\xff\x90\x00\x0a":
            return "has a damaged tile-part header (SOT)"
        tile, psot, index, count = struct.unpack(">HLBB", buf[pos + 4 : pos + 12])
        end = eoc if psot == 0 else pos + psot
        if tile >= tiles or end > eoc or (psot and psot < 14):
            return "has a tile-part whose length runs past its end (cut short, or damaged)"
        q = pos + 12
        while True:  # tile-part header markers, then SOD
            if q + 2 > end:
                return "has a damaged tile-part header"
            marker = int(a[q]) << 8 | int(a[q + 1])
            if marker == 0xFF93:
                q += 2
                break
            if marker not in _J2K_TILE or q + 4 > end:
                return "has a damaged tile-part header"
            q += 2 + (int(a[q + 2]) << 8 | int(a[q + 3]))
        body = a[q:end]
        if body.size > 1:
            ff = np.flatnonzero(body[:-1] == 0xFF)
            follower = body[ff + 1]
            if np.any((follower > 0x8F) & (follower != 0x91) & (follower != 0x92)):
                return "holds a marker code inside its compressed data"
        parts.setdefault(tile, []).append(index)
        if count:
            announced[tile] = count
        pos = end
    if len(parts) != tiles:
        return "lacks a tile"
    for tile, indices in parts.items():
        if sorted(indices) != list(range(max(len(indices), announced.get(tile, 0)))):
            return "lacks a tile-part"
    return None


def _rle_problem(buf: bytes, layout: _Layout) -> str | None:
    """RLE (PS3.5 G): a 64-byte header with one segment per sample byte, offsets rising
    inside the frame, each segment decoding to exactly Rows x Columns bytes."""
    if len(buf) < 64:
        return "is shorter than its header (cut short)"
    header = np.frombuffer(buf[:64], "<u4")
    count = int(header[0])
    offsets = [int(v) for v in header[1 : 1 + count]] + [len(buf)]
    if count != layout.samples * layout.bytes_per_sample or not 1 <= count <= 15:
        return "has a damaged header (segment count)"
    if offsets[0] != 64 or any(stop <= start for start, stop in itertools.pairwise(offsets)):
        return "has a damaged header (segment offsets), or was cut short"
    try:
        from rle.utils import decode_segment  # pylibjpeg-rle
    except ImportError:  # pragma: no cover - a dependency; then the decoder alone checks
        return None
    expected = layout.rows * layout.columns
    for start, stop in itertools.pairwise(offsets):
        try:
            decoded = len(decode_segment(buf[start:stop]))
        except ValueError:
            return "has a segment that ends before its pixels do (cut short, or damaged)"
        if decoded != expected:
            return "has a segment that decodes to the wrong number of pixels"
    return None


_FRAME_CHECKS: dict[str, tuple[str, Callable[[bytes, _Layout], str | None]]] = {
    **dict.fromkeys(
        (
            pydicom.uid.JPEGBaseline8Bit,
            pydicom.uid.JPEGExtended12Bit,
            pydicom.uid.JPEGLossless,
            pydicom.uid.JPEGLosslessSV1,
        ),
        ("JPEG", _jpeg_problem),
    ),
    **dict.fromkeys(
        (pydicom.uid.JPEGLSLossless, pydicom.uid.JPEGLSNearLossless),
        ("JPEG-LS", _jpegls_problem),
    ),
    **dict.fromkeys(
        (pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000),
        ("JPEG 2000", _j2k_problem),
    ),
    pydicom.uid.RLELossless: ("RLE", _rle_problem),
}

# decoders that report damage instead of decoding it into garbage, where installed
_PLUGINS = {
    pydicom.uid.JPEGLSLossless: "pyjpegls",  # CharLS; pylibjpeg-libjpeg decodes garbage
    pydicom.uid.JPEGLSNearLossless: "pyjpegls",
    pydicom.uid.RLELossless: "pylibjpeg",  # pylibjpeg-rle checks segment lengths
}


def _decoding_plugin(ts: UID) -> str:
    name = _PLUGINS.get(ts, "")
    try:
        return name if name and name in get_decoder(ts).available_plugins else ""
    except NotImplementedError:
        return ""


def _checked_frames(ds: Dataset, frames: Iterable[bytes], first: int = 0) -> Iterator[bytes]:
    """`frames` (one compressed frame each, the first of them frame `first`), each checked
    before it is yielded; the first damaged one raises corrupt_pixel_data."""
    ts = _transfer_syntax(ds)
    kind, check = _FRAME_CHECKS[ts]
    layout = _Layout.of(ds)
    total = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        for index, frame in enumerate(frames, first):
            problem = check(frame, layout)
            if problem:
                log.debug("frame %d: %s stream %s", index, kind, problem)
                raise _damaged(kind, problem, index, total)
            yield frame
    except InputError:
        raise
    except Exception as exc:  # the encapsulation itself (items, offsets) is broken
        raise _corrupt(exc) from None


def _transfer_syntax(ds: Dataset) -> UID:
    return UID(str(ds.file_meta.get("TransferSyntaxUID", "")))


def _frame_buffers(ds: Dataset, buffer: bytes | BinaryIO) -> Iterator[bytes]:
    """The compressed frames of encapsulated Pixel Data (`buffer` at its first item)."""
    table = ds.get("ExtendedOffsetTable")
    lengths = ds.get("ExtendedOffsetTableLengths")
    return generate_frames(
        buffer,
        number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
        extended_offsets=(table, lengths) if table and lengths else None,
    )


def _ybr_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """YBR_FULL to RGB (PS3.3 C.7.6.3.1.2), via OpenCV: far faster than pydicom's numpy."""
    if pixels.ndim == 3:
        return cv2.cvtColor(np.ascontiguousarray(pixels[..., [0, 2, 1]]), cv2.COLOR_YCrCb2RGB)
    return np.stack([_ybr_to_rgb(f) for f in pixels])


# The frames a fast decoder takes (a file it does not take goes to pydicom's plugins):
# - 8-bit JPEG Baseline / Extended, grey or YCbCr: libjpeg-turbo (through OpenCV's
#   imdecode), about 7x faster than pylibjpeg-libjpeg (a 2048 x 1536 photograph: 55 ms ->
#   8 ms), or the GPU. Lossy JPEG decoders may differ by a few grey levels (the standard
#   fixes the IDCT's accuracy, not its output); on the synthetic cohort, at most 7 levels
#   from the previous path.
# - JPEG 2000, 8 to 16 bits, grey or colour with or without the codestream's own colour
#   transform: the GPU only (`ingest.gpu_decode`); OpenJPEG otherwise.
# Signed samples always stay with pydicom's plugins.
JPEG8_SYNTAXES = {pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEGExtended12Bit}
J2K_SYNTAXES = {pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000}
_FAST_PHOTOMETRIC = {
    "jpeg": {"MONOCHROME1": 1, "MONOCHROME2": 1, "YBR_FULL": 3, "YBR_FULL_422": 3},
    "j2k": {"MONOCHROME1": 1, "MONOCHROME2": 1, "RGB": 3, "YBR_RCT": 3, "YBR_ICT": 3},
}


class _TurboRefused(Exception):
    """libjpeg-turbo did not decode a frame that passed the stream check."""


# what a fast decoder raises for a file it does not take: its CPU decoders take it instead
_REFUSED = (_TurboRefused, gpu_decode.Refused)
FrameDecoder = Callable[[Iterable[bytes]], Iterator[np.ndarray]]


def fast_layout(ds: Dataset) -> tuple[str, int] | None:
    """("jpeg" | "j2k", samples per pixel) where a fast decoder takes the file's frames,
    else None."""
    ts = _transfer_syntax(ds)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if int(ds.get("PixelRepresentation", 0) or 0) != 0:
        return None
    if ts in JPEG8_SYNTAXES and bits == 8:
        kind = "jpeg"
    elif ts in J2K_SYNTAXES and bits in (8, 16):
        kind = "j2k"
    else:
        return None
    samples = _FAST_PHOTOMETRIC[kind].get(str(ds.get("PhotometricInterpretation", "")))
    if samples is None or int(ds.get("SamplesPerPixel", 1) or 1) != samples:
        return None
    return kind, samples


def _turbo_decoder(rows: int, cols: int, samples: int) -> FrameDecoder:
    """A decoder of 8-bit JPEG frames (grey or YCbCr, to RGB) through libjpeg-turbo."""
    mode = cv2.IMREAD_IGNORE_ORIENTATION | (
        cv2.IMREAD_COLOR if samples == 3 else cv2.IMREAD_GRAYSCALE
    )

    def decode(frame: bytes) -> np.ndarray:
        pixels = cv2.imdecode(np.frombuffer(frame, np.uint8), mode)
        if pixels is None or pixels.shape[:2] != (rows, cols):
            raise _TurboRefused
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB) if samples == 3 else pixels

    return lambda frames: map(decode, frames)


def _fast_decoder(ds: Dataset) -> FrameDecoder | None:
    """The fastest decoder of the file's checked frames that applies: the GPU's
    (`ingest.gpu_decode`, where one is usable), libjpeg-turbo's; None: pydicom's plugins."""
    layout = fast_layout(ds)
    if layout is None:
        return None
    kind, samples = layout
    rows, cols = int(ds.Rows), int(ds.Columns)
    to_rgb = str(ds.get("PhotometricInterpretation", "")).startswith("YBR")
    gpu = gpu_decode.frame_decoder(rows, cols, samples, int(ds.BitsAllocated), to_rgb)
    if gpu is not None or kind != "jpeg":
        return gpu
    return _turbo_decoder(rows, cols, samples)


def _decode(ds: Dataset) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", ""))
    ts = _transfer_syntax(ds)
    try:
        data = ds.PixelData  # a deferred value is read here
    except Exception as exc:
        raise _corrupt(exc) from None
    fast = _fast_decoder(ds)
    if fast is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                frames = list(fast(_checked_frames(ds, _frame_buffers(ds, data))))
            except _REFUSED:  # a valid stream it does not take (a DNL marker): pydicom's
                log.debug("the fast decoder refused a frame; pydicom's plugins decode")
                for _ in _checked_frames(ds, _frame_buffers(ds, data)):  # the unchecked rest too
                    pass
                return _decode_with_pydicom(ds, ts, photometric)
        expected = int(ds.get("NumberOfFrames", 1) or 1)
        if len(frames) < expected:  # pydicom's pixel_array refuses these too
            raise _fail(
                "corrupt_pixel_data",
                f"the file holds {len(frames)} of its {expected} frames; export it again.",
            )
        return frames[0] if expected == 1 else np.stack(frames[:expected])
    if ts in _FRAME_CHECKS:
        for _ in _checked_frames(ds, _frame_buffers(ds, data)):
            pass
    return _decode_with_pydicom(ds, ts, photometric)


def _decode_with_pydicom(ds: Dataset, ts: UID, photometric: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.pixel_array_options(as_rgb=False, decoding_plugin=_decoding_plugin(ts))
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


def read_scan(source: Source, max_decoded_bytes: int = 4 * 2**30) -> DecodedScan:
    """Read, check and decode one file or its bytes (see the module docstring for the
    contract)."""
    ds = read_header(source)
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


def iter_oct_frames(source: Source | BinaryIO, info: ScanInfo) -> Iterator[np.ndarray]:
    """Decode an inspected OCT one B-scan at a time, in stored order, reading each frame
    from the file: the volume is never held in memory whole. Each compressed frame is
    checked (see `_FRAME_CHECKS`) before it is decoded. Where a fast decoder (GPU,
    libjpeg-turbo) refuses a frame, pydicom's plugins go on from that frame."""
    ds = info.header
    n = 0
    fast = _fast_decoder(ds)
    try:
        for frame in _oct_frames(source, ds, fast, 0):
            n += 1
            yield frame
    except _REFUSED:
        log.debug("the fast decoder refused frame %d; pydicom's plugins go on from there", n)
        for frame in _oct_frames(source, ds, None, n):
            n += 1
            yield frame
    if n != int(ds.get("NumberOfFrames", 1) or 1):
        raise _fail(
            "inconsistent_geometry", "the file holds fewer frames than NumberOfFrames says."
        )


def _oct_frames(
    source: Source | BinaryIO, ds: Dataset, fast: FrameDecoder | None, start: int
) -> Iterator[np.ndarray]:
    """The B-scans from frame `start` on, decoded by `fast` (which raises one of
    `_REFUSED` for a frame it does not take) or else by pydicom's plugins."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    ts = _transfer_syntax(ds)
    total = int(ds.get("NumberOfFrames", 1) or 1)
    with ExitStack() as stack:
        try:
            decode_from, raw_from = _frame_streams(source, ts in _FRAME_CHECKS, stack)
        except OSError as exc:
            raise _unreadable(exc) from None
        checked = None
        if raw_from is not None:
            raw = itertools.islice(_raw_frames(ds, raw_from), start, None)
            checked = _checked_frames(ds, raw, start)
        frames: Iterator[np.ndarray]
        if fast is not None and checked is not None:  # decode the frames the check read
            frames, checked = fast(checked), None
        else:
            frames = iter_pixels(
                decode_from,
                as_rgb=False,
                decoding_plugin=_decoding_plugin(ts),
                indices=range(start, total) if start else None,
            )
            close = getattr(frames, "close", None)  # a generator: closing it closes the file
            if close is not None:
                stack.callback(close)
        while (frame := _next_frame(checked, frames)) is not None:
            if frame.shape != (rows, cols):
                raise _fail(
                    "inconsistent_geometry",
                    "OCT frames are not single-channel images of Rows x Columns.",
                )
            yield frame


def _next_frame(checked: Iterator[bytes] | None, frames: Iterator[np.ndarray]) -> np.ndarray | None:
    """The next decoded frame, its compressed stream checked first; None at the end."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if checked is not None:
                next(checked, None)
            return next(frames, None)
    except (InputError, *_REFUSED):
        raise
    except Exception as exc:
        raise _corrupt(exc) from None


def _frame_streams(
    source: Source | BinaryIO, encapsulated: bool, stack: ExitStack
) -> tuple[str | BinaryIO, BinaryIO | None]:
    """Two independent readers of `source` as pydicom sees it (preamble added where it
    lacks one): one for the decoder, one for the compressed frames (None if unneeded)."""
    if isinstance(source, str | Path):
        path = Path(source)
        with path.open("rb") as fh:
            prefix = _missing_preamble(fh.read(140))
        if prefix == b"":
            raw = stack.enter_context(path.open("rb")) if encapsulated else None
            return str(path), raw
        data = path.read_bytes()
    elif isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        source.seek(0)
        data = source.read()
    prefix = _missing_preamble(data[:140])
    if prefix is None:
        raise _not_dicom()
    data = prefix + data
    return io.BytesIO(data), io.BytesIO(data) if encapsulated else None


def _raw_frames(ds: Dataset, fh: BinaryIO) -> Iterator[bytes]:
    """The compressed frames read from `fh`, from the Pixel Data offset the header holds
    (or, when the header no longer has it, from the file parsed again)."""
    offset = getattr(ds._dict.get(PIXEL_DATA_TAG), "value_tell", None)
    if offset is None:
        fh.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.dcmread(fh, stop_before_pixels=True)  # leaves fh at Pixel Data
        offset = fh.tell() + 12  # (7FE0,0010) OB, undefined length: a 12-byte header
    fh.seek(offset)
    return _frame_buffers(ds, fh)
