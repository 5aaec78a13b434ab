"""Shared fixtures: small synthetic cohorts made in seconds by `eyehub.synth`."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from eyehub.synth import generate_cohort
from ingest import HubKey, generate_key_file, load_key, run_ingest
from ingest.run import IngestSettings, IngestSummary


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 patients at --size small, seed 11: every export kind and transfer syntax occurs."""
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, patients=24, seed=11, size="small", workers=2)
    return out


# A fixed test secret: pseudonyms (and so every output) are the same on every run, so a
# test that passes once passes always. keygen's own randomness is tested in test_keys.py.
TEST_SECRET_HEX = "6579656875622d746573742d6b65792d2d6e6f742d666f722d7265616c2d757365"


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "hub.key"
    generate_key_file(path)  # the real writer (mode 0600), then the fixed secret
    path.write_text(f"eyehub-key-v1\n{TEST_SECRET_HEX}\n", encoding="ascii")
    return path


@pytest.fixture(scope="session")
def hub_key(key_file: Path) -> HubKey:
    return load_key(key_file)


@pytest.fixture(scope="session")
def ingested(
    small_cohort: Path, hub_key: HubKey, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, IngestSummary]:
    """The small cohort ingested once (local Ray, 2 workers), with its labels."""
    dataset = tmp_path_factory.mktemp("dataset") / "ds"
    summary = run_ingest(
        [small_cohort / "dicom"],
        dataset,
        hub_key,
        small_cohort / "labels.csv",
        IngestSettings(workers=2),
    )
    return dataset, summary


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
