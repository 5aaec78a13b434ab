"""The scoring service: FastAPI under uvicorn (or Ray Serve), and the clinician's page.

`eyehub serve` runs `run_service`: one process, plain uvicorn, bound to `host:port`; with
`--ray-address` the same app runs in Ray Serve replicas instead (`inference.serve_ray`).
A script (a benchmark, a test) starts it with `serve_in_thread`, or mounts `create_app`.

Routes (the OpenAPI description is at `/docs`):

- `POST /v1/score`: multipart/form-data with one DICOM file in field `file`, several
  `file` fields, or fields `fundus` and `oct` (a fusion model's exam). The answer is always
  a JSON list with one `ExamResult.to_json()` per exam (one file to a fundus or OCT model:
  a list of one). With `?images=true` each entry of an exam's `images` also carries
  `display_png` (the photograph, or the OCT B-scan shown) and `overlay_png` (the heat map
  over it; null when ungradable), base64 PNGs at most `image_max_side` pixels on a side.
- `GET /v1/model`: `LoadedModel.describe()` of the model scoring now.
- `GET /healthz`: the process answers (200). `GET /readyz`: 200 once a model is loaded,
  503 before (or while it cannot be loaded). `GET /metrics`: Prometheus text format.
- `GET /`: the clinician's page (`inference/static/`), self-contained (no CDN, no fonts).

Every `/v1/*` route and `/metrics` need `Authorization: Bearer <token>` when a token is
configured (401 otherwise, `WWW-Authenticate: Bearer`); `/`, `/static/*`, `/healthz`,
`/readyz` and `/docs` do not (the page asks for the token and sends it). Without a token
the service only listens on a loopback address (`run_service` refuses any other host).

Errors are JSON `{"error": code, "detail": sentence}` with the error's `http_status`: a
file that is not a usable DICOM scan answers 400 with its quarantine reason (`not_dicom`,
`truncated`, `not_ophthalmic`, ...), a scan the model cannot take 400 with its scoring
reason (`wrong_modality`, `incomplete_exam`, `not_an_upload`); the service's own codes are
`SERVICE_ERRORS`. An unexpected exception answers 500 `internal_error` with the request id;
its traceback (frames and type, never the message) goes to the log. An upload above
`max_upload_mb` is refused with 413 before it is read: by its Content-Length, or, sent
chunked, as soon as the bytes received pass the limit.

One audit line per `/v1/*` request goes to the logger `inference.audit` (under the CLI:
the log file, not the terminal): time, request id, route, HTTP status, model name and
version, the scans' keyed pseudonyms (`HubKey.scan_id` of the SOP Instance UID, as ingest
names them; without a key file a random per-process key, said at start), the result (the
decisions, or the error code) and the latency. Nothing identifying is logged: no file
name, no DICOM attribute, no token.

A model named by an alias (`models:/eyehub-<name>@champion`) is followed: every
`reload_interval_s` (default 30 s) a background thread asks the registry where the alias
points, and when it moved loads that version and swaps it in at once; requests already
scoring finish on the model they started with.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from eyehub.errors import (
    ConfigError,
    EyehubError,
    InputError,
    ModelError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UsageError,
)
from eyehub.failures import internal_traceback
from eyehub.reasons import SCORING_REASONS, check_reason
from inference.heatmap import png_bytes
from inference.registry import LoadedModel, ModelRef, current_version, load_model, parse_model_ref
from inference.score import ExamResult, Scan, Scorer
from ingest.kernel import DEFAULT_MAX_DECODED_BYTES
from ingest.keys import HubKey, load_key

log = logging.getLogger(__name__)
audit_log = logging.getLogger("inference.audit")

STATIC = Path(__file__).parent / "static"
MB = 2**20  # --max-upload-mb counts mebibytes

# The service's own error codes (`{"error": code}`), beside the scan reasons of
# eyehub.reasons (QUARANTINE_REASONS, SCORING_REASONS) that a refused scan answers with.
SERVICE_ERRORS: Mapping[str, str] = {
    "unauthorized": "no bearer token, or not the service's (401)",
    "upload_too_large": "the request body is larger than --max-upload-mb (413)",
    "model_unavailable": "no model is loaded yet, or it cannot be loaded (503)",
    "model_error": "the loaded model cannot take this input (422)",
    "bad_request": "a query or form field the route cannot take, or a malformed body (400)",
    "not_found": "no such route, or a model or file that does not exist (404)",
    "method_not_allowed": "the route does not take this HTTP method (405)",
    "internal_error": "a programming error in eyehub; the traceback is in the log (500)",
}

_ROUTES = ("/", "/healthz", "/readyz", "/metrics", "/v1/score", "/v1/model", "/docs")
_NEEDS_TOKEN = ("/v1/", "/metrics")
_AUDITED = "/v1/"
_AUDIT_KEY = "eyehub.audit"  # the scope entry a request's audit record travels in
_DRAIN_BYTES = 8 * MB  # read (and drop) at most this much of a refused body before answering
# the token's place in the OpenAPI description (/docs' Authorize button); the check itself is
# _Gate's, before a body is read
_BEARER = HTTPBearer(auto_error=False, description="The service's API token.")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{8,64}")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class ServiceSettings:
    model: str  # models:/eyehub-<name>@<alias>, models:/.../<version>, or a model directory
    tracking_uri: str
    cache: Path  # where registered models are downloaded (EYEHUB_HOME/cache/models)
    key_file: Path | None = None  # the hub key for the audit pseudonyms (else per-process)
    host: str = "127.0.0.1"
    port: int = 8080  # 0: a free port, chosen when the socket is bound
    max_upload_mb: float = 512
    token: str | None = None  # bearer token (None: EYEHUB_API_TOKEN or --token-file unset)
    reload_interval_s: float = 30.0  # how often the alias is looked up again
    device: str = "cpu"  # cpu | cuda | auto
    ray_address: str | None = None  # serve on Ray Serve at this cluster instead of uvicorn
    replicas: int = 1
    replica_cpus: float = 0.5  # Ray Serve: CPUs each replica reserves (Ray's default is 1)
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES  # a scan's declared decoded size
    max_concurrent: int = 2  # scorings at once per process; more requests wait their turn
    image_max_side: int = 1024  # ?images=true: the PNGs' longest side
    explain_task: str | None = None  # the task the heat map explains (default: primary)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)


def check_settings(settings: ServiceSettings) -> None:
    """Refuse settings that cannot work, before anything is loaded or bound."""
    parse_model_ref(settings.model)  # a malformed reference is a UsageError now
    if settings.token is not None and not _valid_token(settings.token):
        raise UsageError(
            "the API token must be printable ASCII without spaces (check EYEHUB_API_TOKEN "
            "or the --token-file)"
        )
    if not settings.token and not is_loopback(settings.host):
        raise UsageError(
            f"refusing to serve on {settings.host} without an API token: anyone who can "
            "reach it could send scans. Set EYEHUB_API_TOKEN or pass --token-file, or serve "
            "on 127.0.0.1"
        )
    if not 0 <= settings.port <= 65535:
        raise UsageError(f"--port must be 0..65535 (got {settings.port})")
    if settings.max_upload_mb <= 0:
        raise UsageError(f"--max-upload-mb must be above 0 (got {settings.max_upload_mb})")
    if settings.reload_interval_s <= 0:
        raise UsageError(f"--reload-interval must be above 0 (got {settings.reload_interval_s})")
    if settings.replicas < 1:
        raise UsageError(f"--replicas must be 1 or more (got {settings.replicas})")
    if settings.max_concurrent < 1:
        raise UsageError(f"max_concurrent must be 1 or more (got {settings.max_concurrent})")
    if settings.device not in ("cpu", "cuda", "auto"):
        raise UsageError(f"--device must be cpu, cuda or auto (got {settings.device!r})")


def _valid_token(token: str) -> bool:
    return bool(token) and token.isascii() and token.isprintable() and " " not in token


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def service_key(key_file: Path | None) -> tuple[HubKey, str | None]:
    """The hub key for the audit pseudonyms, or a random per-process one and a note."""
    if key_file is not None:
        return load_key(key_file), None
    note = (
        "no hub key (EYEHUB_KEY_FILE or --key-file): scans are named by pseudonyms of a "
        "random key that holds for this process only, so they cannot be matched to a dataset"
    )
    return HubKey(secrets.token_bytes(32)), note


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- metrics --------------------------------------------------------------------------------


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (two apps in one process, as
    in the tests, count apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "eyehub_http_requests",
            "HTTP requests answered, by route, method and status",
            ["path", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "eyehub_http_request_duration_seconds",
            "Time from a request's arrival to its answer",
            ["path"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "eyehub_errors", "Error answers by code (reason or service error)", ["code"], registry=r
        )
        self.exams = Counter(
            "eyehub_exams",
            "Exams scored, by decision (refer, routine, ungradable)",
            ["decision"],
            registry=r,
        )
        self.in_flight = Gauge("eyehub_requests_in_flight", "Requests being answered", registry=r)
        self.model = Info("eyehub_model", "The model that scores now", registry=r)
        self.model_loaded = Gauge("eyehub_model_loaded", "1 while a model is loaded", registry=r)
        self.reloads = Counter(
            "eyehub_model_reloads", "Models swapped in after their alias moved", registry=r
        )

    def set_model(self, loaded: LoadedModel) -> None:
        self.model.info(
            {
                "name": loaded.name,
                "version": loaded.version or "",
                "alias": loaded.alias or "",
                "recipe_id": str(loaded.model.recipe_id),
            }
        )
        self.model_loaded.set(1)


# -- the state: the model that scores now, and the thread that follows its alias -----------


class ServiceState:
    """What the app serves with: settings, hub key, metrics, and the current `Scorer`.

    `scorer` is swapped whole when the alias moves (one attribute assignment); a request
    takes it once and scores with it to the end. `start` begins the background thread that
    loads the model (unless one was given) and then follows its alias."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        key: HubKey | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        check_settings(settings)
        self.settings = settings
        self.ref: ModelRef = parse_model_ref(settings.model)
        self.key_note: str | None = None
        if key is None:
            key, self.key_note = service_key(settings.key_file)
        self.key = key
        self.metrics = Metrics()
        self.device = _resolve_device(settings.device)
        self.load_error: str | None = None
        self._scorer: Scorer | None = None
        self._slots = threading.BoundedSemaphore(settings.max_concurrent)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._problem: str | None = None  # the last failure reported (said once, not per poll)
        if loaded is not None:
            self._install(loaded)

    @property
    def scorer(self) -> Scorer | None:
        return self._scorer

    @property
    def follows_alias(self) -> bool:
        return self.ref.registered and self.ref.alias is not None

    def _install(self, loaded: LoadedModel) -> None:
        scorer = Scorer(
            loaded,
            self.key,
            device=self.device,
            explain_task=self.settings.explain_task,
            max_decoded_bytes=self.settings.max_decoded_bytes,
        )
        self.metrics.set_model(loaded)
        self._scorer = scorer  # the swap: requests that took the old scorer keep it
        self.load_error = None

    def load_now(self) -> LoadedModel:
        """Load the model the reference names now and let it score (errors propagate)."""
        loaded = load_model(
            self.settings.model,
            self.settings.tracking_uri,
            self.settings.cache,
            self.device,
            ref=self.ref,
        )
        self._install(loaded)
        return loaded

    def refresh(self) -> bool:
        """Load the model if none is, or the version its alias points to now if that moved;
        True when a model was (re)loaded. Failures are logged (once while they last) and
        leave the current model scoring."""
        current = self._scorer
        try:
            if current is not None:
                if not self.follows_alias:
                    return False
                version, _ = current_version(self.ref, self.settings.tracking_uri)
                if version == current.loaded.version:
                    self._recovered()
                    return False
            loaded = self.load_now()
        except Exception as exc:
            self._failed(exc, current is None)
            return False
        self._recovered()
        words = _model_words(loaded.describe())
        if current is None:
            log.info("ready: %s scores", words)
        else:
            self.metrics.reloads.inc()
            log.info(
                "the alias moved: %s scores now (was version %s)", words, current.loaded.version
            )
        return True

    def _failed(self, exc: Exception, first_load: bool) -> None:
        if isinstance(exc, EyehubError):
            message = str(exc)
        else:  # the traceback without the message, once
            message = f"an unexpected {type(exc).__name__}"
            if self._problem != message:
                log.debug("%s", internal_traceback(exc), extra={"terminal": False})
        if first_load:
            self.load_error = f"the model could not be loaded: {message}"
        if self._problem == message:
            return
        self._problem = message
        interval = self.settings.reload_interval_s
        if first_load:
            log.error("%s; trying again every %g s", self.load_error, interval)
        else:
            scoring = self._scorer.loaded.version if self._scorer is not None else None
            log.warning(
                "could not follow %s (%s); version %s goes on scoring, trying again every %g s",
                self.ref.text,
                message,
                scoring,
                interval,
            )

    def _recovered(self) -> None:
        if self._problem is not None:
            log.info("the model registry answers again")
            self._problem = None

    def start(self) -> None:
        """Start the loader/follower thread (once; stopped by `stop`)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, name="eyehub-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def _follow(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            if self._scorer is not None and not self.follows_alias:
                return  # a fixed version or a directory never changes
            self._stop.wait(self.settings.reload_interval_s)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """One of `max_concurrent` scoring slots (scoring is CPU-bound: more at once only
        adds memory)."""
        with self._slots:
            yield


def _model_words(described: Mapping[str, Any]) -> str:
    words = str(described["name"])
    if described.get("version"):
        words += f" version {described['version']}"
    if described.get("alias"):
        words += f" (alias {described['alias']})"
    return words


# -- the app --------------------------------------------------------------------------------


def create_app(state: ServiceState) -> FastAPI:
    """The ASGI app serving `state` (see the module docstring for its routes). Its
    lifespan starts and stops `state`'s model thread."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.stop)

    app = FastAPI(
        title="eyehub scoring service",
        version="1",
        summary="Calibrated risks, referral decisions and heat maps for retinal scans.",
        description=(
            "Send a DICOM fundus photograph or OCT volume to `POST /v1/score` with "
            '`Authorization: Bearer <token>`. Errors are `{"error": code, "detail": '
            "sentence}`. The clinician's page is at `/`."
        ),
        lifespan=lifespan,
    )
    app.state.eyehub = state
    app.add_middleware(_Gate, state=state)
    page = _page(state.settings)

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", tags=["service"], summary="The process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["service"],
        summary="A model is loaded (200), or not yet (503)",
        responses={503: {"description": "No model loaded yet"}},
    )
    def readyz(request: Request) -> JSONResponse:
        scorer = state.scorer
        if scorer is None:
            detail = state.load_error or "the model is loading"
            return _error_response(503, "model_unavailable", detail, request)
        d = scorer.loaded.describe()
        return JSONResponse({"status": "ready", "model": d["name"], "version": d["version"]})

    @app.get(
        "/metrics",
        tags=["service"],
        summary="Prometheus metrics (needs the token)",
        dependencies=[Depends(_BEARER)],
    )
    def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/v1/model",
        tags=["scoring"],
        summary="The model that scores now",
        dependencies=[Depends(_BEARER)],
    )
    def model(request: Request) -> dict[str, Any]:
        scorer = _scorer_or_503(state, request)
        return scorer.loaded.describe()

    @app.post(
        "/v1/score",
        tags=["scoring"],
        summary="Score one exam (or several): a JSON list, one result per exam",
        responses={
            400: {"description": "Not a usable DICOM scan, or one the model cannot take"},
            401: {"description": "No or wrong bearer token"},
            413: {"description": "Upload above --max-upload-mb"},
            503: {"description": "No model loaded yet"},
        },
        dependencies=[Depends(_BEARER)],
    )
    def score(
        request: Request,
        file: Annotated[list[UploadFile] | None, File(description="DICOM file(s)")] = None,
        fundus: Annotated[UploadFile | None, File(description="A fusion exam's photograph")] = None,
        oct: Annotated[UploadFile | None, File(description="A fusion exam's OCT volume")] = None,
        images: Annotated[
            bool, Query(description="Add the scan and heat map as base64 PNGs")
        ] = False,
    ) -> JSONResponse:
        scorer = _scorer_or_503(state, request)
        uploads = [("fundus", fundus), ("oct", oct), *(("file", f) for f in file or [])]
        sent = [(field, upload) for field, upload in uploads if upload is not None]
        if not sent:
            raise InputError(
                check_reason("not_an_upload", SCORING_REASONS),
                "the request carried no DICOM file: send it as multipart/form-data field "
                "'file' (or 'fundus' and 'oct' for a fusion model)",
            )
        with state.slot():
            results = _score(scorer, sent, _audit(request))
            body = [r.to_json() for r in results]
            if images:
                for result, entry in zip(results, body, strict=True):
                    _add_images(result, entry, state.settings.image_max_side)
        decisions = [str(entry["decision"]) for entry in body]
        for decision in decisions:
            state.metrics.exams.labels(decision).inc()
        _audit(request)["result"] = ",".join(decisions)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @app.exception_handler(EyehubError)
    def eyehub_error(request: Request, exc: EyehubError) -> JSONResponse:
        code = error_code(exc)
        if exc.http_status >= 500 and not isinstance(exc, ServiceUnavailableError):
            log.error("request %s: %s", _audit(request).get("request_id"), exc)
        return _error_response(exc.http_status, code, str(exc), request)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # names the fields only: FastAPI's own message quotes the values sent
        fields = sorted({".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()})
        detail = "these fields cannot be used: " + ", ".join(fields) + "; see /docs"
        return _error_response(400, "bad_request", detail, request)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return _error_response(exc.status_code, code, str(exc.detail), request, exc.headers)

    return app


def _scorer_or_503(state: ServiceState, request: Request) -> Scorer:
    scorer = state.scorer
    if scorer is None:
        raise ServiceUnavailableError(state.load_error or "the model is loading; try again soon")
    entry = _audit(request)
    entry["model"] = scorer.loaded.name
    entry["version"] = scorer.loaded.version
    return scorer


def _score(
    scorer: Scorer, sent: list[tuple[str, UploadFile]], audit: dict[str, Any]
) -> list[ExamResult]:
    start = time.perf_counter()
    scans: list[Scan] = []
    for field, upload in sent:
        scan = scorer.read(upload.file.read())
        audit["scans"].append(scan.pseudonym)
        if field in ("fundus", "oct") and scan.modality != field:
            raise InputError(
                check_reason("wrong_modality", SCORING_REASONS),
                f"the file sent as '{field}' is {_one(scan.modality)}; send the photograph as "
                "'fundus' and the OCT as 'oct'",
            )
        scans.append(scan)
    read_ms = (time.perf_counter() - start) * 1000
    results = scorer.score(scans)
    for r in results:
        r.latency_ms = {"read": read_ms / max(len(results), 1), **r.latency_ms}
    return results


def _one(modality: str) -> str:
    return {"fundus": "a fundus photograph", "oct": "an OCT volume"}.get(modality, modality)


def _add_images(result: ExamResult, entry: dict[str, Any], max_side: int) -> None:
    for image, out in zip(result.images, entry["images"], strict=True):
        out["display_png"] = _b64(png_bytes(image.display(), max_side))
        out["overlay_png"] = (
            None if image.heatmap is None else _b64(png_bytes(image.overlay(), max_side))
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def error_code(exc: EyehubError) -> str:
    """The `error` code an exception answers with (see SERVICE_ERRORS)."""
    if isinstance(exc, InputError):
        return exc.reason
    for cls, code in (
        (ServiceUnavailableError, "model_unavailable"),
        (PayloadTooLargeError, "upload_too_large"),
        (ModelError, "model_error"),
        (NotFoundError, "not_found"),
        (UsageError, "bad_request"),
        (ConfigError, "bad_request"),
    ):
        if isinstance(exc, cls):
            return code
    return "internal_error"


def _audit(request: Request) -> dict[str, Any]:
    entry: dict[str, Any] = request.scope.setdefault(_AUDIT_KEY, _new_audit())
    return entry


def _new_audit(given: bytes | None = None) -> dict[str, Any]:
    """A request's audit record; its id is the caller's X-Request-ID when that is a plain
    token (a proxy's, Ray Serve's), else a new random one."""
    request_id = secrets.token_hex(6)
    if given is not None and _REQUEST_ID.fullmatch(given):
        request_id = given.decode("ascii")
    return {"request_id": request_id, "scans": [], "result": None}


def _error_response(
    status: int,
    code: str,
    detail: str,
    request: Request | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    if request is not None:
        _audit(request)["result"] = code
    return JSONResponse(
        {"error": code, "detail": detail},
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


# -- the gate: request id, token, upload limit, metrics, audit (pure ASGI) ------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _BodyTooLarge(Exception):
    """Raised from `receive` once a body passes the limit (the app's answer is replaced)."""


class _Body:
    """The request body as the app receives it: counted against the limit, and drained
    (read and dropped) before a refusal so that a client still sending reads the answer
    rather than a reset connection."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self.limit = limit
        self.received = 0
        self.done = False  # the last part arrived, or the client went away
        self.over = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
            if self.received > self.limit:
                self.over = True
                raise _BodyTooLarge
        else:
            self.done = True
        return message

    async def drain(self, at_most: int = _DRAIN_BYTES) -> bool:
        """Read and drop the rest of the body, up to `at_most` bytes; True when it all
        came (the connection can be kept)."""
        read = 0
        while not self.done:
            if read > at_most:
                return False
            message = await self._receive()
            if message["type"] != "http.request":
                self.done = True
                return False
            read += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
        return True


class _Gate:
    """Pure ASGI middleware around the FastAPI routes: gives each request an id
    (`X-Request-ID`), refuses a missing or wrong token (401) and an upload above the limit
    (413) before the body is read, answers an unexpected exception with a generic 500
    (traceback to the log, without its message), counts the metrics and writes the audit
    line."""

    def __init__(self, app: Any, state: ServiceState) -> None:
        self.app = app
        self.state = state
        self.limit = state.settings.max_upload_bytes
        self.token = (state.settings.token or "").encode("ascii") or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan
            return
        path = str(scope.get("path", ""))
        route = _route_label(path)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        entry = _new_audit(headers.get("x-request-id"))
        scope[_AUDIT_KEY] = entry
        body = _Body(receive, self.limit)
        answered = {"status": 0, "replaced": False}
        metrics = self.state.metrics
        start = time.perf_counter()
        recorded = False

        def record(status: int) -> None:
            """Count the metrics and write the audit line, once: before the answer's last
            byte leaves, so a client that has its answer finds them."""
            nonlocal recorded
            if recorded:
                return
            recorded = True
            metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            metrics.requests.labels(route, str(scope.get("method", "")), str(status)).inc()
            metrics.latency.labels(route).observe(seconds)
            if status >= 400:
                metrics.errors.labels(entry.get("result") or _status_code(status)).inc()
            if path.startswith(_AUDITED):
                self._audit_line(entry, route, status, seconds)

        async def send_recorded(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                record(answered["status"] or 500)
            await send(message)

        async def send_out(message: Message) -> None:
            if answered["replaced"]:
                return  # the app's answer to a body cut short: replaced by the 413
            if message["type"] == "http.response.start":
                if body.over:
                    answered["replaced"] = True
                    await self._refuse(body, send_recorded, entry, *self._too_large())
                    return
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", entry["request_id"].encode("ascii")),
                ]
            await send_recorded(message)

        metrics.in_flight.inc()
        try:
            refusal = self._refuse_early(path, headers)
            if refusal is not None:
                await self._refuse(body, send_recorded, entry, *refusal)
            else:
                with suppress(_BodyTooLarge):
                    await self.app(scope, body.receive, send_out)
                if body.over and answered["status"] == 0:
                    await self._refuse(body, send_recorded, entry, *self._too_large())
        except Exception as exc:
            entry["result"] = "internal_error"
            log.error(
                "request %s: unexpected error answering %s\n%s",
                entry["request_id"],
                route,
                internal_traceback(exc),
            )
            if answered["status"] == 0:
                detail = (
                    f"an internal error in eyehub (request {entry['request_id']}); the "
                    "traceback is in the service's log"
                )
                await self._refuse(body, send_recorded, entry, 500, "internal_error", detail, {})
            answered["status"] = 500
        finally:
            record(answered["status"] or 500)

    def _refuse_early(
        self, path: str, headers: Mapping[str, bytes]
    ) -> tuple[int, str, str, dict[str, str]] | None:
        if self.token is not None and path.startswith(_NEEDS_TOKEN):
            given = headers.get("authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                challenge = 'Bearer realm="eyehub"'
                if given:
                    challenge += ', error="invalid_token"'
                detail = (
                    "this route needs the service's API token: send 'Authorization: Bearer "
                    "<token>'" + (" (the token sent is not the service's)" if given else "")
                )
                return 401, "unauthorized", detail, {"WWW-Authenticate": challenge}
        declared = _content_length(headers)
        if declared is not None and declared < 0:
            return 400, "bad_request", "the Content-Length header is not a number", {}
        if declared is not None and declared > self.limit:
            return self._too_large(declared)
        return None

    def _too_large(self, size: int | None = None) -> tuple[int, str, str, dict[str, str]]:
        limit = self.state.settings.max_upload_mb
        what = f"the upload ({size / MB:.2f} MB)" if size is not None else "the upload"
        detail = f"{what} is larger than this service takes ({limit:g} MB; --max-upload-mb)"
        return 413, "upload_too_large", detail, {}

    async def _refuse(
        self,
        body: _Body,
        send: Send,
        entry: dict[str, Any],
        status: int,
        code: str,
        detail: str,
        extra: Mapping[str, str],
    ) -> None:
        """Answer `{"error": code, "detail": detail}` without the app, once the rest of the
        body is drained; a body too large to drain ends with the connection closed."""
        entry["result"] = code
        kept = status < 500 and await body.drain()
        payload = json.dumps({"error": code, "detail": detail}).encode("utf-8")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode("ascii")),
            (b"cache-control", b"no-store"),
            (b"x-request-id", entry["request_id"].encode("ascii")),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()),
        ]
        if not kept:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload, "more_body": False})

    def _audit_line(self, entry: dict[str, Any], route: str, status: int, seconds: float) -> None:
        if "model" not in entry:  # refused before a model was taken: the one loaded now
            scorer = self.state.scorer
            entry["model"] = scorer.loaded.name if scorer is not None else None
            entry["version"] = scorer.loaded.version if scorer is not None else None
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        audit_log.info(
            "time=%s request=%s route=%s status=%d model=%s version=%s scans=%s result=%s "
            "latency_ms=%.1f",
            now,
            entry["request_id"],
            route,
            status,
            entry["model"] or "-",
            entry["version"] or "-",
            ",".join(entry["scans"]) or "-",
            entry.get("result") or "ok",
            seconds * 1000,
            extra={"terminal": False},
        )


def _status_code(status: int) -> str:
    """The error code of an answer that did not name one."""
    named = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}
    named |= {413: "upload_too_large", 422: "model_error", 503: "model_unavailable"}
    return named.get(status, "bad_request" if status < 500 else "internal_error")


def _content_length(headers: Mapping[str, bytes]) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return -1


def _route_label(path: str) -> str:
    """The metrics' `path` label: a known route, `/static`, or `other` (never a raw path:
    unbounded label values would grow the metrics without end)."""
    if path in _ROUTES:
        return path
    if path.startswith("/static/"):
        return "/static"
    return "other"


# -- the page --------------------------------------------------------------------------------

_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _page(settings: ServiceSettings) -> str:
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    return html.replace("__MAX_UPLOAD_MB__", f"{settings.max_upload_mb:g}")


# -- running it ------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0: a free one), or a UsageError that
    says the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
            "or --host"
        ) from None
    sock.set_inheritable(True)
    return sock


class _UvicornServer(uvicorn.Server):
    """uvicorn's Server whose Ctrl-C / SIGTERM stop it gracefully and return (uvicorn's own
    raises the signal again once stopped)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _Server:
    """uvicorn serving the app on a socket bound beforehand."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(
            app,
            log_config=None,  # records go to the application's logging (the CLI's log file)
            access_log=True,  # method, path and status only: no body, no file name
            server_header=False,
            lifespan="on",
            timeout_graceful_shutdown=30,
        )
        self.server = _UvicornServer(config)

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def run(self, sock: socket.socket) -> None:
        self.server.run(sockets=[sock])

    def stop(self) -> None:
        self.server.should_exit = True


def service_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}"


@dataclass
class RunningService:
    """A service started by `serve_in_thread`: its address, state, and how to stop it."""

    url: str
    state: ServiceState
    _server: _Server
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.stop()
        self._thread.join(timeout=60)

    def __enter__(self) -> RunningService:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def serve_in_thread(
    settings: ServiceSettings,
    *,
    state: ServiceState | None = None,
    app: FastAPI | None = None,
    timeout: float = 60,
) -> RunningService:
    """Start uvicorn in a thread of this process (port 0: a free one) and return once it
    listens; the model loads in the background (poll `/readyz`). `app` is `create_app`'s
    for `state`, given when a script adds routes to it. For scripts and tests: signals are
    not handled, `stop()` ends it."""
    if app is not None:
        state = app.state.eyehub
    state = state or ServiceState(settings)
    settings = state.settings
    sock = bind_socket(settings.host, settings.port)
    port = int(sock.getsockname()[1])
    server = _Server(app or create_app(state))

    def run() -> None:
        try:
            server.run(sock)
        finally:
            sock.close()

    thread = threading.Thread(target=run, name=f"eyehub-serve-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.stop()
            raise EyehubError(f"the service did not start on {settings.host}:{port}")
        time.sleep(0.02)
    return RunningService(service_url(settings.host, port), state, server, thread)


def run_service(settings: ServiceSettings, say: Callable[[str], None]) -> None:
    """Serve until interrupted; `say` prints a line for the person who started it."""
    check_settings(settings)
    if settings.ray_address:
        # the driver prints what replicas log; Ray folds lines that differ only in numbers
        # and ids ("repeated 2x"), which would fold the audit lines: never fold those
        os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"inference\.audit")
        from inference.serve_ray import run_on_ray

        run_on_ray(settings, say)
        return
    state = ServiceState(settings)
    if state.key_note:
        say(f"note: {state.key_note}")
    if not settings.token:
        say(
            "note: no API token (EYEHUB_API_TOKEN or --token-file): the API is open to anyone "
            f"on this machine; it listens on {settings.host} only"
        )
    sock = bind_socket(settings.host, settings.port)
    url = service_url(settings.host, int(sock.getsockname()[1]))
    server = _Server(create_app(state))

    def announce() -> None:
        while not server.started:
            if server.server.should_exit:
                return
            time.sleep(0.05)
        reload = (
            f"; following the alias every {settings.reload_interval_s:g} s"
            if state.follows_alias
            else ""
        )
        say(
            f"serving {settings.model} at {url} (page: {url}/, API: {url}/docs, "
            f"uploads up to {settings.max_upload_mb:g} MB{reload}); Ctrl-C stops"
        )

    threading.Thread(target=announce, name="eyehub-announce", daemon=True).start()
    try:
        server.run(sock)
    finally:
        sock.close()
        state.stop()
    say("stopped")
