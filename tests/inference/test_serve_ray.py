"""The scoring service on Ray Serve: two replicas on a local Ray instance answer over HTTP
exactly as the plain uvicorn service does."""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests

from inference.service import ServiceSettings, serve_in_thread
from ingest import HubKey
from tests.inference.models import Registered

TOKEN = "ray-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _score(url: str, path: Path) -> Any:
    files = {"file": ("scan.dcm", path.read_bytes(), "application/dicom")}
    answer = requests.post(f"{url}/v1/score", files=files, headers=AUTH, timeout=300)
    assert answer.status_code == 200, answer.text
    (exam,) = answer.json()
    return exam


def _figures(exam: dict[str, Any]) -> dict[str, Any]:
    """What two scorings of one file must agree on (not the timings)."""
    keep = ("scan", "eye", "status", "reason", "decision", "headline", "model")
    tasks = [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()}
        for t in exam["tasks"]
    ]
    return {**{k: exam[k] for k in keep}, "tasks": tasks}


@pytest.mark.slow
def test_two_serve_replicas_score_a_photograph_as_the_uvicorn_service_does(
    fundus_model: Registered,
    key_file: Path,
    hub_key: HubKey,
    cohort_files: pd.DataFrame,
    tmp_path: Path,
) -> None:
    import ray

    from inference import serve_ray

    path = Path(cohort_files[cohort_files.kind == "fundus"].file.iloc[0])
    settings = ServiceSettings(
        model=f"models:/{fundus_model.name}@champion",
        tracking_uri=fundus_model.tracking_uri,
        cache=tmp_path / "cache",
        key_file=key_file,
        port=0,
        token=TOKEN,
    )
    with serve_in_thread(settings) as plain:
        deadline = time.monotonic() + 180
        while requests.get(f"{plain.url}/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the uvicorn service did not load its model"
            time.sleep(0.25)
        want = _figures(_score(plain.url, path))

    on_ray = dataclasses.replace(settings, port=_free_port(), replicas=2)
    if ray.is_initialized():  # left by an earlier test; this one needs a fresh local instance
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        url = serve_ray.deploy(on_ray, hub_key.secret)  # returns once both replicas loaded
        assert serve_ray.replica_states() == {"RUNNING": 2}
        for _ in range(4):  # Serve spreads requests over the replicas; each scores the same
            assert _figures(_score(url, path)) == want
        model = requests.get(f"{url}/v1/model", headers=AUTH, timeout=60).json()
        assert model["version"] == fundus_model.version
        stranger = requests.post(f"{url}/v1/score", files={"file": ("a", b"x")}, timeout=60)
        assert stranger.status_code == 401
        assert requests.get(f"{url}/readyz", timeout=60).json()["status"] == "ready"
    finally:
        serve_ray.undeploy(shutdown_serve=True)
        ray.shutdown()
