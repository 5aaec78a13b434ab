"""Test-set evaluation of a task: metrics with patient-level bootstrap intervals, the same
within subgroups, the flat metric keys MLflow receives, model comparison, and plots.

Temperatures and thresholds were fitted on validation (`models.calibration`); this module
only measures. It reads the per-sample predictions table that `training.finish` writes
(one row per sample and task; `evaluate_predictions` picks a split and each task's rows)
or one task's rows of it (`evaluate_task`). Columns read:

| column | binary | ordinal | regression |
| --- | --- | --- | --- |
| `scan_id`, `patient_id` | required | required | required |
| `label` | 0 / 1 | grade 0..K-1 | value in the label's unit |
| `raw` | probability before temperature scaling | - | predicted value |
| `calibrated` | calibrated probability | referral probability (with `refer_from`) | - |
| `threshold` | the decision threshold (one value) | the referral threshold (optional) | - |
| `grade` or `p_grade_0..K-1` | - | predicted grade, or grade probabilities | - |
| subgroup sources | `sex`, `age`, `manufacturer`, `model`, or any column named | | |

A missing label (NaN) leaves the row out. A sample is referred (binary: called positive)
when `calibrated >= threshold`, as in `EyeModel.predict`; without a `grade` column an
ordinal prediction is the most probable grade.

Metrics: binary `auroc`, `auprc`, `sensitivity`, `specificity` (at the threshold), `ece`,
`ece_uncalibrated` (equal-width bins), `brier`; ordinal `qwk` (quadratic-weighted kappa over
grades 0..K-1), `accuracy` and, with `refer_from`, `referral_auroc`; regression `mae`, `r2`.
Point estimates come from scikit-learn (MONAI for the ECE); intervals from the cluster
bootstrap of `training.stats` (patients drawn with replacement, all their rows taken).

Metric keys (`TaskReport.metrics_dict()`), `<split>` being `test` unless asked otherwise,
`<tag>` a subgroup as `<group>:<value>` (e.g. `sex:F`, `age_band:65-74`):

    <split>/<task>/<metric>                      <split>/<task>/<metric>/<tag>
    <split>/<task>/<metric>/ci_low               <split>/<task>/<metric>/<tag>/ci_low
    <split>/<task>/<metric>/ci_high              <split>/<task>/<metric>/<tag>/ci_high
    <split>/<task>/<metric>/valid_resamples      <split>/<task>/<metric>/<tag>/valid_resamples
    <split>/<task>/n, n_patients, positives      <split>/<task>/n/<tag>, ... positives/<tag>

`positives` exists for binary tasks and ordinal tasks with `refer_from` (referable samples).
A subgroup below the minimum size has its counts but no metric keys; `TaskReport.to_dict()`
(for an MLflow JSON artifact) says which were too small and why.

matplotlib, scikit-learn, scipy and MONAI are imported by the functions that use them.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from eyehub.errors import DatasetError
from eyehub.labels import label_spec
from eyehub.settings import Settings
from training import stats
from training.stats import Interval, Kernel, PairedDifference

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

SCAN, PATIENT, LABEL, RAW, CALIBRATED, THRESHOLD = (
    "scan_id",
    "patient_id",
    "label",
    "raw",
    "calibrated",
    "threshold",
)
UNKNOWN = "unknown"  # the subgroup value of a sample whose source column is empty

BINARY_METRICS = (
    "auroc",
    "auprc",
    "sensitivity",
    "specificity",
    "ece",
    "ece_uncalibrated",
    "brier",
)
ORDINAL_METRICS = ("qwk", "accuracy", "referral_auroc")
REGRESSION_METRICS = ("mae", "r2")

# MLflow metric keys allow alphanumerics, underscores, dashes, periods, spaces, colons and
# slashes; a subgroup value also loses colons and slashes, so keys parse back unambiguously.
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. ]")
_TASK_NAME = re.compile(r"^[A-Za-z0-9_\-.]+$")
_VALUE_MAX = 64


GRADE = "grade"


def grade_column(grade: int) -> str:
    """The column of the probability of `grade` (as `training.finish` writes it)."""
    return f"p_grade_{grade}"


class TaskLike(Protocol):
    """What evaluation reads of a task (`models.tasks.TaskSpec` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def classes(self) -> int: ...

    @property
    def refer_from(self) -> int | None: ...


class EvaluationSettings(Settings):
    """How a test set is evaluated. The names shared with the training config's
    `evaluation:` section mean the same (`from_spec` copies them)."""

    bootstrap: int = Field(
        default=stats.DEFAULT_RESAMPLES, ge=0, description="patient bootstrap resamples (0: none)"
    )
    ci: float = Field(default=stats.DEFAULT_CONFIDENCE, gt=0, lt=1)
    seed: int = 0
    ece_bins: int = Field(default=10, ge=1)
    # `sex`, `age_band` (from `age`), `site` (the acquiring device: `manufacturer` and
    # `model`), or any other column of the frame, used as it is (e.g. `eye`). Left at the
    # default, a group whose source column is absent is skipped; named, it must be there.
    subgroups: tuple[str, ...] = ("sex", "age_band", "site")
    age_bands: tuple[float, ...] = Field(
        default=(50.0, 65.0, 75.0),
        description="band edges in years: 50, 65, 75 give lt50, 50-64, 65-74, ge75",
    )
    min_group_size: int = Field(default=30, ge=1)
    min_group_positives: int = Field(default=10, ge=1)  # binary; referral for ordinal
    min_group_negatives: int = Field(default=10, ge=1)

    @field_validator("age_bands")
    @classmethod
    def _increasing(cls, edges: tuple[float, ...]) -> tuple[float, ...]:
        if not edges or any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError("age_bands must be one or more edges in increasing order")
        return edges

    @classmethod
    def from_spec(cls, spec: Any, **overrides: Any) -> EvaluationSettings:
        """These settings from another settings object with some of the same field names
        (the training config's `evaluation:`); its other fields are ignored. Subgroups the
        spec left at its default stay defaults here (skipped where the data lacks them)."""
        values = {name: getattr(spec, name) for name in cls.model_fields if hasattr(spec, name)}
        explicit = getattr(spec, "model_fields_set", None)
        if explicit is not None and "subgroups" not in explicit:
            values.pop("subgroups", None)
        return cls.from_dict({**values, **overrides})


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubgroupReport:
    """One value of one subgroup (e.g. sex F): its counts and metrics, or why not."""

    group: str
    value: str  # as in the data
    key: str  # as in metric keys
    n: int
    n_patients: int
    positives: int | None
    metrics: dict[str, Interval]
    skipped: dict[str, str]  # metric -> why it has no number
    too_small: str | None = None  # why the whole subgroup has no numbers

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "value": self.value,
            "key": self.key,
            "n": self.n,
            "n_patients": self.n_patients,
            "positives": self.positives,
            "status": "too_small" if self.too_small else "ok",
            "reason": self.too_small,
            "metrics": {m: v.to_dict() for m, v in self.metrics.items()},
            "skipped": dict(self.skipped),
        }


@dataclass(frozen=True)
class TaskReport:
    """A task's test-set evaluation."""

    task: str
    kind: str
    n: int
    n_patients: int
    positives: int | None
    metrics: dict[str, Interval]
    skipped: dict[str, str]
    subgroups: list[SubgroupReport] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def metrics_dict(self, split: str = "test") -> dict[str, float]:
        """The flat `split/task/metric...` keys and values, as MLflow's `log_metrics` takes
        them (non-finite values left out)."""
        base = f"{split}/{self.task}"
        out: dict[str, float] = {}
        _counts(out, base, "", self.n, self.n_patients, self.positives)
        _intervals(out, base, "", self.metrics)
        for sub in self.subgroups:
            tag = f"/{sub.group}:{sub.key}"
            _counts(out, base, tag, sub.n, sub.n_patients, sub.positives)
            _intervals(out, base, tag, sub.metrics)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-able (for `mlflow.log_dict`)."""
        return {
            "task": self.task,
            "kind": self.kind,
            "n": self.n,
            "n_patients": self.n_patients,
            "positives": self.positives,
            "metrics": {m: v.to_dict() for m, v in self.metrics.items()},
            "skipped": dict(self.skipped),
            "subgroups": [s.to_dict() for s in self.subgroups],
            "settings": dict(self.settings),
        }


def _counts(
    out: dict[str, float], base: str, tag: str, n: int, patients: int, positives: int | None
) -> None:
    out[f"{base}/n{tag}"] = float(n)
    out[f"{base}/n_patients{tag}"] = float(patients)
    if positives is not None:
        out[f"{base}/positives{tag}"] = float(positives)


def _intervals(out: dict[str, float], base: str, tag: str, metrics: Mapping[str, Interval]) -> None:
    for name, iv in metrics.items():
        key = f"{base}/{name}{tag}"
        for suffix, value in (
            ("", iv.estimate),
            ("/ci_low", iv.ci_low),
            ("/ci_high", iv.ci_high),
            ("/valid_resamples", float(iv.valid)),
        ):
            if math.isfinite(value):
                out[key + suffix] = float(value)


def metrics_dict(
    reports: Mapping[str, TaskReport] | Sequence[TaskReport], split: str = "test"
) -> dict[str, float]:
    """All reports' keys in one dict."""
    items = reports.values() if isinstance(reports, Mapping) else reports
    out: dict[str, float] = {}
    for report in items:
        out.update(report.metrics_dict(split))
    return out


# -- the task's data ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Data:
    """One task's labelled rows as arrays (validated)."""

    kind: str
    classes: int
    refer_from: int | None
    patients: np.ndarray
    y: np.ndarray
    raw: np.ndarray | None
    calibrated: np.ndarray | None
    threshold: float | None
    predicted: np.ndarray | None  # ordinal: the predicted grade

    def subset(self, mask: np.ndarray) -> _Data:
        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[mask]

        return _Data(
            self.kind,
            self.classes,
            self.refer_from,
            self.patients[mask],
            self.y[mask],
            cut(self.raw),
            cut(self.calibrated),
            self.threshold,
            cut(self.predicted),
        )

    @property
    def n(self) -> int:
        return int(self.y.size)

    @property
    def n_patients(self) -> int:
        return int(pd.unique(self.patients).size)

    @property
    def events(self) -> np.ndarray | None:
        """The yes/no outcome the positives count: binary labels, ordinal referable."""
        if self.kind == "binary":
            return self.y
        if self.kind == "ordinal" and self.refer_from is not None:
            return (self.y >= self.refer_from).astype(np.float64)
        return None

    @property
    def positives(self) -> int | None:
        events = self.events
        return None if events is None else int(events.sum())

    @property
    def predicted_grade(self) -> np.ndarray:
        return _given(self.predicted)

    @property
    def decisions(self) -> np.ndarray:
        if self.calibrated is None or self.threshold is None:
            raise DatasetError("no calibrated probabilities or threshold")
        return (self.calibrated >= self.threshold).astype(np.float64)


def _task_data(task: TaskLike, frame: pd.DataFrame) -> tuple[_Data, np.ndarray]:
    """The validated arrays of the labelled rows, and the mask of those rows in `frame`."""
    if task.kind not in ("binary", "ordinal", "regression"):
        raise DatasetError(f"task {task.name!r}: unknown kind {task.kind!r}")
    if not _TASK_NAME.match(task.name):
        raise DatasetError(
            f"task name {task.name!r} cannot be part of an MLflow metric key "
            "(letters, digits, _ - . only)"
        )
    required = [SCAN, PATIENT, LABEL]
    if task.kind == "binary":
        required += [RAW, CALIBRATED, THRESHOLD]
    elif task.kind == "ordinal":
        probabilities = [grade_column(k) for k in range(task.classes)]
        if GRADE not in frame.columns and not set(probabilities) <= set(frame.columns):
            required += [f"{GRADE} (or {probabilities[0]}..{probabilities[-1]})"]
        if task.refer_from is not None:
            required += [CALIBRATED]
    else:
        required += [RAW]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"task {task.name!r}: the prediction frame lacks column(s) {', '.join(missing)} "
            f"that a {task.kind} task needs (see training.evaluate)"
        )
    if frame[SCAN].duplicated().any():
        dup = frame.loc[frame[SCAN].duplicated(), SCAN].iloc[0]
        raise DatasetError(f"task {task.name!r}: scan_id {dup!r} appears more than once")
    if frame[PATIENT].isna().any():
        raise DatasetError(
            f"task {task.name!r}: {int(frame[PATIENT].isna().sum())} rows have no patient_id"
        )

    y_all = pd.to_numeric(frame[LABEL], errors="coerce").to_numpy(dtype=np.float64)
    bad_text = frame[LABEL].notna().to_numpy() & np.isnan(y_all)
    if bad_text.any():
        raise DatasetError(f"task {task.name!r}: {int(bad_text.sum())} labels are not numbers")
    keep = ~np.isnan(y_all)
    dropped = int((~keep).sum())
    if dropped:
        log.debug(
            "task %s: %d of %d test samples have no label and are left out",
            task.name,
            dropped,
            keep.size,
        )
    if not keep.any():
        raise DatasetError(f"task {task.name!r}: no test sample has a label")
    rows = frame.loc[keep]
    y = y_all[keep]

    def numbers(column: str, probability: bool) -> np.ndarray:
        values = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise DatasetError(
                f"task {task.name!r}: column {column!r} has missing or non-numeric values in "
                f"{int((~np.isfinite(values)).sum())} labelled rows"
            )
        if probability and ((values < 0) | (values > 1)).any():
            raise DatasetError(
                f"task {task.name!r}: column {column!r} must hold probabilities in [0, 1]"
            )
        return values

    raw = calibrated = predicted = None
    threshold: float | None = None
    if task.kind == "binary":
        if not np.isin(y, (0.0, 1.0)).all():
            raise DatasetError(f"task {task.name!r}: binary labels must be 0 or 1")
        raw, calibrated = numbers(RAW, True), numbers(CALIBRATED, True)
        threshold = _threshold(task.name, rows[THRESHOLD])
    elif task.kind == "ordinal":
        if not ((y == np.round(y)) & (y >= 0) & (y < task.classes)).all():
            raise DatasetError(
                f"task {task.name!r}: ordinal labels must be integer grades 0 to {task.classes - 1}"
            )
        if GRADE in rows.columns:
            predicted = numbers(GRADE, False)
            if not (
                (predicted == np.round(predicted)) & (predicted >= 0) & (predicted < task.classes)
            ).all():
                raise DatasetError(
                    f"task {task.name!r}: predicted grades must be integers 0 to {task.classes - 1}"
                )
        else:
            grades = [numbers(grade_column(k), True) for k in range(task.classes)]
            predicted = np.column_stack(grades).argmax(axis=1).astype(np.float64)
        if task.refer_from is not None:
            calibrated = numbers(CALIBRATED, True)
            if RAW in rows.columns and rows[RAW].notna().all():
                raw = numbers(RAW, True)
            if THRESHOLD in rows.columns and rows[THRESHOLD].notna().any():
                threshold = _threshold(task.name, rows[THRESHOLD])
    else:
        if not np.isfinite(y).all():
            raise DatasetError(f"task {task.name!r}: regression labels must be finite")
        raw = numbers(RAW, False)
    data = _Data(
        kind=task.kind,
        classes=task.classes,
        refer_from=task.refer_from,
        patients=rows[PATIENT].astype(str).to_numpy(),
        y=y,
        raw=raw,
        calibrated=calibrated,
        threshold=threshold,
        predicted=predicted,
    )
    return data, keep


def _given(values: np.ndarray | None) -> np.ndarray:
    """A column `_task_data` guarantees for the task's kind."""
    if values is None:
        raise DatasetError("the prediction frame lacks a column this task needs")
    return values


def _threshold(task: str, column: pd.Series) -> float:
    values = pd.to_numeric(column, errors="coerce").dropna().unique()
    if values.size == 0:
        raise DatasetError(
            f"task {task!r}: no decision threshold; calibrate the model on validation first"
        )
    if values.size > 1:
        raise DatasetError(
            f"task {task!r}: the threshold column holds {values.size} different values"
        )
    return float(values[0])


# -- metrics ----------------------------------------------------------------------------


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = 10
) -> float:
    """MONAI's expected calibration error (equal-width bins) of binary probabilities."""
    import torch
    from monai.metrics import CalibrationErrorMetric

    metric = CalibrationErrorMetric(
        num_bins=bins, include_background=True, calibration_reduction="expected"
    )
    p = torch.as_tensor(np.asarray(probabilities, dtype=np.float32)).reshape(1, 1, -1)
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32)).reshape(1, 1, -1)
    metric(y_pred=p, y=y)
    result = metric.aggregate()
    value = result[0] if isinstance(result, list | tuple) else result
    return float(value)


@dataclass
class _Plan:
    kernels: dict[str, Kernel] = field(default_factory=dict)
    estimates: dict[str, Callable[[], float]] = field(default_factory=dict)


def _plan(data: _Data, settings: EvaluationSettings) -> _Plan:
    """The kernels and reference point estimates of a task's metrics on these rows."""
    from sklearn import metrics as skm

    plan = _Plan()
    y = data.y
    if data.kind == "binary":
        p, raw, decisions = _given(data.calibrated), _given(data.raw), data.decisions
        matrix: list[np.ndarray] = []

        def counts() -> np.ndarray:  # one confusion matrix for both rates
            if not matrix:
                matrix.append(skm.confusion_matrix(y, decisions, labels=[0.0, 1.0]))
            return matrix[0]

        bins = settings.ece_bins
        plan.kernels = {
            "auroc": stats.auroc_kernel(y, p),
            "auprc": stats.auprc_kernel(y, p),
            "sensitivity": stats.sensitivity_kernel(y, decisions),
            "specificity": stats.specificity_kernel(y, decisions),
            "ece": stats.ece_kernel(y, p, bins),
            "ece_uncalibrated": stats.ece_kernel(y, raw, bins),
            "brier": stats.brier_kernel(y, p),
        }
        plan.estimates = {
            "auroc": lambda: skm.roc_auc_score(y, p),
            "auprc": lambda: skm.average_precision_score(y, p),
            "sensitivity": lambda: _rate(counts(), 1),
            "specificity": lambda: _rate(counts(), 0),
            "ece": lambda: expected_calibration_error(y, p, bins),
            "ece_uncalibrated": lambda: expected_calibration_error(y, raw, bins),
            "brier": lambda: skm.brier_score_loss(y, p),
        }
    elif data.kind == "ordinal":
        pred = data.predicted_grade
        labels = list(range(data.classes))
        plan.kernels = {
            "qwk": stats.qwk_kernel(y, pred, data.classes),
            "accuracy": stats.accuracy_kernel(y, pred),
        }
        plan.estimates = {
            "qwk": lambda: skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic"),
            "accuracy": lambda: skm.accuracy_score(y, pred),
        }
        events = data.events
        if events is not None:
            referral = _given(data.calibrated)
            plan.kernels["referral_auroc"] = stats.auroc_kernel(events, referral)
            plan.estimates["referral_auroc"] = lambda: skm.roc_auc_score(events, referral)
    else:
        value = _given(data.raw)
        plan.kernels = {"mae": stats.mae_kernel(y, value), "r2": stats.r2_kernel(y, value)}
        plan.estimates = {
            "mae": lambda: skm.mean_absolute_error(y, value),
            "r2": lambda: skm.r2_score(y, value),
        }
    return plan


def _rate(matrix: np.ndarray, cls: int) -> float:
    """Sensitivity (cls 1) or specificity (cls 0) from a 2 x 2 confusion matrix."""
    return float(matrix[cls, cls] / matrix[cls].sum())


_UNDEFINED = {
    "auroc": "undefined: the samples hold one class only",
    "auprc": "undefined: no positive sample",
    "sensitivity": "undefined: no positive sample",
    "specificity": "undefined: no negative sample",
    "referral_auroc": "undefined: the samples are all referable or all not",
    "qwk": "undefined: labels and predictions leave no disagreement to weigh",
    "r2": "undefined: the labels do not vary",
}


def _measure(
    data: _Data, settings: EvaluationSettings, exclude: Mapping[str, str] | None = None
) -> tuple[dict[str, Interval], dict[str, str]]:
    """Point estimates and bootstrap intervals of every defined metric on these rows."""
    plan = _plan(data, settings)
    skipped = dict(exclude or {})
    ones = np.ones((1, data.n))
    kernels: dict[str, Kernel] = {}
    estimates: dict[str, float] = {}
    for name, kernel in plan.kernels.items():
        if name in skipped:
            continue
        if not np.isfinite(kernel(ones)[0]):
            skipped[name] = _UNDEFINED.get(name, "undefined on these samples")
            continue
        kernels[name] = kernel
        estimates[name] = float(plan.estimates[name]())
    intervals = stats.bootstrap(
        kernels,
        data.patients,
        estimates,
        resamples=settings.bootstrap,
        seed=settings.seed,
        confidence=settings.ci,
    )
    for name, iv in intervals.items():
        if iv.valid < iv.resamples:
            log.debug("%s: defined on %d of %d bootstrap resamples", name, iv.valid, iv.resamples)
    return intervals, skipped


# -- subgroups ---------------------------------------------------------------------------


def age_band_labels(edges: Sequence[float]) -> list[str]:
    """Key-safe names of the bands [a, b) the edges cut, in whole years where the edges are
    whole: (50, 65, 75) -> lt50, 50-64, 65-74, ge75; (50.5, 60) -> lt50.5, 50.5-60, ge60."""

    def band(a: float, b: float) -> str:
        if float(a).is_integer() and float(b).is_integer():
            return f"{a:g}-{b - 1:g}"
        return f"{a:g}-{b:g}"

    inner = [band(a, b) for a, b in itertools.pairwise(edges)]
    return [f"lt{edges[0]:g}", *inner, f"ge{edges[-1]:g}"]


def age_bands(ages: pd.Series, edges: Sequence[float]) -> pd.Series:
    """Each age's band name (`UNKNOWN` where missing)."""
    values = pd.to_numeric(ages, errors="coerce").to_numpy(dtype=np.float64)
    names = np.array(age_band_labels(edges), dtype=object)
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    out = np.where(np.isnan(values), UNKNOWN, names[np.minimum(index, len(names) - 1)])
    return pd.Series(out, index=ages.index, dtype=object)


def _sex(values: pd.Series) -> pd.Series:
    """M / F as the label registry reads them; numbers as the models code them (M 1, F 0)."""
    spec = label_spec("sex")
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        coded = values.to_numpy(dtype=np.float64)
        if not np.isin(coded[~np.isnan(coded)], (0.0, 1.0)).all():
            raise DatasetError("column 'sex' holds numbers other than 1 (M) and 0 (F)")
    else:
        coded = spec.encode(values.tolist())  # anything but M / F is refused
    out = np.where(np.isnan(coded), UNKNOWN, np.where(coded == 1.0, spec.positive, spec.negative))
    return pd.Series(out, index=values.index, dtype=object)


def _text(values: pd.Series) -> pd.Series:
    return values.map(lambda v: UNKNOWN if _missing(v) else str(v).strip() or UNKNOWN).astype(
        object
    )


def _missing(v: object) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _device(frame: pd.DataFrame) -> pd.Series:
    """`manufacturer model` (either alone where the other is empty)."""
    words = [
        frame[c].astype(object).where(frame[c].notna(), "").astype(str).str.strip()
        for c in ("manufacturer", "model")
        if c in frame.columns
    ]
    joined = words[0]
    for more in words[1:]:
        joined = (joined + " " + more).str.strip()
    return joined.where(joined != "", UNKNOWN).astype(object)


def subgroup_values(frame: pd.DataFrame, settings: EvaluationSettings) -> dict[str, pd.Series]:
    """Each subgroup's value per row of `frame` (as in the data; see `safe_key`)."""
    explicit = "subgroups" in settings.model_fields_set
    out: dict[str, pd.Series] = {}
    for group in settings.subgroups:
        sources = {"age_band": ["age"], "site": ["manufacturer", "model"]}.get(group, [group])
        present = [c for c in sources if c in frame.columns]
        if not present:
            if explicit:
                raise DatasetError(
                    f"subgroup {group!r} needs column {' or '.join(sources)} in the "
                    "prediction frame"
                )
            log.info("subgroup %s skipped: the frame has no %s column", group, " or ".join(sources))
            continue
        if group == "sex":
            out[group] = _sex(frame["sex"])
        elif group == "age_band":
            out[group] = age_bands(frame["age"], settings.age_bands)
        elif group == "site":
            out[group] = _device(frame)
        else:
            out[group] = _text(frame[group])
    return out


def safe_key(value: str) -> str:
    """A subgroup value as it can appear in an MLflow metric key (other characters become
    `_`; at most 64 characters)."""
    text = _KEY_UNSAFE.sub("_", str(value)).strip()[:_VALUE_MAX]
    return text or "_"


def _keys(values: Sequence[str]) -> dict[str, str]:
    """Safe keys for distinct values, kept distinct (a clash gets _2, _3, ...)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for v in sorted(values):
        key = base = safe_key(v)
        i = 2
        while key in used:
            key = f"{base}_{i}"
            i += 1
        used.add(key)
        out[v] = key
    return out


def _size_check(data: _Data, settings: EvaluationSettings) -> tuple[str | None, dict[str, str]]:
    """Why the whole subgroup is too small (or None), and metrics too small on their own."""
    if data.n < settings.min_group_size:
        return f"too small: {data.n} samples < {settings.min_group_size}", {}
    events = data.events
    if events is None:
        return None, {}
    pos = int(events.sum())
    neg = data.n - pos
    reason = None
    if pos < settings.min_group_positives:
        reason = f"too small: {pos} positives < {settings.min_group_positives}"
    elif neg < settings.min_group_negatives:
        reason = f"too small: {neg} negatives < {settings.min_group_negatives}"
    if reason is None:
        return None, {}
    if data.kind == "binary":
        return reason, {}
    return None, {"referral_auroc": reason}  # ordinal: the grades are still measured


# -- the entry points -------------------------------------------------------------------


def evaluate_task(
    task: TaskLike, frame: pd.DataFrame, settings: EvaluationSettings | None = None
) -> TaskReport:
    """A task's metrics with patient-level bootstrap intervals, overall and per subgroup."""
    settings = settings or EvaluationSettings()
    data, keep = _task_data(task, frame)
    metrics, skipped = _measure(data, settings)
    for name, reason in skipped.items():
        log.warning("task %s: %s %s", task.name, name, reason)
    subgroups: list[SubgroupReport] = []
    for group, values in subgroup_values(frame.loc[keep], settings).items():
        column = values.to_numpy(dtype=object)
        keys = _keys(sorted(set(column)))
        for value, key in keys.items():
            part = data.subset(column == value)
            whole, partial = _size_check(part, settings)
            if whole is not None:
                names = _metric_names(task)
                found: dict[str, Interval] = {}
                lacking = dict.fromkeys(names, whole)
            else:
                found, lacking = _measure(part, settings, partial)
            subgroups.append(
                SubgroupReport(
                    group=group,
                    value=value,
                    key=key,
                    n=part.n,
                    n_patients=part.n_patients,
                    positives=part.positives,
                    metrics=found,
                    skipped=lacking,
                    too_small=whole,
                )
            )
    return TaskReport(
        task=task.name,
        kind=task.kind,
        n=data.n,
        n_patients=data.n_patients,
        positives=data.positives,
        metrics=metrics,
        skipped=skipped,
        subgroups=subgroups,
        settings=settings.to_dict(),
    )


def evaluate_tasks(
    tasks: Sequence[TaskLike],
    frames: Mapping[str, pd.DataFrame],
    settings: EvaluationSettings | None = None,
) -> dict[str, TaskReport]:
    """`evaluate_task` for each task, from its frame in `frames` (keyed by task name)."""
    missing = [t.name for t in tasks if t.name not in frames]
    if missing:
        raise DatasetError(f"no prediction frame for task(s) {', '.join(missing)}")
    return {t.name: evaluate_task(t, frames[t.name], settings) for t in tasks}


def evaluate_predictions(
    tasks: Sequence[TaskLike],
    predictions: pd.DataFrame,
    settings: EvaluationSettings | None = None,
    split: str = "test",
) -> dict[str, TaskReport]:
    """`evaluate_task` for each task on its rows of `split` in the long predictions table
    (columns `task` and `split`, as `training.finish.predictions_table` writes it)."""
    for column in ("task", "split"):
        if column not in predictions.columns:
            raise DatasetError(f"the predictions table has no {column!r} column")
    rows = predictions[predictions["split"] == split]
    if rows.empty:
        raise DatasetError(f"the predictions table has no {split!r} rows")
    frames = {t.name: rows[rows["task"] == t.name] for t in tasks}
    empty = [name for name, frame in frames.items() if frame.empty]
    if empty:
        raise DatasetError(
            f"the predictions table has no {split} rows for task(s) {', '.join(empty)}"
        )
    return {t.name: evaluate_task(t, frames[t.name], settings) for t in tasks}


def _metric_names(task: TaskLike) -> tuple[str, ...]:
    if task.kind == "binary":
        return BINARY_METRICS
    if task.kind == "ordinal":
        return ORDINAL_METRICS if task.refer_from is not None else ORDINAL_METRICS[:2]
    return REGRESSION_METRICS


def compare_models(
    task: TaskLike,
    frame_a: pd.DataFrame,
    frame_b: pd.DataFrame,
    metric: str,
    settings: EvaluationSettings | None = None,
) -> PairedDifference:
    """Model A's metric minus model B's on the same test samples (matched by scan_id), with
    a patient-level paired bootstrap interval and p-value. For AUROCs, `delong_auroc` gives
    DeLong's test as well (which takes samples as independent)."""
    settings = settings or EvaluationSettings()
    if metric not in _metric_names(task):
        raise DatasetError(
            f"task {task.name!r} ({task.kind}) has no metric {metric!r}; it has "
            f"{', '.join(_metric_names(task))}"
        )
    data_a, data_b = _paired(task, frame_a, frame_b)
    plan_a, plan_b = _plan(data_a, settings), _plan(data_b, settings)
    ones = np.ones((1, data_a.n))
    for plan, which in ((plan_a, "A"), (plan_b, "B")):
        if not np.isfinite(plan.kernels[metric](ones)[0]):
            raise DatasetError(
                f"task {task.name!r}: {metric} of model {which} is "
                f"{_UNDEFINED.get(metric, 'undefined on these samples')}"
            )
    return stats.paired_bootstrap(
        metric,
        plan_a.kernels[metric],
        plan_b.kernels[metric],
        data_a.patients,
        estimates=(float(plan_a.estimates[metric]()), float(plan_b.estimates[metric]())),
        resamples=settings.bootstrap,
        seed=settings.seed,
        confidence=settings.ci,
    )


def delong_auroc(
    task: TaskLike, frame_a: pd.DataFrame, frame_b: pd.DataFrame
) -> stats.DeLongResult:
    """DeLong's test of two models' AUROC (binary) or referral AUROC (ordinal) on the same
    test samples, matched by scan_id."""
    data_a, data_b = _paired(task, frame_a, frame_b)
    events = data_a.events
    if events is None or data_a.calibrated is None or data_b.calibrated is None:
        raise DatasetError(f"task {task.name!r} has no AUROC (binary, or ordinal with refer_from)")
    return stats.delong_test(events, data_a.calibrated, data_b.calibrated)


def _paired(task: TaskLike, frame_a: pd.DataFrame, frame_b: pd.DataFrame) -> tuple[_Data, _Data]:
    for frame, which in ((frame_a, "A"), (frame_b, "B")):
        if SCAN not in frame.columns:
            raise DatasetError(f"the prediction frame of model {which} has no scan_id column")
    ids_a, ids_b = set(frame_a[SCAN]), set(frame_b[SCAN])
    if ids_a != ids_b:
        raise DatasetError(
            f"task {task.name!r}: the two models were scored on different samples "
            f"({len(ids_a - ids_b)} only in A, {len(ids_b - ids_a)} only in B); compare "
            "models on the same test split"
        )
    a = frame_a.sort_values(SCAN, kind="stable").reset_index(drop=True)
    b = frame_b.sort_values(SCAN, kind="stable").reset_index(drop=True)
    data_a, keep_a = _task_data(task, a)
    data_b, keep_b = _task_data(task, b)
    if not np.array_equal(keep_a, keep_b) or not np.array_equal(data_a.y, data_b.y):
        raise DatasetError(f"task {task.name!r}: the two frames disagree on the labels")
    if not np.array_equal(data_a.patients, data_b.patients):
        raise DatasetError(f"task {task.name!r}: the two frames disagree on patient_id")
    return data_a, data_b


# -- plots ---------------------------------------------------------------------------------


def task_figures(
    task: TaskLike,
    frame: pd.DataFrame,
    report: TaskReport | None = None,
    settings: EvaluationSettings | None = None,
) -> dict[str, bytes]:
    """PNG images of a task: binary `roc.png`, `pr.png`, `reliability.png`; ordinal
    `confusion.png` (and `referral_roc.png` with refer_from); regression `scatter.png`.
    `report` adds the estimates and intervals to the legends."""
    from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

    settings = settings or EvaluationSettings()
    data, _ = _task_data(task, frame)
    found = report.metrics if report is not None else {}

    def label(metric: str, text: str) -> str:
        iv = found.get(metric)
        if iv is None:
            return text
        return f"{text} {iv.estimate:.3f} ({iv.ci_low:.3f}-{iv.ci_high:.3f})"

    figures: dict[str, bytes] = {}
    events = data.events
    if events is not None and data.calibrated is not None and 0 < events.sum() < events.size:
        p = data.calibrated
        name = "roc.png" if data.kind == "binary" else "referral_roc.png"
        metric = "auroc" if data.kind == "binary" else "referral_auroc"
        fpr, tpr, _ = roc_curve(events, p)

        def roc(ax: Axes) -> None:
            ax.plot(fpr, tpr, label=label(metric, "AUROC"))
            ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
            if data.threshold is not None:
                refer = p >= data.threshold
                sens = float(refer[events == 1].mean())
                spec = float((~refer[events == 0]).mean())
                ax.plot(
                    [1 - spec],
                    [sens],
                    "o",
                    color="black",
                    label=f"threshold {data.threshold:.3f}: sens {sens:.2f}, spec {spec:.2f}",
                )
            unit_axes(ax, f"{task.name}: ROC", "1 - specificity", "sensitivity")

        figures[name] = figure_png(roc)
    if data.kind == "binary" and events is not None and 0 < events.sum() < events.size:
        p, raw = _given(data.calibrated), _given(data.raw)
        precision, recall, _ = precision_recall_curve(events, p)
        prevalence = float(events.mean())

        def pr(ax: Axes) -> None:
            ax.plot(recall, precision, drawstyle="steps-post", label=label("auprc", "AUPRC"))
            ax.axhline(
                prevalence, linestyle=":", color="grey", label=f"prevalence {prevalence:.3f}"
            )
            unit_axes(ax, f"{task.name}: precision-recall", "recall (sensitivity)", "precision")

        def reliability(ax: Axes) -> None:
            for probs, text, metric in (
                (raw, "uncalibrated", "ece_uncalibrated"),
                (p, "calibrated", "ece"),
            ):
                centre, observed = _bin_means(probs, events, settings.ece_bins)
                ax.plot(centre, observed, "o-", label=label(metric, f"{text}, ECE"))
            ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
            unit_axes(
                ax, f"{task.name}: reliability", "predicted probability", "observed frequency"
            )

        figures["pr.png"] = figure_png(pr)
        figures["reliability.png"] = figure_png(reliability)
    if data.kind == "ordinal":
        matrix = confusion_matrix(data.y, data.predicted_grade, labels=list(range(data.classes)))

        def confusion(ax: Axes) -> None:
            ax.imshow(matrix, cmap="Blues")
            top = matrix.max() if matrix.size else 0
            for i in range(data.classes):
                for j in range(data.classes):
                    colour = "white" if top and matrix[i, j] > top / 2 else "black"
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=colour)
            ax.set_xticks(range(data.classes))
            ax.set_yticks(range(data.classes))
            ax.set_xlabel("predicted grade")
            ax.set_ylabel("true grade")
            title = f"{task.name}: confusion matrix"
            if "qwk" in found:
                title += f"\n{label('qwk', 'QWK')}"
            ax.set_title(title)

        figures["confusion.png"] = figure_png(confusion)
    if data.kind == "regression":
        value = _given(data.raw)

        def scatter(ax: Axes) -> None:
            ax.scatter(data.y, value, s=6, alpha=0.5, label=label("mae", "MAE"))
            low = float(min(data.y.min(), value.min()))
            high = float(max(data.y.max(), value.max()))
            ax.plot([low, high], [low, high], linestyle=":", color="grey", label="identity")
            ax.set_xlabel("label")
            ax.set_ylabel("prediction")
            ax.set_title(f"{task.name}: prediction vs label")
            ax.legend(loc="upper left", fontsize="small")

        figures["scatter.png"] = figure_png(scatter)
    return figures


def _bin_means(p: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    index = stats.ece_bins(p, bins)
    counts = np.bincount(index, minlength=bins)
    used = counts > 0
    mean_p = np.bincount(index, weights=p, minlength=bins)[used] / counts[used]
    mean_y = np.bincount(index, weights=y, minlength=bins)[used] / counts[used]
    return mean_p, mean_y


def unit_axes(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="lower right", fontsize="small")


def figure_png(draw: Callable[[Axes], None]) -> bytes:
    """One figure drawn on the Agg canvas (no pyplot, no global backend) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure.add_subplot())
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
