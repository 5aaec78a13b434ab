"""Fundus preparation kernels: plain torch, batched, on whatever device the tensors are on.

The same functions prepare a batch on a Ray Data actor and a single scan at inference.
Images are (B, C, H, W) tensors, uint8 or float in 0-255.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from preprocess.recipe import FundusRecipe

_WORK = 256  # the FOV is found on an image of about this size


@dataclass
class FieldOfView:
    """Circle of the illuminated retina per image, in source pixels; `found` per image."""

    cx: torch.Tensor
    cy: torch.Tensor
    radius: torch.Tensor
    found: torch.Tensor


def _kasa_fit(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Weighted algebraic circle fit per batch row: x^2 + y^2 + D x + E y + F = 0."""
    a = torch.stack([x, y, torch.ones_like(x)], dim=-1) * w[..., None]
    b = -(x**2 + y**2) * w
    ata = a.transpose(1, 2) @ a + 1e-6 * torch.eye(3, device=x.device, dtype=x.dtype)
    atb = a.transpose(1, 2) @ b[..., None]
    d, e, f = torch.linalg.solve(ata, atb)[..., 0].unbind(-1)
    cx, cy = -d / 2, -e / 2
    r = torch.sqrt(torch.clamp(cx**2 + cy**2 - f, min=0))
    return cx, cy, r


def detect_fov(images: torch.Tensor) -> FieldOfView:
    """Find the FOV circle: robust to dark images, uneven light and FOVs cut top and bottom.

    The brightest channel, smoothed at about 256 px, is thresholded relative to the
    image's own bright level; the left and right edge of the lit region on every row, and
    the top and bottom edge on every column, lie on the circle unless they touch the image
    border. A circle is fitted to them, then refitted without points far from it (text or
    reflections).
    """
    b, _, h, w = images.shape
    f = max(1, round(max(h, w) / _WORK))
    bright = images.amax(dim=1, keepdim=True).float()  # max in the source dtype: 1/3 the copy
    small = F.avg_pool2d(bright, f, f, ceil_mode=True) if f > 1 else bright
    small = F.avg_pool2d(small, 3, 1, 1, count_include_pad=False)[:, 0]
    hs, ws = small.shape[-2:]
    level = torch.quantile(small.reshape(b, -1), 0.99, dim=1)
    mask = small > torch.clamp(0.15 * level, min=6.0)[:, None, None]

    xs = torch.arange(ws, device=images.device, dtype=torch.float32)
    ys = torch.arange(hs, device=images.device, dtype=torch.float32)
    big = torch.tensor(1e9, device=images.device)
    # row edges
    left = torch.where(mask, xs, big).amin(dim=2)
    right = torch.where(mask, xs, -big).amax(dim=2)
    row_ok = mask.any(dim=2)
    lw = (row_ok & (left > 0)).float()
    rw = (row_ok & (right < ws - 1)).float()
    # column edges
    top = torch.where(mask, ys[:, None], big).amin(dim=1)
    bottom = torch.where(mask, ys[:, None], -big).amax(dim=1)
    col_ok = mask.any(dim=1)
    tw = (col_ok & (top > 0)).float()
    bw = (col_ok & (bottom < hs - 1)).float()
    yy = ys.expand(b, hs)
    xx = xs.expand(b, ws)
    px = torch.cat([left + 0.5, right + 0.5, xx + 0.5, xx + 0.5], dim=1)  # pixel centres
    py = torch.cat([yy + 0.5, yy + 0.5, top + 0.5, bottom + 0.5], dim=1)
    # boundary between the last lit and first dark pixel: half a pixel outwards
    px = px + torch.cat(
        [
            -0.5 * torch.ones_like(left),
            0.5 * torch.ones_like(right),
            torch.zeros_like(top),
            torch.zeros_like(bottom),
        ],
        dim=1,
    )
    py = py + torch.cat(
        [
            torch.zeros_like(left),
            torch.zeros_like(right),
            -0.5 * torch.ones_like(top),
            0.5 * torch.ones_like(bottom),
        ],
        dim=1,
    )
    wts = torch.cat([lw, rw, tw, bw], dim=1)
    px = torch.where(wts > 0, px, torch.zeros_like(px))
    py = torch.where(wts > 0, py, torch.zeros_like(py))
    cx, cy, r = _kasa_fit(px, py, wts)
    for _ in range(2):  # drop points far from the circle and refit
        resid = (torch.sqrt((px - cx[:, None]) ** 2 + (py - cy[:, None]) ** 2) - r[:, None]).abs()
        keep = wts * (resid < torch.clamp(0.03 * r[:, None], min=1.5)).float()
        cx, cy, r = _kasa_fit(px, py, keep)
    found = (wts.sum(dim=1) >= 12) & (r > 0.1 * min(hs, ws)) & (level > 10)
    return FieldOfView(cx * f, cy * f, r * f, found)


def fov_fraction(fov: FieldOfView, height: int, width: int) -> torch.Tensor:
    """Share of the source image inside the FOV circle (clipped by the image)."""
    ys = torch.arange(height, device=fov.cx.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=fov.cx.device, dtype=torch.float32) + 0.5
    step = max(1, max(height, width) // 512)
    ys, xs = ys[::step], xs[::step]
    inside = (
        (xs[None, None, :] - fov.cx[:, None, None]) ** 2
        + (ys[None, :, None] - fov.cy[:, None, None]) ** 2
    ) <= fov.radius[:, None, None] ** 2
    return inside.float().mean(dim=(1, 2)) * fov.found.float()


def crop_to_fov(images: torch.Tensor, fov: FieldOfView, size: int) -> torch.Tensor:
    """Crop the square around each FOV (zero-padded where it leaves the image) and resize
    to `size`, with area pre-averaging so large photographs do not alias. Each image's
    pre-averaging factor follows its own FOV, so an image is prepared the same whatever
    batch it is in."""
    factors = [max(1, math.floor(float(2 * r) / size)) for r in fov.radius.tolist()]
    out = torch.empty(
        images.shape[0], images.shape[1], size, size, device=images.device, dtype=torch.float32
    )
    for k in sorted(set(factors)):
        idx = [i for i, f in enumerate(factors) if f == k]
        sel = torch.tensor(idx, device=images.device)
        part = FieldOfView(fov.cx[sel], fov.cy[sel], fov.radius[sel], fov.found[sel])
        out[sel] = _crop(images[sel], part, size, k)
    return out


def _crop(images: torch.Tensor, fov: FieldOfView, size: int, k: int) -> torch.Tensor:
    b = images.shape[0]
    x = images.float()
    if k > 1:
        x = F.avg_pool2d(x, k, k, ceil_mode=True)
    hk, wk = x.shape[-2:]
    cx, cy, r = fov.cx / k, fov.cy / k, fov.radius / k
    # affine grid in normalised coordinates of the (pooled) source (align_corners=False)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = r / (wk / 2)
    theta[:, 1, 1] = r / (hk / 2)
    theta[:, 0, 2] = cx / (wk / 2) - 1
    theta[:, 1, 2] = cy / (hk / 2) - 1
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def circle_mask(size: int, device: torch.device, margin: float = 0.0) -> torch.Tensor:
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) - size / 2
    return (c[None, :] ** 2 + c[:, None] ** 2) <= (size / 2 - margin) ** 2


def smooth(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (MONAI's GaussianFilter). A wide blur keeps nothing finer than sigma,
    so it runs on a grid coarsened by up to sigma / 4 and is upsampled back: the same
    result within a grey level, at a fraction of the cost."""
    size = images.shape[-2:]
    k = max(1, int(sigma // 4))
    x = F.avg_pool2d(images, k, k, ceil_mode=True) if k > 1 else images
    x = GaussianFilter(2, sigma=sigma / k).to(images.device)(x)
    if k > 1:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def graham(images: torch.Tensor, sigma: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Local-mean subtraction (B. Graham, Kaggle DR 2015): 4 (x - blur(x)) + 128.

    With a mask, the local mean is taken over the retina only (blur(x m) / blur(m)), so the
    black surround does not leave a bright rim at the FOV edge."""
    if mask is None:
        blur = smooth(images, sigma)
    else:
        m = mask.float()
        blur = smooth(images * m, sigma) / smooth(m, sigma).clamp(min=1e-3)  # mask once
    return 4.0 * (images - blur) + 128.0


def clahe(images: torch.Tensor, clip: float, tiles: int) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation of the LAB lightness channel.

    OpenCV's CLAHE has no torch equivalent, so this step runs on the CPU whatever the
    device (the only one that does); the result returns to the images' device."""
    out = []
    equaliser = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles))
    for image in images.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        lab[..., 0] = equaliser.apply(lab[..., 0])
        out.append(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().to(images.device)


@dataclass
class FundusQuality:
    sharpness: torch.Tensor  # variance of the Laplacian inside the FOV (0-1 grey units)
    illumination: torch.Tensor  # mean brightness inside the FOV (0-1)
    unevenness: torch.Tensor  # coefficient of variation of the low-passed brightness
    fov_fraction: torch.Tensor


def quality(
    cropped: torch.Tensor, fov: FieldOfView, source_fov_fraction: torch.Tensor
) -> FundusQuality:
    """Quality measured on the cropped, un-normalised image (B, 3, S, S) in 0-255."""
    size = cropped.shape[-1]
    grey = cropped.mean(dim=1, keepdim=True) / 255.0
    inside = circle_mask(size, cropped.device, margin=size * 0.05)[None, None].float()
    n = inside.sum()
    lap_k = torch.tensor(
        [[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float32, device=cropped.device
    )[None, None]
    lap = F.conv2d(grey, lap_k, padding=1)
    lap_mean = (lap * inside).sum(dim=(1, 2, 3)) / n
    sharp = ((lap - lap_mean[:, None, None, None]) ** 2 * inside).sum(dim=(1, 2, 3)) / n
    illum = (grey * inside).sum(dim=(1, 2, 3)) / n
    low = smooth(grey * inside, size / 16) / smooth(inside, size / 16).clamp(min=1e-3)
    low_mean = (low * inside).sum(dim=(1, 2, 3)) / n
    low_std = torch.sqrt(
        ((low - low_mean[:, None, None, None]) ** 2 * inside).sum(dim=(1, 2, 3)) / n
    )
    uneven = low_std / low_mean.clamp(min=1e-3)
    return FundusQuality(sharp, illum, uneven, source_fov_fraction)


def gradable(q: FundusQuality, fov: FieldOfView, recipe: FundusRecipe) -> list[str | None]:
    """None for a gradable image, else the first reason it is not."""
    reasons: list[str | None] = []
    for i in range(len(q.sharpness)):
        if not bool(fov.found[i]):
            reasons.append("no_fov")
        elif float(q.illumination[i]) < recipe.min_illumination:
            reasons.append("too_dark")
        elif float(q.illumination[i]) > recipe.max_illumination:
            reasons.append("overexposed")
        elif float(q.fov_fraction[i]) < recipe.min_fov_fraction:
            reasons.append("fov_too_small")
        elif float(q.unevenness[i]) > recipe.max_unevenness:
            reasons.append("uneven_illumination")
        elif float(q.sharpness[i]) < recipe.min_sharpness:
            reasons.append("blurred")
        else:
            reasons.append(None)
    return reasons


@dataclass
class PreparedFundus:
    images: torch.Tensor  # (B, 3, S, S) uint8
    fov: FieldOfView
    quality: FundusQuality
    reasons: list[str | None]


def prepare_fundus(images: torch.Tensor, recipe: FundusRecipe) -> PreparedFundus:
    """The whole fundus recipe on a batch: FOV, crop, resize, mask, normalise, quality."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    fov = detect_fov(images)
    src_fraction = fov_fraction(fov, images.shape[-2], images.shape[-1])
    cropped = crop_to_fov(images, fov, recipe.size)
    q = quality(cropped, fov, src_fraction)
    out = cropped
    retina = circle_mask(recipe.size, out.device, margin=1.0)[None, None]
    if recipe.normalise == "graham":
        out = graham(out, recipe.graham_sigma * recipe.size, retina)
    elif recipe.normalise == "clahe":
        out = clahe(out, recipe.clahe_clip, recipe.clahe_tiles)
    if recipe.mask:
        out = out * retina.float()
    out = out * fov.found.float()[:, None, None, None]  # no FOV: an all-black image
    return PreparedFundus(
        out.clamp(0, 255).round().to(torch.uint8), fov, q, gradable(q, fov, recipe)
    )
