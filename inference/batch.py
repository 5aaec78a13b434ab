"""Batch scoring of an ingested dataset with Ray Data, into a predictions Parquet.

`score_dataset` (the CLI's `eyehub score --dataset`) scores every scan of a dataset that a
model takes, with the model's own recipe, calibration and thresholds:

1. The model is loaded in the driver (`inference.registry.load_model`): its name,
   version, tasks and preprocessing recipe.
2. The dataset is prepared with that recipe when it has not been (`preprocess.run.
   run_preprocess`, the same work as `eyehub preprocess`); a prepared dataset is reused.
3. Ray Data over the prepared index: the gradable samples go through `map_batches` on an
   actor pool of `workers` `Predictor`s (one GPU each on CUDA). An actor reads the
   prepared uint8 tensors from `prepared/<recipe_id>.zarr` by row and calls
   `EyeModel.predict(model_inputs(...))`: what the single-file kernel
   (`inference.score.Scorer`) calls after preparing a DICOM file with the same recipe, so
   a scan of the batch and the same scan sent by a clinician get the same figures. No
   heat maps. Ungradable scans are not sent: they keep the prepared index's reason.
4. The table is written beside its path and renamed into place (readers see the old
   table or the new one); the default path is
   `DATASET/predictions/<model name>-v<version>-<recipe_id>.parquet`.

One row per scan for a fundus or an OCT model. For a fusion model, one row per OCT volume
and the fundus photograph it references (`linked_scan_ids`, as training pairs them),
named by the photograph's `scan_id` with the OCT's in `oct_scan_id` (an OCT that
references no photograph of the dataset is not scored; `BatchSummary.unpaired` counts
them), with age and sex from the dataset's label columns as in training (unknown where
missing).

Columns: `scan_id` (`oct_scan_id`), `patient_id`, `eye`, `modality` (`fusion` for a
pair), `gradable`, `reason`; then per task the model shows (controls are left out, as in
a clinician's result): `<task>/probability` (calibrated; ordinal: of referral; a binary
trait such as sex: of its positive value, with no decision), `<task>/decision`
(`refer`/`routine` at the stored threshold), `<task>/grade` and `<task>/p_grade_<k>`
(ordinal), `<task>/value` (regression, in the label's unit); then `model_name`,
`model_version` (empty for a model directory). An ungradable scan has its reason and no
figures. Rows are sorted by `scan_id`, so a rerun writes the same table.

A scan whose prepared tensor cannot be read is `store_unreadable`; a failure inside the
model is a programming error, marked `internal_error` with its traceback (no message) in
the log, and never stops the batch.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from eyehub.errors import DatasetError, NotFoundError, UsageError
from eyehub.labels import label_spec
from eyehub.reasons import UNGRADABLE_REASONS, check_reason
from models.model import EyeModel, model_inputs

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"
REFER, ROUTINE = "refer", "routine"
# a row's reason is the prepared index's (UNGRADABLE_REASONS), or one of these of that set
_STORE_UNREADABLE = check_reason("store_unreadable", UNGRADABLE_REASONS)
_INTERNAL_ERROR = check_reason("internal_error", UNGRADABLE_REASONS)


@dataclass
class BatchSummary:
    path: Path  # the predictions Parquet
    scans: int  # rows written: scans (fundus, OCT) or fundus+OCT pairs (fusion)
    scored: int
    ungradable: int
    seconds: float
    model_name: str = ""
    model_version: str | None = None
    recipe_id: str = ""
    device: str = "cpu"
    prepared: bool = False  # the dataset was prepared with the model's recipe first
    reasons: dict[str, int] = field(default_factory=dict)  # ungradable rows per reason
    unpaired: int = 0  # fusion: OCT volumes with no linked fundus photograph (not scored)


# -- what a row says about each task --------------------------------------------------------


def figure_columns(model: EyeModel) -> list[str]:
    """The per-task columns of the predictions table, in order (see the module docstring).

    `<task>/decision` is there for a task with a stored threshold; a binary trait (a
    label whose positive value is not "1", e.g. sex) has its probability and no decision,
    as in the single-file result."""
    columns: list[str] = []
    for t in model.tasks:
        spec = label_spec(t.name)
        if spec.control:
            continue
        if t.kind == "regression":
            columns.append(f"{t.name}/value")
            continue
        if t.kind == "ordinal":
            columns.append(f"{t.name}/grade")
            columns += [f"{t.name}/p_grade_{k}" for k in range(t.classes)]
        if t.decides:
            columns.append(f"{t.name}/probability")
            trait = t.kind == "binary" and spec.positive != "1"
            if not trait and t.name in model.thresholds:
                columns.append(f"{t.name}/decision")
    return columns


def task_figures(
    model: EyeModel, predictions: dict[str, dict[str, np.ndarray]], columns: list[str]
) -> np.ndarray:
    """`EyeModel.predict`'s output as a float64 matrix [B, len(columns)]: decisions as 1
    (refer) or 0 (routine), grades as numbers (the driver gives them their types)."""
    n = len(next(iter(next(iter(predictions.values())).values())))
    out = np.full((n, len(columns)), np.nan)
    for j, column in enumerate(columns):
        task, what = column.split("/", 1)
        entry = predictions[task]
        if what == "decision":
            out[:, j] = np.asarray(entry["refer"], dtype=np.float64)
        elif what.startswith("p_grade_"):
            out[:, j] = entry["grades"][:, int(what.removeprefix("p_grade_"))]
        else:
            out[:, j] = np.asarray(entry[what], dtype=np.float64)
    return out


# -- the Ray Data actor ---------------------------------------------------------------------


class Predictor:
    """The Ray Data actor: read a batch's prepared tensors from the Zarr store by row, call
    `EyeModel.predict(model_inputs(...))`, return the figures per sample.

    The model travels as its saved files (`EyeModel.save`'s directory as {name: bytes},
    put in Ray's object store once) and is loaded with `EyeModel.load`, so an actor on
    another node needs no access to the driver's model cache."""

    def __init__(self, model_files: Any, zarr_path: str, device: str) -> None:
        import ray
        import zarr

        if isinstance(model_files, ray.ObjectRef):  # the driver's ray.put of the files
            model_files = ray.get(model_files)
        self.device = torch.device(device)
        with tempfile.TemporaryDirectory(prefix="eyehub-model-") as tmp:
            for name, data in model_files.items():
                (Path(tmp) / name).write_bytes(data)
            self.model = EyeModel.load(Path(tmp), self.device)
        self.columns = figure_columns(self.model)
        root = zarr.open_group(zarr_path, mode="r")
        self.arrays: dict[str, Any] = {m: root[m] for m in ("fundus", "oct") if m in root}

    def _read(self, modality: str, row: int) -> np.ndarray | None:
        if row < 0:
            return None
        return np.asarray(self.arrays[modality][int(row)])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from eyehub.failures import internal_traceback

        keys = np.asarray(batch["key"])
        n = len(keys)
        figures = np.full((n, len(self.columns)), np.nan)
        reasons = [""] * n
        tracebacks = [""] * n
        ok: list[int] = []
        tensors: dict[str, list[np.ndarray]] = {"fundus": [], "oct": []}
        for i in range(n):
            try:
                read = {m: self._read(m, int(batch[f"{m}_row"][i])) for m in ("fundus", "oct")}
            except Exception:  # a damaged or removed chunk: marked, never stops the batch
                reasons[i] = _STORE_UNREADABLE
                continue
            ok.append(i)
            for m, tensor in read.items():
                if tensor is not None:
                    tensors[m].append(tensor)
        if ok:
            try:
                spec = self.model.spec
                ages = [None if np.isnan(a) else float(a) for a in batch["age"][ok]]
                sexes = [str(s) or None for s in batch["sex"][ok]]
                inputs = model_inputs(
                    spec,
                    fundus=np.stack(tensors["fundus"]) if tensors["fundus"] else None,
                    oct=np.stack(tensors["oct"]) if tensors["oct"] else None,
                    age=ages,
                    sex=sexes,
                    device=self.device,
                )
                figures[ok] = task_figures(self.model, self.model.predict(inputs), self.columns)
            except Exception as exc:  # a programming error: marked, traceback to the log
                trace = internal_traceback(exc)
                for i in ok:
                    reasons[i], tracebacks[i] = _INTERNAL_ERROR, trace
        return {
            "key": keys,
            "figures": figures,
            "reason": np.array(reasons),
            "traceback": np.array(tracebacks),
        }


# -- the driver -----------------------------------------------------------------------------


def _samples(model: EyeModel, index: pd.DataFrame, name: str) -> tuple[pd.DataFrame, int]:
    """What the model scores, one row each: `scan_id` (`oct_scan_id`), `patient_id`,
    `eye`, `modality`, `gradable`, `reason`, the prepared rows (`fundus_row`, `oct_row`,
    -1 when not read), `age` and `sex`; and the number of OCT volumes a fusion model
    could not pair."""
    kind = model.spec.input
    base = ["scan_id", "patient_id", "eye", "modality", "gradable", "reason"]
    age = label_spec("age").encode(index["age"]) if "age" in index else np.full(len(index), np.nan)
    sex = (
        ["" if pd.isna(v) else str(v) for v in index["sex"].astype(object)]
        if "sex" in index
        else [""] * len(index)
    )
    index = index.assign(age_=age, sex_=sex)
    if kind in ("fundus", "oct"):
        chosen = index[index.modality == kind]
        rows = chosen["row"].astype("int64")
        samples = chosen[base].assign(
            fundus_row=rows if kind == "fundus" else -1,
            oct_row=rows if kind == "oct" else -1,
            age=chosen["age_"],
            sex=chosen["sex_"],
        )
        return samples.reset_index(drop=True), 0
    fundus = index[index.modality == "fundus"].set_index("scan_id")
    pairs = []
    unpaired = 0
    for r in index[index.modality == "oct"].itertuples():
        refs = r.linked_scan_ids if r.linked_scan_ids is not None else []
        linked = [s for s in refs if s in fundus.index]
        if not linked:
            unpaired += 1
            continue
        f = fundus.loc[linked[0]]
        gradable = bool(f["gradable"]) and bool(r.gradable)
        # the photograph's reason first, as the single-file kernel reports an exam
        reason = None if gradable else (f["reason"] if not f["gradable"] else r.reason)
        pairs.append(
            {
                "scan_id": linked[0],
                "oct_scan_id": r.scan_id,
                "patient_id": r.patient_id,
                "eye": r.eye,
                "modality": "fusion",
                "gradable": gradable,
                "reason": reason,
                "fundus_row": int(f["row"]),
                "oct_row": int(r.row),
                "age": r.age_,  # the OCT's labels, as training takes them
                "sex": r.sex_,
            }
        )
    if not pairs:
        raise DatasetError(
            f"this fusion model ({name}) scores an OCT volume "
            "with the fundus photograph it references (same eye and visit); this dataset "
            "has no such pair"
        )
    return pd.DataFrame.from_records(pairs), unpaired


def _kind_words(kind: str) -> str:
    return {"fundus": "fundus photographs", "oct": "OCT volumes"}.get(
        kind, "fundus photographs and OCT volumes"
    )


def _model_files(model: EyeModel) -> dict[str, bytes]:
    """The model's saved directory as {file name: bytes} (what the actors load)."""
    with tempfile.TemporaryDirectory(prefix="eyehub-model-") as tmp:
        folder = model.save(Path(tmp) / "model")
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _pool_size(ray: Any, workers: int, device: str) -> int:
    """`workers` actors; on CUDA one GPU each, so no more than the cluster has GPUs (an
    actor waiting for a GPU that does not exist would never start)."""
    if device != "cuda":
        return workers
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise UsageError("--device cuda: the Ray cluster has no GPU; use --device cpu")
    if workers > gpus:
        log.info("%d actors asked for, %d GPU(s): scoring with %d", workers, gpus, gpus)
    return min(workers, gpus)


def default_output(dataset: Path, name: str, version: str | None, rid: str) -> Path:
    """`DATASET/predictions/<model name>-v<version>-<recipe_id>.parquet` (a model directory,
    which has no version: `<name>-<recipe_id>.parquet`)."""
    stem = f"{name}-v{version}" if version else name
    return dataset / PREDICTIONS / f"{stem}-{rid}.parquet"


def score_dataset(
    dataset: Path,
    model: str,
    *,
    tracking_uri: str,
    cache: Path,
    out: Path | None = None,
    workers: int = 2,
    batch_size: int = 16,
    device: str = "auto",
    ray_address: str | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    on_prepare_progress: Callable[[int, int], None] | None = None,
) -> BatchSummary:
    """Score every scan of `dataset` with the model `model` names; see the module docstring.

    `model` is a registered model (`models:/eyehub-<name>@<alias>` or `.../<version>`,
    downloaded into `cache`) or a model directory; `out` the Parquet file to write (an
    existing directory: the default file name in it). Ray starts locally with `workers` CPUs
    when `ray_address` is None and no Ray is running, and is shut down at the end;
    `on_progress(done, total)` counts rows, `on_note` gets a line when the dataset is
    prepared first (with `on_prepare_progress(done, total)` for that step)."""
    from eyehub.compute import start_ray
    from eyehub.storage import atomic_path
    from inference.registry import load_model
    from ingest.catalog import CATALOG
    from preprocess.run import PREPARED, resolve_device

    start = time.perf_counter()
    note = on_note or (lambda text: log.info("%s", text))
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise NotFoundError(f"no dataset at {dataset}: give the directory `eyehub ingest` wrote")
    if not (dataset / CATALOG).is_file():
        raise DatasetError(f"{dataset} has no {CATALOG}: run `eyehub ingest` first")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {workers})")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    device = resolve_device(device)
    loaded = load_model(model, tracking_uri, cache)
    eye_model = loaded.model
    rid = eye_model.recipe_id
    kind = eye_model.spec.input
    catalog = pd.read_parquet(dataset / CATALOG)
    if catalog.empty:
        raise DatasetError(f"the dataset {dataset} has no scans: nothing to score")
    wanted = {"fundus", "oct"} if kind == "fusion" else {kind}
    missing = sorted(wanted - set(catalog.modality))
    if missing:
        raise DatasetError(
            f"the model {loaded.name} scores {_kind_words(kind)}; the dataset {dataset} "
            f"has no {' and no '.join(_kind_words(m) for m in missing)}"
        )
    path = default_output(dataset, loaded.name, loaded.version, rid)
    if out is not None:  # a file, or a directory to write the default name into
        path = out / path.name if out.is_dir() else out
    columns = figure_columns(eye_model)
    summary = BatchSummary(path, 0, 0, 0, 0.0, loaded.name, loaded.version, rid, device)

    import ray

    from preprocess.run import prepare_if_needed

    started = start_ray(workers, ray_address)
    try:
        index, summary.prepared = prepare_if_needed(
            dataset,
            eye_model.recipe,
            catalog.scan_id,
            note,
            device,
            workers,
            ray_address,
            batch_size,
            on_prepare_progress,
        )
        index = index[index.scan_id.isin(catalog.scan_id)]
        samples, summary.unpaired = _samples(eye_model, index, loaded.name)
        figures = np.full((len(samples), len(columns)), np.nan)
        reasons = samples["reason"].astype(object).where(~samples.gradable, None).to_numpy()
        gradable = samples.gradable.astype(bool).to_numpy()
        total = len(samples)
        todo = np.flatnonzero(gradable)
        done = total - len(todo)
        if on_progress:
            on_progress(done, total)
        if len(todo):
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            items = [
                {
                    "key": int(i),
                    "fundus_row": int(samples.fundus_row.iat[i]),
                    "oct_row": int(samples.oct_row.iat[i]),
                    "age": float(samples.age.iat[i]),
                    "sex": str(samples.sex.iat[i]),
                }
                for i in todo
            ]
            actors = _pool_size(ray, workers, device)
            blocks = max(1, min(len(items), math.ceil(len(items) / batch_size)))
            ds = ray.data.from_items(items, override_num_blocks=blocks)
            predicted = ds.map_batches(
                Predictor,
                fn_constructor_kwargs={
                    "model_files": ray.put(_model_files(eye_model)),
                    "zarr_path": str(dataset / PREPARED / f"{rid}.zarr"),
                    "device": device,
                },
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_gpus=1 if device == "cuda" else 0,
                num_cpus=1,
            )
            # No prefetching: Ray Data's prefetcher thread can still be in ray.wait when the
            # iteration ends, and a Ray call after ray.shutdown starts a new Ray that
            # kills the process a minute later. Unprefetched, the thread never calls Ray
            # (it stays parked: one idle daemon thread per call, a Ray Data leak).
            for batch in predicted.iter_batches(batch_size=None, prefetch_batches=0):
                keys = np.asarray(batch["key"], dtype=np.int64)
                figures[keys] = np.asarray(batch["figures"], dtype=np.float64).reshape(
                    len(keys), len(columns)
                )
                for key, reason, trace in zip(
                    keys, batch["reason"], batch["traceback"], strict=True
                ):
                    if reason:
                        gradable[key], reasons[key] = False, str(reason)
                        figures[key] = np.nan
                    if trace:
                        log.error(
                            "internal error scoring scan %s:\n%s", samples.scan_id.iat[key], trace
                        )
                done += len(keys)
                if on_progress:
                    on_progress(done, total)
    finally:
        if started:
            ray.shutdown()

    table = _table(samples, gradable, reasons, figures, columns, loaded.name, loaded.version)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    summary.scans = len(table)
    summary.scored = int(table.gradable.sum())
    summary.ungradable = summary.scans - summary.scored
    counts = table.loc[~table.gradable, "reason"].value_counts()
    summary.reasons = {str(k): int(v) for k, v in counts.items()}
    summary.seconds = time.perf_counter() - start
    log.info(
        "scored %d of %d %s with %s (version %s) in %.1f s: %s",
        summary.scored,
        summary.scans,
        "pairs" if kind == "fusion" else "scans",
        loaded.name,
        loaded.version,
        summary.seconds,
        path,
    )
    return summary


def _table(
    samples: pd.DataFrame,
    gradable: np.ndarray,
    reasons: np.ndarray,
    figures: np.ndarray,
    columns: list[str],
    name: str,
    version: str | None,
) -> pd.DataFrame:
    """The predictions table (see the module docstring), sorted by scan_id."""
    keep = ["scan_id", "oct_scan_id"] if "oct_scan_id" in samples else ["scan_id"]
    table = samples[[*keep, "patient_id", "eye", "modality"]].reset_index(drop=True)
    table = table.astype(object).astype("string")
    table["gradable"] = gradable
    table["reason"] = pd.array([r if isinstance(r, str) and r else None for r in reasons], "string")
    figures = np.where(gradable[:, None], figures, np.nan)
    for j, column in enumerate(columns):
        values = figures[:, j]
        if column.endswith("/decision"):
            words = [None if np.isnan(v) else (REFER if v >= 0.5 else ROUTINE) for v in values]
            table[column] = pd.array(words, dtype="string")
        elif column.endswith("/grade"):
            table[column] = pd.array(
                [None if np.isnan(v) else int(v) for v in values], dtype="Int64"
            )
        else:
            table[column] = values
    table["model_name"] = pd.array([name] * len(table), dtype="string")
    table["model_version"] = pd.array([version] * len(table), dtype="string")
    return table.sort_values(keep, kind="stable").reset_index(drop=True)
