"""Evaluate a finished run's test predictions and log them to the active MLflow run.

Every figure comes from `training.evaluate` (patient-bootstrap CIs, subgroups, plots).
Controls (`config.controls`, e.g. `null_control`) are evaluated like any task; a control
whose test AUROC sits further from 0.5 than `evaluation.control_tolerance` is a warning
and the tag `eyehub.control_warning` on the run: it means the model learnt something it
must not (patient identity leaking across splits, a site effect).
"""

from __future__ import annotations

import io
import logging
import math

import pandas as pd
from PIL import Image

from training.config import TrainConfig
from training.evaluate import EvaluationSettings, evaluate_predictions, metrics_dict, task_figures

log = logging.getLogger(__name__)


def control_warnings(
    config: TrainConfig, metrics: dict[str, float], predictions: pd.DataFrame | None = None
) -> list[str]:
    """A sentence per control whose test AUROC is far from chance. With the predictions,
    it also names the task whose labels the control follows most closely in the test
    patients: a causeless label that happens to follow a real one in a small sample is
    predicted through it, without any leak."""
    out = []
    for control in config.controls:
        auroc = metrics.get(f"test/{control}/auroc")
        if auroc is None or not math.isfinite(auroc):
            continue
        if abs(auroc - 0.5) > config.evaluation.control_tolerance:
            low = metrics.get(f"test/{control}/auroc/ci_low", float("nan"))
            high = metrics.get(f"test/{control}/auroc/ci_high", float("nan"))
            text = (
                f"control '{control}' has test AUROC {auroc:.3f} ({low:.3f}-{high:.3f}), "
                f"further than {config.evaluation.control_tolerance} from chance"
            )
            follows = None if predictions is None else _follows(control, predictions)
            if follows is not None:
                task, r, patients = follows
                text += (
                    f". In the {patients} test patients its labels follow '{task}' by chance "
                    f"(r = {r:+.2f}), and a model that learns '{task}' predicts it through "
                    "that. Otherwise"
                )
            else:
                text += ":"
            text += (
                " a control has no cause in the images, so the model has learnt something it "
                "must not (patient identity across splits, a site or device effect)"
            )
            if low <= 0.5 <= high:
                text += (
                    "; its CI includes chance, so with this few test patients it may be "
                    "sampling noise (a leak shows as a CI that excludes 0.5)"
                )
            out.append(text)
    return out


def _follows(control: str, predictions: pd.DataFrame) -> tuple[str, float, int] | None:
    """The task whose per-patient test labels correlate most with the control's, when
    |r| >= 0.3."""
    test = predictions[predictions.split == "test"]
    per_patient = test.groupby(["patient_id", "task"]).label.mean().unstack()
    if control not in per_patient:
        return None
    r = per_patient.corr(min_periods=10)[control].drop(control).dropna()
    if r.empty:
        return None
    task = str(r.abs().idxmax())
    if abs(r[task]) < 0.3:
        return None
    return task, float(r[task]), int(per_patient[control].notna().sum())


def evaluate_and_log(
    config: TrainConfig, predictions: pd.DataFrame
) -> tuple[dict[str, float], list[str]]:
    """Test metrics of every task into MLflow (metrics, per-task JSON reports, plots);
    returns the metrics and the control warnings."""
    import mlflow

    settings = EvaluationSettings.from_spec(config.evaluation)
    tasks = list(config.model.tasks)
    reports = evaluate_predictions(tasks, predictions, settings, split="test")
    metrics = metrics_dict(reports)
    mlflow.log_metrics(metrics)
    test = predictions[predictions.split == "test"]
    for task in tasks:
        report = reports[task.name]
        mlflow.log_dict(report.to_dict(), f"evaluation/{task.name}.json")
        frame = test[test.task == task.name]
        for name, png in task_figures(task, frame, report, settings).items():
            mlflow.log_image(_image(png), f"plots/{task.name}/{name}")
    warnings = control_warnings(config, metrics, predictions)
    if warnings:
        mlflow.set_tag("eyehub.control_warning", " | ".join(warnings)[:5000])
        for text in warnings:  # the CLI prints them under its results table
            log.warning("%s", text, extra={"terminal": False})
    return metrics, warnings


def _image(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png))
