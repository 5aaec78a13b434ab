"""`eyehub ui`: MLflow's UI on the project's tracking store, checked in a real browser (the
runs, the registered model and its aliases are listed), and stopped with everything it
started when interrupted."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from inference.compare import client_for
from tests.review.runs import CONFIG_NAME, MODEL_NAME, Store
from tests.tools import need_tool

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
WAIT_MS = 60_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def servers_on(port: int) -> list[int]:
    """Processes whose command line serves MLflow on `port`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"mlflow" in a or b"uvicorn" in a for a in args) and str(port).encode() in args:
            found.append(int(entry.name))
    return found


def test_the_ui_lists_the_runs_and_the_model_with_its_aliases(
    review_store: Store, store_uri: str, tmp_path: Path
) -> None:
    need_tool("chromium")
    from playwright.sync_api import Route, sync_playwright

    client = client_for(store_uri)
    client.set_registered_model_alias(MODEL_NAME, "champion", "1")
    client.set_registered_model_alias(MODEL_NAME, "previous", "2")
    experiment = client.get_experiment_by_name(CONFIG_NAME).experiment_id
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    env = {
        **os.environ,
        "EYEHUB_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": store_uri,
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "eyehub.cli", "ui", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 180
        while not answers(base + "health"):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the MLflow UI did not start"
            time.sleep(0.5)
        outside: list[str] = []

        def local_only(route: Route) -> None:
            if route.request.url.startswith(base):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            try:
                page = browser.new_page()
                page.route("**/*", local_only)
                page.goto(base + "#/models")
                page.get_by_text(MODEL_NAME).first.wait_for(timeout=WAIT_MS)
                page.goto(base + f"#/models/{MODEL_NAME}")
                for alias in ("champion", "previous", "candidate"):  # chips: "@ champion"
                    chip = page.get_by_text(re.compile(rf"^@\s*{alias}$"))
                    chip.first.wait_for(timeout=WAIT_MS)
                page.goto(base + f"#/experiments/{experiment}/runs")
                for run in review_store.runs:
                    page.get_by_text(f"{CONFIG_NAME}-{run}").first.wait_for(timeout=WAIT_MS)
            finally:
                browser.close()
        assert servers_on(port)
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl+C
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"eyehub ui did not stop on Ctrl+C: {err[-2000:]}")
    assert process.returncode == 0, err[-3000:]
    assert f"MLflow UI on {store_uri}: {base}" in out
    assert "stopping the MLflow UI" in out
    assert not answers(base + "health")
    assert servers_on(port) == []  # the server and its worker went with it
