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
from zarr.codecs import BloscCodec

from eyehub.errors import DatasetError

SCANS = "scans.zarr"
STAGING = ".staging"
FORMAT_VERSION = 1

_AXIS_TYPES = {"c": "channel", "z": "space", "y": "space", "x": "space"}


def _codec() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")


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


def _downsample(pixels: np.ndarray) -> np.ndarray:
    """Halve y and x by 2x2 mean (the last two axes); channel and B-scan axes kept."""
    h, w = pixels.shape[-2] // 2 * 2, pixels.shape[-1] // 2 * 2
    view = pixels[..., :h, :w].astype(np.float32)
    out = (
        view[..., 0::2, 0::2]
        + view[..., 1::2, 0::2]
        + view[..., 0::2, 1::2]
        + view[..., 1::2, 1::2]
    ) / 4.0
    return np.rint(out).astype(pixels.dtype)


def ome_multiscales(
    name: str, axes: tuple[str, ...], spacing: tuple[float, ...] | None, levels: int
) -> dict[str, Any]:
    """OME-Zarr 0.5 `multiscales` metadata: axes with units, one scale per level."""
    spatial = [a for a in axes if a != "c"]
    unit = spacing is not None
    axis_meta = []
    for a in axes:
        entry: dict[str, str] = {"name": a, "type": _AXIS_TYPES[a]}
        if a != "c" and unit:
            entry["unit"] = "millimeter"
        axis_meta.append(entry)
    base = dict(zip(spatial, spacing, strict=True)) if spacing else dict.fromkeys(spatial, 1.0)
    datasets = []
    for level in range(levels):
        scale = []
        for a in axes:
            if a == "c":
                scale.append(1.0)
            elif a in ("y", "x"):
                scale.append(base[a] * 2**level)
            else:
                scale.append(base[a])
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [{"type": "scale", "scale": scale}],
            }
        )
    return {"name": name, "axes": axis_meta, "datasets": datasets}


def write_scan(
    dataset: Path,
    scan_id: str,
    pixels: np.ndarray,
    axes: tuple[str, ...],
    spacing: tuple[float, ...] | None,
    eyehub_attrs: dict[str, Any],
) -> bool:
    """Write one scan atomically; returns False when a scan with this id already exists."""
    final = scan_path(dataset, scan_id)
    if final.exists():
        return False
    staging = dataset / STAGING / f"{scan_id}.{uuid.uuid4().hex}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        group = zarr.open_group(staging, mode="w-", zarr_format=3)
        inode = staging.stat().st_ino  # the directory zarr created for this write
        # training reads a whole photograph or one B-scan at a time
        chunks = (1, *pixels.shape[1:]) if axes[0] == "z" else pixels.shape
        levels = [pixels, _downsample(pixels)]
        for i, level in enumerate(levels):
            arr = group.create_array(
                str(i),
                shape=level.shape,
                dtype=level.dtype,
                chunks=tuple(min(c, s) for c, s in zip(chunks, level.shape, strict=True)),
                compressors=[_codec()],
                dimension_names=list(axes),
                fill_value=0,
            )
            arr[...] = level
        group.attrs.update(
            {
                "ome": {
                    "version": "0.5",
                    "multiscales": [ome_multiscales(scan_id, axes, spacing, len(levels))],
                },
                "eyehub": eyehub_attrs,
            }
        )
        if not _staging_intact(staging, inode, len(levels)):
            raise DatasetError(
                f"staging of scan {scan_id} was disturbed while written; run the ingest again"
            )
        try:
            os.rename(staging, final)
        except OSError:
            if final.exists():  # another task wrote the same scan first
                return False
            raise
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staging_intact(staging: Path, inode: int, levels: int) -> bool:
    """The directory we created, with every metadata document: safe to make visible."""
    try:
        if staging.stat().st_ino != inode:
            return False
    except FileNotFoundError:
        return False
    docs = [staging / "zarr.json", *(staging / str(i) / "zarr.json" for i in range(levels))]
    return all(d.is_file() for d in docs)


def read_pixels(dataset: Path, scan_id: str, level: int = 0) -> np.ndarray:
    arr = zarr.open_array(scan_path(dataset, scan_id) / str(level), mode="r")
    return np.asarray(arr[...])
