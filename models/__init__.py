"""What a trained model is.

Public names: the settings `ModelSpec` and `TaskSpec`; `EyeNet` (encoders, late fusion,
task heads) and `EyeModel` (the network with its tasks, calibration, thresholds and
preprocessing recipe, saved and loaded as one unit); `model_inputs` (prepared uint8
tensors to network inputs); `multitask_loss`; `explain` (Grad-CAM and OCT attention);
`load_pretrained` and its `LoadReport`; the calibration helpers `fit_temperature`,
`threshold_at_sensitivity` and `Threshold`; and the network names `FUNDUS_NETWORKS`,
`OCT_NETWORKS`.
"""

from models.calibration import Threshold, fit_temperature, threshold_at_sensitivity
from models.explain import Explanation, explain
from models.model import EyeModel, EyeNet, ModelSpec, model_inputs
from models.networks import FUNDUS_NETWORKS, OCT_NETWORKS
from models.pretrained import LoadReport, load_pretrained
from models.tasks import TaskSpec, multitask_loss, ordinal_probabilities

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
