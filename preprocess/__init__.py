"""Preprocess: recipe-addressed, training-ready tensors from an ingested dataset.

Public names: `prepare_scans` and `PreparedScan` (the preparation kernel every path
shares: stored pixels to the prepared tensor and its quality record), the kernels under it
`prepare_fundus`, `prepare_oct`, `detect_fov` (plain torch, any device), the settings
`Recipe`, `FundusRecipe`, `OctRecipe` and `recipe_id`, and the Ray Data driver
`run_preprocess`.

Names are imported from their submodule on first use (PEP 562): `from preprocess import
Recipe` loads the settings only (pydantic, no torch), and the kernels load without the
Ray Data driver or anything of ingest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eyehub.lazy import lazy_exports

if TYPE_CHECKING:
    from preprocess.fundus import PreparedFundus, detect_fov, prepare_fundus
    from preprocess.kernel import PreparedScan, prepare_scans
    from preprocess.oct import PreparedOct, prepare_oct
    from preprocess.recipe import FundusRecipe, OctRecipe, Recipe, recipe_id
    from preprocess.run import PreprocessSummary, run_preprocess

# public name -> the submodule that defines it, imported when the name is first used
_SOURCES = {
    "PreparedFundus": "preprocess.fundus",
    "detect_fov": "preprocess.fundus",
    "prepare_fundus": "preprocess.fundus",
    "PreparedScan": "preprocess.kernel",
    "prepare_scans": "preprocess.kernel",
    "PreparedOct": "preprocess.oct",
    "prepare_oct": "preprocess.oct",
    "FundusRecipe": "preprocess.recipe",
    "OctRecipe": "preprocess.recipe",
    "Recipe": "preprocess.recipe",
    "recipe_id": "preprocess.recipe",
    "PreprocessSummary": "preprocess.run",
    "run_preprocess": "preprocess.run",
}

__all__ = [
    "FundusRecipe",
    "OctRecipe",
    "PreparedFundus",
    "PreparedOct",
    "PreparedScan",
    "PreprocessSummary",
    "Recipe",
    "detect_fov",
    "prepare_fundus",
    "prepare_oct",
    "prepare_scans",
    "recipe_id",
    "run_preprocess",
]

# mypy and editors see the imports above; only the interpreter sees __getattr__, so a
# misspelt name is still a type error rather than Any
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, _SOURCES, globals())
