"""`eyehub compare`: tracked runs side by side, with paired tests on their shared samples.

A run is named by its MLflow run id, by a registered version (`models:/eyehub-x/3`) or by
an alias (`models:/eyehub-x@champion`; a version's run is its tag `eyehub.run_id`). Each
run's own record is read from the tracking store: the test rows of
`predictions/predictions.parquet`, `config/resolved.yaml` and the tag
`eyehub.dataset_digest` (`training.run` and `training.finish` log them).

What the comparison holds (`compare_runs` -> `Comparison`, one JSON-able `content` dict
plus PNG figures; `render_html`, `render_markdown` and `render_json` write the same content):

- the runs, and where their resolved configs differ;
- the datasets' digests, with a warning when they differ, and per task the samples the
  runs share, with a warning when the test sets differ. Everything below is measured on
  the samples *every* run was tested on (matched by `scan_id`; a shared sample whose label
  or patient differs between the runs is left out and counted);
- per task, each run's metrics with patient-bootstrap intervals (`training.evaluate`);
- for each pair of runs (B - A, B listed after A), the difference of every metric with a
  paired bootstrap over patients (`training.evaluate.compare_models`) and, for AUROCs,
  DeLong's test (`training.evaluate.delong_auroc`, which takes eyes as independent);
- ROC and reliability curves of all runs overlaid (regression: predictions vs labels);
- the subgroup table side by side (sex, age band, site), with the pairwise difference of
  the task's main metric in each subgroup large enough to measure, marked where p < 0.05.

The report holds counts only: no scan or patient pseudonym.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import importlib.resources
import itertools
import json
import logging
import math
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from eyehub.errors import DatasetError, NotFoundError, UsageError
from training.evaluate import (
    EvaluationSettings,
    TaskReport,
    compare_models,
    delong_auroc,
    evaluate_task,
    figure_png,
    subgroup_values,
    unit_axes,
)
from training.run import flatten

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

SCHEMA = "eyehub.compare/1"
PREDICTIONS = "predictions/predictions.parquet"
CONFIG = "config/resolved.yaml"
DIGEST_TAG = "eyehub.dataset_digest"
RUN_TAG = "eyehub.run_id"
PRIMARY_TAG = "eyehub.primary_task"
ALPHA = 0.05  # a difference is marked significant below this p-value
FORMATS = ("html", "md", "json")

# the metric that stands for a task (training.config.MAIN_METRIC) and the metrics compared
MAIN_METRIC = {"binary": "auroc", "ordinal": "qwk", "regression": "mae"}
COMPARED = {
    "binary": ("auroc", "auprc", "sensitivity", "specificity", "ece", "brier"),
    "ordinal": ("qwk", "accuracy", "referral_auroc"),
    "regression": ("mae", "r2"),
}
LOWER_IS_BETTER = frozenset({"ece", "ece_uncalibrated", "brier", "mae"})
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


# -- the runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A task as evaluation reads it (`training.evaluate.TaskLike`)."""

    name: str
    kind: str
    classes: int = 0
    refer_from: int | None = None


@dataclass
class RunRecord:
    """One tracked run and what a comparison reads of it."""

    label: str  # A, B, C ... in the order given
    reference: str  # as the user named it
    run_id: str
    run_name: str
    experiment: str
    model_name: str | None
    model_version: str | None
    aliases: list[str]
    config: dict[str, Any]
    dataset_digest: str | None
    recipe_id: str | None
    primary_task: str | None
    tasks: dict[str, Task]
    test: pd.DataFrame  # the test rows of predictions.parquet
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    val: pd.DataFrame | None = None  # the validation rows

    @property
    def title(self) -> str:
        if self.model_name is not None:
            aliases = f" @{', @'.join(self.aliases)}" if self.aliases else ""
            return f"{self.model_name} v{self.model_version}{aliases}"
        return self.run_name or self.run_id[:12]

    def describe(self) -> dict[str, Any]:
        primary = self.test[self.test["task"] == self.primary_task] if self.primary_task else None
        return {
            "label": self.label,
            "reference": self.reference,
            "title": self.title,
            "run_id": self.run_id,
            "run_name": self.run_name,
            "experiment": self.experiment,
            "model": None
            if self.model_name is None
            else {"name": self.model_name, "version": self.model_version, "aliases": self.aliases},
            "config_name": self.config.get("name"),
            "dataset_digest": self.dataset_digest,
            "recipe_id": self.recipe_id,
            "primary_task": self.primary_task,
            "test_samples": None if primary is None else len(primary),
            "test_patients": None if primary is None else int(primary["patient_id"].nunique()),
        }


def client_for(tracking_uri: str) -> Any:
    """An MLflow client of the tracking store."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def resolve_reference(client: Any, text: str) -> tuple[str, Any | None]:
    """The run id a reference names, and the registered version it went through (or None)."""
    from mlflow.exceptions import MlflowException

    from inference.registry import parse_model_ref

    text = text.strip()
    if text.startswith("models:/"):
        ref = parse_model_ref(text)
        what = f"alias @{ref.alias}" if ref.alias else f"version {ref.version}"
        try:
            if ref.alias is not None:
                mv = client.get_model_version_by_alias(ref.name, ref.alias)
            else:
                mv = client.get_model_version(ref.name, str(ref.version))
        except MlflowException:
            raise NotFoundError(
                f"no registered model {ref.name!r} with {what} in the tracking store"
            ) from None
        run_id = (mv.tags or {}).get(RUN_TAG) or mv.run_id
        if not run_id:
            raise DatasetError(f"{text} has no run (neither the tag {RUN_TAG} nor a run id)")
        return str(run_id), mv
    if not _RUN_ID.match(text):
        raise UsageError(
            f"{text!r} is neither an MLflow run id (32 hex digits) nor a model reference "
            "(models:/eyehub-<name>/<version> or models:/eyehub-<name>@<alias>)"
        )
    return text, None


def load_run(client: Any, reference: str, label: str = "A") -> RunRecord:
    """A run's record for comparison (see the module docstring)."""
    import yaml
    from mlflow.exceptions import MlflowException

    run_id, mv = resolve_reference(client, reference)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise NotFoundError(f"no MLflow run {run_id} in the tracking store") from None
    try:
        experiment = client.get_experiment(run.info.experiment_id).name
    except MlflowException:
        experiment = str(run.info.experiment_id)
    tags = dict(run.data.tags)
    with tempfile.TemporaryDirectory(prefix="eyehub-compare-") as tmp:
        try:
            table = client.download_artifacts(run_id, PREDICTIONS, tmp)
            predictions = pd.read_parquet(table)
        except Exception as exc:  # MLflow's and the artifact store's errors alike
            raise DatasetError(
                f"run {run_id} ({reference}) has no {PREDICTIONS}: only a finished "
                f"`eyehub train` run can be compared ({type(exc).__name__})"
            ) from None
        try:
            text = Path(client.download_artifacts(run_id, CONFIG, tmp)).read_text("utf-8")
            config: dict[str, Any] = yaml.safe_load(text) or {}
        except Exception:  # compared without its config (nothing to diff)
            log.warning("run %s has no %s; its config is not compared", run_id, CONFIG)
            config = {}
    for column in ("task", "split", "scan_id", "patient_id", "label"):
        if column not in predictions.columns:
            raise DatasetError(f"run {run_id}: {PREDICTIONS} has no {column!r} column")
    test = predictions[predictions["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise DatasetError(f"run {run_id}: {PREDICTIONS} has no test rows")
    primary = (mv.tags or {}).get(PRIMARY_TAG) if mv is not None else None
    primary = primary or tags.get(PRIMARY_TAG) or config.get("primary_task")
    digest = tags.get(DIGEST_TAG)
    if digest is None:
        inputs = getattr(run, "inputs", None)
        found = [d.dataset.digest for d in getattr(inputs, "dataset_inputs", None) or []]
        digest = found[0] if found else None
    return RunRecord(
        label=label,
        reference=reference,
        run_id=run_id,
        run_name=run.info.run_name or "",
        experiment=experiment,
        model_name=None if mv is None else mv.name,
        model_version=None if mv is None else str(mv.version),
        aliases=[] if mv is None else sorted(getattr(mv, "aliases", []) or []),
        config=config,
        dataset_digest=digest,
        recipe_id=tags.get("eyehub.recipe_id"),
        primary_task=primary,
        tasks=_tasks(config, test),
        test=test,
        metrics=dict(run.data.metrics),
        tags=tags,
        val=predictions[predictions["split"] == "val"].reset_index(drop=True),
    )


def _tasks(config: Mapping[str, Any], test: pd.DataFrame) -> dict[str, Task]:
    """The run's tasks from its resolved config, else from the label registry."""
    from eyehub.labels import label_spec

    entries = (config.get("model") or {}).get("tasks") or []
    out: dict[str, Task] = {}
    for entry in entries:
        if isinstance(entry, Mapping) and "name" in entry and "kind" in entry:
            out[str(entry["name"])] = Task(
                name=str(entry["name"]),
                kind=str(entry["kind"]),
                classes=int(entry.get("classes") or 0),
                refer_from=entry.get("refer_from"),
            )
    for name in pd.unique(test["task"]):
        if name not in out:
            spec = label_spec(str(name))
            out[str(name)] = Task(str(name), spec.kind, int(spec.classes or 0), None)
    return {name: task for name, task in out.items() if name in set(test["task"])}


def config_differences(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """The resolved-config keys whose values are not the same in every run."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat))
    out = []
    for key in keys:
        values = [f.get(key) for f in flat]
        if len(set(values)) > 1:
            out.append(
                {"key": key, "values": {r.label: v for r, v in zip(runs, values, strict=True)}}
            )
    return out


# -- the shared samples ----------------------------------------------------------------------


@dataclass
class SharedSamples:
    """The rows of one task that every run was tested on, per run, in the same order."""

    frames: dict[str, pd.DataFrame]  # run label -> rows sorted by scan_id
    shared: int
    shared_patients: int
    only: dict[str, int]  # run label -> samples only that run (of these runs) was tested on
    disagreeing: int  # shared samples left out: their label or patient differs between runs

    def to_dict(self) -> dict[str, Any]:
        return {
            "shared": self.shared,
            "shared_patients": self.shared_patients,
            "only": dict(self.only),
            "disagreeing": self.disagreeing,
            "same": not any(self.only.values()) and not self.disagreeing,
        }


def shared_samples(task: str, frames: Mapping[str, pd.DataFrame]) -> SharedSamples:
    """Each run's rows of `task` restricted to the samples every run has, with the same
    label and patient in each (`frames`: run label -> that run's test rows of the task)."""
    ids = {label: set(frame["scan_id"]) for label, frame in frames.items()}
    for label, frame in frames.items():
        if frame["scan_id"].duplicated().any():
            raise DatasetError(f"run {label}: task {task!r} has a scan_id twice in its test rows")
    common = set.intersection(*ids.values()) if ids else set()
    indexed = {
        label: frame[frame["scan_id"].isin(common)].set_index("scan_id").sort_index()
        for label, frame in frames.items()
    }
    keep = pd.Series(True, index=sorted(common))
    first = next(iter(indexed.values()), None)
    if first is not None:
        label_a = pd.to_numeric(first["label"], errors="coerce")
        for other in indexed.values():
            label_b = pd.to_numeric(other["label"], errors="coerce")
            same_label = (label_a == label_b) | (label_a.isna() & label_b.isna())
            same_patient = first["patient_id"].astype(str) == other["patient_id"].astype(str)
            keep &= (same_label & same_patient).reindex(keep.index, fill_value=False)
    kept = keep.index[keep.to_numpy()]
    out = {
        label: frame.loc[kept].reset_index().loc[:, list(frames[label].columns)]
        for label, frame in indexed.items()
    }
    patients = 0 if first is None else int(first.loc[kept, "patient_id"].nunique())
    return SharedSamples(
        frames=out,
        shared=len(kept),
        shared_patients=patients,
        only={label: len(ids[label] - common) for label in frames},
        disagreeing=len(common) - len(kept),
    )


# -- the comparison --------------------------------------------------------------------------


@dataclass
class Comparison:
    """The comparison's content (JSON-able) and its figures (task -> name -> PNG bytes)."""

    content: dict[str, Any]
    figures: dict[str, dict[str, bytes]] = field(default_factory=dict)


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def evaluation_settings(config: Mapping[str, Any], bootstrap: int | None) -> EvaluationSettings:
    """The first run's evaluation settings (group sizes, age bands, CI), `bootstrap`
    resamples, subgroups left to what the predictions hold."""
    section = dict(config.get("evaluation") or {})
    values = {k: v for k, v in section.items() if k in EvaluationSettings.model_fields}
    values.pop("subgroups", None)  # default: groups whose columns are there
    if bootstrap is not None:
        values["bootstrap"] = bootstrap
    return EvaluationSettings.from_dict(values)


def compare_runs(
    references: Sequence[str],
    tracking_uri: str,
    tasks: Sequence[str] | None = None,
    bootstrap: int | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Comparison:
    """Compare two or more tracked runs (see the module docstring)."""
    if len(references) < 2:
        raise UsageError("compare needs at least two runs")
    if len(references) > 26:
        raise UsageError("compare takes at most 26 runs")
    note = on_note or (lambda text: log.info("%s", text))
    client = client_for(tracking_uri)
    runs = [load_run(client, ref, chr(ord("A") + i)) for i, ref in enumerate(references)]
    seen: dict[str, str] = {}
    for run in runs:
        if run.run_id in seen:
            raise UsageError(
                f"{run.reference} and {seen[run.run_id]} are the same run ({run.run_id})"
            )
        seen[run.run_id] = run.reference
    settings = evaluation_settings(runs[0].config, bootstrap)
    names = _chosen_tasks(runs, tasks)
    warnings: list[str] = []
    digests = {r.dataset_digest for r in runs}
    same_dataset = len(digests) == 1 and None not in digests
    if None in digests:
        unknown = ", ".join(r.label for r in runs if r.dataset_digest is None)
        warnings.append(f"the dataset digest of run(s) {unknown} is unknown")
    elif not same_dataset:
        warnings.append(
            "the runs were tested on different datasets (their dataset digests differ): "
            "every figure below is on the samples they share only"
        )
    content: dict[str, Any] = {
        "schema": SCHEMA,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tracking_uri": _safe_uri(tracking_uri),
        "runs": [r.describe() for r in runs],
        "same_dataset": same_dataset,
        "same_samples": True,
        "warnings": warnings,
        "config_differences": config_differences(runs),
        "settings": {
            "bootstrap": settings.bootstrap,
            "confidence": settings.ci,
            "seed": settings.seed,
            "alpha": ALPHA,
            "min_group_size": settings.min_group_size,
            "min_group_positives": settings.min_group_positives,
            "difference": "later run minus earlier run (B - A)",
            "paired_test": "paired bootstrap over patients (all of a patient's samples drawn "
            "together), two-sided",
            "auroc_test": "DeLong's test (samples taken as independent)",
        },
        "tasks": [],
    }
    comparison = Comparison(content)
    differing: dict[str, list[str]] = {}  # the same counts for several tasks: one warning
    for name in names:
        note(f"comparing {name} ...")
        entry, figures = _compare_task(runs, runs[0].tasks[name], settings)
        content["tasks"].append(entry)
        comparison.figures[name] = figures
        samples = entry["samples"]
        if not samples["same"]:
            content["same_samples"] = False
            only = ", ".join(f"{n} only in {label}" for label, n in samples["only"].items())
            text = (
                f"the runs were not tested on the same samples ({only}"
                + (
                    f", {samples['disagreeing']} shared but labelled differently"
                    if samples["disagreeing"]
                    else ""
                )
                + f"); the comparison is restricted to the {samples['shared']} samples "
                f"({samples['shared_patients']} patients) they share"
            )
            differing.setdefault(text, []).append(name)
    for text, tasks_named in differing.items():
        which = "task" if len(tasks_named) == 1 else "tasks"
        warnings.append(f"{which} {', '.join(tasks_named)}: {text}")
    return comparison


def _chosen_tasks(runs: Sequence[RunRecord], tasks: Sequence[str] | None) -> list[str]:
    common = [t for t in runs[0].tasks if all(t in r.tasks for r in runs[1:])]
    if tasks:
        missing = {t: [r.label for r in runs if t not in r.tasks] for t in tasks}
        missing = {t: labels for t, labels in missing.items() if labels}
        if missing:
            raise UsageError(
                "; ".join(f"run(s) {', '.join(v)} have no task {t!r}" for t, v in missing.items())
                + f" (tasks all runs have: {', '.join(common) or 'none'})"
            )
        chosen = list(dict.fromkeys(tasks))
    else:
        chosen = common
    if not chosen:
        raise UsageError("the runs have no task in common")
    for name in chosen:
        kinds = {r.tasks[name].kind for r in runs}
        if len(kinds) > 1:
            raise DatasetError(f"task {name!r} is of different kinds in the runs: {sorted(kinds)}")
    primary = runs[0].primary_task
    if primary in chosen:  # the primary task first
        chosen.remove(primary)
        chosen.insert(0, primary)
    return chosen


def _compare_task(
    runs: Sequence[RunRecord], task: Task, settings: EvaluationSettings
) -> tuple[dict[str, Any], dict[str, bytes]]:
    frames = {r.label: r.test[r.test["task"] == task.name] for r in runs}
    shared = shared_samples(task.name, frames)
    entry: dict[str, Any] = {
        "task": task.name,
        "kind": task.kind,
        "primary": task.name == runs[0].primary_task,
        "main_metric": MAIN_METRIC[task.kind],
        "samples": shared.to_dict(),
        "metrics": {},
        "skipped": {},
        "comparisons": [],
        "delong": [],
        "subgroups": [],
        "error": None,
    }
    if shared.shared == 0:
        entry["error"] = "the runs share no test sample of this task"
        return entry, {}
    reports: dict[str, TaskReport] = {}
    try:
        for label, frame in shared.frames.items():
            reports[label] = evaluate_task(task, frame, settings)
    except DatasetError as exc:
        entry["error"] = str(exc)
        return entry, {}
    for label, report in reports.items():
        entry["metrics"][label] = {
            m: _interval(iv.to_dict()) for m, iv in report.metrics.items() if m in _shown(task)
        }
        entry["skipped"][label] = {m: r for m, r in report.skipped.items() if m in _shown(task)}
        entry["n"] = report.n
        entry["n_patients"] = report.n_patients
        entry["positives"] = report.positives
    pairs = list(itertools.combinations([r.label for r in runs], 2))
    for first, second in pairs:
        a, b = shared.frames[first], shared.frames[second]
        for metric in COMPARED[task.kind]:
            if metric == "referral_auroc" and task.refer_from is None:
                continue
            entry["comparisons"].append(_difference(task, metric, first, second, a, b, settings))
        if task.kind == "binary" or (task.kind == "ordinal" and task.refer_from is not None):
            entry["delong"].append(_delong(task, first, second, a, b))
    entry["subgroups"] = _subgroups(task, shared, reports, pairs, settings)
    return entry, _figures(task, shared.frames, reports, settings)


def _shown(task: Task) -> tuple[str, ...]:
    metrics = COMPARED[task.kind]
    return (*metrics, "ece_uncalibrated") if task.kind == "binary" else metrics


def _interval(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in ("estimate", "ci_low", "ci_high", "confidence")}


def _difference(
    task: Task,
    metric: str,
    first: str,
    second: str,
    frame_a: pd.DataFrame,
    frame_b: pd.DataFrame,
    settings: EvaluationSettings,
) -> dict[str, Any]:
    """`second` minus `first` on the same samples, with the paired patient bootstrap."""
    out: dict[str, Any] = {
        "first": first,
        "second": second,
        "metric": metric,
        "higher_is_better": higher_is_better(metric),
    }
    try:
        diff = compare_models(task, frame_b, frame_a, metric, settings)
    except DatasetError as exc:
        return {**out, "skipped": str(exc)}
    iv = diff.difference
    significant = math.isfinite(diff.p_value) and diff.p_value < ALPHA
    better = None
    if significant:
        up = iv.estimate > 0
        better = second if up == higher_is_better(metric) else first
    return {
        **out,
        "first_value": diff.b,
        "second_value": diff.a,
        "difference": iv.estimate,
        "ci_low": iv.ci_low,
        "ci_high": iv.ci_high,
        "confidence": iv.confidence,
        "valid_resamples": iv.valid,
        "resamples": iv.resamples,
        "p_value": diff.p_value,
        "significant": significant,
        "better": better,
    }


def _delong(
    task: Task, first: str, second: str, frame_a: pd.DataFrame, frame_b: pd.DataFrame
) -> dict[str, Any]:
    out: dict[str, Any] = {"first": first, "second": second}
    try:
        result = delong_auroc(task, frame_b, frame_a)
    except DatasetError as exc:
        return {**out, "skipped": str(exc)}
    return {
        **out,
        "metric": "auroc" if task.kind == "binary" else "referral_auroc",
        "first_value": result.auc_b,
        "second_value": result.auc_a,
        "difference": result.difference,
        "se": result.se,
        "z": result.z,
        "p_value": result.p_value,
        "significant": result.p_value < ALPHA,
        "positives": result.positives,
        "negatives": result.negatives,
    }


def _subgroups(
    task: Task,
    shared: SharedSamples,
    reports: Mapping[str, TaskReport],
    pairs: Sequence[tuple[str, str]],
    settings: EvaluationSettings,
) -> list[dict[str, Any]]:
    """Each subgroup's main metric per run, and each pair's difference where measurable."""
    metric = MAIN_METRIC[task.kind]
    first_label = next(iter(shared.frames))
    first = shared.frames[first_label]
    labelled = first[pd.to_numeric(first["label"], errors="coerce").notna()]
    values = subgroup_values(labelled, settings)
    by_key = {
        label: {(s.group, s.value): s for s in report.subgroups}
        for label, report in reports.items()
    }
    out = []
    for sub in reports[first_label].subgroups:
        row: dict[str, Any] = {
            "group": sub.group,
            "value": sub.value,
            "n": sub.n,
            "n_patients": sub.n_patients,
            "positives": sub.positives,
            "metric": metric,
            "status": "too_small" if sub.too_small else "ok",
            "reason": sub.too_small,
            "values": {},
            "comparisons": [],
        }
        for label in reports:
            other = by_key[label].get((sub.group, sub.value))
            found = None if other is None else other.metrics.get(metric)
            row["values"][label] = None if found is None else _interval(found.to_dict())
        if sub.too_small is None:
            ids = set(labelled.loc[(values[sub.group] == sub.value).to_numpy(), "scan_id"])
            parts = {
                label: frame[frame["scan_id"].isin(ids)] for label, frame in shared.frames.items()
            }
            for a, b in pairs:
                row["comparisons"].append(
                    _difference(task, metric, a, b, parts[a], parts[b], settings)
                )
        out.append(row)
    return out


# -- figures ---------------------------------------------------------------------------------


def _events(task: Task, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """The yes/no outcome and the probability of it (binary; ordinal referral)."""
    y = pd.to_numeric(frame["label"], errors="coerce").to_numpy(dtype=np.float64)
    keep = ~np.isnan(y)
    if task.kind == "binary":
        events = y[keep]
    elif task.kind == "ordinal" and task.refer_from is not None:
        events = (y[keep] >= task.refer_from).astype(np.float64)
    else:
        return None
    if "calibrated" not in frame.columns:
        return None
    p = pd.to_numeric(frame["calibrated"], errors="coerce").to_numpy(dtype=np.float64)[keep]
    if not np.isfinite(p).all() or not 0 < events.sum() < events.size:
        return None
    return events, p


def _figures(
    task: Task,
    frames: Mapping[str, pd.DataFrame],
    reports: Mapping[str, TaskReport],
    settings: EvaluationSettings,
) -> dict[str, bytes]:
    """ROC and reliability curves of every run overlaid (regression: a scatter)."""
    from sklearn.metrics import roc_curve

    from training.stats import ece_bins

    figures: dict[str, bytes] = {}
    outcome = {label: _events(task, frame) for label, frame in frames.items()}
    if all(v is not None for v in outcome.values()):
        metric = "auroc" if task.kind == "binary" else "referral_auroc"
        what = "" if task.kind == "binary" else " (referral)"

        def roc(ax: Axes) -> None:
            for label, found in outcome.items():
                assert found is not None
                fpr, tpr, _ = roc_curve(*found)
                iv = reports[label].metrics.get(metric)
                text = f"{label}" + (
                    f": AUROC {iv.estimate:.3f} ({iv.ci_low:.3f}-{iv.ci_high:.3f})" if iv else ""
                )
                ax.plot(fpr, tpr, label=text)
            ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
            unit_axes(ax, f"{task.name}{what}: ROC", "1 - specificity", "sensitivity")

        def reliability(ax: Axes) -> None:
            for label, found in outcome.items():
                assert found is not None
                events, p = found
                index = ece_bins(p, settings.ece_bins)
                counts = np.bincount(index, minlength=settings.ece_bins)
                used = counts > 0
                mean_p = np.bincount(index, weights=p, minlength=settings.ece_bins)[used]
                mean_y = np.bincount(index, weights=events, minlength=settings.ece_bins)[used]
                iv = reports[label].metrics.get("ece")
                text = label + (f": ECE {iv.estimate:.3f}" if iv else "")
                ax.plot(mean_p / counts[used], mean_y / counts[used], "o-", label=text)
            ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
            unit_axes(
                ax, f"{task.name}{what}: reliability", "predicted probability", "observed share"
            )

        figures["roc.png"] = figure_png(roc)
        figures["reliability.png"] = figure_png(reliability)
    if task.kind == "regression":

        def scatter(ax: Axes) -> None:
            low, high = math.inf, -math.inf
            for label, frame in frames.items():
                y = pd.to_numeric(frame["label"], errors="coerce").to_numpy(dtype=np.float64)
                v = pd.to_numeric(frame["raw"], errors="coerce").to_numpy(dtype=np.float64)
                keep = np.isfinite(y) & np.isfinite(v)
                iv = reports[label].metrics.get("mae")
                text = label + (f": MAE {iv.estimate:.3g}" if iv else "")
                ax.scatter(y[keep], v[keep], s=8, alpha=0.6, label=text)
                if keep.any():
                    low = min(low, float(y[keep].min()), float(v[keep].min()))
                    high = max(high, float(y[keep].max()), float(v[keep].max()))
            if math.isfinite(low):
                ax.plot([low, high], [low, high], linestyle=":", color="grey", label="identity")
            ax.set_title(f"{task.name}: prediction vs label")
            ax.set_xlabel("label")
            ax.set_ylabel("prediction")
            ax.legend(loc="upper left", fontsize="small")

        figures["scatter.png"] = figure_png(scatter)
    return figures


# -- a small document model, written as Markdown or self-contained HTML -------------------


Cell = str | tuple[str, str]  # text, or (text, css class: num, better, worse, muted)


@dataclass
class Heading:
    level: int
    text: str
    anchor: str | None = None


@dataclass
class Para:
    text: str


@dataclass
class Alert:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    caption: str | None = None


@dataclass
class Figures:
    images: list[tuple[str, bytes]]  # caption, PNG


@dataclass
class Code:
    text: str


Block = Heading | Para | Alert | Bullets | Table | Figures | Code


def to_markdown(blocks: Iterable[Block]) -> str:
    """The blocks as GitHub-flavoured Markdown (figures are named, not embedded)."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            lines += [block.text, ""]
        elif isinstance(block, Alert):
            lines += [f"> **WARNING:** {block.text}", ""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            if block.caption:
                lines += [f"*{block.caption}*", ""]
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "|".join(" --- " for _ in block.header) + "|")
            for row in block.rows:
                lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
            lines.append("")
        elif isinstance(block, Figures):
            names = ", ".join(caption for caption, _ in block.images)
            lines += [f"*Figures in the HTML version: {names}.*", ""]
        elif isinstance(block, Code):
            lines += ["```yaml", block.text.rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _md_cell(cell: Cell) -> str:
    text, mark = (cell, "") if isinstance(cell, str) else cell
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if mark in ("better", "worse") and text else text


def to_html(title: str, blocks: Iterable[Block], footer: str = "") -> str:
    """The blocks as one self-contained HTML page: inline CSS, figures as data: URIs, no
    script and no reference to anything outside the file."""
    css = importlib.resources.files("inference").joinpath("static/report.css").read_text("utf-8")
    esc = html.escape
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            anchor = f' id="{esc(block.anchor)}"' if block.anchor else ""
            body.append(f"<h{block.level}{anchor}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            body.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Alert):
            body.append(f'<div class="alert" role="alert">{esc(block.text)}</div>')
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{esc(item)}</li>" for item in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            parts = ['<div class="scroll"><table>']
            if block.caption:
                parts.append(f"<caption>{esc(block.caption)}</caption>")
            parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.header) + "</tr>")
            for row in block.rows:
                cells = []
                for cell in row:
                    text, mark = (cell, "") if isinstance(cell, str) else cell
                    cls = f' class="{esc(mark)}"' if mark else ""
                    cells.append(f"<td{cls}>{esc(text)}</td>")
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</table></div>")
            body.append("".join(parts))
        elif isinstance(block, Figures):
            figs = []
            for caption, png in block.images:
                data = base64.b64encode(png).decode("ascii")
                figs.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                    f"<figcaption>{esc(caption)}</figcaption></figure>"
                )
            body.append('<div class="figures">' + "".join(figs) + "</div>")
        elif isinstance(block, Code):
            body.append(f"<pre><code>{esc(block.text)}</code></pre>")
    foot = f"<footer>{esc(footer)}</footer>" if footer else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{css}</style></head>"
        f"<body><main>{''.join(body)}{foot}</main></body></html>\n"
    )


# -- rendering the comparison ------------------------------------------------------------


def number(value: Any, digits: int = 3) -> str:
    """A figure for people: rounded, '-' where missing or not finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int | np.integer):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def interval(iv: Mapping[str, Any] | None) -> str:
    """`estimate (low to high)`."""
    if not iv:
        return "-"
    text = number(iv.get("estimate"))
    low, high = iv.get("ci_low"), iv.get("ci_high")
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" ({number(low)} to {number(high)})"
    return text


def p_text(row: Mapping[str, Any]) -> str:
    """A p-value; a bootstrap p of 0 as below its resolution (1 / valid resamples)."""
    p = row.get("p_value")
    if p is None or not math.isfinite(p):
        return "-"
    if p == 0:
        valid = row.get("valid_resamples") or 0
        return f"< {1 / valid:.2g}" if valid else "< 0.001"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def difference_text(row: Mapping[str, Any]) -> str:
    if "skipped" in row:
        return "-"
    text = f"{row['difference']:+.3f}"
    if math.isfinite(row.get("ci_low", math.nan)) and math.isfinite(row.get("ci_high", math.nan)):
        text += f" ({row['ci_low']:+.3f} to {row['ci_high']:+.3f})"
    return text


def _delong_mark(row: Mapping[str, Any]) -> str:
    if not row.get("significant"):
        return "num"
    return "better" if row["difference"] > 0 else "worse"


def _mark(row: Mapping[str, Any]) -> str:
    if not row.get("significant"):
        return "num"
    return "better" if row.get("better") == row.get("second") else "worse"


def comparison_blocks(content: Mapping[str, Any], figures: Mapping[str, Any]) -> list[Block]:
    """The report as document blocks (the same for HTML and Markdown)."""
    runs = content["runs"]
    labels = [r["label"] for r in runs]
    settings = content["settings"]
    conf = f"{round(100 * settings['confidence'])}%"
    blocks: list[Block] = [
        Heading(1, "eyehub comparison: " + " vs ".join(f"{r['label']} {r['title']}" for r in runs)),
        Para(f"Made {content['created_at']} from the tracking store {content['tracking_uri']}."),
    ]
    blocks += [Alert(text) for text in content["warnings"]]
    if content["same_dataset"] and content["same_samples"]:
        blocks.append(Para("All runs were tested on the same dataset and the same test samples."))
    blocks += _summary_blocks(content, labels, conf)
    blocks += [
        Heading(2, "Runs", "runs"),
        Table(
            [
                "run",
                "named as",
                "MLflow run",
                "experiment",
                "dataset digest",
                "recipe",
                "primary task",
                "test samples (patients)",
            ],
            [
                [
                    r["label"],
                    r["reference"] if r["model"] is None else f"{r['title']} ({r['reference']})",
                    f"{r['run_name']} ({r['run_id']})",
                    r["experiment"],
                    (r["dataset_digest"] or "unknown")[:16],
                    r["recipe_id"] or "-",
                    r["primary_task"] or "-",
                    ("-", "muted")
                    if r["test_samples"] is None
                    else (f"{r['test_samples']} ({r['test_patients']})", "num"),
                ]
                for r in runs
            ],
        ),
        Heading(2, "What differs in the resolved configs", "config"),
    ]
    diffs = content["config_differences"]
    if diffs:
        blocks.append(
            Table(
                ["key", *labels],
                [[d["key"], *(_short(d["values"].get(label)) for label in labels)] for d in diffs],
            )
        )
    else:
        blocks.append(Para("The resolved configs are the same."))
    blocks += [
        Heading(2, "Test samples per task", "samples"),
        Table(
            [
                "task",
                "shared samples",
                "shared patients",
                *(f"only in {label}" for label in labels),
                "labelled differently",
            ],
            [
                [
                    t["task"],
                    (str(t["samples"]["shared"]), "num"),
                    (str(t["samples"]["shared_patients"]), "num"),
                    *(
                        (
                            str(t["samples"]["only"][label]),
                            "worse" if t["samples"]["only"][label] else "num",
                        )
                        for label in labels
                    ),
                    (str(t["samples"]["disagreeing"]), "num"),
                ]
                for t in content["tasks"]
            ],
        ),
    ]
    for task in content["tasks"]:
        blocks += _task_blocks(task, labels, conf, figures.get(task["task"], {}))
    blocks += [
        Heading(2, "Methods", "methods"),
        Bullets(
            [
                f"Every figure is measured on the test samples all runs share (matched by scan); "
                f"intervals are {conf} percentile intervals from {settings['bootstrap']} "
                "bootstrap resamples of patients (a patient's eyes and visits are drawn "
                "together).",
                "Differences are the later run minus the earlier (B - A), with a paired "
                "bootstrap over patients: both runs are measured on each resample, and the "
                "two-sided p-value is twice the smaller share of resampled differences on "
                "either side of 0.",
                "DeLong's test compares the AUROCs on the same samples but takes the samples "
                "as independent; with two eyes per patient its p-value is too small, so the "
                "paired bootstrap is the comparison to read.",
                f"Marked cells: p < {settings['alpha']} (green: the later run is better, red: "
                "worse; lower is better for ECE, Brier score and MAE). Subgroup tests are not "
                "corrected for multiple comparisons: read them as pointers, not findings.",
                f"A subgroup below {settings['min_group_size']} samples or "
                f"{settings['min_group_positives']} positives (or negatives) is reported as "
                "too small, not as a number.",
            ]
        ),
    ]
    return blocks


def _summary_blocks(content: Mapping[str, Any], labels: Sequence[str], conf: str) -> list[Block]:
    """Each task's main metric per run and each pair's difference, first."""
    pairs = list(itertools.combinations(labels, 2))
    rows: list[list[Cell]] = []
    for task in content["tasks"]:
        metric = task["main_metric"]
        if task["error"]:
            rows.append([task["task"], metric, *(("not compared", "muted") for _ in labels)])
            rows[-1] += [("-", "muted") for _ in pairs]
            continue
        row: list[Cell] = [task["task"] + (" (primary)" if task["primary"] else ""), metric]
        row += [(interval(task["metrics"].get(label, {}).get(metric)), "num") for label in labels]
        found = {(c["first"], c["second"]): c for c in task["comparisons"] if c["metric"] == metric}
        for pair in pairs:
            c = found.get(pair)
            if c is None or "skipped" in c:
                row.append((c["skipped"] if c else "-", "muted"))
            else:
                row.append((f"{difference_text(c)}, p {p_text(c)}", _mark(c)))
        rows.append(row)
    return [
        Heading(2, "Summary", "summary"),
        Table(
            [
                "task",
                "metric",
                *(f"{label} ({conf} CI)" for label in labels),
                *(f"{b} - {a} (CI), p" for a, b in pairs),
            ],
            rows,
            caption="each task's main metric on the shared test samples; marked: p < 0.05 "
            "(green: the later run is better, red: worse)",
        ),
    ]


def _short(value: Any, width: int = 80) -> str:
    text = "(absent)" if value is None else str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _task_blocks(
    task: Mapping[str, Any], labels: Sequence[str], conf: str, figures: Mapping[str, bytes]
) -> list[Block]:
    name = task["task"]
    title = f"Task {name} ({task['kind']}" + (", primary)" if task["primary"] else ")")
    blocks: list[Block] = [Heading(2, title, f"task-{name}")]
    if task["error"]:
        return [*blocks, Alert(f"not compared: {task['error']}")]
    blocks.append(
        Para(
            f"{task['samples']['shared']} shared test samples of "
            f"{task['samples']['shared_patients']} patients"
            + (f", {task['positives']} positive" if task.get("positives") is not None else "")
            + "."
        )
    )
    metrics = list(dict.fromkeys(m for label in labels for m in task["metrics"].get(label, {})))
    skipped = {m for label in labels for m in task["skipped"].get(label, {})}
    rows: list[list[Cell]] = []
    for metric in [*metrics, *sorted(skipped - set(metrics))]:
        rows.append(
            [
                metric,
                *(
                    (interval(task["metrics"][label].get(metric)), "num")
                    if metric in task["metrics"].get(label, {})
                    else (task["skipped"].get(label, {}).get(metric, "-"), "muted")
                    for label in labels
                ),
            ]
        )
    blocks.append(Table(["metric", *(f"{label} ({conf} CI)" for label in labels)], rows))
    if task["comparisons"]:
        blocks += [
            Heading(3, "Paired differences"),
            Table(
                ["pair", "metric", "difference (CI)", "p (paired bootstrap)", "better"],
                [
                    [
                        f"{c['second']} - {c['first']}",
                        c["metric"],
                        (difference_text(c), _mark(c))
                        if "skipped" not in c
                        else (c["skipped"], "muted"),
                        (p_text(c), "num"),
                        c.get("better") or ("-" if "skipped" in c else "no significant difference"),
                    ]
                    for c in task["comparisons"]
                ],
            ),
        ]
    if task["delong"]:
        blocks += [
            Heading(3, "DeLong's test of the AUROCs"),
            Table(
                ["pair", "AUROCs", "difference", "SE", "z", "p"],
                [
                    [
                        f"{d['second']} - {d['first']}",
                        f"{number(d['second_value'])} vs {number(d['first_value'])}",
                        (f"{d['difference']:+.3f}", _delong_mark(d)),
                        (number(d["se"]), "num"),
                        (number(d["z"], 2), "num"),
                        (p_text(d), "num"),
                    ]
                    if "skipped" not in d
                    else [f"{d['second']} - {d['first']}", (d["skipped"], "muted"), "", "", "", ""]
                    for d in task["delong"]
                ],
            ),
        ]
    if figures:
        captions = {
            "roc.png": "ROC curves, overlaid",
            "reliability.png": "reliability (calibrated probability), overlaid",
            "scatter.png": "predictions vs labels",
        }
        blocks.append(
            Figures([(f"{name}: {captions.get(k, k)}", png) for k, png in figures.items()])
        )
    if task["subgroups"]:
        pairs = [(c["first"], c["second"]) for c in task["comparisons"]]
        pairs = list(dict.fromkeys(pairs))
        blocks += [
            Heading(3, f"Subgroups ({task['main_metric']})"),
            Table(
                [
                    "group",
                    "value",
                    "samples (patients)",
                    *(f"{label} ({conf} CI)" for label in labels),
                    *(f"{b} - {a} (p)" for a, b in pairs),
                ],
                [_subgroup_row(s, labels, pairs) for s in task["subgroups"]],
                caption="marked: p < 0.05 in the paired patient bootstrap on the subgroup's "
                "shared samples (not corrected for multiple comparisons)",
            ),
        ]
    return blocks


def _subgroup_row(
    sub: Mapping[str, Any], labels: Sequence[str], pairs: Sequence[tuple[str, str]]
) -> list[Cell]:
    row: list[Cell] = [sub["group"], sub["value"], (f"{sub['n']} ({sub['n_patients']})", "num")]
    if sub["status"] != "ok":
        reason = sub["reason"] or "too small"
        return [*row, *((reason, "muted") for _ in labels), *(("-", "muted") for _ in pairs)]
    row += [(interval(sub["values"].get(label)), "num") for label in labels]
    found = {(c["first"], c["second"]): c for c in sub["comparisons"]}
    for pair in pairs:
        c = found.get(pair)
        if c is None or "skipped" in c:
            row.append((c["skipped"] if c else "-", "muted"))
        else:
            mark = _mark(c)
            star = " *" if c["significant"] else ""
            row.append((f"{c['difference']:+.3f} ({p_text(c)}){star}", mark))
    return row


def render_html(comparison: Comparison) -> str:
    content = comparison.content
    title = "eyehub comparison: " + " vs ".join(r["title"] for r in content["runs"])
    return to_html(
        title,
        comparison_blocks(content, comparison.figures),
        footer=f"{SCHEMA}; made by eyehub compare",
    )


def render_markdown(comparison: Comparison) -> str:
    return to_markdown(comparison_blocks(comparison.content, {}))


def render_json(comparison: Comparison) -> str:
    return json.dumps(jsonable(comparison.content), indent=2, allow_nan=False) + "\n"


def jsonable(value: Any) -> Any:
    """`value` with NaN and infinities as null and numpy scalars as Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_format(out: Path, fmt: str | None) -> str:
    """The format asked for, else the one the file's suffix names (html by default)."""
    if fmt is None:
        suffix = out.suffix.lower().lstrip(".")
        fmt = {"md": "md", "markdown": "md", "json": "json"}.get(suffix, "html")
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    return fmt


def write_report(comparison: Comparison, out: Path, fmt: str | None = None) -> Path:
    """Write the report as html, md or json (see `report_format`); returns its path."""
    from eyehub.storage import write_text_atomic

    fmt = report_format(out, fmt)
    text = {"html": render_html, "md": render_markdown, "json": render_json}[fmt](comparison)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    return out


def _safe_uri(uri: str) -> str:
    """A tracking URI without credentials (user:password@ in a URL)."""
    return re.sub(r"//[^/@]+@", "//***@", uri)
