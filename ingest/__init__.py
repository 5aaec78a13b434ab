"""Ingest: ophthalmic DICOM to a de-identified OME-Zarr dataset, distributed with Ray.

Public names: `run_ingest`, `IngestSettings`, `IngestSummary`, `HubKey`, `load_key`,
`generate_key_file`, `load_scan` and `ScanPixels` (the Ray-free scan kernel: a DICOM file
or its bytes to the pixels ingest stores, Clean Pixel Data included), `read_scan` (decode
only), `REASONS` (quarantine reason codes), and the dataset file names.

Names are imported from their submodule on first use (PEP 562): `from ingest import
read_pixels` loads the store reader, not the Ray driver (`ingest.run`) or the converter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eyehub.lazy import lazy_exports

if TYPE_CHECKING:
    from ingest.catalog import CATALOG, QUARANTINE
    from ingest.kernel import ScanPixels, load_scan
    from ingest.keys import HubKey, generate_key_file, load_key
    from ingest.reader import REASONS, DecodedScan, read_scan
    from ingest.run import IngestSettings, IngestSummary, parse_size, run_ingest
    from ingest.store import SCANS, read_pixels

# public name -> the submodule that defines it, imported when the name is first used
_SOURCES = {
    "CATALOG": "ingest.catalog",
    "QUARANTINE": "ingest.catalog",
    "ScanPixels": "ingest.kernel",
    "load_scan": "ingest.kernel",
    "HubKey": "ingest.keys",
    "generate_key_file": "ingest.keys",
    "load_key": "ingest.keys",
    "REASONS": "ingest.reader",
    "DecodedScan": "ingest.reader",
    "read_scan": "ingest.reader",
    "IngestSettings": "ingest.run",
    "IngestSummary": "ingest.run",
    "parse_size": "ingest.run",
    "run_ingest": "ingest.run",
    "SCANS": "ingest.store",
    "read_pixels": "ingest.store",
}

__all__ = [
    "CATALOG",
    "QUARANTINE",
    "REASONS",
    "SCANS",
    "DecodedScan",
    "HubKey",
    "IngestSettings",
    "IngestSummary",
    "ScanPixels",
    "generate_key_file",
    "load_key",
    "load_scan",
    "parse_size",
    "read_pixels",
    "read_scan",
    "run_ingest",
]

# mypy and editors see the imports above; only the interpreter sees __getattr__, so a
# misspelt name is still a type error rather than Any
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, _SOURCES, globals())
