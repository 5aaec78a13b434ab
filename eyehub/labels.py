"""The label registry: every label column eyehub knows, what kind it is and how it reads.

Ingest joins a labels file to the scans and refuses a column this registry does not know;
preprocess carries exactly these columns into the prepared index; training, evaluation
and scoring read a task's kind, classes, unit and level from here. So a new column in a
hospital's labels file never silently becomes a training target: it is added here first
(with its kind and meaning), or left out of the file.

Kinds:

- ``binary``: 0/1 (or two named values, e.g. ``sex`` M/F, where ``positive`` names the
  value read as 1);
- ``ordinal``: integer grades ``0 .. classes-1``;
- ``regression``: a number in ``unit``.

Level ``eye`` labels belong to one eye at one visit; ``patient`` labels to the person
(the same for both eyes at a visit). ``control`` marks a column with no cause in the
images (a model predicting it above chance has learnt something it must not, e.g.
patient identity leaking across splits).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from eyehub.errors import ConfigError, DatasetError

Kind = Literal["binary", "ordinal", "regression"]
Level = Literal["eye", "patient"]


@dataclass(frozen=True)
class LabelSpec:
    """One label column of the registry."""

    name: str
    kind: Kind
    level: Level
    description: str
    classes: int | None = None  # ordinal: number of grades
    unit: str | None = None  # regression
    positive: str = "1"  # binary: the value read as 1 ...
    negative: str = "0"  # ... and the one read as 0
    control: bool = False

    def encode(self, values: Iterable[Any]) -> np.ndarray:
        """Labels as float64 for training: binary 0/1, ordinal grade, regression value;
        NaN where missing. A value the kind does not allow raises DatasetError."""
        out = []
        bad = 0
        for v in values:
            if _is_na(v):
                out.append(np.nan)
                continue
            x = self._read(v)
            if x is None:
                bad += 1
                out.append(np.nan)
            else:
                out.append(x)
        if bad:
            raise DatasetError(
                f"label column '{self.name}' has {bad} value(s) that a {self.kind} label "
                f"cannot take ({self.allowed()})"
            )
        return np.asarray(out, dtype=np.float64)

    def allowed(self) -> str:
        """The values this label takes, in words (for error messages and docs)."""
        if self.kind == "binary":
            return f"{self.negative} or {self.positive}"
        if self.kind == "ordinal":
            return f"integer grades 0 to {(self.classes or 2) - 1}"
        return f"a number ({self.unit})"

    def invalid_count(self, values: Iterable[Any]) -> int:
        """How many present values this label cannot take."""
        return sum(1 for v in values if not _is_na(v) and self._read(v) is None)

    def _read(self, v: Any) -> float | None:
        if self.kind == "binary":
            text = _text(v)
            if text == self.positive:
                return 1.0
            if text == self.negative:
                return 0.0
            return None
        try:
            x = float(v)
        except (TypeError, ValueError):
            return None
        if not np.isfinite(x):
            return None
        if self.kind == "ordinal":
            classes = self.classes or 2
            if x != int(x) or not 0 <= x < classes:
                return None
        return x


def _is_na(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN, pandas.NA raises TypeError in bool()
    except TypeError:
        return True


def _text(v: Any) -> str:
    """1, 1.0, '1' and True all read as '1'; text is stripped and upper-cased."""
    if isinstance(v, bool | np.bool_):
        return "1" if v else "0"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v).strip().upper()


def _binary(name: str, level: Level, description: str, **kw: Any) -> LabelSpec:
    return LabelSpec(name, "binary", level, description, **kw)


LABELS: Mapping[str, LabelSpec] = {
    spec.name: spec
    for spec in (
        LabelSpec(
            "dr_grade",
            "ordinal",
            "eye",
            "diabetic retinopathy grade (ICDR 0 none, 1 mild, 2 moderate, 3 severe NPDR, 4 PDR)",
            classes=5,
        ),
        _binary("referable_dr", "eye", "referable diabetic retinopathy (grade 2 or above)"),
        _binary("amd", "eye", "age-related macular degeneration"),
        _binary("glaucoma", "eye", "glaucoma"),
        _binary("dme", "eye", "diabetic macular oedema"),
        LabelSpec("age", "regression", "patient", "age at the visit", unit="years"),
        _binary("sex", "patient", "sex recorded in the patient record", positive="M", negative="F"),
        _binary("diabetes", "patient", "diabetes mellitus"),
        _binary("hypertension", "patient", "hypertension"),
        LabelSpec("systolic_bp", "regression", "patient", "systolic blood pressure", unit="mmHg"),
        LabelSpec("hba1c", "regression", "patient", "glycated haemoglobin", unit="%"),
        _binary("cvd_5y", "patient", "a cardiovascular event within 5 years"),
        _binary("dementia", "patient", "dementia"),
        _binary(
            "null_control",
            "patient",
            "a random label with no cause in the images: it must stay at chance",
            control=True,
        ),
    )
}


def label_spec(name: str) -> LabelSpec:
    """The registry entry of `name`; an unknown label is a ConfigError naming it."""
    try:
        return LABELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown label '{name}'; eyehub's label registry (eyehub/labels.py) has "
            f"{', '.join(LABELS)}"
        ) from None


def check_label_columns(columns: Iterable[str], where: str) -> list[str]:
    """The label columns, in order; a column the registry does not know is refused."""
    columns = list(columns)
    unknown = [c for c in columns if c not in LABELS]
    if unknown:
        raise DatasetError(
            f"{where} has column(s) {', '.join(repr(c) for c in unknown)} that eyehub's label "
            "registry does not know; remove them, or add them to eyehub/labels.py with "
            "their kind (binary, ordinal, regression) and level (eye, patient)"
        )
    return columns
