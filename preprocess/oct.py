"""OCT preparation kernels: physical resampling, percentile normalisation, quality.

Plain torch on any device. A volume is (Z, Y, X) = (B-scan, depth, A-scan) with spacing in
mm; the output grid covers the recipe's physical extent centred on the volume, so volumes
from different devices share one physical scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from preprocess.recipe import OctRecipe


@dataclass
class OctQuality:
    signal: float  # 99th percentile of the raw intensities, 0-1
    empty_share: float  # share of B-scans with almost no signal
    saturated_share: float  # share of B-scans with more than 5% saturated pixels


@dataclass
class PreparedOct:
    volume: torch.Tensor  # (D, H, W) uint8
    quality: OctQuality
    central_bscan: int  # source index of the B-scan at the output's centre
    reason: str | None  # None when gradable


def oct_quality(volume: torch.Tensor, max_value: float) -> OctQuality:
    v = volume.float() / max_value
    flat = v.reshape(v.shape[0], -1)
    sample = flat[:, :: max(1, flat.shape[1] // 20000)]  # quantile on a subsample: fast
    per_bscan = torch.quantile(sample, 0.99, dim=1)
    signal = float(torch.quantile(per_bscan, 0.75))  # typical of the B-scans that hold signal
    empty = float((per_bscan < 0.15 * max(signal, 1e-6)).float().mean())
    saturated = float(((flat >= 0.999).float().mean(dim=1) > 0.05).float().mean())
    return OctQuality(signal, empty, saturated)


def resample(
    volume: torch.Tensor, spacing_mm: tuple[float, float, float], recipe: OctRecipe
) -> torch.Tensor:
    """Trilinear resampling onto the recipe grid (zeros outside the scanned volume)."""
    z, y, x = volume.shape
    extent_src = [n * s for n, s in zip((z, y, x), spacing_mm, strict=True)]
    # output voxel centres, in normalised source coordinates (align_corners=False)
    axes = []
    for n_out, ext_out, ext_src in zip(recipe.shape, recipe.extent_mm, extent_src, strict=True):
        centres = (torch.arange(n_out, dtype=torch.float32) + 0.5) / n_out - 0.5  # -0.5..0.5
        axes.append(centres * ext_out / ext_src * 2)
    gz, gy, gx = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([gx, gy, gz], dim=-1)[None].to(volume.device)
    out = F.grid_sample(
        volume.float()[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out[0, 0]


def prepare_oct(
    volume: torch.Tensor,
    spacing_mm: tuple[float, float, float],
    recipe: OctRecipe,
    max_value: float = 255.0,
) -> PreparedOct:
    q = oct_quality(volume, max_value)
    out = resample(volume, spacing_mm, recipe)
    if recipe.denoise_sigma > 0:
        out = GaussianFilter(3, sigma=recipe.denoise_sigma).to(out.device)(out[None, None])[0, 0]
    sample = out.reshape(-1)[:: max(1, out.numel() // 200000)]
    lo = torch.quantile(sample, recipe.lower_percentile / 100)
    hi = torch.quantile(sample, recipe.upper_percentile / 100)
    scaled = ((out - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1) * 255
    if q.signal < recipe.min_signal:
        reason: str | None = "low_signal"
    elif q.empty_share > recipe.max_empty_share:
        reason = "empty_bscans"
    elif q.saturated_share > recipe.max_saturated_share:
        reason = "saturated_bscans"
    else:
        reason = None
    return PreparedOct(scaled.round().to(torch.uint8), q, volume.shape[0] // 2, reason)
