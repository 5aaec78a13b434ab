"""`eyehub train`: from an ingested dataset to a registered model, on Ray Train, in MLflow.

1. Resolve the config; prepare the dataset with the config's recipe when it has not been
   (the same work as `eyehub preprocess`).
2. Build the samples, split them by patient and run every check before a worker starts.
3. Open the MLflow run (an experiment per config; the same run again on resume), log the
   resolved config, the dataset with the catalog's digest, and the split.
4. Train with Ray Train's TorchTrainer (`training.loop.train_loop`), checkpointing every
   epoch under `EYEHUB_HOME/runs/<run name>`; the same command after a crash resumes there.
5. On the best epoch's weights: calibrate on validation, evaluate on test
   (`training.report`), log metrics, plots, predictions and the model, register it as
   `eyehub-<config name>` with alias `candidate`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eyehub.errors import DatasetError, EyehubError, NotFoundError, UsageError
from eyehub.labels import label_spec
from eyehub.storage import write_text_atomic
from ingest.catalog import CATALOG
from preprocess.recipe import recipe_id
from training.config import TrainConfig
from training.data import SampleArrays
from training.loop import NONFINITE
from training.splits import SplitReport, samples_for, split_samples

log = logging.getLogger(__name__)

RUNS = "runs"
RUN_STATE = "eyehub-run.json"


class TrainingError(EyehubError, RuntimeError):
    """Training stopped (a non-finite loss, workers that kept failing)."""

    exit_code = 1


@dataclass
class TrainSettings:
    """How and where to train (not part of the model: does not change the run's name)."""

    home: Path
    workers: int = 1
    cpus_per_worker: int | None = None  # default: this machine's CPUs shared by the workers
    gpus_per_worker: float = 0.0
    ray_address: str | None = None
    tracking_uri: str | None = None
    resume: bool | None = None  # None: resume an unfinished run, else start a new one
    loader_workers: int = 0


@dataclass
class TrainSummary:
    run_name: str
    run_id: str
    experiment: str
    tracking_uri: str
    epochs: int = 0
    best_epoch: int = -1
    resumed_from: int | None = None
    model_name: str = ""
    model_version: str = ""
    model_dir: Path | None = None
    split: SplitReport | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def catalog_digest(dataset: Path) -> str:
    """SHA-256 of catalog.parquet: names the data a run saw (for mlflow.data)."""
    with open(dataset / CATALOG, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def config_digest(config: TrainConfig) -> str:
    body = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:10]


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list | tuple) and data and isinstance(data[0], dict):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = json.dumps(data) if not isinstance(data, str) else data
    return out


def ensure_prepared(
    dataset: Path, config: TrainConfig, settings: TrainSettings, on_note: Callable[[str], None]
) -> pd.DataFrame:
    """The prepared index for the config's recipe, preparing the dataset first if needed."""
    from preprocess.run import prepare_if_needed

    if not (dataset / CATALOG).is_file():
        raise DatasetError(f"{dataset} has no {CATALOG}: run `eyehub ingest` first")
    catalog = pd.read_parquet(dataset / CATALOG)
    index, _ = prepare_if_needed(
        dataset,
        config.preprocess,
        catalog.scan_id,
        on_note,
        workers=settings.workers,
        ray_address=settings.ray_address,
    )
    subgroup = catalog[["scan_id", "manufacturer", "model"]]
    return index.merge(subgroup, on="scan_id", how="left")


def resolve_regression(config: TrainConfig, train: pd.DataFrame) -> TrainConfig:
    """Regression tasks standardised with the training split's mean and SD."""
    tasks = []
    for t in config.model.tasks:
        if t.kind == "regression" and t.mean == 0.0 and t.std == 1.0:
            y = label_spec(t.name).encode(train[t.name])
            y = y[~np.isnan(y)]
            t = t.model_copy(update={"mean": float(y.mean()), "std": float(max(y.std(), 1e-6))})
        tasks.append(t)
    model = config.model.model_copy(update={"tasks": tuple(tasks)})
    return config.model_copy(update={"model": model})


def _run_dir(settings: TrainSettings, config: TrainConfig, dataset: Path) -> tuple[str, Path]:
    """The run's name and directory: the same config on the same data resumes the same
    run; `--new-run` (or a finished run) takes the next free name."""
    base = f"{config.name}-{config_digest(config)}-{catalog_digest(dataset)[:8]}"
    root = (settings.home / RUNS).resolve()
    n = 1
    while True:
        name = base if n == 1 else f"{base}-{n}"
        folder = root / name
        state = _read_state(folder)
        if state is None:
            return name, folder
        if settings.resume is True or (settings.resume is None and state["status"] != "finished"):
            return name, folder
        n += 1


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((folder / RUN_STATE).read_text(encoding="utf-8"))
        return data
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_state(folder: Path, **values: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = _read_state(folder) or {}
    state.update(values)
    write_text_atomic(folder / RUN_STATE, json.dumps(state, indent=1))


def run_training(
    config: TrainConfig,
    dataset: Path,
    settings: TrainSettings,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> TrainSummary:
    """Train, evaluate and register; see the module docstring."""
    import mlflow

    from eyehub.compute import start_ray

    note = on_note or (lambda text: log.info("%s", text))
    start = time.perf_counter()
    if settings.workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {settings.workers})")
    dataset = dataset.resolve()
    if not (dataset / CATALOG).is_file():
        raise DatasetError(f"{dataset} has no {CATALOG}: run `eyehub ingest` first")
    check_catalog_labels(config, dataset)
    config = resolve_pretrained(config)
    index = ensure_prepared(dataset, config, settings, note)
    samples, report = split_samples(config, samples_for(config, index))
    config = resolve_regression(config, samples[samples.split == "train"])
    name, folder = _run_dir(settings, config, dataset)
    tracking_uri = settings.tracking_uri or (f"sqlite:///{(settings.home / 'mlflow.db').resolve()}")
    mlflow.set_tracking_uri(tracking_uri)
    experiment = _experiment(config.name, None if settings.tracking_uri else settings.home)
    state = _read_state(folder)
    resumed = state is not None and state.get("run_id")
    if resumed:
        run = mlflow.start_run(run_id=state["run_id"])  # type: ignore[index]
        note(f"resuming run {name} (MLflow run {run.info.run_id})")
    else:
        run = mlflow.start_run(run_name=name, log_system_metrics=True)
        _write_state(folder, run_id=run.info.run_id, status="running", dataset=str(dataset))
        _log_start(config, dataset, samples, report, folder)
    summary = TrainSummary(
        name,
        run.info.run_id,
        experiment.name,
        tracking_uri,
        split=report,
    )
    (folder / NONFINITE).unlink(missing_ok=True)
    try:
        started_ray = start_ray(os.cpu_count() or 2, settings.ray_address)
        try:
            result = _fit(
                config,
                dataset,
                samples,
                settings,
                name,
                folder,
                run.info.run_id,
                tracking_uri,
                on_progress,
            )
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        marker = folder / NONFINITE
        if marker.is_file():
            stopped = json.loads(marker.read_text(encoding="utf-8"))
            epoch, step = stopped["epoch"], stopped["step"]
            raise TrainingError(
                f"the loss became non-finite at epoch {int(epoch) + 1}, step {int(step) + 1}; "
                "the last good checkpoint is kept in "
                f"{folder}. Lower training.lr or set training.grad_clip, then run with --new-run"
            )
        from training.finish import finish_run

        finish_run(config, dataset, samples, result, summary, folder)
        _write_state(folder, status="finished")
        mlflow.end_run("FINISHED")
    except BaseException as exc:
        failed = not isinstance(exc, KeyboardInterrupt)
        mlflow.set_tag("eyehub.failure", type(exc).__name__)
        mlflow.end_run("FAILED" if failed else "KILLED")
        _write_state(folder, status="failed" if failed else "interrupted")
        raise
    summary.seconds = time.perf_counter() - start
    return summary


def _experiment(name: str, home: Path | None) -> Any:
    """The config's experiment; on the default local store its artifacts live under
    EYEHUB_HOME/artifacts (not ./mlruns of wherever the command ran)."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is None:
        location = (home / "artifacts").resolve().as_uri() if home is not None else None
        mlflow.create_experiment(name, artifact_location=location)
    return mlflow.set_experiment(name)


def resolve_pretrained(config: TrainConfig) -> TrainConfig:
    """Pretrained files made absolute (workers run in their own directories) and checked
    before anything is prepared or started. eyehub downloads no weights."""
    updates: dict[str, Path] = {}
    for key in ("pretrained", "oct_pretrained"):
        path = getattr(config.model, key)
        if path is None:
            continue
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise NotFoundError(
                f"model.{key}: no checkpoint at {path}. eyehub downloads no weights: put the "
                f"file there or pass --set model.{key}=PATH (docs/training.md says where "
                "RETFound's weights come from)"
            )
        updates[key] = path
    if not updates:
        return config
    return config.model_copy(update={"model": config.model.model_copy(update=updates)})


def check_catalog_labels(config: TrainConfig, dataset: Path) -> None:
    """Before anything is prepared: every task is a column of the catalog with labels."""
    catalog = pd.read_parquet(dataset / CATALOG)
    missing = [t.name for t in config.model.tasks if t.name not in catalog.columns]
    if missing:
        raise DatasetError(
            f"model.tasks: {', '.join(repr(m) for m in missing)} not in the dataset's catalog; "
            "ingest the labels file (--labels) or remove the task(s)"
        )
    empty = [t.name for t in config.model.tasks if not catalog[t.name].notna().any()]
    if len(empty) == len(config.model.tasks):
        raise DatasetError(
            "every label of the configured tasks is missing in this dataset: ingest it with "
            "--labels, or choose tasks that have labels"
        )
    if empty:
        raise DatasetError(
            f"model.tasks: {', '.join(repr(e) for e in empty)} has no label in this dataset; "
            "remove the task(s) or ingest their labels"
        )


def _log_start(
    config: TrainConfig, dataset: Path, samples: pd.DataFrame, report: SplitReport, folder: Path
) -> None:
    import mlflow
    import yaml

    params = flatten(config.to_dict())
    mlflow.log_params({k: v[:6000] for k, v in params.items()})
    mlflow.log_text(yaml.safe_dump(config.to_dict(), sort_keys=False), "config/resolved.yaml")
    digest = catalog_digest(dataset)
    columns = ["scan_id", "patient_id", "eye", "split"]
    table = samples[columns].astype(str)
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(  # type: ignore[attr-defined]
            table, source=str(dataset / CATALOG), name=dataset.name, digest=digest[:32]
        )
    mlflow.log_input(ds, context="training")
    mlflow.set_tags(
        {
            "eyehub.dataset_digest": digest,
            "eyehub.recipe_id": recipe_id(config.preprocess),
            "eyehub.run_dir": str(folder),
            "eyehub.primary_task": config.primary_task,
        }
    )
    for split in ("train", "val", "test"):
        mlflow.log_metrics(
            {
                f"split/{split}/patients": report.patients[split],
                f"split/{split}/samples": report.samples[split],
                f"split/{split}/ungradable": report.ungradable[split],
            }
        )


def _fit(
    config: TrainConfig,
    dataset: Path,
    samples: pd.DataFrame,
    settings: TrainSettings,
    name: str,
    folder: Path,
    run_id: str,
    tracking_uri: str,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from preprocess.run import PREPARED

    tasks = [t.name for t in config.model.tasks]
    queue = Queue() if on_progress is not None else None
    loop_config = {
        "spec": config.model.to_dict(),
        "recipe": config.preprocess.to_dict(),
        "training": config.training.to_dict(),
        "augmentation": [a.to_dict() for a in config.augmentation],
        "early_stopping_metric": config.early_stopping_metric,
        "early_stopping_mode": config.early_stopping_mode,
        "zarr": str(dataset / PREPARED / f"{recipe_id(config.preprocess)}.zarr"),
        "train": SampleArrays.from_frame(samples[samples.split == "train"], tasks).to_dict(),
        "val": SampleArrays.from_frame(samples[samples.split == "val"], tasks).to_dict(),
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "progress": queue,
        "loader_workers": settings.loader_workers,
        "run_dir": str(folder),
    }
    from training.loop import train_loop

    cpus = settings.cpus_per_worker or max(1, (os.cpu_count() or 1) // settings.workers)
    resources: dict[str, float] = {"CPU": cpus}
    if settings.gpus_per_worker > 0:
        resources["GPU"] = settings.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(folder.parent),
            failure_config=ray.train.FailureConfig(max_failures=config.training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.training.checkpoints_kept
            ),
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # surfaced in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="eyehub-train", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
        while queue is not None and on_progress is not None:
            try:
                on_progress(queue.get_nowait())
            except Empty:
                break
    if "error" in outcome:
        exc = outcome["error"]
        raise TrainingError(
            f"training failed ({type(exc).__name__}); the workers' output is in the run "
            f"directory {folder} and the log file"
        ) from exc
    return outcome["result"]
