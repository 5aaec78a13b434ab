"""Preprocessing recipes: typed settings whose digest names the prepared output.

`recipe_id` is a digest of everything that changes the prepared tensors, so a changed
recipe never overwrites another's output and the same recipe always finds its own.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field

from eyehub.settings import Settings


class FundusRecipe(Settings):
    size: int = Field(default=512, ge=32, le=4096, description="output side, pixels")
    normalise: Literal["none", "graham", "clahe"] = "graham"
    graham_sigma: float = Field(
        default=1 / 30, gt=0, description="Gaussian sigma of the local mean, as a share of size"
    )
    clahe_clip: float = Field(default=2.0, gt=0, description="CLAHE clip limit")
    clahe_tiles: int = Field(default=8, ge=1, description="CLAHE tiles per side")
    mask: bool = True
    # gradable when every threshold holds (quality on the prepared image, in 0-1 units)
    min_sharpness: float = 2e-4
    min_illumination: float = 0.12
    max_illumination: float = 0.95
    max_unevenness: float = 0.6
    min_fov_fraction: float = 0.2


class OctRecipe(Settings):
    shape: tuple[int, int, int] = (32, 256, 256)  # B-scans, depth, A-scans
    extent_mm: tuple[float, float, float] = (6.0, 2.0, 6.0)  # centred on the volume
    lower_percentile: float = Field(default=1.0, ge=0, lt=50)
    upper_percentile: float = Field(default=99.5, gt=50, le=100)
    denoise_sigma: float = Field(default=0.0, ge=0, description="Gaussian sigma in voxels; 0 = off")
    min_signal: float = 0.2
    max_empty_share: float = 0.2
    max_saturated_share: float = 0.1


class Recipe(Settings):
    name: str = "default"
    fundus: FundusRecipe = FundusRecipe()
    oct: OctRecipe = OctRecipe()


def recipe_id(recipe: Recipe) -> str:
    """12 hex digits naming what the recipe produces (its name does not count)."""
    body = recipe.to_dict()
    body.pop("name", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
