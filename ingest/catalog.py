"""`catalog.parquet` and `quarantine.parquet`, rebuilt from the records that are the truth.

The catalog is derived from the scans in `scans.zarr` (each carries its own row), joined
with the pseudonymised labels; quarantine records are one small JSON file per rejected
input under `.ingest/quarantine/`. Both tables are written to a temporary file and
renamed into place, so readers never see a half-written table and a killed run leaves
the previous one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from eyehub.labels import check_label_columns
from eyehub.reasons import QUARANTINE_REASONS, check_reason
from eyehub.storage import atomic_path, write_text_atomic
from ingest.row import CatalogRow
from ingest.store import iter_scans

CATALOG = "catalog.parquet"
QUARANTINE = "quarantine.parquet"
STATE = ".ingest"
LABELS = "labels.parquet"
LABEL_KEYS = ("patient_id", "eye", "study_date")  # how labels join to scans


_ARROW_TYPES: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    dt.date: pa.date32(),
    list[int]: pa.list_(pa.int64()),
    list[float]: pa.list_(pa.float64()),
    list[str]: pa.list_(pa.string()),
}


def _arrow_schema(cls: type) -> pa.Schema:
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = isinstance(hint, types.UnionType) and len(args) == 1
        base = args[0] if nullable else hint
        fields.append(pa.field(f.name, _ARROW_TYPES[base], nullable=True))
    return pa.schema(fields)


CATALOG_SCHEMA = _arrow_schema(CatalogRow)
CATALOG_COLUMNS = tuple(CATALOG_SCHEMA.names)

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
    check_reason(reason, QUARANTINE_REASONS)
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
    """Write `catalog.parquet` from the stored scans and the saved labels; returns it.

    Columns: `CatalogRow`'s, then the label columns (each known to the label registry)."""
    rows = [CatalogRow.from_stored(attrs["eyehub"]["catalog"]) for _, attrs in iter_scans(dataset)]
    base = pa.Table.from_pylist([dataclasses.asdict(r) for r in rows], schema=CATALOG_SCHEMA)
    catalog = base.to_pandas()
    labels = load_labels(dataset)
    if labels is not None:
        label_columns = check_label_columns(labels.columns[len(LABEL_KEYS) :], "the labels file")
        if label_columns:
            labels = labels.copy()
            labels["study_date"] = pd.to_datetime(labels["study_date"]).dt.date
            catalog["study_date"] = pd.to_datetime(catalog["study_date"]).dt.date
            catalog = catalog.merge(labels, on=list(LABEL_KEYS), how="left")
    catalog = catalog.sort_values("scan_id").reset_index(drop=True)
    table = pa.Table.from_pandas(catalog, preserve_index=False)
    for field in CATALOG_SCHEMA:  # the contract's types, whatever pandas made of them
        idx = table.schema.get_field_index(field.name)
        table = table.set_column(idx, field, table.column(field.name).cast(field.type))
    _atomic_write(table, dataset / CATALOG)
    return catalog


def label_columns(catalog: pd.DataFrame) -> list[str]:
    """The label columns of a catalog (or a table that carries its columns): every column
    that is not the catalog's own; one the label registry does not know is refused."""
    return check_label_columns(
        [c for c in catalog.columns if c not in CATALOG_COLUMNS], "the catalog"
    )
