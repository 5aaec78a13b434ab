"""A real Orthanc PACS for the tests: the Debian package with its DICOMweb plugin, on
127.0.0.1 and a free port, its storage in a temporary folder, stopped by its pid.

Orthanc 1.10 has no option to bind the HTTP server to one address; with
`RemoteAccessAllowed: false` it refuses every client but the local host. Its DICOM
(C-STORE) server is switched off: the tests speak DICOMweb only.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.tools import need_tool

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc: its REST API at `url`, DICOMweb at `dicomweb`."""

    url: str
    folder: Path
    auth: tuple[str, str] | None = None

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log(self) -> Path:
        return self.folder / "orthanc.log"

    def get(self, path: str) -> Any:
        answer = requests.get(f"{self.url}{path}", auth=self.auth, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def upload(self, file: Path) -> dict[str, Any]:
        """Store a DICOM file through the REST API (`POST /instances`), bytes as they are."""
        answer = requests.post(
            f"{self.url}/instances", data=file.read_bytes(), auth=self.auth, timeout=60
        )
        answer.raise_for_status()
        stored: dict[str, Any] = answer.json()
        return stored

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance Orthanc holds in the study (found with `/tools/find`): its
        Orthanc `id`, its `tags` (simplified) and its parent `patient`'s Orthanc id."""
        query = {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        answer = requests.post(f"{self.url}/tools/find", json=query, auth=self.auth, timeout=30)
        answer.raise_for_status()
        out = []
        for study_id in answer.json():
            for instance in self.get(f"/studies/{study_id}/instances"):
                tags = self.get(f"/instances/{instance['ID']}/simplified-tags")
                patient = self.get(f"/instances/{instance['ID']}/patient")
                out.append({"id": instance["ID"], "tags": tags, "patient": patient["ID"]})
        return out

    def file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance."""
        answer = requests.get(
            f"{self.url}/instances/{instance_id}/file", auth=self.auth, timeout=60
        )
        answer.raise_for_status()
        return answer.content


@contextmanager
def running_orthanc(folder: Path, users: dict[str, str] | None = None) -> Iterator[Orthanc]:
    """Start Orthanc with its DICOMweb plugin in `folder` (config, storage, log), wait
    until its REST API answers, and stop it (by pid) at the end. With `users`, HTTP basic
    authentication is required (user -> password). A port taken between choosing it and
    Orthanc binding it (another test run on this machine) costs a retry on another."""
    need_tool(ORTHANC, DICOMWEB_PLUGIN)
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        server, process = _start(folder, users)
        try:
            if _wait_until_up(server, process, last=attempt == 2):
                break
        except BaseException:
            _stop(process)
            raise
    try:
        yield server
    finally:
        _stop(process)


def _start(folder: Path, users: dict[str, str] | None) -> tuple[Orthanc, subprocess.Popen[bytes]]:
    port = free_port()
    config = {
        "Name": "eyehub-test-pacs",
        "HttpPort": port,
        "DicomPort": free_port(),  # unused: the DICOM server is off
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": users is not None,
        "RegisteredUsers": users or {},
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SaveJobs": False,
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
    auth = next(iter(users.items())) if users else None
    server = Orthanc(f"http://127.0.0.1:{port}", folder, auth)
    with server.log.open("wb") as log:
        process = subprocess.Popen(
            [ORTHANC, str(folder / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
    return server, process


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def _wait_until_up(server: Orthanc, process: subprocess.Popen[bytes], last: bool) -> bool:
    """True once Orthanc answers; False if it exited at start (and `last` is False)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if not last:
                return False
            tail = server.log.read_text()[-3000:]
            raise RuntimeError(f"Orthanc exited with {process.returncode} at start:\n{tail}")
        try:
            if requests.get(f"{server.url}/system", auth=server.auth, timeout=2).ok:
                return True
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(
        f"Orthanc did not answer in {START_TIMEOUT_S} s:\n{server.log.read_text()[-3000:]}"
    )
