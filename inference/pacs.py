"""A PACS over DICOMweb: retrieve a study's instances (WADO-RS), store reports (STOW-RS).

The PACS round trip of `eyehub score --pacs`: every instance of a study is fetched as the
PACS stores it (``transfer-syntax=*``: the files as they are, never transcoded by the
server), scored, and the SR of each exam stored back into the same study
(`inference.sr`). `dicomweb-client` speaks the protocol; this module turns what can go
wrong into eyehub's errors with a sentence a person can act on:

- the server cannot be reached, answers with an error or not as DICOMweb, refuses the
  credentials or refuses a stored instance: `ServiceUnavailableError` (exit code 1,
  HTTP 503: a service eyehub depends on cannot do what was asked; nothing is wrong with
  the scans);
- the PACS has no such study: `NotFoundError`;
- a URL that is not http(s): `UsageError`.

A bearer token goes in the session's Authorization header; ``user:password@`` in a URL is
taken out of the URL and sent as HTTP basic authentication. Neither appears in a message
or a log line, and neither do the study's UIDs (they identify a patient's exam); the URL
in messages is the credential-free one.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from eyehub.errors import NotFoundError, ServiceUnavailableError, UsageError

log = logging.getLogger(__name__)

# Instances as stored: the default (Explicit VR Little Endian) asks the PACS to transcode,
# which some cannot do for a compressed photograph (Orthanc answers 500)
AS_STORED = (("application/dicom", "*"),)
TIMEOUT_S = (10.0, 120.0)  # connect, and between bytes of an answer
# dicomweb-client retries a failed request (an exception, or HTTP 408/429/503/504) with
# exponential back-off; its default (5 tries from 2 s apart) keeps a user waiting half a
# minute for a PACS that is simply not there
RETRY_ATTEMPTS, RETRY_WAIT_MS = 3, 200  # waits 0.4 s, then 0.8 s


def retrieve_study(url: str, study_uid: str, token: str | None = None) -> list[bytes]:
    """Every instance of the study at the DICOMweb base `url` (e.g.
    http://127.0.0.1:8042/dicom-web), as Part 10 file bytes."""
    client, where = _client(url, token)
    try:
        datasets = client.retrieve_study(study_uid, media_types=AS_STORED)
    except requests.HTTPError as exc:
        status = _status(exc)
        if status == 404:
            _no_such_study(client, where, study_uid)
        raise _http_failure(where, status, "retrieving the study") from None
    except (ValueError, InvalidDicomError) as exc:  # an answer, but not multipart DICOM
        raise _not_dicomweb(where, exc) from None
    except requests.RequestException as exc:
        raise _unreachable(where, exc) from None
    if not datasets:
        raise NotFoundError(f"the PACS at {where} returned no instance of the study asked for")
    files = [_part10(ds) for ds in datasets]
    log.debug("retrieved %d instance(s) of a study from %s", len(files), where)
    return files


def store_instances(url: str, datasets: Sequence[Dataset], token: str | None = None) -> None:
    """Store `datasets` with STOW-RS at the DICOMweb base `url`; an instance the PACS
    refuses (or stores only with a failure) raises ServiceUnavailableError."""
    if not datasets:
        return
    client, where = _client(url, token)
    try:
        answer = client.store_instances(list(datasets))
    except requests.HTTPError as exc:
        raise _http_failure(where, _status(exc), f"storing {len(datasets)} instance(s)") from None
    except requests.JSONDecodeError as exc:  # an answer, but not a DICOMweb store's
        raise _not_dicomweb(where, exc) from None
    except requests.RequestException as exc:
        raise _unreachable(where, exc) from None
    failed = list(answer.get("FailedSOPSequence", []))
    if failed:
        reasons = sorted({_reason(item.get("FailureReason")) for item in failed})
        raise ServiceUnavailableError(
            f"the PACS at {where} refused {len(failed)} of {len(datasets)} instance(s) "
            f"(failure reason {', '.join(reasons)}); see the PACS's own log for why"
        )
    warned = [i for i in answer.get("ReferencedSOPSequence", []) if "WarningReason" in i]
    if warned:
        log.warning(
            "the PACS at %s stored %d instance(s) with a warning (reason %s)",
            where,
            len(warned),
            ", ".join(sorted({_reason(i.get("WarningReason")) for i in warned})),
        )
    log.debug("stored %d instance(s) at %s", len(datasets), where)


def safe_url(url: str) -> str:
    """The URL without credentials (``user:password@``), as messages show it."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _client(url: str, token: str | None) -> tuple[DICOMwebClient, str]:
    parts = urlsplit(url.strip())
    where = safe_url(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"{where!r} is not a DICOMweb URL; give the service's base, e.g. "
            "http://pacs.example:8042/dicom-web"
        )
    session = requests.Session()
    if parts.username is not None:
        session.auth = (unquote(parts.username), unquote(parts.password or ""))
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    try:
        client = DICOMwebClient(where.rstrip("/"), session=session, timeout=TIMEOUT_S)
    except ValueError:  # dicomweb-client's own check of the URL
        raise UsageError(f"{where!r} is not a DICOMweb URL") from None
    client.set_http_retry_params(
        retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS
    )
    return client, where


def _no_such_study(client: DICOMwebClient, where: str, study_uid: str) -> None:
    """After a 404: NotFoundError if the service answers a search and has no such study;
    otherwise (no DICOMweb service at that path) the caller reports the 404."""
    try:
        found = client.search_for_studies(search_filters={"StudyInstanceUID": study_uid}, limit=1)
    except requests.RequestException:
        return
    if not found:
        raise NotFoundError(
            f"the PACS at {where} has no study with the Study Instance UID given; check "
            "the UID (the PACS's viewer shows it) and the URL"
        )


def _status(exc: requests.HTTPError) -> int | None:
    return None if exc.response is None else int(exc.response.status_code)


def _http_failure(where: str, status: int | None, doing: str) -> ServiceUnavailableError:
    if status in (401, 403):
        hint = "it refused the credentials; check the token or the user and password"
    elif status == 404:
        hint = "no DICOMweb service answers at that path; check the URL (e.g. .../dicom-web)"
    elif status is not None and status >= 500:
        hint = "the PACS failed; see its own log"
    else:
        hint = "the PACS refused the request"
    return ServiceUnavailableError(f"{doing} at {where} failed with HTTP {status}: {hint}")


def _unreachable(where: str, exc: requests.RequestException) -> ServiceUnavailableError:
    what = "timed out" if isinstance(exc, requests.Timeout) else "cannot be reached"
    return ServiceUnavailableError(
        f"the PACS at {where} {what} ({type(exc).__name__}); check the URL and that the "
        "server is running and reachable from here"
    )


def _not_dicomweb(where: str, exc: Exception) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        f"the server at {where} answered, but not as a DICOMweb service does "
        f"({type(exc).__name__}); check the URL (the service's base, e.g. .../dicom-web)"
    )


def _reason(value: object) -> str:
    try:
        return f"0x{int(str(value)):04X}"
    except ValueError:
        return "unknown"


def _part10(ds: Dataset) -> bytes:
    """The instance as a Part 10 file (the bytes the PACS sent: a dataset read from a
    Part 10 stream is written back unchanged)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()
