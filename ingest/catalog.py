"""`catalog.parquet` and `quarantine.parquet`, rebuilt from the records that are the truth.

The catalog is derived from the scans in `scans.zarr` (each carries its own row), joined
with the pseudonymised labels; quarantine records are one small JSON file per rejected
input under `.ingest/quarantine/`. Both tables are written to a temporary file and
renamed into place, so readers never see a half-written table and a killed run leaves
the previous one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from eyehub.storage import atomic_path, write_text_atomic
from ingest.store import iter_scans

CATALOG = "catalog.parquet"
QUARANTINE = "quarantine.parquet"
STATE = ".ingest"
LABELS = "labels.parquet"

CATALOG_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),
        ("patient_id", pa.string()),
        ("eye", pa.string()),
        ("modality", pa.string()),
        ("sop_class_uid", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("axes", pa.string()),
        ("dtype", pa.string()),
        ("spacing_mm", pa.list_(pa.float64())),
        ("manufacturer", pa.string()),
        ("model", pa.string()),
        ("acquisition_date", pa.date32()),
        ("study_date", pa.date32()),
        ("study_uid", pa.string()),
        ("transfer_syntax_uid", pa.string()),
        ("lossy", pa.bool_()),
        ("fov_fraction", pa.float64()),
        ("linked_scan_ids", pa.list_(pa.string())),
        ("source_sha256", pa.string()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("source_path", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("source_sha256", pa.string()),
    ]
)


def _atomic_write(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _quarantine_dir(dataset: Path) -> Path:
    return dataset / STATE / "quarantine"


def _record_name(source_path: str) -> str:
    return hashlib.sha256(source_path.encode("utf-8")).hexdigest()[:32] + ".json"


def record_quarantine(
    dataset: Path, source_path: str, reason: str, detail: str, sha256: str | None
) -> None:
    folder = _quarantine_dir(dataset)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "source_path": source_path,
        "reason": reason,
        "detail": detail,
        "source_sha256": sha256,
    }
    write_text_atomic(folder / _record_name(source_path), json.dumps(record))


def clear_quarantine(dataset: Path, source_path: str) -> None:
    (_quarantine_dir(dataset) / _record_name(source_path)).unlink(missing_ok=True)


def quarantine_records(dataset: Path) -> list[dict[str, Any]]:
    folder = _quarantine_dir(dataset)
    if not folder.is_dir():
        return []
    records = []
    for f in sorted(folder.glob("*.json")):
        try:
            records.append(json.loads(f.read_text(encoding="utf-8")))
        except json.JSONDecodeError:
            continue
    return sorted(records, key=lambda r: r["source_path"])


def rebuild_quarantine(dataset: Path) -> int:
    records = quarantine_records(dataset)
    table = pa.Table.from_pylist(records, schema=QUARANTINE_SCHEMA)
    _atomic_write(table, dataset / QUARANTINE)
    return len(records)


def save_labels(dataset: Path, labels: pd.DataFrame) -> None:
    """Keep the pseudonymised labels so later runs (and rebuilds) can join them."""
    (dataset / STATE).mkdir(parents=True, exist_ok=True)
    _atomic_write(pa.Table.from_pandas(labels, preserve_index=False), dataset / STATE / LABELS)


def load_labels(dataset: Path) -> pd.DataFrame | None:
    path = dataset / STATE / LABELS
    return pd.read_parquet(path) if path.exists() else None


def rebuild_catalog(dataset: Path) -> pd.DataFrame:
    """Write `catalog.parquet` from the stored scans and the saved labels; returns it."""
    rows = [attrs["eyehub"]["catalog"] for _, attrs in iter_scans(dataset)]
    base = pa.Table.from_pylist(
        [{k: _coerce(k, r.get(k)) for k in CATALOG_SCHEMA.names} for r in rows],
        schema=CATALOG_SCHEMA,
    )
    catalog = base.to_pandas()
    labels = load_labels(dataset)
    if labels is not None and len(labels.columns) > 3:
        labels = labels.copy()
        labels["study_date"] = pd.to_datetime(labels["study_date"]).dt.date
        catalog["study_date"] = pd.to_datetime(catalog["study_date"]).dt.date
        catalog = catalog.merge(labels, on=["patient_id", "eye", "study_date"], how="left")
    catalog = catalog.sort_values("scan_id").reset_index(drop=True)
    table = pa.Table.from_pandas(catalog, preserve_index=False)
    for name in ("acquisition_date", "study_date"):
        idx = table.schema.get_field_index(name)
        table = table.set_column(idx, name, table.column(name).cast(pa.date32()))
    _atomic_write(table, dataset / CATALOG)
    return catalog


def _coerce(name: str, value: Any) -> Any:
    """Stored rows keep dates as ISO text (JSON); the table wants dates."""
    if name in ("acquisition_date", "study_date") and isinstance(value, str):
        return dt.date.fromisoformat(value)
    return value
