"""The same ingest against a real two-node Ray cluster started on loopback."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from eyehub.synth import generate_cohort

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def two_node_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head` and `ray start --address`, token-authenticated, on 127.0.0.1."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    temp = tempfile.mkdtemp(prefix="rayeh", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--temp-dir={temp}",
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=180,
        )
        subprocess.run(
            [RAY, "start", f"--address={address}", *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=180,
        )
        yield address, env
    finally:
        subprocess.run(
            [RAY, "stop", "--force"], env=env, capture_output=True, timeout=120, check=False
        )
        shutil.rmtree(temp, ignore_errors=True)


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
