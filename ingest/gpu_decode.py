"""JPEG 2000 and JPEG decoding on an NVIDIA GPU through nvImageCodec (nvJPEG2000, nvJPEG).

An optional path: used when the process sees a CUDA device and `nvidia-nvimgcodec-cu12`
(with its `nvidia-nvjpeg2k-cu12` / `nvidia-nvjpeg-cu12` libraries) imports; everywhere
else the CPU decoders run and nothing is printed. The reader (`ingest.reader`) decides
which files' frames a fast decoder takes (`reader.fast_layout`: JPEG 2000 with unsigned
8 to 16-bit samples, grey / RGB / YBR_RCT / YBR_ICT; 8-bit JPEG, grey or YCbCr) and asks
`frame_decoder` for one; it gets None where no GPU is usable, and falls back to its CPU
decoders for a file whose frames the GPU did not decode (`Refused`).

Lossless output is bit-exact with OpenJPEG's by the standard (the reversible 5/3 wavelet
is integer arithmetic); lossy JPEG 2000 (the 9/7 wavelet, YBR_ICT) and lossy JPEG may
differ from the CPU decoders by a few grey levels, as any two decoders of a lossy stream
may. Colour follows NVIDIA's own pydicom plugin (`nvidia/nvimgcodec/tools/dicom`): sRGB
out for YBR_ICT / YBR_RCT and YCbCr JPEG, samples unchanged otherwise. A frame that comes
back signed, of another shape, or wider than the file's samples is refused.

Frames go to the GPU in batches (`BATCH` per call), so an OCT volume's B-scans decode
together. Each worker process holds one decoder (per thread, should a process decode from
several), on device `pid % devices`, with one CPU thread for the hybrid stages (the
workers are the parallelism); nothing touches CUDA before a worker forks, and a forked
child forgets its parent's decoder and device count.

Modes (`configure`, the ingest setting `gpu_decode`): "auto" uses the GPU where one is
usable, "off" never. A process is "off" until it is configured: ingest's workers configure
the run's setting (whose default is "auto"); the scoring service, which decodes one upload
at a time from many threads, keeps the CPU decoders. "nvimgcodec-cpu" runs the same code
on nvImageCodec's CPU backends (OpenCV's OpenJPEG and libjpeg-turbo, several threads per
file): no faster than eyehub's own CPU path, it exists so this adapter (batches, dtypes,
colour, fallbacks) is tested end to end on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import threading
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

Mode = Literal["auto", "off", "nvimgcodec-cpu"]
MODES: tuple[Mode, ...] = typing.get_args(Mode)
Backend = Literal["gpu", "cpu"]
BATCH = 32  # frames per decode call: an OCT volume's B-scans in a few calls

_settings: dict[str, str] = {"mode": "off"}
_local = threading.local()
_decoded: dict[Backend, int] = {"gpu": 0, "cpu": 0}


class Refused(Exception):
    """nvImageCodec did not decode a frame, or gave one of another shape: the file goes to
    the CPU decoders."""


def configure(mode: Mode) -> None:
    """Set this process's mode (ingest workers call it with the run's `gpu_decode`)."""
    if mode not in MODES:
        raise ValueError(f"gpu_decode must be one of {', '.join(MODES)} (got {mode!r})")
    _settings["mode"] = mode


def frames_decoded() -> dict[Backend, int]:
    """How many frames nvImageCodec has decoded in this process, by backend."""
    return dict(_decoded)


@functools.cache
def cuda_devices() -> int:
    """How many CUDA devices the driver shows this process (0 without a driver): asked of
    libcuda directly, so a machine without one pays a failed dlopen and nothing else."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    except (OSError, AttributeError):
        return 0


def installed() -> str | None:
    """nvImageCodec's version where it imports, else None."""
    try:
        from nvidia import nvimgcodec
    except Exception:  # absent, or its native libraries do not load
        return None
    return str(getattr(nvimgcodec, "__version__", "unknown"))


def available(backend: Backend = "gpu") -> bool:
    """Whether this process can decode through nvImageCodec on `backend`."""
    return _decoder(backend) is not None


def describe() -> str:
    """One line for people: what decodes JPEG 2000 and JPEG in this process."""
    version = installed()
    if version is None:
        return "GPU decode: off (nvImageCodec is not installed)"
    devices = cuda_devices()
    if devices == 0:
        return f"GPU decode: off (nvImageCodec {version}; no CUDA device)"
    if not available("gpu"):
        return f"GPU decode: off (nvImageCodec {version} could not open the CUDA device)"
    return f"GPU decode: on (nvImageCodec {version}, {devices} CUDA device(s))"


def _decoder(backend: Backend) -> Any | None:
    """This thread's nvImageCodec decoder on `backend`, made once; None where it cannot be."""
    cached = _local.__dict__.get(backend, False)
    if cached is not False:
        return cached
    decoder = None
    if backend == "cpu" or cuda_devices() > 0:
        try:
            from nvidia import nvimgcodec

            if backend == "cpu":
                decoder = nvimgcodec.Decoder(
                    device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                    backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)],
                )
            else:
                decoder = nvimgcodec.Decoder(
                    device_id=os.getpid() % cuda_devices(),
                    max_num_cpu_threads=1,
                    backends=[
                        nvimgcodec.Backend(nvimgcodec.HW_GPU_ONLY),  # A100/H100 JPEG engines
                        nvimgcodec.Backend(nvimgcodec.GPU_ONLY),
                        nvimgcodec.Backend(nvimgcodec.HYBRID_CPU_GPU),
                    ],
                )
        except Exception as exc:  # not installed, or the device would not open
            log.info("nvImageCodec (%s) is not usable here: %s", backend, exc)
            decoder = None
    setattr(_local, backend, decoder)
    return decoder


def _forget() -> None:
    """In a forked child: no CUDA state of the parent's is usable there (its decoders are
    dropped without being destroyed: their destructors would free the parent's memory)."""
    global _local
    cuda_devices.cache_clear()
    _inherited.append(_local)
    _local = threading.local()


_inherited: list[threading.local] = []


os.register_at_fork(after_in_child=_forget)


def frame_decoder(
    rows: int, cols: int, samples: int, bits: int, to_rgb: bool
) -> Callable[[Iterable[bytes]], Iterator[np.ndarray]] | None:
    """A decoder of a file's compressed frames (each checked by the reader first) through
    nvImageCodec, where this process's mode and devices allow; else None. `to_rgb`: the
    frames are YCbCr (JPEG) or carry the codestream's colour transform (JPEG 2000)."""
    if _settings["mode"] == "off":
        return None
    backend: Backend = "cpu" if _settings["mode"] == "nvimgcodec-cpu" else "gpu"
    decoder = _decoder(backend)
    if decoder is None:
        return None
    from nvidia import nvimgcodec

    params = nvimgcodec.DecodeParams(
        color_spec=nvimgcodec.SRGB if to_rgb else nvimgcodec.UNCHANGED,
        allow_any_depth=True,
        apply_exif_orientation=False,
    )
    shape = (rows, cols, samples)
    dtype = np.uint8 if bits == 8 else np.uint16

    def decode(frames: Iterable[bytes]) -> Iterator[np.ndarray]:
        stream = iter(frames)
        while batch := list(itertools.islice(stream, BATCH)):
            yield from _decode_batch(decoder, nvimgcodec, batch, params, shape, dtype)
            _decoded[backend] += len(batch)

    return decode


def _decode_batch(
    decoder: Any,
    nvimgcodec: Any,
    frames: list[bytes],
    params: Any,
    shape: tuple[int, int, int],
    dtype: type[np.generic],
) -> Iterator[np.ndarray]:
    try:
        images = decoder.decode([nvimgcodec.CodeStream(f) for f in frames], params=params)
    except Exception as exc:
        log.debug("nvImageCodec refused a batch: %s", exc)
        raise Refused from None
    for image in images:
        host = None if image is None else image.cpu()
        if host is None:
            raise Refused
        pixels = np.ascontiguousarray(np.asarray(host))
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if (
            pixels.shape != shape
            or pixels.dtype.kind != "u"  # a signed codestream in a file that says unsigned
            or pixels.dtype.itemsize > np.dtype(dtype).itemsize
        ):
            raise Refused
        pixels = pixels.astype(dtype, copy=False)
        yield pixels[..., 0] if shape[2] == 1 else pixels
