"""Bad inputs go to quarantine with a stable reason and an actionable sentence; the batch
carries on; the exit status says so."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.cli import run_eyehub
from tests.ingest.bad_inputs import TOO_LARGE_LIMIT, good_fundus, good_oct, make_all


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory: pytest.TempPathFactory, key_file: Path):
    src = tmp_path_factory.mktemp("bad_src")
    bad = make_all(src / "bad")
    good_fundus(src / "good" / "fundus.dcm", n=50)
    good_oct(src / "good" / "oct", n=51)
    dataset = tmp_path_factory.mktemp("bad_ds") / "ds"
    out = run_eyehub(
        "ingest",
        str(src),
        "--out",
        str(dataset),
        "--key-file",
        str(key_file),
        "--max-decoded-bytes",
        str(TOO_LARGE_LIMIT),
    )
    return bad, dataset, out


def test_every_bad_input_is_quarantined_with_its_reason(bad_run) -> None:
    bad, dataset, _ = bad_run
    q = pd.read_parquet(dataset / "quarantine.parquet")
    by_path = dict(zip(q.source_path, q.reason, strict=True))
    for reason, path in bad.items():
        assert by_path.get(str(path.resolve())) == reason, (reason, by_path)
    assert len(q) == len(bad)
    assert q.detail.str.len().min() > 30  # a sentence, not a code


def test_good_inputs_are_converted_despite_the_bad_ones(bad_run) -> None:
    _, dataset, _ = bad_run
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    assert sorted(catalog.modality) == ["fundus", "oct"]


def test_exit_status_and_summary_report_quarantine_without_traceback(bad_run) -> None:
    bad, _, out = bad_run
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert f"{len(bad)} quarantined" in out.stdout
    for reason in bad:
        assert reason in out.stdout


def test_details_quote_no_identifier(bad_run) -> None:
    _, dataset, _ = bad_run
    q = pd.read_parquet(dataset / "quarantine.parquet")
    text = " ".join(q.detail)
    for planted in ("QUARANTINE^TEST", "MRNBAD", "ACCBAD", "Test Eye Clinic", "1 Test Lane"):
        assert planted not in text


def test_a_clean_run_exits_zero_and_usage_errors_exit_two(tmp_path: Path, key_file: Path) -> None:
    good_fundus(tmp_path / "src" / "a.dcm", n=60)
    args = ["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "ds")]
    key = ["--key-file", str(key_file)]
    assert run_eyehub(*args, *key, timeout=300).returncode == 0
    missing = run_eyehub("ingest", str(tmp_path / "nope"), *args[2:], *key, timeout=300)
    assert missing.returncode == 2 and "not found" in missing.stderr
    nokey = run_eyehub(*args, timeout=300, drop_env=["EYEHUB_KEY_FILE"])
    assert nokey.returncode == 2 and "keygen" in nokey.stderr
    assert "Traceback" not in missing.stderr + nokey.stderr


def test_a_labels_file_without_its_key_columns_is_a_usage_error(
    tmp_path: Path, key_file: Path
) -> None:
    good_fundus(tmp_path / "src" / "a.dcm", n=61)
    labels = tmp_path / "labels.csv"
    labels.write_text("patient,eye,dr_grade\nX,R,1\n")
    out = run_eyehub(
        "ingest",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "ds"),
        "--key-file",
        str(key_file),
        "--labels",
        str(labels),
        timeout=300,
    )
    assert out.returncode == 2
    assert "mrn" in out.stderr and "study_date" in out.stderr
    assert "Traceback" not in out.stderr
