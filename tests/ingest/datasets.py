"""What a dataset holds, for tests that compare two of them (reruns, executors, decoders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from ingest.catalog import CATALOG
from ingest.store import SCANS

Scans = dict[str, tuple[dict[str, Any], np.ndarray]]  # scan_id: (attributes, pixels)


def dataset_state(dataset: Path) -> tuple[pd.DataFrame, Scans]:
    """The catalog (by scan_id) and each scan's (attributes, pixels)."""
    catalog = pd.read_parquet(dataset / CATALOG).sort_values("scan_id").reset_index(drop=True)
    scans: Scans = {}
    for scan_dir in sorted((dataset / SCANS).iterdir()):
        if scan_dir.is_dir():
            attrs = zarr.open_group(scan_dir, mode="r").attrs.asdict()
            pixels = np.asarray(zarr.open_array(scan_dir / "0", mode="r")[...])
            scans[scan_dir.name] = (attrs, pixels)
    return catalog, scans


def assert_same_scans(want: Scans, got: Scans) -> None:
    """The same scans, attributes and pixels (shape and dtype included)."""
    assert want.keys() == got.keys()
    for scan_id, (attrs, pixels) in want.items():
        assert attrs == got[scan_id][0], scan_id
        assert pixels.dtype == got[scan_id][1].dtype, scan_id
        assert np.array_equal(pixels, got[scan_id][1]), scan_id
