"""Tracked runs for the review tests, made in seconds without training.

Each run is an MLflow run in a real SQLite store with what `eyehub train` logs: the
resolved config (`config/resolved.yaml`), the dataset digest and primary-task tags, the test
metrics, per-task evaluation reports and plots (`training.evaluate_run.evaluate_and_log`,
the function training calls), `predictions/predictions.parquet`, and a model registered
by `training.finish.register_model` (alias `candidate`, version tags). Only the predictions
are made up, with a planted difference: a `strong` run separates the classes far better
than a `weak` one on the very same samples.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import TrainConfig

CONFIG_NAME = "review_demo"
MODEL_NAME = "eyehub-" + CONFIG_NAME
DIGEST = "d1" * 32  # the catalog digest of "the" dataset
OTHER_DIGEST = "e2" * 32
# the synthetic generator's sites (eyehub.synth.cohort.SITES), as the catalog holds them
SITES = (("SYNTHOPTIX", "RetinaCam 3D"), ("NORTHLIGHT MEDICAL", "NL-4000 OCT"))


@dataclass
class Run:
    name: str
    run_id: str
    version: str
    predictions: pd.DataFrame


@dataclass
class _Summary:
    run_id: str
    model_name: str = ""
    model_version: str = ""


def review_config(lr: float = 0.002) -> TrainConfig:
    """fundus_demo with three tasks (one of each kind), a quick bootstrap, and groups small
    enough for 80 test samples."""
    from eyehub.configs import resolve_config
    from eyehub.settings import read_yaml
    from training.config import resolve_train_config

    raw = read_yaml(resolve_config("train", "fundus_demo"))
    raw.update(
        name=CONFIG_NAME,
        description="the review tests' model",
        controls=[],
        evaluation={
            "bootstrap": 200,
            "min_group_size": 20,
            "min_group_positives": 5,
        },
    )
    raw["model"] = {
        **raw["model"],
        "features": 8,
        "tasks": ["referable_dr", {"name": "dr_grade", "refer_from": 2}, "age"],
    }
    raw["preprocess"] = {"name": "review", "fundus": {"size": 64}}  # a quick input example
    raw["training"] = {**raw["training"], "lr": lr}
    return resolve_train_config(raw)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def predictions(
    strength: float, patients: range = range(40), noise_seed: int = 1, val_patients: int = 20
) -> pd.DataFrame:
    """The long predictions table `training.finish.predictions_table` writes, for test
    patients `patients` (two eyes each) and some validation patients. Labels and subgroup
    columns depend only on the patient, so two tables share them where patients overlap;
    `strength` is how well the scores separate the classes (the planted difference)."""
    rows = []
    noise = np.random.default_rng(noise_seed)
    for split, ids in (("test", list(patients)), ("val", range(1000, 1000 + val_patients))):
        for i in ids:
            truth = np.random.default_rng(10_000 + i)  # the same labels in every run
            sex = "M" if i % 2 else "F"
            age = float(truth.uniform(40, 88))
            manufacturer, model = SITES[i % 2 if truth.random() < 0.8 else 1 - i % 2]
            for eye in ("R", "L"):
                referable = float(truth.random() < 0.4)
                grade = int(truth.integers(2, 5)) if referable else int(truth.integers(0, 2))
                base = {
                    "scan_id": f"scan-{i:04d}-{eye}",
                    "patient_id": f"pseudo-{i:04d}",
                    "eye": eye,
                    "sex": sex,
                    "age": age,
                    "manufacturer": manufacturer,
                    "model": model,
                    "split": split,
                }
                score = strength * (2 * referable - 1) + noise.normal()
                rows.append(
                    {
                        **base,
                        "task": "referable_dr",
                        "label": referable,
                        "raw": _sigmoid(score),
                        "calibrated": _sigmoid(score / 1.3),
                        "threshold": 0.5,
                        "refer": bool(_sigmoid(score / 1.3) >= 0.5),
                    }
                )
                centre = grade + noise.normal(scale=2.0 / max(strength, 0.1))
                logits = -((np.arange(5) - centre) ** 2) / 2.0
                p = np.exp(logits - logits.max())
                p /= p.sum()
                referral = float(p[2:].sum())
                rows.append(
                    {
                        **base,
                        "task": "dr_grade",
                        "label": float(grade),
                        "raw": referral,
                        "calibrated": referral,
                        "grade": int(p.argmax()),
                        **{f"p_grade_{k}": float(p[k]) for k in range(5)},
                        "threshold": 0.5,
                        "refer": referral >= 0.5,
                    }
                )
                value = age + noise.normal(scale=12.0 / max(strength, 0.1))
                rows.append(
                    {
                        **base,
                        "task": "age",
                        "label": age,
                        "raw": value,
                        "calibrated": value,
                        "threshold": np.nan,
                        "refer": pd.NA,
                    }
                )
    return pd.DataFrame(rows)


def log_run(
    tracking_uri: str,
    folder: Path,
    name: str,
    table: pd.DataFrame,
    config: TrainConfig,
    digest: str = DIGEST,
) -> Run:
    """An MLflow run with what a finished `eyehub train` run holds, registered as
    `eyehub-review_demo` (alias `candidate`)."""
    import mlflow
    import yaml

    from preprocess.recipe import recipe_id
    from tests.inference.models import build_model
    from training.evaluate import EvaluationSettings, evaluate_predictions, metrics_dict
    from training.finish import register_model
    from training.run import _experiment

    mlflow.set_tracking_uri(tracking_uri)
    _experiment(config.name, folder)  # artifacts under folder/artifacts, as training does
    with mlflow.start_run(run_name=f"{config.name}-{name}") as run:
        mlflow.log_text(yaml.safe_dump(config.to_dict(), sort_keys=False), "config/resolved.yaml")
        mlflow.set_tags(
            {
                "eyehub.dataset_digest": digest,
                "eyehub.recipe_id": recipe_id(config.preprocess),
                "eyehub.primary_task": config.primary_task,
            }
        )
        split_rows = table[table.task == config.primary_task]
        for split in ("val", "test"):
            part = split_rows[split_rows.split == split]
            mlflow.log_metrics(
                {
                    f"split/{split}/patients": part.patient_id.nunique(),
                    f"split/{split}/samples": len(part),
                    f"split/{split}/ungradable": 0,
                }
            )
        mlflow.log_metrics(
            {"split/train/patients": 60, "split/train/samples": 120, "split/train/ungradable": 0}
        )
        # what training.evaluate_run.evaluate_and_log logs, but the plots (seconds each)
        settings = EvaluationSettings.from_spec(config.evaluation)
        reports = evaluate_predictions(list(config.model.tasks), table, settings)
        mlflow.log_metrics(metrics_dict(reports))
        for task, report in reports.items():
            mlflow.log_dict(report.to_dict(), f"evaluation/{task}.json")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "predictions.parquet"
            table.to_parquet(path, index=False)
            mlflow.log_artifact(str(path), "predictions")
        model = build_model(config)
        model.info.update({"run_id": run.info.run_id, "dataset_digest": digest})
        model_dir = model.save(folder / "models" / name)
        summary: Any = _Summary(run.info.run_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            register_model(config, model, model_dir, summary)
    return Run(name, run.info.run_id, summary.model_version, table)


@dataclass
class Store:
    """The review store: its file, and the runs in it by name."""

    folder: Path
    db: Path
    runs: dict[str, Run]

    def uri(self, db: Path | None = None) -> str:
        return f"sqlite:///{db or self.db}"


def make_store(folder: Path) -> Store:
    """Four runs of `eyehub-review_demo`, registered as versions 1-4:

    1. `strong`: well separated scores, 40 test patients (80 eyes);
    2. `weak`: the same samples, poorly separated scores, another learning rate;
    3. `shifted`: strong, but tested on another dataset: 30 of its 40 test patients are
       the others' (patients 10-49);
    4. `same`: exactly `strong`'s predictions (an equal model)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    uri = f"sqlite:///{db}"
    strong = predictions(2.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one input example per model: threads only contend
    try:
        runs = _runs(uri, folder, strong)
    finally:
        torch.set_num_threads(threads)
    return Store(folder, db, runs)


def _runs(uri: str, folder: Path, strong: pd.DataFrame) -> dict[str, Run]:
    return {
        "strong": log_run(uri, folder, "strong", strong, review_config()),
        "weak": log_run(uri, folder, "weak", predictions(0.6), review_config(lr=0.0001)),
        "shifted": log_run(
            uri,
            folder,
            "shifted",
            predictions(2.0, patients=range(10, 50), noise_seed=3),
            review_config(),
            digest=OTHER_DIGEST,
        ),
        "same": log_run(uri, folder, "same", strong.copy(), review_config()),
    }
