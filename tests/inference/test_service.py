"""The scoring service as a client sees it: `eyehub serve` in a subprocess, and the same
app under uvicorn in a thread of the test process (one per module, for speed), on
127.0.0.1 with free ports; real DICOM files, a real MLflow store, real HTTP."""

from __future__ import annotations

import base64
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
import pydicom
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from eyehub.errors import UsageError
from inference.registry import load_model
from inference.score import Scorer
from inference.service import (
    ServiceSettings,
    ServiceState,
    create_app,
    run_service,
    serve_in_thread,
)
from ingest import HubKey
from tests.inference.models import Registered, register
from tests.ingest.bad_inputs import TOO_LARGE_LIMIT, make_all, study

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT_S = 180  # a deadline for the service to come up or follow an alias; not a timing test


def _first(files: pd.DataFrame, kind: str, export: str | None = None) -> Path:
    rows = files[files.kind == kind]
    if export is not None:
        rows = rows[rows.export == export]
    return Path(rows.file.iloc[0])


def _wait_ready(url: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the service exited with {process.returncode}")
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url} was not ready within {WAIT_S} s")


def _post(url: str, path: Path, *, headers: dict[str, str] | None = None, **kw: Any) -> Any:
    files = {"file": ("scan.dcm", path.read_bytes(), "application/dicom")}
    return requests.post(f"{url}/v1/score", files=files, headers=headers, timeout=300, **kw)


def _comparable(exam: dict[str, Any]) -> dict[str, Any]:
    """What must agree between two scorings of one file (not the timings)."""
    return {k: exam[k] for k in ("scan", "eye", "status", "reason", "decision", "model")}


def _assert_same_figures(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert _comparable(got) == _comparable(want)
    assert [t["task"] for t in got["tasks"]] == [t["task"] for t in want["tasks"]]
    for g, w in zip(got["tasks"], want["tasks"], strict=True):
        assert g.get("decision") == w.get("decision"), g["task"]
        assert g.get("threshold") == w.get("threshold"), g["task"]
        for key in ("probability", "value"):
            if key in w:
                assert g[key] == pytest.approx(w[key], abs=1e-4), (g["task"], key)


def _in_process(reg: Registered, key: HubKey, path: Path, cache: Path) -> dict[str, Any]:
    loaded = load_model(f"models:/{reg.name}@champion", reg.tracking_uri, cache)
    (result,) = Scorer(loaded, key).score_files([path])
    return result.to_json()


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sample(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Lines(logging.Handler):
    """Every log record of the test process, formatted as the CLI's log file would be."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def audit(self) -> list[str]:
        return [line for line in self.lines if " inference.audit: " in line]


# -- one service for the module: uvicorn in a thread -----------------------------------------


@pytest.fixture(scope="module")
def records() -> Iterator[_Lines]:
    handler = _Lines()
    loggers = {name: logging.getLogger(name) for name in ("inference", "uvicorn")}
    levels = {name: logger.level for name, logger in loggers.items()}
    logging.getLogger().addHandler(handler)
    for logger in loggers.values():
        logger.setLevel(logging.DEBUG)
    yield handler
    logging.getLogger().removeHandler(handler)
    for name, logger in loggers.items():
        logger.setLevel(levels[name])


@pytest.fixture(scope="module")
def service(
    fundus_model: Registered,
    key_file: Path,
    records: _Lines,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """The fundus model by its alias, followed every second; a decoded-size limit below
    the big hostile photograph (the cohort's scans are far smaller)."""
    settings = ServiceSettings(
        model=f"models:/{fundus_model.name}@champion",
        tracking_uri=fundus_model.tracking_uri,
        cache=tmp_path_factory.mktemp("service-cache"),
        key_file=key_file,
        port=0,
        token=TOKEN,
        reload_interval_s=1.0,
        max_decoded_bytes=TOO_LARGE_LIMIT,
    )
    with serve_in_thread(settings) as running:
        _wait_ready(running.url)
        yield running.url


def test_the_routes_a_stranger_may_use_are_open_and_the_rest_need_the_token(
    service: str, cohort_files: pd.DataFrame
) -> None:
    assert requests.get(f"{service}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{service}/readyz", timeout=30).json()["status"] == "ready"
    page = requests.get(f"{service}/", timeout=30)
    assert page.status_code == 200 and "<title>eyehub" in page.text
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert requests.get(f"{service}/docs", timeout=30).status_code == 200
    assert "/v1/score" in requests.get(f"{service}/openapi.json", timeout=30).json()["paths"]
    fundus = _first(cohort_files, "fundus")
    for answer in (
        _post(service, fundus),
        _post(service, fundus, headers={"Authorization": "Bearer not-the-token"}),
        _post(service, fundus, headers={"Authorization": TOKEN}),  # no scheme
        requests.get(f"{service}/v1/model", timeout=30),
        requests.get(f"{service}/metrics", timeout=30),
    ):
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert answer.json()["error"] == "unauthorized"
    model = requests.get(f"{service}/v1/model", headers=AUTH, timeout=30).json()
    assert model["name"] == "eyehub-fundus_demo" and model["input"] == "fundus"


def test_a_photograph_comes_back_with_decisions_in_words_and_its_images_for_the_page(
    service: str, cohort_files: pd.DataFrame, hub_key: HubKey
) -> None:
    path = _first(cohort_files, "fundus")
    answer = _post(service, path, headers=AUTH, params={"images": "true"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    (exam,) = answer.json()  # always a list, one entry per exam
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert exam["scan"] == hub_key.scan_id(uid)
    assert exam["status"] == "scored" and exam["decision"] in ("refer", "routine")
    assert exam["headline"].startswith(exam["decision"].upper())
    assert {t["decision"] for t in exam["tasks"] if "decision" in t} <= {"refer", "routine"}
    (image,) = exam["images"]
    shown: dict[str, np.ndarray] = {}
    for key in ("display_png", "overlay_png"):
        decoded = cv2.imdecode(np.frombuffer(base64.b64decode(image[key]), np.uint8), 1)
        assert decoded is not None, f"{key} is not a PNG"
        assert decoded.shape[:2] == tuple(image["shape"][1:])  # the photograph's own size
        shown[key] = decoded
    assert not np.array_equal(shown["display_png"], shown["overlay_png"])  # the map is on it


def test_every_hostile_file_is_refused_with_its_reason_and_no_identifier(
    service: str, tmp_path: Path
) -> None:
    planted = study()
    words = [planted.patient_name, planted.patient_id, planted.address, planted.accession]
    for reason, path in make_all(tmp_path).items():
        answer = _post(service, path, headers=AUTH)
        assert answer.status_code == 400, (reason, answer.status_code, answer.text)
        body = answer.json()
        assert body["error"] == reason, (reason, body)
        assert body["detail"] and not any(w in answer.text for w in words), body
    assert requests.get(f"{service}/healthz", timeout=30).status_code == 200


def test_a_scan_the_model_cannot_take_or_no_scan_is_refused_with_the_reason(
    service: str, cohort_files: pd.DataFrame
) -> None:
    oct_file = _first(cohort_files, "oct")
    answer = _post(service, oct_file, headers=AUTH)
    assert answer.status_code == 400
    assert answer.json()["error"] == "wrong_modality"
    assert "fundus photographs" in answer.json()["detail"]
    sent_as = requests.post(
        f"{service}/v1/score",
        files={"fundus": ("a.dcm", oct_file.read_bytes())},
        headers=AUTH,
        timeout=60,
    )
    assert sent_as.status_code == 400 and sent_as.json()["error"] == "wrong_modality"
    empty = requests.post(f"{service}/v1/score", headers=AUTH, timeout=60)
    assert empty.status_code == 400 and empty.json()["error"] == "not_an_upload"
    unknown = requests.get(f"{service}/v2/nothing", timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"


def test_metrics_count_requests_by_route_and_status_errors_by_code_and_name_the_model(
    service: str, cohort_files: pd.DataFrame, fundus_model: Registered
) -> None:
    before = _metrics(service)
    assert _post(service, _first(cohort_files, "fundus"), headers=AUTH).status_code == 200
    assert _post(service, _first(cohort_files, "oct"), headers=AUTH).status_code == 400
    assert _post(service, _first(cohort_files, "fundus")).status_code == 401
    after = _metrics(service)

    def grew(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    requests_total = "eyehub_http_requests_total"
    assert grew(requests_total, path="/v1/score", method="POST", status="200") == 1
    assert grew(requests_total, path="/v1/score", method="POST", status="400") == 1
    assert grew(requests_total, path="/v1/score", method="POST", status="401") == 1
    assert grew("eyehub_errors_total", code="wrong_modality") == 1
    assert grew("eyehub_errors_total", code="unauthorized") == 1
    assert grew("eyehub_http_request_duration_seconds_count", path="/v1/score") == 3
    decisions = sum(grew("eyehub_exams_total", decision=d) for d in ("refer", "routine"))
    assert decisions == 1
    (info,) = [labels for (name, labels) in after if name == "eyehub_model_info"]
    assert dict(info)["version"] == fundus_model.version
    assert dict(info)["name"] == fundus_model.name
    assert _sample(after, "eyehub_model_loaded") == 1


def test_each_request_leaves_one_audit_line_with_the_scan_pseudonym_and_no_identifier(
    service: str,
    records: _Lines,
    cohort_files: pd.DataFrame,
    hub_key: HubKey,
    planted_identifiers: list[str],
) -> None:
    paths = [_first(cohort_files, "fundus", export) for export in ("op", "sc", "vl")]
    paths.append(_first(cohort_files, "oct"))  # refused: wrong modality, still audited
    ids: list[tuple[str, Path | None, int]] = []
    for path in paths:
        answer = _post(service, path, headers=AUTH)
        assert answer.status_code in (200, 400)
        ids.append((answer.headers["X-Request-ID"], path, answer.status_code))
    stranger = _post(service, paths[0])
    ids.append((stranger.headers["X-Request-ID"], None, 401))
    audit = records.audit()
    for request_id, sent, status in ids:
        (line,) = [a for a in audit if f"request={request_id} " in a]
        assert f"status={status} " in line and "route=/v1/score" in line
        assert "model=eyehub-fundus_demo version=" in line and "latency_ms=" in line
        if sent is not None:
            uid = str(pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID)
            assert f"scans={hub_key.scan_id(uid)} " in line
        if status == 400:
            assert "result=wrong_modality" in line
    assert records.lines, "nothing was logged"
    everything = "\n".join(records.lines)
    leaked = [p for p in planted_identifiers if p in everything]
    assert not leaked, leaked
    assert TOKEN not in everything


def test_a_moved_alias_is_followed_and_results_name_the_new_version(
    service: str,
    fundus_model: Registered,
    tracking_uri: str,
    cohort_files: pd.DataFrame,
    tmp_path: Path,
) -> None:
    def version() -> str:
        return str(requests.get(f"{service}/v1/model", headers=AUTH, timeout=30).json()["version"])

    def wait_for(wanted: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while version() != wanted:
            assert time.monotonic() < deadline, f"the service did not move to version {wanted}"
            time.sleep(0.5)

    assert version() == fundus_model.version
    newer = register("fundus_demo", tracking_uri, tmp_path, seed=1)  # moves champion
    assert newer.version != fundus_model.version
    try:
        wait_for(newer.version)
        answer = _post(service, _first(cohort_files, "fundus"), headers=AUTH)
        assert answer.json()[0]["model"]["version"] == newer.version
        metrics = _metrics(service)
        (info,) = [labels for (name, labels) in metrics if name == "eyehub_model_info"]
        assert dict(info)["version"] == newer.version
        assert _sample(metrics, "eyehub_model_reloads_total") >= 1
    finally:  # the session's other tests expect champion where the fixture put it
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        client.set_registered_model_alias(fundus_model.name, "champion", fundus_model.version)
    wait_for(fundus_model.version)


def test_without_a_model_the_service_lives_unready_and_a_bug_is_a_generic_500(
    fundus_model: Registered,
    tmp_path: Path,
    records: _Lines,
    planted_identifiers: list[str],
) -> None:
    settings = ServiceSettings(
        model="models:/eyehub-no_such_model@champion",
        tracking_uri=fundus_model.tracking_uri,
        cache=tmp_path,
        port=0,
        token=TOKEN,
    )
    app = create_app(ServiceState(settings))
    secret = planted_identifiers[0]

    @app.get("/v1/bug")
    def bug() -> None:  # a programming error whose message quotes a patient
        raise RuntimeError(f"cannot handle {secret}")

    with serve_in_thread(settings, app=app) as running:
        deadline = time.monotonic() + WAIT_S
        while True:
            ready = requests.get(f"{running.url}/readyz", timeout=30)
            if "could not be loaded" in ready.text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ready.status_code == 503
        assert ready.json()["error"] == "model_unavailable"
        assert "no registered model" in ready.json()["detail"]
        assert requests.get(f"{running.url}/healthz", timeout=30).status_code == 200
        score = requests.post(
            f"{running.url}/v1/score", files={"file": ("a", b"x")}, headers=AUTH, timeout=30
        )
        assert score.status_code == 503 and score.json()["error"] == "model_unavailable"

        failed = requests.get(f"{running.url}/v1/bug", headers=AUTH, timeout=30)
        assert failed.status_code == 500
        assert failed.json()["error"] == "internal_error"
        request_id = failed.headers["X-Request-ID"]
        assert request_id in failed.json()["detail"] and secret not in failed.text
        assert requests.get(f"{running.url}/healthz", timeout=30).status_code == 200
    logged = "\n".join(records.lines)
    assert f"request {request_id}: unexpected error" in logged
    assert "RuntimeError (message withheld)" in logged and "in bug" in logged
    assert secret not in logged


def test_a_service_without_a_token_only_listens_on_loopback(tmp_path: Path) -> None:
    settings = ServiceSettings(
        model="models:/eyehub-fundus_demo@champion",
        tracking_uri="sqlite:///unused.db",
        cache=tmp_path,
        host="0.0.0.0",
        token=None,
    )
    with pytest.raises(UsageError, match="without an API token"):
        run_service(settings, lambda line: None)


# -- eyehub serve, as a user starts it ------------------------------------------------------


def test_eyehub_serve_scores_as_the_scorer_does_refuses_strangers_and_large_uploads(
    fundus_model: Registered,
    cohort_files: pd.DataFrame,
    scoring_env: dict[str, str],
    scoring_home: Path,
    hub_key: HubKey,
    planted_identifiers: list[str],
    tmp_path: Path,
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **scoring_env, "EYEHUB_API_TOKEN": TOKEN, "COLUMNS": "200"}
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "eyehub.cli", "serve"]
    command += ["--model", f"models:/{fundus_model.name}@champion", "--port", str(port)]
    command += ["--max-upload-mb", "0.05"]
    fundus, oct_file = _first(cohort_files, "fundus"), _first(cohort_files, "oct")
    assert fundus.stat().st_size < 0.04 * 2**20 < 0.06 * 2**20 < oct_file.stat().st_size
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
    try:
        _wait_ready(url, process)
        # a file named after the patient, as exports often are: the name goes nowhere
        named = {"file": (f"{planted_identifiers[0]}.dcm", fundus.read_bytes())}
        scored = requests.post(f"{url}/v1/score", files=named, headers=AUTH, timeout=300)
        assert scored.status_code == 200, scored.text
        want = _in_process(fundus_model, hub_key, fundus, tmp_path / "cache")
        _assert_same_figures(scored.json()[0], want)

        assert _post(url, fundus).status_code == 401
        assert _post(url, fundus, headers={"Authorization": "Bearer wrong"}).status_code == 401

        too_large = _post(url, oct_file, headers=AUTH)  # with its Content-Length
        assert too_large.status_code == 413, too_large.text
        assert too_large.json()["error"] == "upload_too_large"
        chunked = requests.post(
            f"{url}/v1/score",
            data=_chunked_multipart(oct_file.read_bytes(), "bnd0123"),
            headers={**AUTH, "Content-Type": "multipart/form-data; boundary=bnd0123"},
            timeout=120,
        )
        assert chunked.request.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in chunked.request.headers
        assert chunked.status_code == 413 and chunked.json()["error"] == "upload_too_large"

        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # still up
        again = _post(url, fundus, headers=AUTH)
        assert again.status_code == 200 and again.json()[0]["scan"] == want["scan"]
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, err.read_text()[-3000:]
    printed = out.read_text()
    assert f"serving models:/{fundus_model.name}@champion at {url}" in printed
    assert "stopped" in printed

    logs = sorted((scoring_home / "logs").glob("eyehub-*.log"))
    assert logs, "eyehub serve wrote no log file"
    text = "\n".join(p.read_text() for p in logs) + printed + err.read_text()
    audit = [line for line in text.splitlines() if " inference.audit " in line]
    assert len(audit) == 6, audit  # one per /v1 request: 2 scored, 2 strangers, 2 too large
    assert sum(f"scans={want['scan']} " in line for line in audit) == 2
    assert sum("status=413" in line and "upload_too_large" in line for line in audit) == 2
    assert sum("status=401" in line for line in audit) == 2
    leaked = [p for p in planted_identifiers if p in text]
    assert not leaked, leaked
    assert TOKEN not in text


def _chunked_multipart(data: bytes, boundary: str) -> Iterator[bytes]:
    """A multipart body as a generator: requests sends it chunked, without Content-Length."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.dcm"\r\n'
        "Content-Type: application/dicom\r\n\r\n"
    ).encode()
    for start in range(0, len(data), 8192):
        yield data[start : start + 8192]
    yield f"\r\n--{boundary}--\r\n".encode()
