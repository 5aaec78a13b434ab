"""What a trained model is.

Public names: the settings `ModelSpec` and `TaskSpec`; `EyeNet` (encoders, late fusion,
task heads) and `EyeModel` (the network with its tasks, calibration, thresholds and
preprocessing recipe, saved and loaded as one unit); `model_inputs` (prepared uint8
tensors to network inputs); `multitask_loss`; `explain` (Grad-CAM and OCT attention);
`load_pretrained` and its `LoadReport`; the calibration helpers `fit_temperature`,
`threshold_at_sensitivity` and `Threshold`; and the network names `FUNDUS_NETWORKS`,
`OCT_NETWORKS`.

Names are imported from their submodule on first use (PEP 562), and MONAI only when a
network is built or explained: reading a `ModelSpec` or a saved model's manifest needs
neither MONAI nor anything of ingest and preprocess beyond the `Recipe`.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from eyehub.lazy import lazy_exports

if TYPE_CHECKING:
    from models.calibration import Threshold, fit_temperature, threshold_at_sensitivity
    from models.explain import Explanation, explain
    from models.model import EyeModel, EyeNet, ModelSpec, model_inputs
    from models.networks import FUNDUS_NETWORKS, OCT_NETWORKS
    from models.pretrained import LoadReport, load_pretrained
    from models.tasks import TaskSpec, multitask_loss, ordinal_probabilities

# public name -> the submodule that defines it, imported when the name is first used
_SOURCES = {
    "Threshold": "models.calibration",
    "fit_temperature": "models.calibration",
    "threshold_at_sensitivity": "models.calibration",
    "Explanation": "models.explain",
    "explain": "models.explain",
    "EyeModel": "models.model",
    "EyeNet": "models.model",
    "ModelSpec": "models.model",
    "model_inputs": "models.model",
    "FUNDUS_NETWORKS": "models.networks",
    "OCT_NETWORKS": "models.networks",
    "LoadReport": "models.pretrained",
    "load_pretrained": "models.pretrained",
    "TaskSpec": "models.tasks",
    "multitask_loss": "models.tasks",
    "ordinal_probabilities": "models.tasks",
}

__all__ = [
    "FUNDUS_NETWORKS",
    "OCT_NETWORKS",
    "Explanation",
    "EyeModel",
    "EyeNet",
    "LoadReport",
    "ModelSpec",
    "TaskSpec",
    "Threshold",
    "explain",
    "fit_temperature",
    "load_pretrained",
    "model_inputs",
    "multitask_loss",
    "ordinal_probabilities",
    "threshold_at_sensitivity",
]

# mypy and editors see the imports above; only the interpreter sees __getattr__, so a
# misspelt name is still a type error rather than Any
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, _SOURCES, globals())


class _Package(types.ModuleType):
    """Keeps `models.explain` the function after the submodule of the same name is
    imported: the import system then sets the package's attribute to the submodule."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _SOURCES.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
