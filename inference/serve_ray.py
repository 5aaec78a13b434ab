"""The scoring service on Ray Serve: the same app (`inference.service.create_app`) in
replicas of one deployment, behind Serve's HTTP proxy (`eyehub serve --ray-address ADDR
--replicas N`; `--ray-address local` starts a Ray instance on this machine).

Each replica loads the model in its constructor, so Serve sends it requests only once it
can score, and a model that cannot be loaded fails the deployment with its reason. Each
replica follows the model's alias on its own (`reload_interval_s`). A replica reserves
`replica_cpus` CPUs (0.5 by default; Ray's default of 1 would fit one replica per core).
The hub key's secret travels to the replicas as a constructor argument, as it does to
ingest's Ray tasks; without a key file one random key is made here and shared by all
replicas, so a scan has the same pseudonym whichever replica scores it.

Replicas write their log records (the audit lines included) to their standard error, which
Ray forwards to this driver (under the CLI: to the log file) and keeps in the session's
worker logs.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from ray import serve

from eyehub.errors import ModelError, UsageError
from eyehub.logs import FILE_FORMAT
from inference.service import (
    ServiceSettings,
    ServiceState,
    check_settings,
    create_app,
    service_key,
    service_url,
)
from ingest.keys import HubKey

log = logging.getLogger(__name__)

APP_NAME = "eyehub-scoring"  # the Serve application
DEPLOYMENT_NAME = "eyehub-scoring"  # its one deployment


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class ScoringReplica:
    """One replica: the model loaded (or the constructor fails), then the service's app."""

    def __init__(self, settings: ServiceSettings, secret: bytes) -> None:
        _replica_logging()
        self.state = ServiceState(settings, key=HubKey(secret))
        self.state.load_now()  # errors fail the replica, and so the deployment, by name

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.state)


def _replica_logging() -> None:
    """eyehub's records (the audit lines) to the replica's standard error, which Ray
    forwards to the driver; a worker process has no logging configured otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    for name in ("inference", "eyehub", "ingest", "preprocess", "models"):
        logger = logging.getLogger(name)
        if not any(getattr(h, "_eyehub_replica", False) for h in logger.handlers):
            handler._eyehub_replica = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def connect(address: str) -> bool:
    """Connect to the Ray cluster at `address` ("local": start one on this machine);
    True when this call connected (the caller shuts it down). An initialised Ray is reused.

    Unlike the batch stages (`eyehub.compute.start_ray`), workers' output is forwarded to
    this driver: the replicas' audit lines must reach the service's log."""
    import ray

    if ray.is_initialized():
        return False
    logging.getLogger("ray").propagate = True  # Ray's records to the application's logging
    options: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "configure_logging": False,
    }
    if address == "local":
        ray.init(address="local", include_dashboard=False, **options)
    else:
        ray.init(address=address, **options)
    return True


def deploy(settings: ServiceSettings, secret: bytes) -> str:
    """Run the scoring app on the connected cluster's Serve with `settings.replicas`
    replicas; returns its URL once every replica has loaded the model."""
    check_settings(settings)
    if settings.port == 0:
        raise UsageError("Ray Serve needs a fixed --port (0 is not one)")
    serve.start(
        http_options={"host": settings.host, "port": settings.port}, proxy_location="HeadOnly"
    )
    app = ScoringReplica.options(  # type: ignore[attr-defined]
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus},
    ).bind(settings, secret)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:  # Serve's "Deploying application ... failed"
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise ModelError(
            f"Ray Serve could not start the scoring replicas ({first[:300]}); the replicas' "
            "errors are in the log"
        ) from None
    return service_url(settings.host, settings.port)


def replica_states() -> dict[str, int]:
    """How many of the deployment's replicas are in each state ({"RUNNING": 2})."""
    status = serve.status()
    app = status.applications.get(APP_NAME)
    if app is None:
        return {}
    deployment = app.deployments.get(DEPLOYMENT_NAME)
    if deployment is None:
        return {}
    return {str(k): int(v) for k, v in deployment.replica_states.items()}


def undeploy(shutdown_serve: bool) -> None:
    """Remove the scoring app (and, for a Ray instance of our own, Serve itself)."""
    if shutdown_serve:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)


def run_on_ray(settings: ServiceSettings, say: Callable[[str], None]) -> None:
    """Serve on Ray Serve until Ctrl-C or SIGTERM (`run_service` with `ray_address`)."""
    import ray

    check_settings(settings)
    if settings.port == 0:
        raise UsageError("Ray Serve needs a fixed --port (0 is not one)")
    key, note = service_key(settings.key_file)
    if note:
        say(f"note: {note}")
    if not settings.token:
        say("note: no API token (EYEHUB_API_TOKEN or --token-file): the API is open")
    assert settings.ray_address is not None  # run_service comes here only with one
    started = connect(settings.ray_address)
    own = settings.ray_address == "local" and started
    try:
        say(f"starting {settings.replicas} Ray Serve replica(s) of {settings.model}...")
        url = deploy(settings, key.secret)
        say(
            f"serving {settings.model} on Ray Serve at {url} ({settings.replicas} replica(s); "
            f"page: {url}/, API: {url}/docs); Ctrl-C stops"
        )
        _wait_for_signal()
    finally:
        try:
            undeploy(shutdown_serve=own)
        finally:
            if started:
                ray.shutdown()
    say("stopped")


def _wait_for_signal() -> None:
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        stop.wait()
        return
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in handled}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
