"""Never lose data: reruns convert only what is missing; kill -9 at any moment then a rerun
gives the same dataset as an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from eyehub.synth import generate_cohort
from ingest import HubKey, run_ingest
from ingest.run import IngestSettings
from tests.ingest.datasets import assert_same_scans, dataset_state


@pytest.mark.slow
def test_rerun_converts_nothing_and_new_files_are_converted_alone(
    tmp_path: Path, hub_key: HubKey
) -> None:
    src = tmp_path / "src"
    generate_cohort(src, patients=4, seed=21, workers=2)
    dataset = tmp_path / "ds"
    first = run_ingest([src / "dicom"], dataset, hub_key, src / "labels.csv")
    n = first.converted
    assert n > 0 and first.quarantined_total == 0
    second = run_ingest([src / "dicom"], dataset, hub_key, src / "labels.csv")
    assert (second.converted, second.present) == (0, n)
    # a later export arrives: only its files are converted
    generate_cohort(tmp_path / "more", patients=6, seed=21, workers=2)  # same seed: +2 patients
    for patient in ("patient_0004", "patient_0005"):
        shutil.copytree(tmp_path / "more" / "dicom" / patient, src / "dicom" / patient)
    added = sum(1 for p in (src / "dicom").rglob("*") if p.is_file()) - n
    third = run_ingest([src / "dicom"], dataset, hub_key, tmp_path / "more" / "labels.csv")
    assert (third.converted, third.present) == (added, n)
    assert len(pd.read_parquet(dataset / "catalog.parquet")) == n + added


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_kill_9_then_rerun_gives_the_uninterrupted_dataset(
    executor: str, tmp_path: Path, hub_key: HubKey, key_file: Path
) -> None:
    src = tmp_path / "src"
    generate_cohort(src, patients=10, seed=33, workers=2)
    total = sum(1 for p in (src / "dicom").rglob("*") if p.is_file())
    reference = tmp_path / "reference"
    run_ingest([src / "dicom"], reference, hub_key, src / "labels.csv", IngestSettings(workers=2))

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eyehub.cli",
            "ingest",
            str(src / "dicom"),
            "--out",
            str(interrupted),
            "--labels",
            str(src / "labels.csv"),
            "--key-file",
            str(key_file),
            "--workers",
            "1",
            "--executor",
            executor,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    scans = interrupted / "scans.zarr"
    deadline = time.monotonic() + 240
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        seen = sum(1 for p in scans.iterdir() if p.is_dir()) if scans.is_dir() else 0
        if seen >= 6:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers (and raylet) at once
    proc.wait()
    assert 0 < seen < total, "the run must be killed part-way"

    rerun = run_ingest([src / "dicom"], interrupted, hub_key, src / "labels.csv")
    assert rerun.converted + rerun.present == total and rerun.quarantined_total == 0
    ref_catalog, ref_scans = dataset_state(reference)
    got_catalog, got_scans = dataset_state(interrupted)
    pd.testing.assert_frame_equal(ref_catalog, got_catalog)
    assert_same_scans(ref_scans, got_scans)
    # staging debris of the killed run stays invisible (cleaned once stale), never in the store
    leftovers = (
        list((interrupted / ".staging").iterdir()) if (interrupted / ".staging").exists() else []
    )
    assert all(p.name.split(".")[0] in ref_scans for p in leftovers)
