"""Scoring test models: built in seconds, calibrated on made-up validation outputs and
registered in a real MLflow store the way training registers them (training.finish)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.model import EyeModel
from training.config import TrainConfig, load_train_config


@dataclass
class Registered:
    name: str
    version: str
    tracking_uri: str
    model_dir: Path
    run_id: str


@dataclass
class _Summary:
    run_id: str
    model_name: str = ""
    model_version: str = ""


def build_model(config: TrainConfig, seed: int = 0) -> EyeModel:
    """An untrained network of the config, calibrated on random validation outputs, so
    that every yes/no task has a temperature and a threshold."""
    torch.manual_seed(seed)
    model = EyeModel(config.model, config.preprocess)
    model.net.eval()
    rng = np.random.default_rng(seed)
    n = 60
    outputs: dict[str, Any] = {}
    labels: dict[str, np.ndarray] = {}
    for t in model.tasks:
        width = (t.classes or 2) - 1 if t.kind == "ordinal" else 1
        y = rng.integers(0, 2, n).astype(np.float64)
        if t.kind == "ordinal":
            y = rng.integers(0, t.classes or 2, n).astype(np.float64)
        score = rng.normal(size=(n, 1)) + (y[:, None] > 0) * 1.5
        outputs[t.name] = np.repeat(score, width, axis=1).astype(np.float32)
        labels[t.name] = y
    model.calibrate(outputs, labels)
    model.info.update({"config": config.name, "primary_task": config.primary_task})
    return model


def register(
    config_name: str, tracking_uri: str, folder: Path, seed: int = 0, alias: str = "champion"
) -> Registered:
    """Build, save and register a model as training does; set `alias` on it too."""
    import mlflow

    from training.finish import register_model

    config = load_train_config(config_name)
    model = build_model(config, seed)
    from training.run import _experiment

    mlflow.set_tracking_uri(tracking_uri)
    _experiment(f"scoring-tests-{config_name}", folder)  # artifacts under folder, not ./mlruns
    with mlflow.start_run() as run:
        model.info["run_id"] = run.info.run_id
        model_dir = model.save(folder / f"{config_name}-{seed}")
        summary = _Summary(run.info.run_id)
        register_model(config, model, model_dir, summary)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    client.set_registered_model_alias(summary.model_name, alias, summary.model_version)
    return Registered(
        summary.model_name, summary.model_version, tracking_uri, model_dir, run.info.run_id
    )
