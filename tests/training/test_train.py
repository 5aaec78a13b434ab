"""`run_training` end to end on the small cohort: real Ray Train, real MLflow (SQLite),
real checkpoints; a killed worker, a non-finite loss."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest

from eyehub.errors import DatasetError
from eyehub.synth import generate_cohort
from ingest import HubKey, run_ingest
from ingest.run import IngestSettings
from training.config import load_train_config
from training.run import TrainingError, TrainSettings, run_training

# tasks with positives in a 24-patient cohort's validation and test splits
TASKS = "model.tasks=[referable_dr, {name: dr_grade, refer_from: 2}, age, sex, null_control]"
FAST = [
    TASKS,
    "model.features=64",
    "training.batch_size=8",
    "evaluation.bootstrap=50",
    "evaluation.min_group_size=5",
    "evaluation.min_group_positives=2",
    "split.val=0.3",
    "split.test=0.3",
]


@pytest.fixture(scope="module")
def cohort_60(tmp_path_factory: pytest.TempPathFactory, hub_key: HubKey) -> tuple[Path, Path]:
    """60 patients (about 340 scans), ingested: enough for the planted signals to show."""
    cohort = tmp_path_factory.mktemp("cohort60")
    generate_cohort(cohort, patients=60, seed=5, size="small", workers=2)
    dataset = tmp_path_factory.mktemp("dataset60") / "ds"
    run_ingest([cohort / "dicom"], dataset, hub_key, cohort / "labels.csv", IngestSettings())
    return cohort, dataset


def _config(*extra: str) -> object:
    return load_train_config("fundus_demo", [*FAST, *extra])


# What the pipeline reaches on the 60-patient cohort in 8 epochs (18 test patients),
# measured: referable_dr AUROC 0.88, sex 0.74, age MAE 9.5 years, null_control 0.56. The
# bars sit below by the spread a replaced worker's restart can add, and above what a
# pipeline that learns nothing gives (AUROC 0.5; age predicted as the mean: MAE ~12)
EPOCHS = "training.epochs=8"
QUALITY = {"referable_dr": 0.80, "sex": 0.65}
# age: measured 9.5 and 11.8 years; its regression is unstable in the first epochs
# (docs/training.md), so within 8 epochs only a broken head or unit is caught here
AGE_MAE = 20.0
CONTROL = (0.25, 0.75)  # null_control: chance, within what 18 test patients allow


@pytest.mark.slow
def test_a_run_survives_a_killed_worker_learns_the_planted_signals_and_registers_its_record(
    cohort_60: tuple[Path, Path], tmp_path: Path
) -> None:
    """One run, three behaviours (one training run is the costly part): a worker process
    killed (SIGKILL) after the first checkpoint is replaced and training goes on to the
    last epoch; the model learns what the cohort plants; the run holds its full record."""
    cohort, dataset = cohort_60
    home = tmp_path / "home"
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if list((home / "runs").glob("*/checkpoint_*")):
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    progress: list[dict[str, object]] = []
    summary = run_training(
        _config(EPOCHS, "training.max_failures=1", "model.features=128"),  # type: ignore[arg-type]
        dataset,
        TrainSettings(home=home, workers=1),
        on_progress=progress.append,
    )
    killer.join(timeout=5)
    assert killed, "no train worker was found to kill"
    assert summary.model_name == "eyehub-fundus_demo" and summary.model_version == "1"
    assert summary.epochs == 8  # to the last epoch, across the replaced worker
    assert any("loss" in p for p in progress)
    assert any("val/referable_dr/auroc" in p for p in progress)
    client = mlflow.MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.run_id)
    metrics = run.data.metrics
    for key in (
        "test/referable_dr/auroc",
        "test/referable_dr/auroc/ci_low",
        "test/referable_dr/auroc/ci_high",
        "test/dr_grade/qwk",
        "test/age/mae",
        "test/null_control/auroc",
        "train/loss",
        "split/test/patients",
    ):
        assert key in metrics, key
    assert metrics["test/referable_dr/auroc/ci_low"] <= metrics["test/referable_dr/auroc"] + 1e-9
    history = client.get_metric_history(summary.run_id, "val/referable_dr/auroc")
    assert sorted({m.step for m in history}) == list(range(8))  # every epoch, once done
    learnt = {task: metrics[f"test/{task}/auroc"] for task in QUALITY}
    assert all(learnt[task] >= bar for task, bar in QUALITY.items()), learnt
    assert metrics["test/age/mae"] < AGE_MAE, metrics["test/age/mae"]
    assert CONTROL[0] <= metrics["test/null_control/auroc"] <= CONTROL[1]
    assert run.data.params["primary_task"] == "referable_dr"
    assert run.data.tags["eyehub.dataset_digest"]
    digest = run.data.tags["eyehub.dataset_digest"]
    assert run.inputs.dataset_inputs[0].dataset.digest == digest[:32]

    def artifacts(path: str) -> set[str]:
        return {a.path for a in client.list_artifacts(summary.run_id, path)}

    assert {"plots", "predictions", "config", "evaluation"} <= artifacts("")
    assert "config/resolved.yaml" in artifacts("config")
    plots = {f"plots/referable_dr/{n}.png" for n in ("roc", "pr", "reliability")}
    assert plots <= artifacts("plots/referable_dr")
    assert "plots/dr_grade/confusion.png" in artifacts("plots/dr_grade")
    assert "evaluation/sex.json" in artifacts("evaluation")
    local = Path(client.download_artifacts(summary.run_id, "predictions", str(tmp_path)))
    table = pd.read_parquet(local / "predictions.parquet")
    assert set(table.split) == {"val", "test"}
    assert {"scan_id", "patient_id", "eye", "task", "label", "raw", "calibrated"} <= set(
        table.columns
    )
    test = table[(table.split == "test") & (table.task == "referable_dr")]
    assert test.scan_id.is_unique and len(test) == summary.split.samples["test"]  # type: ignore[union-attr]
    # the registered alias scores a prepared tensor
    model = mlflow.pyfunc.load_model("models:/eyehub-fundus_demo@candidate")
    out = model.predict(np.zeros((2, 3, 128, 128), dtype=np.uint8))
    assert len(out) == 2 and "referable_dr/probability" in out.columns

    # nothing that identifies a patient went to MLflow
    def strings(node: object) -> list[str]:
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    planted = {v for v in strings(json.loads((cohort / "phi.json").read_text()))}
    planted = {v for v in planted if len(v) >= 6}
    blob = (home / "mlflow.db").read_bytes()
    for folder in (home / "mlruns", home / "runs"):
        if folder.exists():
            for f in folder.rglob("*"):
                if f.is_file() and f.stat().st_size < 5_000_000:
                    blob += f.read_bytes()
    found = [v for v in planted if v.encode() in blob]
    assert not found, found


def _train_worker_pids() -> list[int]:
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            pids.append(proc.info["pid"])
    return pids


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_naming_epoch_and_step(
    dataset: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    with pytest.raises(TrainingError, match=r"non-finite at epoch \d+, step \d+"):
        run_training(
            _config("training.epochs=2", "training.lr=1e12", "training.warmup_epochs=0"),  # type: ignore[arg-type]
            dataset,
            TrainSettings(home=home, workers=1),
        )
    client = mlflow.MlflowClient(f"sqlite:///{(home / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("fundus_demo").experiment_id])
    assert runs[0].info.status == "FAILED"


def test_a_dataset_that_leaks_or_lacks_labels_is_refused_before_training(
    dataset: Path, tmp_path: Path
) -> None:
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    catalog["referable_dr"] = pd.NA
    catalog["dr_grade"] = pd.NA
    catalog["age"] = np.nan
    catalog["sex"] = None
    catalog["null_control"] = pd.NA
    catalog.to_parquet(dataset / "catalog.parquet", index=False)
    with pytest.raises(DatasetError, match="missing"):
        run_training(
            _config(),  # type: ignore[arg-type]
            dataset,
            TrainSettings(home=tmp_path / "home", workers=1),
        )
    assert not (tmp_path / "home" / "runs").exists()
