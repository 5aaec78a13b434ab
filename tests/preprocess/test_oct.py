"""OCT preparation kernels and recipes."""

from __future__ import annotations

import numpy as np
import torch

from eyehub.synth.oct import OctGeometry, render_oct
from eyehub.synth.phenotype import make_patient
from preprocess.oct import prepare_oct
from preprocess.recipe import OctRecipe, Recipe, recipe_id


def _volume(shape: tuple[int, int, int], geometry: OctGeometry, signal: float = 1.0):
    p = make_patient(4, 1, 2)
    ev = p.visits[0][1][0]
    vol, truth = render_oct(ev.signs, "R", shape, geometry, np.random.default_rng(0), signal=signal)
    spacing = (
        geometry.scan_height_mm / shape[0],
        geometry.depth_mm / shape[1],
        geometry.scan_width_mm / shape[2],
    )
    return torch.from_numpy(vol), spacing, truth


def test_resampling_uses_physical_spacing_so_devices_agree() -> None:
    recipe = OctRecipe(shape=(16, 64, 64), extent_mm=(5.0, 1.8, 5.0))
    # the same eye imaged at two resolutions gives nearly the same prepared volume
    coarse, s1, _ = _volume((12, 80, 64), OctGeometry(6.0, 6.0, 2.3))
    fine, s2, _ = _volume((24, 160, 128), OctGeometry(6.0, 6.0, 2.3))
    a = prepare_oct(coarse, s1, recipe).volume.float()
    b = prepare_oct(fine, s2, recipe).volume.float()
    assert a.shape == b.shape == (16, 64, 64)
    # compare the depth profiles (speckle differs, the anatomy must not)
    pa, pb = a.mean(dim=(0, 2)), b.mean(dim=(0, 2))
    assert torch.corrcoef(torch.stack([pa, pb]))[0, 1] > 0.9
    assert abs(int(pa.argmax()) - int(pb.argmax())) <= 2


def test_intensities_are_normalised_and_quality_flags_low_signal() -> None:
    vol, spacing, _ = _volume((12, 80, 64), OctGeometry(6.0, 6.0, 2.3))
    good = prepare_oct(vol, spacing, OctRecipe(shape=(8, 32, 32)))
    assert good.volume.dtype == torch.uint8 and int(good.volume.max()) == 255
    assert good.reason is None and good.central_bscan == 6
    dim = prepare_oct((vol.float() * 0.15).to(torch.uint8), spacing, OctRecipe(shape=(8, 32, 32)))
    assert dim.reason == "low_signal"
    empty = vol.clone()
    empty[:6] = 0
    assert prepare_oct(empty, spacing, OctRecipe(shape=(8, 32, 32))).reason == "empty_bscans"


def test_recipe_id_is_a_digest_of_what_changes_the_output() -> None:
    a = Recipe()
    assert recipe_id(a) == recipe_id(Recipe(name="renamed"))
    assert recipe_id(a) != recipe_id(Recipe.from_dict({"fundus": {"size": 384}}))
    assert len(recipe_id(a)) == 12
