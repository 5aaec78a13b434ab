"""Preprocess: recipe-addressed, training-ready tensors from an ingested dataset.

Public names: the kernels `prepare_fundus`, `prepare_oct`, `detect_fov` (plain torch, any
device; inference calls them for one scan), the settings `Recipe`, `FundusRecipe`,
`OctRecipe` and `recipe_id`, and the Ray Data driver `run_preprocess`.
"""

from preprocess.fundus import PreparedFundus, detect_fov, prepare_fundus
from preprocess.oct import PreparedOct, prepare_oct
from preprocess.recipe import FundusRecipe, OctRecipe, Recipe, recipe_id
from preprocess.run import PreprocessSummary, run_preprocess

__all__ = [
    "FundusRecipe",
    "OctRecipe",
    "PreparedFundus",
    "PreparedOct",
    "PreprocessSummary",
    "Recipe",
    "detect_fov",
    "prepare_fundus",
    "prepare_oct",
    "recipe_id",
    "run_preprocess",
]
