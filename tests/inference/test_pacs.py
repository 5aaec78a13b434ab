"""The PACS round trip over DICOMweb, against a real Orthanc: a study's instances come back
as stored, reports go into the patient's own study, and what goes wrong (no such study,
no server, a refused store, refused credentials) is one clear sentence with no secret in
it. Then `eyehub score --pacs ... --sr` end to end."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from eyehub.errors import NotFoundError, ServiceUnavailableError
from inference.pacs import retrieve_study, store_instances
from inference.registry import LoadedModel, load_model
from inference.score import Scorer
from inference.sr import build_sr
from ingest.keys import HubKey
from tests.cli import run_eyehub
from tests.inference.models import Registered
from tests.inference.orthanc import Orthanc, free_port, running_orthanc


@dataclass
class Visit:
    """One visit of one patient: one study, its files by SOP Instance UID."""

    study_uid: str
    patient_id: str
    files: dict[str, Path]
    kinds: dict[str, str]  # SOP Instance UID -> fundus | oct


def _visits(cohort_files: pd.DataFrame, count: int) -> list[Visit]:
    """The first `count` visits with both a photograph and an OCT."""
    visits = []
    for _, rows in cohort_files.groupby(["patient_index", "visit"], sort=True):
        if set(rows["kind"]) != {"fundus", "oct"}:
            continue
        files, kinds, studies, patients = {}, {}, set(), set()
        for file, kind in zip(rows["file"], rows["kind"], strict=True):
            header = pydicom.dcmread(file, stop_before_pixels=True)
            files[str(header.SOPInstanceUID)] = Path(file)
            kinds[str(header.SOPInstanceUID)] = kind
            studies.add(str(header.StudyInstanceUID))
            patients.add(str(header.PatientID))
        assert len(studies) == len(patients) == 1  # a visit is one study of one patient
        visits.append(Visit(studies.pop(), patients.pop(), files, kinds))
        if len(visits) == count:
            break
    return visits


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def visits(orthanc: Orthanc, cohort_files: pd.DataFrame) -> list[Visit]:
    """Two visits uploaded to the PACS: one for the library's tests, one for the CLI's."""
    chosen = _visits(cohort_files, 2)
    for visit in chosen:
        for file in visit.files.values():
            assert orthanc.upload(file)["Status"] == "Success"
    return chosen


@pytest.fixture(scope="module")
def fundus_loaded(
    fundus_model: Registered, tracking_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> LoadedModel:
    cache = tmp_path_factory.mktemp("model-cache")
    return load_model(f"models:/{fundus_model.name}@champion", tracking_uri, cache)


def sop_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def test_retrieve_study_gives_every_instance_as_stored(
    orthanc: Orthanc, visits: list[Visit]
) -> None:
    visit = visits[0]
    fetched = retrieve_study(orthanc.dicomweb, visit.study_uid)

    by_uid = {sop_uid(data): data for data in fetched}
    assert set(by_uid) == set(visit.files)
    # the very bytes uploaded: compressed photographs and OCTs are not transcoded
    for uid, data in by_uid.items():
        assert data == visit.files[uid].read_bytes()


def test_stored_reports_land_in_the_patients_study(
    orthanc: Orthanc, visits: list[Visit], fundus_loaded: LoadedModel, hub_key: HubKey
) -> None:
    visit = visits[0]
    scorer = Scorer(fundus_loaded, hub_key, heatmaps=False)
    scans = [scorer.read(data) for data in retrieve_study(orthanc.dicomweb, visit.study_uid)]
    exams, skipped = scorer.partition(scans)
    assert len(exams) == sum(k == "fundus" for k in visit.kinds.values())
    assert {s.modality for group, _ in skipped for s in group} == {"oct"}
    reports = [build_sr(result, fundus_loaded) for result in scorer.score_exams(exams)]

    store_instances(orthanc.dicomweb, reports)

    held = orthanc.study_instances(visit.study_uid)
    sources = [i for i in held if i["tags"]["SOPInstanceUID"] in visit.files]
    stored = [i for i in held if i["tags"]["Modality"] == "SR"]
    assert {i["tags"]["SOPInstanceUID"] for i in stored} == {r.SOPInstanceUID for r in reports}
    patient = {i["patient"] for i in sources}
    assert len(patient) == 1
    for report in stored:
        assert report["patient"] in patient  # Orthanc filed it under the same patient
        assert report["tags"]["PatientID"] == visit.patient_id
        assert report["tags"]["SeriesDescription"] == "eyehub AI findings"
    # and the PACS gives them back with the study
    again = {sop_uid(data) for data in retrieve_study(orthanc.dicomweb, visit.study_uid)}
    assert again == set(visit.files) | {r.SOPInstanceUID for r in reports}


def test_a_study_the_pacs_does_not_have_is_not_found(orthanc: Orthanc, visits: list[Visit]) -> None:
    missing = generate_uid()
    with pytest.raises(NotFoundError, match="has no study") as raised:
        retrieve_study(orthanc.dicomweb, missing)
    assert missing not in str(raised.value)


def test_a_url_that_is_no_dicomweb_service_is_not_a_missing_study(
    orthanc: Orthanc, visits: list[Visit]
) -> None:
    with pytest.raises(ServiceUnavailableError, match=r"HTTP 404.*check the URL"):
        retrieve_study(f"{orthanc.url}/no-such-path", visits[0].study_uid)


def test_an_unreachable_pacs_is_one_clear_error_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there
    url = f"http://doctor:pw-Secret-42@127.0.0.1:{port}/dicom-web"
    study = generate_uid()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ServiceUnavailableError, match="cannot be reached") as raised:
        retrieve_study(url, study, token="tok-Secret-42")
    with pytest.raises(ServiceUnavailableError, match="cannot be reached") as raised_store:
        store_instances(url, [_instance_without_identity()], token="tok-Secret-42")

    for message in (str(raised.value), str(raised_store.value)):
        assert f"http://127.0.0.1:{port}/dicom-web" in message
        assert "Secret-42" not in message and "doctor" not in message
        assert study not in message
    assert "Secret-42" not in caplog.text  # at any level, from any library
    # the study's UID: not in eyehub's own records, nor in any a command's log file keeps
    # (other libraries' from INFO; dicomweb-client's DEBUG lines name the URL it asks)
    kept = [
        r for r in caplog.records if r.levelno >= logging.INFO or r.name.startswith("inference")
    ]
    assert [r.getMessage() for r in kept if study in r.getMessage()] == []


def _instance_without_identity() -> Dataset:
    """A dataset with no SOP Class, no SOP Instance, no study: no PACS can file it."""
    ds = Dataset()
    ds.PatientName = "NOBODY"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.preamble = b"\0" * 128
    return ds


def test_a_refused_store_is_an_error(orthanc: Orthanc) -> None:
    with pytest.raises(ServiceUnavailableError, match=r"storing 1 instance.*HTTP 400"):
        store_instances(orthanc.dicomweb, [_instance_without_identity()])


def test_credentials_are_sent_and_never_shown(
    tmp_path: Path, visits: list[Visit], caplog: pytest.LogCaptureFixture
) -> None:
    visit = visits[0]
    with running_orthanc(tmp_path / "pacs", users={"eyehub": "pw-Right-7"}) as pacs:
        first = next(iter(visit.files.values()))
        pacs.upload(first)
        host = pacs.dicomweb.removeprefix("http://")
        caplog.set_level(logging.DEBUG)

        fetched = retrieve_study(f"http://eyehub:pw-Right-7@{host}", visit.study_uid)
        assert [sop_uid(d) for d in fetched] == [sop_uid(first.read_bytes())]

        with pytest.raises(ServiceUnavailableError, match="HTTP 401") as wrong_password:
            retrieve_study(f"http://eyehub:pw-Wrong-7@{host}", visit.study_uid)
        with pytest.raises(ServiceUnavailableError, match="HTTP 401") as token_only:
            retrieve_study(pacs.dicomweb, visit.study_uid, token="tok-Wrong-7")

    for message in (str(wrong_password.value), str(token_only.value)):
        assert "credentials" in message
        assert "pw-" not in message and "tok-" not in message
    assert "pw-" not in caplog.text and "tok-" not in caplog.text


@pytest.mark.slow
def test_eyehub_score_from_the_pacs_stores_its_reports_there(
    orthanc: Orthanc,
    visits: list[Visit],
    fundus_model: Registered,
    scoring_env: dict[str, str],
    planted_identifiers: list[str],
    tmp_path: Path,
) -> None:
    visit = visits[1]
    token = tmp_path / "pacs.token"
    token.write_text("tok-Cli-Secret-9\n")
    fundus = {uid for uid, kind in visit.kinds.items() if kind == "fundus"}

    done = run_eyehub(
        "score",
        "--pacs",
        orthanc.dicomweb,
        "--study",
        visit.study_uid,
        "--model",
        f"models:/{fundus_model.name}@champion",
        "--sr",
        "--out",
        str(tmp_path / "out"),
        "--pacs-token-file",
        str(token),
        extra_env=scoring_env,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]

    held = orthanc.study_instances(visit.study_uid)
    reports = [i for i in held if i["tags"]["Modality"] == "SR"]
    assert len(reports) == len(fundus)  # one per photograph; the OCTs were skipped
    patient = {i["patient"] for i in held if i["tags"]["SOPInstanceUID"] in visit.files}
    referenced = set()
    for report in reports:
        assert report["patient"] in patient
        assert report["tags"]["PatientID"] == visit.patient_id
        sr = pydicom.dcmread(io.BytesIO(orthanc.file(report["id"])))
        referenced |= {
            str(i.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for i in series.ReferencedSOPSequence
        }
    assert referenced == fundus

    logs = sorted((Path(scoring_env["EYEHUB_HOME"]) / "logs").glob("*.log"))
    assert logs, "the command kept no log file"
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    leaked = [v for v in planted_identifiers if v in text or v in output]
    assert leaked == []
    assert "Secret-9" not in text and "Secret-9" not in output


@pytest.mark.slow
def test_eyehub_score_says_why_a_pacs_study_cannot_be_had_and_keeps_credentials_out(
    orthanc: Orthanc,
    fundus_model: Registered,
    scoring_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """A study the PACS does not have: one error line and exit code 2, no traceback; the
    password of a URL with `user:password@` is in neither the output nor the log file."""
    host = orthanc.dicomweb.removeprefix("http://")
    done = run_eyehub(
        "score",
        "--pacs",
        f"http://clinic:pw-Cli-Secret-3@{host}",
        "--study",
        generate_uid(),
        "--model",
        f"models:/{fundus_model.name}@champion",
        "--sr",
        "--out",
        str(tmp_path / "out"),
        extra_env=scoring_env,
    )
    output = done.stdout + done.stderr
    assert done.returncode == NotFoundError.exit_code, output[-4000:]
    assert "has no study" in output
    assert "Traceback" not in output
    logs = sorted((Path(scoring_env["EYEHUB_HOME"]) / "logs").glob("*.log"))
    assert logs, "the command kept no log file"
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert "Cli-Secret-3" not in output
    assert "Cli-Secret-3" not in text, "the PACS password is in the command's log file"
