"""The MLflow face of an EyeModel: a pyfunc wrapper around the saved model directory.

`mlflow.pyfunc.load_model("models:/eyehub-<config>@candidate")` gives a model whose
`predict` takes prepared uint8 tensors (fundus [N, 3, S, S] or OCT [N, D, H, W]; a fusion
model a dict with both) and returns one row per sample with each task's calibrated
probability, decision, grade or value. The EyeModel directory travels as the pyfunc's
artifact, so scoring can also load it whole (recipe, calibration, thresholds).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

ARTIFACT = "eyehub_model"


# MLflow warns at class creation that predict has no type hints; it has none on purpose
# (MLflow would take them as the input schema; the signature is given when logging)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)

    class EyePyfunc(PythonModel):
        # no type hints on predict: MLflow would read them as the input schema (and warn)
        def load_context(self, context):
            from models.model import EyeModel

            self.model = EyeModel.load(context.artifacts[ARTIFACT])

        def predict(self, context, model_input, params=None):
            from models.model import model_inputs

            spec = self.model.spec
            if isinstance(model_input, dict):
                fundus, oct_ = model_input.get("fundus"), model_input.get("oct")
            elif spec.input == "oct":
                fundus, oct_ = None, model_input
            else:
                fundus, oct_ = model_input, None
            inputs = model_inputs(
                spec,
                None if fundus is None else np.asarray(fundus, dtype=np.uint8),
                None if oct_ is None else np.asarray(oct_, dtype=np.uint8),
            )
            predictions = self.model.predict(inputs)
            columns: dict[str, Any] = {}
            for task, entry in predictions.items():
                for key, values in entry.items():
                    if key == "grades":
                        for k in range(values.shape[1]):
                            columns[f"{task}/p_grade_{k}"] = values[:, k]
                    else:
                        columns[f"{task}/{key}"] = values
            return pd.DataFrame(columns)
