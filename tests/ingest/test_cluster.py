"""The same ingest against a real two-node Ray cluster started on loopback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from eyehub.synth import generate_cohort


@pytest.mark.slow
@pytest.mark.cluster
def test_ingest_runs_on_both_nodes_of_a_cluster(
    tmp_path: Path, key_file: Path, two_node_cluster: tuple[str, dict[str, str]]
) -> None:
    address, env = two_node_cluster
    src = tmp_path / "src"
    generate_cohort(src, patients=4, seed=44, workers=2)
    total = sum(1 for p in (src / "dicom").rglob("*") if p.is_file())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "eyehub.cli",
            "ingest",
            str(src / "dicom"),
            "--out",
            str(tmp_path / "ds"),
            "--key-file",
            str(key_file),
            "--ray-address",
            address,
            "--workers",
            "2",
        ],
        env={**env, "COLUMNS": "200", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{total} converted" in out.stdout
    nodes = re.search(r"on (\d+) Ray node", out.stdout)
    assert nodes is not None and int(nodes.group(1)) == 2, out.stdout
    assert len(pd.read_parquet(tmp_path / "ds" / "catalog.parquet")) == total
