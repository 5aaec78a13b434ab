"""Both executors keep ingest's guarantees: a worker that dies takes only its own file,
reruns are idempotent, memory per worker stays bounded, and they write the same dataset.

Workers are really killed (SIGKILL from outside, as the kernel's OOM killer would) while
they hold the victim file open; nothing in eyehub knows it is being tested.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from eyehub.synth import generate_cohort
from ingest import HubKey, run_ingest
from ingest.run import IngestSettings, IngestSummary
from tests.ingest.bad_inputs import big_oct
from tests.ingest.datasets import assert_same_scans, dataset_state


class _Killer(threading.Thread):
    """SIGKILLs every descendant process of this test that has `victim` open."""

    def __init__(self, victim: Path, most: int = 1000) -> None:
        super().__init__(daemon=True)
        self.victim = str(victim)
        self.kills = 0
        self.most = most
        self.running = True

    def run(self) -> None:
        me = psutil.Process()
        while self.running and self.kills < self.most:
            for proc in me.children(recursive=True):
                try:
                    if any(f.path == self.victim for f in proc.open_files()):
                        os.kill(proc.pid, signal.SIGKILL)
                        self.kills += 1
                except (psutil.Error, ProcessLookupError):
                    continue
            time.sleep(0.01)

    def stop(self) -> None:
        self.running = False
        self.join()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A small cohort plus one large OCT (the victim); (dicom folder, victim, decoded bytes)."""
    root = tmp_path_factory.mktemp("executor")
    generate_cohort(root / "cohort", patients=3, seed=71, workers=2)
    victim = root / "cohort" / "dicom" / "zz_large_oct"
    decoded = big_oct(victim)
    return root / "cohort" / "dicom", victim, decoded


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_worker_killed_mid_file_loses_only_that_file(
    executor: str, sources: tuple[Path, Path, int], hub_key: HubKey, tmp_path: Path
) -> None:
    folder, victim, decoded = sources
    total = sum(1 for p in folder.rglob("*") if p.is_file())
    dataset = tmp_path / "ds"
    settings = IngestSettings(workers=2, executor=executor)  # type: ignore[arg-type]
    killer = _Killer(victim)
    killer.start()
    try:
        summary = run_ingest([folder], dataset, hub_key, settings=settings)
    finally:
        killer.stop()
    assert killer.kills >= 2, "the victim's worker must have been killed on every try"
    assert summary.quarantined == {"worker_lost": 1}
    assert summary.converted == total - 1
    quarantine = pd.read_parquet(dataset / "quarantine.parquet")
    assert list(quarantine["source_path"]) == [str(victim)]
    assert "run the ingest again" in quarantine["detail"][0]

    # run again (nothing kills it now): only the lost file is converted
    rerun = run_ingest([folder], dataset, hub_key, settings=IngestSettings(workers=2))
    assert (rerun.converted, rerun.present, rerun.quarantined_total) == (1, total - 1, 0)
    assert len(pd.read_parquet(dataset / "quarantine.parquet")) == 0
    assert len(pd.read_parquet(dataset / "catalog.parquet")) == total
    # memory stayed bounded: the large volume streamed through its worker frame by frame
    assert 0 < rerun.stats.peak_file_growth < decoded / 2, (rerun.stats.peak_file_growth, decoded)


@pytest.mark.slow
def test_a_file_whose_worker_died_once_is_converted_by_a_fresh_one(
    sources: tuple[Path, Path, int], hub_key: HubKey, tmp_path: Path
) -> None:
    folder, victim, _ = sources
    total = sum(1 for p in folder.rglob("*") if p.is_file())
    killer = _Killer(victim, most=1)
    killer.start()
    try:
        summary = run_ingest(
            [folder],
            tmp_path / "ds",
            hub_key,
            settings=IngestSettings(executor="local"),
        )
    finally:
        killer.stop()
    assert killer.kills == 1
    assert (summary.converted, summary.quarantined_total) == (total, 0)
    assert len(pd.read_parquet(tmp_path / "ds" / "catalog.parquet")) == total


@pytest.mark.slow
def test_both_executors_write_the_same_dataset_and_reruns_convert_nothing(
    sources: tuple[Path, Path, int], hub_key: HubKey, tmp_path: Path
) -> None:
    folder, _, _ = sources
    datasets = {}
    for executor in ("local", "ray"):
        dataset = tmp_path / executor
        settings = IngestSettings(workers=2, executor=executor)
        first = run_ingest([folder], dataset, hub_key, settings=settings)
        assert first.executor == executor and first.quarantined_total == 0
        # from the source index: unchanged files are not even read
        again = run_ingest([folder], dataset, hub_key, settings=settings)
        assert (again.converted, again.present) == (0, first.converted)
        assert again.executor == ""  # nothing to convert: no executor started
        datasets[executor] = dataset_state(dataset)
    local, ray = datasets["local"], datasets["ray"]
    pd.testing.assert_frame_equal(local[0], ray[0])
    assert_same_scans(local[1], ray[1])

    # without the source index every file is read, hashed and found present
    shutil.rmtree(tmp_path / "local" / ".ingest")
    third = run_ingest([folder], tmp_path / "local", hub_key)
    assert (third.converted, third.present) == (0, len(local[1]))


def test_a_worker_over_its_memory_limit_is_replaced_and_nothing_is_lost(
    sources: tuple[Path, Path, int], hub_key: HubKey, tmp_path: Path
) -> None:
    folder, victim, _ = sources
    files = [p for p in folder.rglob("*") if p.is_file() and p != victim]
    # a limit below any Python process: every worker is replaced after its one file
    summary: IngestSummary = run_ingest(
        files, tmp_path / "ds", hub_key, settings=IngestSettings(workers=2, max_worker_rss=1)
    )
    assert summary.converted == len(files) and summary.quarantined_total == 0
    assert summary.stats.workers_recycled == len(files)
    assert summary.stats.workers_started >= len(files)
    assert summary.stats.peak_worker_rss > 0
