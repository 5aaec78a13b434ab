"""The scoring service: FastAPI under uvicorn (or Ray Serve), and the clinician's page.

SKELETON: to be implemented."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServiceSettings:
    model: str  # models:/eyehub-<name>@<alias>, models:/.../<version>, or a model directory
    tracking_uri: str
    cache: Path  # where registered models are downloaded (EYEHUB_HOME/cache/models)
    key_file: Path | None = None  # the hub key for the audit pseudonyms (else per-process)
    host: str = "127.0.0.1"
    port: int = 8080
    max_upload_mb: float = 512
    token: str | None = None  # bearer token (None: EYEHUB_API_TOKEN or --token-file unset)
    reload_interval_s: float = 30.0  # how often the alias is looked up again
    device: str = "cpu"
    ray_address: str | None = None  # serve on Ray Serve at this cluster instead of uvicorn
    replicas: int = 1


def run_service(settings: ServiceSettings, say: Callable[[str], None]) -> None:
    """Serve until interrupted; `say` prints a line for the person who started it."""
    raise NotImplementedError
