"""Keyed pseudonyms: stable under one key, different under another, irreversible."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest

from eyehub.errors import KeyMissingError, NotFoundError, UsageError
from ingest import HubKey, generate_key_file, load_key


def test_keygen_writes_a_private_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "k")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(path)
    assert len(key.secret) == 32 and "secret" not in repr(key).replace("<secret>", "")
    with pytest.raises(UsageError, match="already exists"):
        generate_key_file(path)


def test_pseudonyms_are_stable_per_key_and_differ_between_keys(tmp_path: Path) -> None:
    a = load_key(generate_key_file(tmp_path / "a"))
    b = load_key(generate_key_file(tmp_path / "b"))
    assert a.patient_id("MRN1") == load_key(tmp_path / "a").patient_id("MRN1")
    assert a.patient_id("MRN1") != b.patient_id("MRN1")
    assert a.patient_id("MRN1") != a.patient_id("MRN2")
    assert a.scan_id("1.2.3") != a.scan_id("1.2.4")
    uid = a.uid("1.2.840.99")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid == a.uid("1.2.840.99")
    assert "MRN1" not in a.patient_id("MRN1")


def test_one_date_shift_per_patient_keeps_intervals() -> None:
    key = HubKey(b"k" * 32)
    pid = key.patient_id("MRN7")
    d1, d2 = dt.date(2020, 1, 1), dt.date(2021, 6, 30)
    shift = key.date_shift_days(pid)
    assert 1 <= shift <= 730
    assert key.shift_date(pid, d2) - key.shift_date(pid, d1) == d2 - d1
    shifts = {key.date_shift_days(key.patient_id(f"MRN{i}")) for i in range(50)}
    assert len(shifts) > 40  # per patient, not one global shift


def test_key_problems_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyMissingError, match="eyehub keygen"):
        load_key(None)
    with pytest.raises(NotFoundError):
        load_key(tmp_path / "missing")
    loose = generate_key_file(tmp_path / "loose")
    os.chmod(loose, 0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        load_key(loose)
    bad = tmp_path / "bad"
    bad.write_text("hello\n")
    os.chmod(bad, 0o600)
    with pytest.raises(UsageError, match="not an eyehub key file"):
        load_key(bad)
