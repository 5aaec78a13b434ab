"""The dataset directory's scan store: one OME-Zarr 0.5 image per scan in `scans.zarr`.

A scan is written whole into `DATASET/.staging/` and renamed into `scans.zarr/<scan_id>`
once complete (a directory rename is atomic on one filesystem), so a reader or a killed
run never sees half a scan. Each scan is written by exactly one task, so no two writers
ever touch the same chunk. The image group's attributes hold the OME metadata and, under
`eyehub`, the de-identified attributes and the scan's catalog row: the store is the
record, and `catalog.parquet` is rebuilt from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from eyehub.errors import DatasetError
from eyehub.storage import chunk_codec

SCANS = "scans.zarr"
STAGING = ".staging"
FORMAT_VERSION = 1

_AXIS_TYPES = {"c": "channel", "z": "space", "y": "space", "x": "space"}


def open_store(dataset: Path) -> Path:
    """Create (or check) the dataset directory and its root group; clear stale staging."""
    if dataset.exists() and not dataset.is_dir():
        raise DatasetError(f"{dataset} exists and is not a directory")
    dataset.mkdir(parents=True, exist_ok=True)
    root = dataset / SCANS
    if not (root / "zarr.json").exists():
        group = zarr.open_group(root, mode="a", zarr_format=3)
        group.attrs.update(
            {
                "eyehub": {
                    "dataset_format": FORMAT_VERSION,
                    "deidentified": True,
                    "content": "one OME-Zarr 0.5 image per scan, named by scan_id",
                },
            }
        )
    clean_staging(dataset)
    return root


STALE_STAGING_SECONDS = 3600


def clean_staging(dataset: Path, max_age_s: float = STALE_STAGING_SECONDS) -> None:
    """Drop staging debris of interrupted runs; never touch a write that may be live.

    Every writer removes its own staging directory, so what remains belongs to a killed
    run. A worker of that run can outlive its driver for a while, so only entries older
    than `max_age_s` are removed (they are invisible to readers in any case).
    """
    staging = dataset / STAGING
    if not staging.is_dir():
        return
    now = time.time()
    for entry in staging.iterdir():
        try:
            if now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except FileNotFoundError:
            continue
    with contextlib.suppress(OSError):
        staging.rmdir()  # only when empty


def scan_path(dataset: Path, scan_id: str) -> Path:
    return dataset / SCANS / scan_id


def read_scan_attributes(path: Path) -> dict[str, Any] | None:
    """The attributes of one stored scan (reads its zarr.json only), or None."""
    meta = path / "zarr.json"
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def iter_scans(dataset: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    root = dataset / SCANS
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if child.is_dir():
            attrs = read_scan_attributes(child)
            if attrs is not None and "eyehub" in attrs:
                yield child.name, attrs


def ome_multiscales(
    name: str, axes: tuple[str, ...], spacing: tuple[float, ...] | None
) -> dict[str, Any]:
    """OME-Zarr 0.5 `multiscales` metadata for the one full-resolution level ("0"): axes
    with units where the spacing is known, and its scale transform."""
    spatial = iter(spacing or ())
    axis_meta = []
    scale = []
    for a in axes:
        entry: dict[str, str] = {"name": a, "type": _AXIS_TYPES[a]}
        if a == "c":
            scale.append(1.0)
        else:
            scale.append(next(spatial, 1.0))
            if spacing is not None:
                entry["unit"] = "millimeter"
        axis_meta.append(entry)
    dataset = {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
    return {"name": name, "axes": axis_meta, "datasets": [dataset]}


class _Staged:
    """A scan being written under `.staging/`, made visible by `commit` (an atomic rename)."""

    def __init__(self, dataset: Path, scan_id: str) -> None:
        self.final = scan_path(dataset, scan_id)
        self.scan_id = scan_id
        self.path = dataset / STAGING / f"{scan_id}.{uuid.uuid4().hex}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.group = zarr.open_group(self.path, mode="w-", zarr_format=3)
        self.inode = self.path.stat().st_ino  # the directory zarr created for this write

    def create(self, shape: tuple[int, ...], dtype: np.dtype, axes: tuple[str, ...]) -> Any:
        # training reads a whole photograph or one B-scan at a time
        chunks = (1, *shape[1:]) if axes[0] == "z" else shape
        return self.group.create_array(
            "0",
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            compressors=[chunk_codec(dtype)],
            dimension_names=list(axes),
            fill_value=0,
            # every chunk is written as it comes: testing each one for "all fill value"
            # first costs about a third of the write, and an all-zero B-scan is rare
            config={"write_empty_chunks": True},
        )

    def commit(
        self, axes: tuple[str, ...], spacing: tuple[float, ...] | None, eyehub_attrs: dict[str, Any]
    ) -> bool:
        self.group.attrs.update(
            {
                "ome": {
                    "version": "0.5",
                    "multiscales": [ome_multiscales(self.scan_id, axes, spacing)],
                },
                "eyehub": eyehub_attrs,
            }
        )
        if not _staging_intact(self.path, self.inode):
            raise DatasetError(
                f"staging of scan {self.scan_id} was disturbed while written; run the ingest again"
            )
        try:
            os.rename(self.path, self.final)
        except OSError:
            if self.final.exists():  # another task wrote the same scan first
                return False
            raise
        return True

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_scan(
    dataset: Path,
    scan_id: str,
    pixels: np.ndarray,
    axes: tuple[str, ...],
    spacing: tuple[float, ...] | None,
    eyehub_attrs: dict[str, Any],
) -> bool:
    """Write one whole scan atomically; False when a scan with this id already exists.

    One resolution level: photographs and B-scans of today's devices (<= 4k px) open in
    viewers as they are, and a pyramid level would double the write time."""
    if scan_path(dataset, scan_id).exists():
        return False
    staged = _Staged(dataset, scan_id)
    try:
        staged.create(pixels.shape, pixels.dtype, axes)[...] = pixels
        return staged.commit(axes, spacing, eyehub_attrs)
    finally:
        staged.discard()


def write_scan_frames(
    dataset: Path,
    scan_id: str,
    frames: Iterator[np.ndarray],
    shape: tuple[int, int, int],
    dtype: np.dtype,
    order: np.ndarray,
    axes: tuple[str, ...],
    spacing: tuple[float, ...] | None,
    eyehub_attrs: dict[str, Any],
) -> bool:
    """Write a volume frame by frame as `frames` yields them in stored order; `order[k]`
    is the stored frame at anatomical position k. Only one frame is in memory at a time.
    An exception from `frames` discards the staging and propagates."""
    if scan_path(dataset, scan_id).exists():
        return False
    position = np.empty_like(order)
    position[order] = np.arange(len(order))  # stored index -> anatomical position
    staged = _Staged(dataset, scan_id)
    try:
        array = staged.create(shape, dtype, axes)
        pending: dict[int, np.ndarray] = {}
        for stored, frame in enumerate(frames):
            pending[int(position[stored])] = frame
            if len(pending) >= _FRAMES_PER_WRITE:
                _flush_runs(array, pending)
        _flush_runs(array, pending)
        return staged.commit(axes, spacing, eyehub_attrs)
    finally:
        staged.discard()


_FRAMES_PER_WRITE = 16  # frames buffered before a write (about 7 MB of realistic OCT)


def _flush_runs(array: Any, pending: dict[int, np.ndarray]) -> None:
    """Write buffered frames, one zarr call per run of consecutive positions (frames in
    order, or reversed, make one run; each zarr call has a fixed cost)."""
    positions = sorted(pending)
    start = 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            run = positions[start:i]
            array[run[0] : run[-1] + 1] = np.stack([pending[p] for p in run])
            start = i
    pending.clear()


def _staging_intact(staging: Path, inode: int) -> bool:
    """The directory we created, with every metadata document: safe to make visible."""
    try:
        if staging.stat().st_ino != inode:
            return False
    except FileNotFoundError:
        return False
    docs = [staging / "zarr.json", staging / "0" / "zarr.json"]
    return all(d.is_file() for d in docs)


def read_pixels(dataset: Path, scan_id: str, level: int = 0) -> np.ndarray:
    arr = zarr.open_array(scan_path(dataset, scan_id) / str(level), mode="r")
    return np.asarray(arr[...])
