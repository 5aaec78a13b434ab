"""One scan's catalog row (no pandas or pyarrow here: the conversion workers build rows,
and importing those would slow every worker's start; `ingest.catalog` writes the table)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

_DATE_COLUMNS = ("acquisition_date", "study_date")


@dataclass(frozen=True)
class CatalogRow:
    """One scan's row of `catalog.parquet`, before the labels are joined: the one
    definition of the catalog's columns (the Parquet schema is derived from it).

    Ingest stores each scan's row in the scan's own attributes (dates as ISO text), so the
    catalog can be rebuilt from the store; `from_stored` reads it back."""

    scan_id: str
    patient_id: str  # keyed pseudonym
    eye: str  # R | L
    modality: str  # fundus | oct
    sop_class_uid: str | None
    shape: list[int]
    axes: str  # "cyx" (fundus) | "zyx" (OCT: B-scan, depth, A-scan)
    dtype: str
    spacing_mm: list[float] | None
    manufacturer: str | None
    model: str | None
    acquisition_date: dt.date | None  # shifted
    study_date: dt.date | None  # shifted
    study_uid: str | None  # pseudonymised
    transfer_syntax_uid: str | None
    lossy: bool
    # fundus: share of the photograph kept by Clean Pixel Data (the lit region's convex
    # hull; everything outside it was zeroed). Not the circle preprocess fits: see
    # `fov_fraction` in the prepared index.
    fov_mask_fraction: float | None
    linked_scan_ids: list[str]  # scan_ids this scan references (OCT -> its fundus)
    source_sha256: str

    def to_stored(self) -> dict[str, Any]:
        """The row as JSON (dates as ISO text), as stored in the scan's attributes."""
        row = dataclasses.asdict(self)
        for name in _DATE_COLUMNS:
            if row[name] is not None:
                row[name] = row[name].isoformat()
        return row

    @classmethod
    def from_stored(cls, row: dict[str, Any]) -> CatalogRow:
        values: dict[str, Any] = {f.name: row.get(f.name) for f in dataclasses.fields(cls)}
        for name in _DATE_COLUMNS:
            if isinstance(values[name], str):
                values[name] = dt.date.fromisoformat(values[name])
        if values["fov_mask_fraction"] is None:  # datasets written before the rename
            values["fov_mask_fraction"] = row.get("fov_fraction")
        values["lossy"] = bool(values["lossy"])
        values["linked_scan_ids"] = list(values["linked_scan_ids"] or [])
        return cls(**values)
