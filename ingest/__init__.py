"""Ingest: ophthalmic DICOM to a de-identified OME-Zarr dataset, distributed with Ray.

Public names: `run_ingest`, `IngestSettings`, `IngestSummary`, `HubKey`, `load_key`,
`generate_key_file`, `read_scan` (the Ray-free reading kernel), `REASONS` (quarantine
reason codes), and the dataset file names.
"""

from ingest.catalog import CATALOG, QUARANTINE
from ingest.keys import HubKey, generate_key_file, load_key
from ingest.reader import REASONS, DecodedScan, read_scan
from ingest.run import IngestSettings, IngestSummary, parse_size, run_ingest
from ingest.store import SCANS, read_pixels

__all__ = [
    "CATALOG",
    "QUARANTINE",
    "REASONS",
    "SCANS",
    "DecodedScan",
    "HubKey",
    "IngestSettings",
    "IngestSummary",
    "generate_key_file",
    "load_key",
    "parse_size",
    "read_pixels",
    "read_scan",
    "run_ingest",
]
