"""The optional GPU decode path (`ingest/gpu_decode.py`, nvImageCodec): installed by
`make install` everywhere, used only where a CUDA device is, silent and inert elsewhere.

Its adapter (batches of frames, dtypes, colour, the fall-back to the CPU decoders) is the
same code whichever backend nvImageCodec runs, so it is checked here on nvImageCodec's CPU
backends (the `nvimgcodec-cpu` mode), and on the GPU itself where the machine has one.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from eyehub.synth import generate_cohort
from ingest import HubKey, gpu_decode, reader, run_ingest
from ingest.run import IngestSettings
from tests.ingest.datasets import dataset_state

LOSSY_TOLERANCE = 8  # grey levels between two JPEG decoders (as tests/ingest/test_dataset.py)
# asked in a child process: this one forks (the cohort's renderers) and should hold no CUDA
_PROBE = "from ingest import gpu_decode; print(gpu_decode.cuda_devices())"
HAS_CUDA = (
    int(
        subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True
        ).stdout
    )
    > 0
)
MODES = [
    "nvimgcodec-cpu",
    pytest.param("auto", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small cohort (JPEG 2000 OCT and photographs, JPEG photographs among its files)
    plus a 12-bit JPEG 2000 OCT and a lossy JPEG 2000 (YBR_ICT) photograph made from its
    native files."""
    root = tmp_path_factory.mktemp("gpu-decode")
    generate_cohort(root, patients=4, seed=23, workers=2)
    folder = root / "dicom"
    native = next(
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and _syntax(p) == pydicom.uid.ExplicitVRLittleEndian and _is_oct(p)
    )
    ds = pydicom.dcmread(native)
    twelve_bit = (ds.pixel_array.astype(np.uint16) * 16 + 7) & 0x0FFF
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.compress(JPEG2000Lossless, twelve_bit, encoding_plugin="pylibjpeg")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "zz_oct_12bit.dcm", enforce_file_format=True)
    rgb = next(
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and _syntax(p) == pydicom.uid.ExplicitVRLittleEndian
        and str(getattr(_header(p), "PhotometricInterpretation", "")) == "RGB"
    )
    ds = pydicom.dcmread(rgb)
    ds.compress(pydicom.uid.JPEG2000, ds.pixel_array, j2k_cr=[20], use_mct=True)
    ds.PhotometricInterpretation = "YBR_ICT"  # the codestream's irreversible colour transform
    ds.LossyImageCompression = "01"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "zz_photo_lossy_j2k.dcm", enforce_file_format=True)
    return folder


@functools.cache
def _header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None


def _syntax(path: Path) -> str:
    ds = _header(path)
    return "" if ds is None else str(ds.file_meta.TransferSyntaxUID)


def _is_oct(path: Path) -> bool:
    ds = _header(path)
    return ds is not None and str(ds.get("Modality")) == "OPT"


def _files(cohort: Path, syntaxes: set[pydicom.uid.UID]) -> list[Path]:
    return [p for p in sorted(cohort.rglob("*")) if p.is_file() and _syntax(p) in syntaxes]


def _decode(path: Path) -> np.ndarray:
    """The file's pixels as ingest decodes them: OCT B-scans one by one, photographs whole."""
    info = reader.inspect_scan(reader.read_header(path, defer_pixels=True))
    if info.modality == "oct":
        return np.stack(list(reader.iter_oct_frames(path, info)))
    return reader.decode_fundus(info)


@pytest.fixture
def mode() -> Iterator[None]:
    yield
    gpu_decode.configure("off")  # as every process starts


def test_installed_and_without_a_gpu_inert_and_silent(cohort: Path) -> None:
    """In a fresh process configured as an ingest worker is: nvImageCodec imports (make
    install put it there); a JPEG 2000 OCT is decoded on the GPU where there is one, and
    where there is none it goes to the CPU decoders, with nothing at all printed."""
    oct_j2k = _files(cohort, {JPEG2000Lossless})[0]
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from ingest import gpu_decode\n"
        "from ingest.kernel import load_scan\n"
        "gpu_decode.configure('auto')\n"
        "load_scan(Path(sys.argv[1]))\n"
        "print(json.dumps({'version': gpu_decode.installed(),\n"
        "    'devices': gpu_decode.cuda_devices(), 'describe': gpu_decode.describe(),\n"
        "    'used': gpu_decode.frames_decoded()['gpu'] > 0}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(oct_j2k)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    seen = json.loads(done.stdout)
    assert seen["version"], "nvidia-nvimgcodec-cu12 is not installed (make install installs it)"
    if seen["devices"] == 0:
        assert not seen["used"]
        assert (
            seen["describe"] == f"GPU decode: off (nvImageCodec {seen['version']}; no CUDA device)"
        )
    else:
        assert seen["used"] and seen["describe"].startswith("GPU decode: on")


@pytest.mark.parametrize("nvimgcodec_mode", MODES)
def test_lossless_frames_are_bit_exact_and_jpeg_within_the_standards_tolerance(
    cohort: Path, nvimgcodec_mode: gpu_decode.Mode, mode: None
) -> None:
    j2k = _files(cohort, reader.J2K_SYNTAXES)
    jpeg = _files(cohort, reader.JPEG8_SYNTAXES)
    kinds = {_is_oct(p) for p in j2k}
    assert len(j2k) >= 3 and kinds == {True, False} and jpeg, "the cohort lacks a case"
    backend: gpu_decode.Backend = "cpu" if nvimgcodec_mode == "nvimgcodec-cpu" else "gpu"
    assert cohort / "zz_photo_lossy_j2k.dcm" in j2k and cohort / "zz_oct_12bit.dcm" in j2k
    for path in j2k + jpeg:
        gpu_decode.configure("off")
        cpu = _decode(path)
        gpu_decode.configure(nvimgcodec_mode)
        before = gpu_decode.frames_decoded()[backend]
        fast = _decode(path)
        assert gpu_decode.frames_decoded()[backend] > before, f"{path.name}: not decoded by it"
        assert fast.shape == cpu.shape and fast.dtype == cpu.dtype, path.name
        if _syntax(path) == JPEG2000Lossless:
            assert np.array_equal(fast, cpu), f"{path.name}: lossless pixels differ"
        else:  # lossy JPEG, lossy JPEG 2000 (the 9/7 wavelet in floating point)
            diff = np.abs(fast.astype(int) - cpu.astype(int)).max()
            assert diff <= LOSSY_TOLERANCE, f"{path.name}: {diff} grey levels"
        if path.name == "zz_oct_12bit.dcm":
            assert fast.dtype == np.uint16 and 2048 < int(fast.max()) < 4096


def test_a_frame_nvimgcodec_cannot_decode_or_of_another_size_is_refused(
    cohort: Path, mode: None
) -> None:
    """The adapter's own refusals (what sends a file to the CPU decoders): a stream it
    cannot decode, and an image whose size is not the file's."""
    oct_j2k = next(p for p in _files(cohort, {JPEG2000Lossless}) if _is_oct(p))
    photo = next(p for p in _files(cohort, {JPEG2000Lossless}) if not _is_oct(p))
    gpu_decode.configure("nvimgcodec-cpu")
    decode = reader._fast_decoder(reader.read_header(oct_j2k, defer_pixels=True))
    assert decode is not None
    photo_ds = pydicom.dcmread(photo)
    photo_frame = next(reader._frame_buffers(photo_ds, photo_ds.PixelData))
    for frames in ([b"\xff\x4f\xff\x51 not a codestream"], [photo_frame]):
        with pytest.raises(gpu_decode.Refused):
            list(decode(frames))


@pytest.mark.parametrize("refused_at", ["first", "second", "last"])
def test_a_frame_the_fast_decoder_refuses_goes_to_the_cpu_decoders_from_that_frame(
    cohort: Path, refused_at: str, mode: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame nvImageCodec does not decode (an unsupported feature, a device error): the
    B-scans before it are kept, pydicom's plugins decode from it on; a photograph goes to
    them whole. Either way the pixels equal the CPU decoders' own."""
    oct_j2k = next(p for p in _files(cohort, {JPEG2000Lossless}) if _is_oct(p))
    photo = next(p for p in _files(cohort, {JPEG2000Lossless}) if not _is_oct(p))
    gpu_decode.configure("off")
    want = {p: _decode(p) for p in (oct_j2k, photo)}
    frames = len(want[oct_j2k])
    monkeypatch.setattr(gpu_decode, "BATCH", 4)  # the volume spans several batches
    assert frames > 2 * gpu_decode.BATCH
    at = {"first": 0, "second": 1, "last": frames - 1}[refused_at]
    gpu_decode.configure("nvimgcodec-cpu")
    real = reader._fast_decoder
    refusals: list[int] = []

    def refusing(ds: pydicom.Dataset) -> reader.FrameDecoder | None:
        decode = real(ds)
        assert decode is not None
        refuse = at if int(ds.get("NumberOfFrames", 1) or 1) > 1 else 0

        def decoded(streams: Iterable[bytes]) -> Iterator[np.ndarray]:
            for index, frame in enumerate(decode(streams)):
                if index == refuse:
                    refusals.append(index)
                    raise gpu_decode.Refused
                yield frame

        return decoded

    monkeypatch.setattr(reader, "_fast_decoder", refusing)
    for path, pixels in want.items():
        assert np.array_equal(_decode(path), pixels), path.name
    assert refusals == [at, 0]


@pytest.mark.parametrize("nvimgcodec_mode", MODES)
def test_an_ingest_through_nvimgcodec_writes_the_dataset_the_cpu_path_writes(
    cohort: Path, hub_key: HubKey, tmp_path: Path, nvimgcodec_mode: gpu_decode.Mode, mode: None
) -> None:
    """End to end through the local executor's workers: the run's `gpu_decode` reaches them,
    the files they decode through nvImageCodec are counted, the dataset is the same."""
    states = {}
    backend = "cpu" if nvimgcodec_mode == "nvimgcodec-cpu" else "gpu"
    names: tuple[gpu_decode.Mode, ...] = ("off", nvimgcodec_mode)
    for name in names:
        settings = IngestSettings(workers=2, executor="local", gpu_decode=name)
        summary = run_ingest([cohort], tmp_path / name, hub_key, settings=settings)
        assert summary.quarantined_total == 0
        states[name] = (summary, dataset_state(tmp_path / name))
    (off, (off_catalog, off_state)), (nv, (nv_catalog, nv_state)) = states.values()
    off_scans = {k: pixels for k, (_, pixels) in off_state.items()}
    nv_scans = {k: pixels for k, (_, pixels) in nv_state.items()}
    assert sum(off.nvimgcodec.values()) == 0
    taken = [
        p
        for p in _files(cohort, reader.J2K_SYNTAXES | reader.JPEG8_SYNTAXES)
        if reader.fast_layout(reader.read_header(p, defer_pixels=True))
    ]
    assert len(taken) >= 4 and nv.nvimgcodec[backend] == len(taken)
    pd.testing.assert_frame_equal(
        off_catalog.drop(columns="fov_mask_fraction"), nv_catalog.drop(columns="fov_mask_fraction")
    )
    assert np.allclose(
        off_catalog.fov_mask_fraction, nv_catalog.fov_mask_fraction, atol=1e-3, equal_nan=True
    )
    assert off_scans.keys() == nv_scans.keys()
    lossy = set(off_catalog.scan_id[off_catalog.lossy])
    for scan_id, pixels in off_scans.items():
        if scan_id in lossy:
            diff = np.abs(pixels.astype(int) - nv_scans[scan_id].astype(int)).max()
            assert diff <= LOSSY_TOLERANCE, scan_id
        else:
            assert np.array_equal(pixels, nv_scans[scan_id]), scan_id
