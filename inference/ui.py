"""`eyehub ui`: MLflow's own UI on the project's tracking store.

The tracking store is the one every eyehub command uses (`Environment.default_tracking_uri`:
`MLFLOW_TRACKING_URI`, else `sqlite:///<EYEHUB_HOME>/mlflow.db`), so a reviewer never has
to name the backend. A store that is a database or a folder gets `mlflow server` started on
it as a child process (new experiments' artifacts under `<EYEHUB_HOME>/artifacts`, where
training puts them; one worker), listening on 127.0.0.1 unless told otherwise; the command
waits until the server answers `/health`, says where it is, and stops it (its whole
process group) when interrupted (Ctrl+C, SIGTERM, SIGHUP). A tracking store that is
already a server (`http(s)://`) has its UI there: the command only says so.

MLflow's server answers only requests whose Host header is localhost or a private address
(`--allowed-hosts` in `mlflow server --help`); `--host 0.0.0.0` binds every interface but
does not change that.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eyehub.errors import EyehubError, UsageError

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # a first start creates and migrates the SQLite store


class UiError(EyehubError, RuntimeError):
    """MLflow's server did not start (the log file has its output)."""


def server_command(tracking_uri: str, home: Path, host: str, port: int) -> list[str]:
    """`mlflow server` on the tracking store, with this interpreter's MLflow."""
    artifacts = (home / "artifacts").resolve()
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--default-artifact-root",
        artifacts.as_uri(),
        "--artifacts-destination",
        artifacts.as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def check_port(host: str, port: int) -> None:
    """Refuse a port another program already listens on."""
    if not 0 < port < 65536:
        raise UsageError(f"--port must be 1-65535 (got {port})")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise UsageError(
                f"port {port} on {host} is in use (another MLflow UI?); choose one with --port"
            ) from None


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://{shown}:{port}/"


def run_ui(
    tracking_uri: str,
    home: Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    on_line: Callable[[str], None] | None = None,
    open_browser: bool = False,
) -> None:
    """Serve MLflow's UI on the tracking store until interrupted (see the module doc)."""
    say = on_line or (lambda text: log.info("%s", text))
    if tracking_uri.startswith(("http://", "https://")):
        say(f"the tracking store is an MLflow server: its UI is at {_safe(tracking_uri)}")
        return
    check_port(host, port)
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    (home / "artifacts").mkdir(parents=True, exist_ok=True)
    command = server_command(tracking_uri, home, host, port)
    log.debug("starting %s", " ".join(command))
    # its own session: a Ctrl+C reaches this process only, which then stops the server's
    # whole group (uvicorn and its worker); its output goes where ours goes (the log file)
    try:
        output: int = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (tests)
        output = subprocess.DEVNULL
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        start_new_session=True,
    )
    previous = _stop_on_signals()
    try:
        url = url_for(host, port)
        _wait_ready(process, url)
        say(f"MLflow UI on {_safe(tracking_uri)}: {url}  (Ctrl+C stops it)")
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        while process.poll() is None:
            time.sleep(0.5)
        raise UiError(f"MLflow's server stopped by itself (exit status {process.returncode})")
    except KeyboardInterrupt:
        say("stopping the MLflow UI")
    finally:
        stop(process)
        for number, handler in previous.items():
            signal.signal(number, handler)


def _interrupt(number: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {number}")


def _stop_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP (a supervisor, a closed terminal) stop the server as Ctrl+C does;
    returns the handlers they replaced (none outside the main thread)."""
    previous: dict[int, Any] = {}
    for number in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[number] = signal.signal(number, _interrupt)
        except ValueError:  # not the main thread: signals stay as they were
            break
    return previous


def _wait_ready(process: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UiError(
                f"MLflow's server exited at start (status {process.returncode}); its output "
                "is in the log file"
            )
        try:
            with urllib.request.urlopen(url + "health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise UiError(f"MLflow's server did not answer at {url} within {READY_TIMEOUT_S:.0f} s")


def stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL after `grace_s`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        process.wait(timeout=grace_s)


def _safe(uri: str) -> str:
    """A tracking URI without credentials (user:password@ in a URL)."""
    import re

    return re.sub(r"//[^/@]+@", "//***@", uri)
