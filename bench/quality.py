"""Quality of the demo configs on the demo cohort, against the issue's targets and against
what the synthetic generator's own planted values allow (not pass/fail).

1. Builds the demo's dataset (`eyehub demo --no-train`: the same cohort, seed and size)
   unless `--home` already holds it, then trains each config with `eyehub train`, timing
   each run.
2. Reads each run's test metrics from MLflow, and its per-sample predictions.
3. For the same test samples, fits a logistic regression (linear for age) on the values
   the generator planted in each image (`EyeSigns`: cup-to-disc ratio, lesion counts,
   drusen, vessel calibres, lens yellowing, disc size, tessellation, ...), trained on the
   run's training patients. It is what a model that read every planted sign perfectly
   would reach with that many patients: the ceiling the cohort itself sets.

    .venv/bin/python bench/quality.py [--home DIR] [--patients 120] [--configs ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import mean_absolute_error, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from eyehub.labels import label_spec
from eyehub.synth.cohort import SITES
from eyehub.synth.phenotype import make_patient

DEMO_SEED = 7  # eyehub demo's cohort seed (eyehub/cli.py)
TARGETS: dict[str, tuple[str, float, float | None]] = {
    # task: (metric, bound, upper bound for a control)
    "referable_dr": ("auroc", 0.90, None),
    "glaucoma": ("auroc", 0.90, None),
    "amd": ("auroc", 0.85, None),
    "dme": ("auroc", 0.85, None),
    "sex": ("auroc", 0.85, None),
    "diabetes": ("auroc", 0.80, None),
    "hypertension": ("auroc", 0.80, None),
    "dr_grade": ("referral_auroc", 0.0, None),  # reported, no target
    "age": ("mae", 5.0, None),
    "null_control": ("auroc", 0.40, 0.60),
}


def _eyehub(*args: str, home: Path) -> float:
    env = {**os.environ, "EYEHUB_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "eyehub"), *args], check=True, env=env)
    return time.perf_counter() - start


def _planted(cohort: Path) -> pd.DataFrame:
    """Per DICOM file: its sha256 and the signs the generator drew for its eye and visit."""
    truth = pd.read_csv(cohort / "truth.csv")
    rows = []
    patients: dict[int, Any] = {}
    for row in truth.itertuples():
        index = int(row.patient_index)
        if index not in patients:
            patients[index] = make_patient(DEMO_SEED, index, len(SITES))
        _, eyes = patients[index].visits[int(row.visit) - 1]
        signs = eyes[0 if row.eye == "R" else 1].signs
        data = (cohort / str(row.path)).read_bytes()
        values = {k: float(v) for k, v in dataclasses.asdict(signs).items()}
        rows.append({"source_sha256": hashlib.sha256(data).hexdigest(), **values})
    return pd.DataFrame(rows)


def _baseline(
    task: str, kind: str, train: pd.DataFrame, test: pd.DataFrame, features: list[str]
) -> float | None:
    train, test = train.dropna(subset=[task]), test.dropna(subset=[task])
    if kind == "regression":
        model = make_pipeline(StandardScaler(), LinearRegression())
        model.fit(train[features], train[task].astype(float))
        return float(mean_absolute_error(test[task].astype(float), model.predict(test[features])))
    encode = label_spec(task).encode  # sex: M 1, F 0, as training reads it
    y_train, y_test = pd.Series(encode(train[task])), pd.Series(encode(test[task]))
    if kind == "ordinal":  # referral from grade 2, as the config's refer_from
        y_train, y_test = (y_train >= 2).astype(int), (y_test >= 2).astype(int)
    if y_train.nunique() < 2 or y_test.nunique() < 2:
        return None
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    model.fit(train[features], y_train.astype(int))
    return float(roc_auc_score(y_test.astype(int), model.predict_proba(test[features])[:, 1]))


def _target(metric: str, bound: float, upper: float | None) -> str:
    if upper is not None:
        return f"{bound}-{upper}"
    if metric == "mae":
        return f"<{bound}"
    return f">={bound}" if bound else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(".eyehub-quality"))
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--configs", nargs="+", default=["fundus_demo", "oct_demo", "fusion_demo"])
    parser.add_argument("--no-train", action="store_true", help="report the latest runs only")
    args = parser.parse_args()
    import mlflow

    home = args.home.resolve()
    dataset, cohort = home / "demo" / "dataset", home / "demo" / "cohort"
    if not (dataset / "catalog.parquet").is_file():
        took = _eyehub("demo", "--no-train", "--patients", str(args.patients), home=home)
        print(f"demo dataset ({args.patients} patients) built in {took:.0f} s")
    seconds = {}
    if not args.no_train:
        for config in args.configs:
            seconds[config] = _eyehub(
                "train", "--config", config, "--dataset", str(dataset), "--new-run", home=home
            )
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    planted = _planted(cohort)
    features = [c for c in planted.columns if c != "source_sha256"]
    samples = catalog.merge(planted, on="source_sha256", how="left")
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    table = []
    for config in args.configs:
        experiment = client.get_experiment_by_name(config)
        if experiment is None:
            continue
        run = client.search_runs(
            [experiment.experiment_id],
            "attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )[0]
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="predictions/predictions.parquet"
        )
        predictions = pd.read_parquet(local)
        held_out = set(predictions.patient_id)
        test_ids = set(predictions[predictions.split == "test"].scan_id)
        train = samples[~samples.patient_id.isin(held_out)]
        test = samples[samples.scan_id.isin(test_ids)]
        modality = "oct" if config.startswith("oct") else "fundus"  # fusion: by its fundus
        train = train[train.modality == modality]
        for task, (metric, bound, upper) in TARGETS.items():
            key = f"test/{task}/{metric}"
            value = run.data.metrics.get(key)
            if value is None:
                continue
            low = run.data.metrics.get(key + "/ci_low")
            high = run.data.metrics.get(key + "/ci_high")
            kind = label_spec(task).kind
            baseline = _baseline(task, kind, train, test, features)
            if task == "dr_grade":
                met = "-"
            elif upper is not None:
                met = "yes" if bound <= value <= upper else "NO"
            elif metric == "mae":
                met = "yes" if value < bound else "NO"
            else:
                met = "yes" if value >= bound else "NO"
            positives = None
            if kind == "binary":
                positives = int((label_spec(task).encode(test[task]) == 1).sum())
            table.append(
                {
                    "config": config,
                    "task": task,
                    "metric": key.split("/")[-1],
                    "target": _target(metric, bound, upper),
                    "value": round(value, 3),
                    "ci": f"{low:.3f}-{high:.3f}" if low is not None and high is not None else "",
                    "met": met,
                    "planted_lr": None if baseline is None else round(baseline, 3),
                    "test_samples": len(test.dropna(subset=[task])),
                    "test_positives": positives,
                    "train_s": round(seconds[config]) if config in seconds else None,
                }
            )
    frame = pd.DataFrame(table)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
