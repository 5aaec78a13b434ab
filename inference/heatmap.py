"""Heat maps at the scan's own resolution, and the PNG a clinician looks at.

The model explains the prepared tensor (models.explain); these functions take that map
back through the preparation's geometry onto the scan as it was sent:

- fundus: the prepared image is the square of side 2r around the fitted field of view
  (centre cx, cy, radius r in source pixels; preprocess.fundus.crop_to_fov), so a source
  pixel (x, y) sits at ((x + 0.5 - cx) / r, (y + 0.5 - cy) / r) in the map's normalised
  coordinates; outside the field of view's circle the map is 0.
- OCT: the prepared volume is the recipe's extent in millimetres centred on the scanned
  volume (preprocess.oct.resample); a source B-scan pixel maps through its position in mm.
  The attention over the prepared B-scans is carried onto the source B-scans the same way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _sample(heatmap: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """`heatmap` (h, w) sampled bilinearly at normalised coordinates gx (W,), gy (H,)
    (align_corners=False; zeros outside) as an (H, W) array."""
    grid_x, grid_y = np.meshgrid(gx, gy)
    grid = torch.from_numpy(np.stack([grid_x, grid_y], axis=-1)[None].astype(np.float32))
    src = torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))[None, None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0, 0].numpy()


def fundus_to_source(
    heatmap: np.ndarray, cx: float, cy: float, radius: float, height: int, width: int
) -> np.ndarray:
    """A map of the prepared photograph as a (height, width) map of the source one.

    The mapping is a scale and a shift, so OpenCV's affine warp does it (bilinear, zeros
    outside, the same sampling as `_sample`) in a few milliseconds at full resolution."""
    import cv2

    size = heatmap.shape[-1]
    r = max(float(radius), 1e-6)
    scale = size / (2 * r)  # map pixels per source pixel
    # source pixel centre x + 0.5 lies at normalised (x + 0.5 - cx) / r, i.e. map pixel
    # ((x + 0.5 - cx) / r + 1) * size / 2 - 0.5
    shift_x = (0.5 - cx) * scale + size / 2 - 0.5
    shift_y = (0.5 - cy) * scale + size / 2 - 0.5
    matrix = np.array([[scale, 0.0, shift_x], [0.0, scale, shift_y]], dtype=np.float64)
    out = cv2.warpAffine(
        np.ascontiguousarray(heatmap, dtype=np.float32),
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    inside = np.zeros((height, width), np.uint8)  # the field of view's circle
    cv2.circle(inside, (round(cx - 0.5), round(cy - 0.5)), max(round(r), 1), 1, thickness=-1)
    out *= inside
    return out


def _normalised_positions(n_src: int, spacing: float, extent_out: float) -> np.ndarray:
    """Where each source sample along one axis lies in the prepared grid's normalised
    coordinates (-1..1 inside the recipe's extent, centred on the volume)."""
    mm = (np.arange(n_src) + 0.5 - n_src / 2) * spacing
    return mm / (extent_out / 2)


def oct_bscan_to_source(
    heatmap: np.ndarray,
    spacing_mm: tuple[float, float, float],
    source_shape: tuple[int, int, int],
    extent_mm: tuple[float, float, float],
) -> np.ndarray:
    """A map of one prepared B-scan (depth x A-scans) as a map of a source B-scan."""
    _, rows, cols = source_shape
    gy = _normalised_positions(rows, spacing_mm[1], extent_mm[1])
    gx = _normalised_positions(cols, spacing_mm[2], extent_mm[2])
    return _sample(heatmap, gx, gy)


def source_bscan(
    prepared_index: int,
    prepared_depth: int,
    spacing_mm: tuple[float, float, float],
    source_depth: int,
    extent_mm: tuple[float, float, float],
) -> int:
    """The source B-scan nearest the centre of prepared B-scan `prepared_index`."""
    centre_mm = ((prepared_index + 0.5) / prepared_depth - 0.5) * extent_mm[0]
    index = round(centre_mm / spacing_mm[0] + source_depth / 2 - 0.5)
    return int(min(max(index, 0), source_depth - 1))


def attention_to_source(
    attention: np.ndarray,
    spacing_mm: tuple[float, float, float],
    source_depth: int,
    extent_mm: tuple[float, float, float],
) -> np.ndarray:
    """Attention over the prepared B-scans as weights over the source B-scans (linear
    between prepared B-scan centres, 0 outside the recipe's extent), summing to 1."""
    d = len(attention)
    centres = ((np.arange(d) + 0.5) / d - 0.5) * extent_mm[0]
    src = (np.arange(source_depth) + 0.5 - source_depth / 2) * spacing_mm[0]
    inside = np.abs(src) <= extent_mm[0] / 2
    weights = np.where(inside, np.interp(src, centres, attention), 0.0)
    total = weights.sum()
    return weights / total if total > 0 else np.full(source_depth, 1.0 / source_depth)


def display_image(pixels: np.ndarray) -> np.ndarray:
    """A scan image as (H, W, 3) uint8 for display: a fundus (c, y, x) or a B-scan (y, x)."""
    if pixels.ndim == 3:  # fundus (c, y, x)
        img = np.moveaxis(pixels, 0, -1)
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
    else:
        img = np.repeat(pixels[..., None], 3, axis=-1)
    if img.dtype != np.uint8:
        top = float(np.iinfo(img.dtype).max) if img.dtype.kind == "u" else float(img.max() or 1)
        img = np.clip(img.astype(np.float32) / top * 255.0, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heat map in a colour scale laid over `image` (H, W, 3) uint8, where it is above
    a tenth of its peak (zero evidence leaves the scan as it is)."""
    import cv2

    heat = np.clip(heatmap, 0.0, 1.0)
    coloured = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    weight = (alpha * (heat > 0.1) * np.sqrt(heat))[..., None]
    out = image.astype(np.float32) * (1 - weight) + coloured.astype(np.float32) * weight
    return np.clip(out, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray, max_side: int | None = None) -> bytes:
    """`image` (H, W, 3) RGB uint8 as PNG bytes, shrunk to `max_side` when larger."""
    import cv2

    if max_side is not None and max(image.shape[:2]) > max_side:
        scale = max_side / max(image.shape[:2])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
