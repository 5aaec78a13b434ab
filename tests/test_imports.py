"""What importing a stage loads: a Ray Train worker or the scoring service loads what a
model needs and nothing of the ingest drivers. Each check runs in a fresh interpreter, so
what the test process has already imported cannot hide a load.

The packages expose their public names lazily (PEP 562): the name table, the
`TYPE_CHECKING` imports that mypy and editors read, and `__all__` must agree.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAZY_PACKAGES = ("ingest", "preprocess", "models", "training", "inference")
INGEST_DRIVERS = {"ingest.run", "ingest.convert", "preprocess.run", "ray"}
# what MONAI's own import loads (it imports all its subpackages, and with them every
# optional dependency that is installed): avoidable only where no network is built
MONAI_AND_ITS_LOAD = {"monai", "mlflow", "pydicom", "cv2", "skimage", "zarr", "pandas"}

SMALL_FUSION_MODEL = """
import torch
from models import EyeModel, ModelSpec, explain, model_inputs
from preprocess import FundusRecipe, OctRecipe, Recipe
spec = ModelSpec.from_dict({
    "input": "fusion", "features": 8,
    "tasks": [{"name": "amd", "kind": "binary"}],
})
model = EyeModel(spec, Recipe(fundus=FundusRecipe(size=32), oct=OctRecipe(shape=(2, 32, 32))))
x = model_inputs(spec, torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
                 torch.zeros(1, 2, 32, 32, dtype=torch.uint8))
model.predict(x)
explain(model, x, "amd", image="oct")
"""


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    report = "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", code + report],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.splitlines()[-1]))


def _resolve_all(package: str) -> str:
    return f"import {package}\nfor name in {package}.__all__:\n    getattr({package}, name)\n"


def test_the_models_public_names_load_no_ingest_driver_ray_or_monai() -> None:
    loaded = _modules_after(_resolve_all("models"))
    assert "models.explain" in loaded and "models.model" in loaded  # the names were imported
    unwanted = INGEST_DRIVERS | MONAI_AND_ITS_LOAD | {"ingest", "preprocess.fundus", "sklearn"}
    assert loaded & unwanted == set()


def test_building_predicting_and_explaining_load_no_ingest_driver_or_ray() -> None:
    loaded = _modules_after(SMALL_FUSION_MODEL)
    assert "monai" in loaded  # a network was built
    assert loaded & (INGEST_DRIVERS | {"ingest"}) == set()


@pytest.mark.parametrize("package", ["inference", "training"])
def test_inference_and_training_load_no_ingest_driver_or_ray(package: str) -> None:
    loaded = _modules_after(_resolve_all(package))
    assert package in loaded
    assert loaded & (INGEST_DRIVERS | {"ingest"}) == set()


def test_a_recipe_is_settings_only() -> None:
    loaded = _modules_after("import preprocess.recipe\nfrom preprocess import Recipe, recipe_id")
    assert "pydantic" in loaded
    assert loaded & ({"torch", "preprocess.fundus", "ingest"} | MONAI_AND_ITS_LOAD) == set()


def test_the_preprocess_kernels_load_nothing_of_ingest_or_ray() -> None:
    loaded = _modules_after("from preprocess import detect_fov, prepare_fundus, prepare_oct")
    assert "preprocess.fundus" in loaded and "preprocess.oct" in loaded
    assert loaded & (INGEST_DRIVERS | {"ingest"}) == set()


def test_the_ingest_reading_names_load_no_driver_or_ray() -> None:
    loaded = _modules_after("from ingest import HubKey, read_pixels, read_scan, CATALOG")
    assert "ingest.reader" in loaded
    assert loaded & INGEST_DRIVERS == set()


def test_every_public_name_of_every_stage_still_imports() -> None:
    names = {
        "ingest": ["run_ingest", "read_pixels", "IngestSettings", "load_key"],
        "preprocess": ["Recipe", "run_preprocess", "prepare_fundus"],
        "models": ["EyeModel", "explain", "TaskSpec"],
    }
    for package, wanted in names.items():
        module = importlib.import_module(package)
        assert set(wanted) <= set(module.__all__)
        for name in module.__all__:
            assert getattr(module, name) is not None, (package, name)
            assert name in dir(module), (package, name)
        assert not hasattr(module, "no_such_name")
        with pytest.raises(ImportError):
            exec(f"from {package} import no_such_name", {})


def test_a_public_name_is_the_object_its_submodule_defines() -> None:
    """Also after its submodule was imported: `models.explain` names both a submodule and
    the function, and must stay the function."""
    code = "import importlib, sys\n"
    for package in LAZY_PACKAGES:
        table = _table(package)
        code += f"import {package}\n"
        code += "".join(f"importlib.import_module({m!r})\n" for m in sorted(set(table.values())))
        code += "".join(
            f"assert {package}.{name} is getattr(sys.modules[{module!r}], {name!r}), {name!r}\n"
            for name, module in table.items()
        )
        code += f"from {package} import *\n"
    _modules_after(code)  # its asserts fail the subprocess


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_the_name_table_the_type_checking_imports_and_all_agree(package: str) -> None:
    tree = ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8"))
    typed: dict[str, str] = {}
    declared: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                if isinstance(imp, ast.ImportFrom) and imp.module:
                    typed.update({a.asname or a.name: imp.module for a in imp.names})
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            declared = ast.literal_eval(node.value)  # type: ignore[attr-defined]
    assert typed == _table(package)
    assert sorted(declared) == sorted(typed) and len(declared) == len(set(declared))


def _table(package: str) -> dict[str, str]:
    """The package's name -> submodule table, read from its source."""
    tree = ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "_SOURCES" for t in targets):
            table: dict[str, str] = ast.literal_eval(node.value)  # type: ignore[attr-defined]
            return table
    raise AssertionError(f"{package}/__init__.py has no _SOURCES table")
