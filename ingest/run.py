"""Drive an ingest over Ray: walk the sources, one task per small batch of files.

Local Ray by default (`ray.init(num_cpus=workers)`); `--ray-address` / `RAY_ADDRESS` sends
the same tasks to a cluster. At most `2 x workers` batches are in flight, so memory stays
bounded whatever the cohort size. The driver records outcomes, keeps a source index so a
rerun skips unchanged files without reading them, and rebuilds the catalog and quarantine
tables from the store at the end (also after an interrupted run).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from ingest.convert import convert_batch
from ingest.kernel import DEFAULT_MAX_DECODED_BYTES
from ingest.keys import HubKey
from ingest.labels import read_labels
from ingest.store import clean_staging, open_store, scan_path

log = logging.getLogger(__name__)

SOURCE_INDEX = "sources.json"


class IngestSettings(Settings):
    workers: int = 2
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    ray_address: str | None = None
    batch_files: int = 4
    batch_bytes: int = 64 * 2**20


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
    nodes: set[str] = field(default_factory=set)  # Ray nodes that converted files

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


def _batches(files: list[Path], settings: IngestSettings) -> list[list[str]]:
    out: list[list[str]] = []
    current: list[str] = []
    size = 0
    for f in files:
        fsize = f.stat().st_size
        if current and (
            len(current) >= settings.batch_files or size + fsize > settings.batch_bytes
        ):
            out.append(current)
            current, size = [], 0
        current.append(str(f))
        size += fsize
    if current:
        out.append(current)
    return out


def _convert_batch_task(
    paths: list[str], dataset: str, secret: bytes, max_decoded_bytes: int
) -> tuple[str, list[dict[str, Any]]]:
    """The Ray task: the plain kernel, plus which node ran it."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    return node, convert_batch(paths, dataset, secret, max_decoded_bytes)


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
    if on_start:
        on_start(len(files))
    done = len(files) - len(todo)
    if on_progress:
        on_progress(done)

    if todo:
        import ray

        started = start_ray(settings.workers, settings.ray_address)
        try:
            remote = ray.remote(num_cpus=1, max_retries=1)(_convert_batch_task)
            pending: dict[Any, list[str]] = {}
            queue = _batches(todo, settings)
            last_save = time.monotonic()
            while queue or pending:
                while queue and len(pending) < 2 * settings.workers:
                    batch = queue.pop(0)
                    ref = remote.remote(batch, str(dataset), key.secret, settings.max_decoded_bytes)
                    pending[ref] = batch
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    batch = pending.pop(ref)
                    try:
                        node, results = ray.get(ref)
                        summary.nodes.add(node)
                    except Exception as exc:  # a worker died (e.g. killed for memory)
                        results = [
                            {
                                "path": p,
                                "outcome": "quarantined",
                                "reason": "worker_lost",
                                "detail": f"the worker converting it died "
                                f"({type(exc).__name__}); run the ingest again, with fewer "
                                "--workers if it was killed for memory.",
                                "sha256": None,
                            }
                            for p in batch
                        ]
                    for res in results:
                        _account(dataset, res, summary, index)
                    done += len(results)
                    if on_progress:
                        on_progress(done)
                if time.monotonic() - last_save > 5:
                    _save_index(dataset, index)
                    last_save = time.monotonic()
        finally:
            _save_index(dataset, index)
            if started:
                ray.shutdown()
    _save_index(dataset, index)
    clean_staging(dataset)
    summary.catalog_rows = len(rebuild_catalog(dataset))
    rebuild_quarantine(dataset)
    summary.seconds = time.perf_counter() - start
    return summary


def _account(
    dataset: Path, res: dict[str, Any], summary: IngestSummary, index: dict[str, dict[str, Any]]
) -> None:
    path = res["path"]
    outcome = res["outcome"]
    if outcome == "converted":
        summary.converted += 1
        summary.decoded_bytes += res.get("decoded_bytes", 0)
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
