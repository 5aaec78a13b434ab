"""The preparation kernel: stored scan pixels to the prepared tensor and its quality record.

Plain torch, no Ray, no store. The Ray Data actor of `preprocess.run` batches scans read
from the store, calls `prepare_scans` and writes what it returns; scoring calls it on the
pixels `ingest.kernel.load_scan` gives for a clinician's file. So a scan is prepared the
same way on both paths: uint16 photographs scaled to 0-255, OCT intensities by their
dtype's maximum, shapes checked, photographs of one size batched.

Each result's `record` holds the columns of the prepared index: fundus `fov_cx`, `fov_cy`,
`fov_radius` (source pixels), `fov_fraction` (share of the photograph inside the fitted
FOV circle), `sharpness`, `illumination`, `unevenness`; OCT `oct_signal`, `empty_share`,
`saturated_share`, `central_bscan`; both `gradable` and `reason` (a code of
`eyehub.reasons.UNGRADABLE_REASONS`, None when gradable).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from eyehub.failures import internal_traceback
from eyehub.reasons import UNGRADABLE_REASONS, check_reason
from preprocess.fundus import prepare_fundus
from preprocess.oct import prepare_oct
from preprocess.recipe import Recipe

log = logging.getLogger(__name__)


class ScanLike(Protocol):
    """What the kernel needs of a scan (`ingest.kernel.ScanPixels` has it)."""

    @property
    def modality(self) -> str: ...

    @property
    def pixels(self) -> np.ndarray: ...

    @property
    def spacing_mm(self) -> Sequence[float] | None: ...


@dataclass
class PreparedScan:
    """One scan prepared: the uint8 tensor (fundus (3, S, S), OCT (D, H, W)), or None when
    it could not be prepared at all, and its record for the prepared index."""

    modality: str
    tensor: np.ndarray | None
    record: dict[str, Any] = field(default_factory=dict)
    traceback: str | None = None  # internal_error only: for the driver's log file

    @property
    def gradable(self) -> bool:
        return bool(self.record.get("gradable"))

    @property
    def reason(self) -> str | None:
        reason: str | None = self.record.get("reason")
        return reason


def _failed(modality: str, reason: str, exc: BaseException | None = None) -> PreparedScan:
    check_reason(reason, UNGRADABLE_REASONS)
    tb = internal_traceback(exc) if exc is not None and reason == "internal_error" else None
    return PreparedScan(modality, None, {"gradable": False, "reason": reason}, tb)


def _fundus_ok(px: np.ndarray) -> bool:
    return px.ndim == 3 and px.shape[0] in (1, 3) and min(px.shape[1:]) >= 16


def _fundus_batch(
    pixels: list[np.ndarray], recipe: Recipe, device: torch.device
) -> list[PreparedScan]:
    images = torch.from_numpy(np.stack(pixels)).to(device)
    if images.dtype != torch.uint8:  # 16-bit photographs: 0-65535 to 0-255
        images = images.float() / 257.0
    out = prepare_fundus(images, recipe.fundus)
    tensors = out.images.cpu().numpy()
    results = []
    for i in range(len(pixels)):
        reason = out.reasons[i]
        if reason is not None:
            check_reason(reason, UNGRADABLE_REASONS)
        record = {
            "fov_cx": float(out.fov.cx[i]),
            "fov_cy": float(out.fov.cy[i]),
            "fov_radius": float(out.fov.radius[i]),
            "fov_fraction": float(out.quality.fov_fraction[i]),
            "sharpness": float(out.quality.sharpness[i]),
            "illumination": float(out.quality.illumination[i]),
            "unevenness": float(out.quality.unevenness[i]),
            "gradable": reason is None,
            "reason": reason,
        }
        results.append(PreparedScan("fundus", tensors[i], record))
    return results


def _oct_one(scan: ScanLike, recipe: Recipe, device: torch.device) -> PreparedScan:
    px = scan.pixels
    spacing = tuple(float(s) for s in (scan.spacing_mm or ()))
    if px.ndim != 3 or len(spacing) != 3 or min(px.shape) < 2 or min(spacing) <= 0:
        return _failed("oct", "bad_geometry")
    max_value = float(np.iinfo(px.dtype).max) if px.dtype.kind == "u" else 255.0
    res = prepare_oct(
        torch.from_numpy(np.ascontiguousarray(px, dtype=np.float32)).to(device),
        (spacing[0], spacing[1], spacing[2]),
        recipe.oct,
        max_value,
    )
    if res.reason is not None:
        check_reason(res.reason, UNGRADABLE_REASONS)
    record = {
        "oct_signal": res.quality.signal,
        "empty_share": res.quality.empty_share,
        "saturated_share": res.quality.saturated_share,
        "central_bscan": res.central_bscan,
        "gradable": res.reason is None,
        "reason": res.reason,
    }
    return PreparedScan("oct", res.volume.cpu().numpy(), record)


def prepare_scans(
    scans: Sequence[ScanLike], recipe: Recipe, device: torch.device | str = "cpu"
) -> list[PreparedScan]:
    """Prepare scans with `recipe`, in the order given. Never raises for one scan: a scan
    that cannot be prepared gets `gradable=False` and its reason; an unexpected error is
    `internal_error` with the traceback in `PreparedScan.traceback`."""
    device = torch.device(device)
    results: list[PreparedScan | None] = [None] * len(scans)
    by_shape: dict[tuple[object, ...], list[int]] = {}
    for i, scan in enumerate(scans):
        try:
            if scan.modality == "fundus" and _fundus_ok(scan.pixels):
                by_shape.setdefault((*scan.pixels.shape, scan.pixels.dtype.str), []).append(i)
            elif scan.modality == "oct":
                results[i] = _oct_one(scan, recipe, device)
            else:
                results[i] = _failed(scan.modality, "bad_geometry")
        except Exception as exc:
            results[i] = _failed(scan.modality, "internal_error", exc)
    for group in by_shape.values():  # photographs of one size go through together
        try:
            prepared = _fundus_batch([scans[i].pixels for i in group], recipe, device)
        except Exception:
            prepared = []
            for i in group:  # find the one that fails; the others are prepared
                try:
                    prepared += _fundus_batch([scans[i].pixels], recipe, device)
                except Exception as exc:
                    prepared.append(_failed("fundus", "internal_error", exc))
        for i, result in zip(group, prepared, strict=True):
            results[i] = result
    return [r for r in results if r is not None]
