"""The labels file: read, pseudonymise, and keep only what may leave ingest.

`labels.csv` is keyed by MRN, eye and study date, as hospital records are. Each row's key
becomes (patient_id, eye, shifted study date) under the hub's key, the same transform the
scans get, so labels join to scans without the MRN or the real date ever being stored.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pandas as pd

from eyehub.errors import DatasetError, NotFoundError, UsageError
from eyehub.labels import LABELS, check_label_columns
from ingest.keys import HubKey

log = logging.getLogger(__name__)

KEY_COLUMNS = ("mrn", "eye", "study_date")
_EYES = {"R": "R", "RIGHT": "R", "OD": "R", "L": "L", "LEFT": "L", "OS": "L"}


def _parse_date(text: str) -> dt.date | None:
    text = text.strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d", "%d/%m/%Y"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


def read_labels(path: Path, key: HubKey) -> pd.DataFrame:
    """Pseudonymised labels: `patient_id, eye, study_date` (shifted) + the label columns.

    Rows whose key cannot be read are skipped and counted (by line number, never value).
    Empty cells stay empty (null).
    """
    if not path.is_file():
        raise NotFoundError(f"labels file {path} does not exist")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UsageError(
            f"labels file {path} is not a readable CSV ({type(exc).__name__})"
        ) from None
    raw.columns = [c.strip().lower() for c in raw.columns]
    missing = [c for c in KEY_COLUMNS if c not in raw.columns]
    if missing:
        raise UsageError(
            f"labels file {path} lacks the column(s) {', '.join(missing)}; it must be keyed "
            "by mrn, eye and study_date"
        )
    try:
        label_cols = check_label_columns(
            [c for c in raw.columns if c not in KEY_COLUMNS], f"labels file {path}"
        )
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    records = []
    bad_lines = []
    for i, row in enumerate(raw.itertuples(index=False), start=2):
        values = dict(zip(raw.columns, row, strict=True))
        mrn = values["mrn"].strip()
        eye = _EYES.get(values["eye"].strip().upper())
        date = _parse_date(values["study_date"])
        if not mrn or eye is None or date is None:
            bad_lines.append(i)
            continue
        pid = key.patient_id(mrn)
        rec = {"patient_id": pid, "eye": eye, "study_date": key.shift_date(pid, date)}
        rec.update({c: values[c] for c in label_cols})
        records.append(rec)
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:10])) + (" ..." if len(bad_lines) > 10 else "")
        log.warning(
            "labels: skipped %d row(s) with an unreadable mrn, eye or study_date (lines %s)",
            len(bad_lines),
            shown,
        )
    table = pd.DataFrame.from_records(
        records, columns=["patient_id", "eye", "study_date", *label_cols]
    )
    dupes = table.duplicated(["patient_id", "eye", "study_date"], keep="last")
    if dupes.any():
        log.warning(
            "labels: %d duplicate (mrn, eye, study_date) row(s); the last one wins",
            int(dupes.sum()),
        )
        table = table[~dupes]
    for col in label_cols:
        table[col] = _typed(table[col])
        bad = LABELS[col].invalid_count(table[col])
        if bad:
            raise UsageError(
                f"labels file {path}: column '{col}' has {bad} value(s) that a "
                f"{LABELS[col].kind} label cannot take; it takes {LABELS[col].allowed()}"
            )
    return table.reset_index(drop=True)


def _typed(column: pd.Series) -> pd.Series:
    """Numbers become nullable numbers (integers stay integers); text stays text."""
    text = column.astype(str).str.strip()
    empty = text == ""
    numeric = pd.to_numeric(text.where(~empty), errors="coerce")
    if bool(numeric[~empty].notna().all()):
        if bool((numeric.dropna() % 1 == 0).all()):
            return numeric.astype("Int64")
        return numeric.astype("Float64")
    return text.where(~empty).astype("string")
