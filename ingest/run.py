"""Drive an ingest: walk the sources, hand the files to an executor, record outcomes.

Without a cluster address the files are converted by worker processes on this machine
(`ingest.executor.LocalExecutor`: no Ray start-up); `--ray-address` / `RAY_ADDRESS` (or
`executor="ray"`) sends the same task function to Ray. Files go largest first, so the
workers finish together. The driver records outcomes, keeps a source index so a rerun
skips unchanged files without reading them, and rebuilds the catalog and quarantine
tables from the store at the end (also after an interrupted run).
"""

from __future__ import annotations

import json
import logging
import os
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ByteSize, TypeAdapter, ValidationError

from eyehub.compute import start_ray
from eyehub.errors import NotFoundError, UsageError
from eyehub.settings import Settings
from eyehub.storage import write_text_atomic
from ingest.catalog import (
    STATE,
    clear_quarantine,
    quarantine_records,
    rebuild_catalog,
    rebuild_quarantine,
    record_quarantine,
    save_labels,
)
from ingest.executor import ExecutorStats, LocalExecutor, RayExecutor
from ingest.gpu_decode import Mode as GpuDecodeMode
from ingest.kernel import DEFAULT_MAX_DECODED_BYTES
from ingest.keys import HubKey
from ingest.labels import read_labels
from ingest.store import clean_staging, open_store, scan_path

log = logging.getLogger(__name__)

SOURCE_INDEX = "sources.json"


ExecutorChoice = Literal["auto", "local", "ray"]
EXECUTORS: tuple[ExecutorChoice, ...] = typing.get_args(ExecutorChoice)


class IngestSettings(Settings):
    workers: int = 2
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    ray_address: str | None = None
    # auto: Ray when a cluster address is given, else worker processes on this machine
    executor: ExecutorChoice = "auto"
    # a local worker above this resident size after a file is replaced by a fresh one
    max_worker_rss: int = 4 * 2**30
    # JPEG 2000 / JPEG on a CUDA GPU through nvImageCodec where one is usable (ingest/gpu_decode.py)
    gpu_decode: GpuDecodeMode = "auto"
    batch_files: int = 4  # Ray: files per task
    batch_bytes: int = 64 * 2**20

    def executor_kind(self) -> str:
        if self.executor != "auto":
            return self.executor
        return "ray" if self.ray_address else "local"


@dataclass
class IngestSummary:
    files: int = 0
    converted: int = 0
    present: int = 0
    ignored: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    decoded_bytes: int = 0
    catalog_rows: int = 0
    executor: str = ""  # local | ray (empty when nothing needed converting)
    # converted files whose frames nvImageCodec decoded, by backend (gpu; cpu: a test mode)
    nvimgcodec: Counter[str] = field(default_factory=Counter)
    stats: ExecutorStats = field(default_factory=ExecutorStats)
    # wall seconds per phase: sources (walk, index, labels), convert (the executor, start
    # to stop), records (the driver's per-file bookkeeping, inside convert), catalog
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def nodes(self) -> set[str]:
        """The Ray nodes that converted files (none with the local executor)."""
        return self.stats.nodes

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())


def parse_size(text: str | int) -> int:
    """'4GiB', '500MB', '1073741824' -> bytes (pydantic's ByteSize reads the units)."""
    try:
        value = int(_SIZE.validate_python(text))
    except ValidationError:
        raise UsageError(
            f"--max-decoded-bytes: cannot read {text!r} as a size (e.g. 4GiB)"
        ) from None
    if value <= 0:
        raise UsageError(f"--max-decoded-bytes must be above zero (got {text!r})")
    return value


_SIZE = TypeAdapter(ByteSize)


def walk_sources(sources: Iterable[Path], exclude: Path) -> list[Path]:
    """Every regular file under the sources (no reliance on extensions), sorted."""
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise NotFoundError(f"source(s) not found: {', '.join(missing)}")
    exclude = exclude.resolve()
    files: set[Path] = set()
    for src in sources:
        if src.is_file():
            files.add(src.resolve())
            continue
        for root, dirs, names in os.walk(src, followlinks=False):
            root_path = Path(root).resolve()
            if root_path == exclude or exclude in root_path.parents:
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in names:
                if not name.startswith("."):
                    p = root_path / name
                    if p.is_file():
                        files.add(p)
    return sorted(files)


def _load_index(dataset: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((dataset / STATE / SOURCE_INDEX).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _save_index(dataset: Path, index: dict[str, dict[str, Any]]) -> None:
    (dataset / STATE).mkdir(parents=True, exist_ok=True)
    write_text_atomic(dataset / STATE / SOURCE_INDEX, json.dumps(index))


def run_ingest(
    sources: list[Path],
    dataset: Path,
    key: HubKey,
    labels: Path | None = None,
    settings: IngestSettings | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> IngestSummary:
    """Ingest `sources` into `dataset`; see the module docstring."""
    settings = settings or IngestSettings()
    if settings.workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {settings.workers})")
    start = time.perf_counter()
    files = walk_sources(sources, dataset)
    open_store(dataset)
    if labels is not None:
        save_labels(dataset, read_labels(labels, key))
    summary = IngestSummary(files=len(files))
    index = _load_index(dataset)
    quarantined_before = {r["source_path"]: r for r in quarantine_records(dataset)}

    todo: list[Path] = []
    for f in files:
        entry = index.get(str(f))
        st = f.stat()
        unchanged = (
            entry is not None
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
        )
        if unchanged and entry is not None:
            outcome = entry.get("outcome")
            if outcome == "converted" and scan_path(dataset, entry["scan_id"]).is_dir():
                summary.present += 1
                continue
            if outcome == "ignored":
                summary.ignored += 1
                continue
            if outcome == "quarantined" and str(f) in quarantined_before:
                summary.quarantined[quarantined_before[str(f)]["reason"]] += 1
                continue
        todo.append(f)
    summary.phases["sources"] = time.perf_counter() - start
    if on_start:
        on_start(len(files))
    done = len(files) - len(todo)
    if on_progress:
        on_progress(done)

    if todo:
        todo.sort(key=_expected_work, reverse=True)  # longest first: the workers end together
        kind = settings.executor_kind()
        summary.executor = kind
        started_ray = False
        executor: LocalExecutor | RayExecutor
        if kind == "ray":
            started_ray = start_ray(settings.workers, settings.ray_address)
            executor = RayExecutor(dataset, key.secret, settings)
        else:
            executor = LocalExecutor(dataset, key.secret, settings)
        summary.stats = executor.stats
        last_save = time.monotonic()
        converting = time.perf_counter()
        records = 0.0
        try:
            for result in executor.run([str(f) for f in todo]):
                t = time.perf_counter()
                _account(dataset, result, summary, index)
                records += time.perf_counter() - t
                done += 1
                if on_progress:
                    on_progress(done)
                if time.monotonic() - last_save > 5:
                    _save_index(dataset, index)
                    last_save = time.monotonic()
        finally:
            _save_index(dataset, index)
            if started_ray:
                import ray

                ray.shutdown()
        summary.phases["convert"] = time.perf_counter() - converting
        summary.phases["records"] = records
    _save_index(dataset, index)
    clean_staging(dataset)
    t = time.perf_counter()
    summary.catalog_rows = len(rebuild_catalog(dataset))
    rebuild_quarantine(dataset)
    summary.phases["catalog"] = time.perf_counter() - t
    summary.seconds = time.perf_counter() - start
    return summary


# Seconds of work per byte of file, relative to native pixels, by transfer syntax: rough
# ranks, not measurements, except JPEG 2000. On the realistic synthetic cohort a 128-frame
# JPEG 2000 OCT (42 MB) took about 6 s to decode, a native one (58 MB) about 0.5 s to
# compress and write: some 15x per byte; the others were not measured.
_WORK_PER_BYTE = {
    b"1.2.840.10008.1.2.4.90": 12.0,  # JPEG 2000 lossless
    b"1.2.840.10008.1.2.4.91": 12.0,  # JPEG 2000
    b"1.2.840.10008.1.2.4.80": 3.0,  # JPEG-LS lossless
    b"1.2.840.10008.1.2.4.81": 3.0,  # JPEG-LS near-lossless
    b"1.2.840.10008.1.2.4.70": 4.0,  # JPEG lossless SV1
    b"1.2.840.10008.1.2.4.57": 4.0,  # JPEG lossless
    b"1.2.840.10008.1.2.5": 1.5,  # RLE
}


def _expected_work(path: Path) -> float:
    """How long a file will take, roughly: its size times its transfer syntax's cost per
    byte, read from the file meta group at its start (a 1 KiB read, no parsing)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(1024)
    except OSError:
        return 0.0
    # (0002,0010) Transfer Syntax UID; the file meta group is explicit VR little endian.
    # An even-length UID has no padding: the next element's tag follows it directly.
    at = head.find(b"\x02\x00\x10\x00UI")
    if at < 0:
        return float(size)
    length = int.from_bytes(head[at + 6 : at + 8], "little")
    uid = head[at + 8 : at + 8 + length].rstrip(b"\0 ")
    return size * _WORK_PER_BYTE.get(uid, 1.0)


def _account(
    dataset: Path, res: dict[str, Any], summary: IngestSummary, index: dict[str, dict[str, Any]]
) -> None:
    path = res["path"]
    outcome = res["outcome"]
    if outcome == "converted":
        summary.converted += 1
        summary.decoded_bytes += res.get("decoded_bytes", 0)
        if res.get("nvimgcodec"):
            summary.nvimgcodec[res["nvimgcodec"]] += 1
        clear_quarantine(dataset, path)
    elif outcome == "present":
        summary.present += 1
        clear_quarantine(dataset, path)
    elif outcome == "ignored":
        summary.ignored += 1
    else:
        summary.quarantined[res["reason"]] += 1
        record_quarantine(dataset, path, res["reason"], res["detail"], res.get("sha256"))
        if res["reason"] == "internal_error":
            log.error("internal error converting %s:\n%s", path, res.get("traceback", ""))
        else:
            log.warning("quarantined %s: %s", path, res["reason"])
    if "size" in res:
        index[path] = {
            "size": res["size"],
            "mtime_ns": res["mtime_ns"],
            "outcome": "converted" if outcome == "present" else outcome,
            "scan_id": res.get("scan_id"),
        }
