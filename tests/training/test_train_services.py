"""Training against real services: a two-node Ray cluster on loopback (DDP over gloo
across the nodes), a real `mlflow server` over HTTP, and the command line resuming a
run whose driver was killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from training.run import RUN_STATE

from .test_train import FAST

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with its own SQLite store and proxied artifacts."""
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [
            MLFLOW,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("mlflow server exited") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.cluster
def test_two_workers_across_a_two_node_cluster_track_to_an_mlflow_server(
    dataset: Path,
    tmp_path: Path,
    two_node_cluster: tuple[str, dict[str, str]],
    mlflow_server: str,
) -> None:
    """The command line on a two-node cluster (DDP over gloo, one worker per node), with
    MLFLOW_TRACKING_URI set to a real `mlflow server`: everything goes there over HTTP,
    artifacts and the registered model included, nothing to the local default store. One
    run for both services: each run costs a minute on 2 cores."""
    address, env = two_node_cluster
    home = tmp_path / "home"
    command = [*_train_command(dataset, "training.epochs=1"), "--workers", "2"]
    command += ["--ray-address", address]
    env = {**env, "EYEHUB_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
    out = subprocess.run(
        command,
        env={**env, "MLFLOW_TRACKING_URI": mlflow_server},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    client = mlflow.MlflowClient(mlflow_server)
    run_id = json.loads(next((home / "runs").glob(f"*/{RUN_STATE}")).read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.tags["eyehub.train_workers"] == "2"
    assert len(run.data.tags["eyehub.train_nodes"].split(",")) == 2  # one worker per node
    assert "test/referable_dr/auroc" in run.data.metrics
    local = Path(client.download_artifacts(run_id, "predictions", str(tmp_path)))
    assert len(pd.read_parquet(local / "predictions.parquet")) > 0
    version = client.get_model_version_by_alias("eyehub-fundus_demo", "candidate")
    assert version.run_id == run_id
    assert not (home / "mlflow.db").exists()  # nothing went to the local default store
    assert any((tmp_path / "server" / "artifacts").rglob("predictions.parquet"))


def _train_command(dataset: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "eyehub.cli", "train", "--config", "fundus_demo"]
    command += ["--dataset", str(dataset)]
    for override in [*FAST, *extra]:
        command += ["--set", override]
    return command


@pytest.mark.slow
def test_the_same_command_after_a_crash_resumes_into_the_same_run(
    dataset: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "EYEHUB_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = _train_command(dataset, "training.epochs=2")
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and not list((home / "runs").glob("*/checkpoint_*")):
            assert proc.poll() is None, "training ended before its first checkpoint"
            time.sleep(0.5)
        assert list((home / "runs").glob("*/checkpoint_*")), "no checkpoint within 10 minutes"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and what it started
        proc.wait(timeout=60)
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "stop", "--force"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    state_file = next((home / "runs").glob(f"*/{RUN_STATE}"))
    first = json.loads(state_file.read_text())
    assert first["status"] == "running"
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "resuming run" in out.stdout and first["run_id"] in out.stdout
    assert json.loads(state_file.read_text())["status"] == "finished"
    client = mlflow.MlflowClient(f"sqlite:///{(home / 'mlflow.db').resolve()}")
    history = client.get_metric_history(first["run_id"], "val/referable_dr/auroc")
    assert sorted({m.step for m in history}) == [0, 1]  # no epoch lost
    assert client.get_run(first["run_id"]).info.status == "FINISHED"
    assert "test metrics" in out.stdout and "models:/eyehub-fundus_demo@candidate" in out.stdout
