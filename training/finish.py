"""After the last epoch: calibrate, evaluate on test, log, save and register the model.

Runs in the driver on the best epoch's weights (from the run's latest checkpoint).
Temperatures and thresholds are fitted on validation (models' calibration code), then
every test figure is computed by `training.evaluate` with patient-bootstrap CIs and
subgroups, logged under `test/<task>/<metric>`; the per-sample predictions of validation
and test go to `predictions/predictions.parquet` so a later comparison can pair runs
sample by sample.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from eyehub.labels import label_spec
from models.calibration import calibrated_probability
from models.model import EyeModel
from models.tasks import decision_score, ordinal_probabilities
from preprocess.recipe import recipe_id
from training.config import TrainConfig
from training.data import PreparedDataset, SampleArrays
from training.loop import STATE, predict_outputs

log = logging.getLogger(__name__)

REGISTERED_PREFIX = "eyehub-"
CANDIDATE = "candidate"


def predictions_table(
    model: EyeModel, samples: pd.DataFrame, outputs: dict[str, np.ndarray], split: str
) -> pd.DataFrame:
    """Long table: one row per sample and task, with the label, the raw (uncalibrated)
    and calibrated prediction, the decision, and the subgroup columns."""
    frames = []
    base = samples[["scan_id", "patient_id", "eye"]].reset_index(drop=True)
    for extra in ("sex", "age", "manufacturer", "model"):
        if extra in samples:
            base[extra] = samples[extra].astype(object).to_numpy()
    for t in model.tasks:
        out = torch.as_tensor(outputs[t.name]).float()
        frame = base.copy()
        frame["task"] = t.name
        frame["split"] = split
        frame["label"] = label_spec(t.name).encode(samples[t.name])
        temperature = model.temperatures.get(t.name, 1.0)
        if t.kind == "regression":
            value = out[:, 0].numpy() * t.std + t.mean
            frame["raw"] = value
            frame["calibrated"] = value
        else:
            score = decision_score(t, out).double().numpy()
            frame["raw"] = calibrated_probability(score, 1.0)
            frame["calibrated"] = calibrated_probability(score, temperature)
            if t.kind == "ordinal":
                grades = ordinal_probabilities(out / temperature).numpy()
                frame["grade"] = grades.argmax(axis=1)
                for k in range(grades.shape[1]):
                    frame[f"p_grade_{k}"] = grades[:, k]
        threshold = model.thresholds.get(t.name)
        frame["threshold"] = threshold.value if threshold is not None else np.nan
        frame["refer"] = frame["calibrated"] >= threshold.value if threshold is not None else pd.NA
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def finish_run(
    config: TrainConfig,
    dataset: Path,
    samples: pd.DataFrame,
    result: Any,
    summary: Any,
    folder: Path,
) -> None:
    import mlflow

    from preprocess.run import PREPARED
    from training.evaluate_run import evaluate_and_log

    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        state = torch.load(Path(ckpt) / STATE, map_location="cpu", weights_only=False)
    model = EyeModel(config.model, config.preprocess)
    model.net.load_state_dict(state["best_model"])
    model.net.eval()
    summary.epochs = int(state["epoch"]) + 1
    summary.best_epoch = int(state["best_epoch"]) + 1
    zarr_path = str(dataset / PREPARED / f"{recipe_id(config.preprocess)}.zarr")
    tasks = [t.name for t in config.model.tasks]
    device = torch.device("cpu")
    parts = {}
    for split in ("val", "test"):
        frame = samples[samples.split == split].reset_index(drop=True)
        arrays = SampleArrays.from_frame(frame, tasks)
        data = PreparedDataset(zarr_path, arrays)
        parts[split] = (frame, arrays, predict_outputs(model.net, config.model, data, device))
    _, val_arrays, val_outputs = parts["val"]
    model.calibrate(val_outputs, val_arrays.labels, config.evaluation.target_sensitivity)
    predictions = pd.concat(
        [predictions_table(model, f, o, s) for s, (f, _, o) in parts.items()], ignore_index=True
    )
    model.info.update(
        {
            "config": config.name,
            "run_id": summary.run_id,
            "best_epoch": summary.best_epoch,
            "dataset_digest": mlflow.get_run(summary.run_id).data.tags.get("eyehub.dataset_digest"),
            "primary_task": config.primary_task,
        }
    )
    summary.metrics, summary.warnings = evaluate_and_log(config, predictions)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "predictions.parquet"
        predictions.to_parquet(table, index=False)
        mlflow.log_artifact(str(table), "predictions")
        model_dir = model.save(folder / "model")
    summary.model_dir = model_dir
    register_model(config, model, model_dir, summary)


def _requirements() -> list[str]:
    """What the logged pyfunc needs: eyehub (whose code it is) at this version, with the
    torch and MLflow it was saved with."""
    from importlib.metadata import version

    return [
        f"eyehub=={version('eyehub')}",
        f"torch=={version('torch')}",
        f"mlflow=={version('mlflow')}",
    ]


def register_model(config: TrainConfig, model: EyeModel, model_dir: Path, summary: Any) -> None:
    """Log `model_dir` as the run's pyfunc model (in the active MLflow run), register it as
    `eyehub-<config>` with alias `candidate`, and set `summary.model_name` and `.model_version`."""
    import mlflow
    from mlflow.models import infer_signature

    from training.pyfunc import ARTIFACT, EyePyfunc

    if model.spec.input == "fusion":
        example: Any = {
            "fundus": np.zeros((1, 3, model.recipe.fundus.size, model.recipe.fundus.size), "u1"),
            "oct": np.zeros((1, *model.recipe.oct.shape), "u1"),
        }
    elif model.spec.input == "oct":
        example = np.zeros((1, *model.recipe.oct.shape), "u1")
    else:
        example = np.zeros((1, 3, model.recipe.fundus.size, model.recipe.fundus.size), "u1")
    name = REGISTERED_PREFIX + config.name
    with warnings.catch_warnings():  # MLflow's hints about type hints and inferred schemas
        warnings.simplefilter("ignore", UserWarning)
        output = EyePyfunc()
        output.model = model
        signature = infer_signature(example, output.predict(None, example))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=EyePyfunc(),
            artifacts={ARTIFACT: str(model_dir)},
            signature=signature,
            input_example=example,
            registered_model_name=name,
            # given, not inferred: inferring them loads the model in a subprocess (seconds)
            pip_requirements=_requirements(),
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, CANDIDATE, version)
    client.set_model_version_tag(name, version, "eyehub.run_id", summary.run_id)
    client.set_model_version_tag(name, version, "eyehub.primary_task", config.primary_task)
    summary.model_name, summary.model_version = name, version
