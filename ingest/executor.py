"""Who converts the files: worker processes on this machine, or Ray tasks on a cluster.

Both executors run the same task function (`ingest.convert.convert_file`) and yield one
result record per file as it finishes; the driver (`ingest.run`) records them. Both keep
the same guarantees, each tested:

- a worker that dies (killed for memory, a crash in a native decoder) takes only the file
  it was converting: that file is tried once more on a fresh worker, then quarantined as
  `worker_lost`; every other file is converted;
- nothing is lost to a kill -9 of the whole run (a scan becomes visible only once
  complete; see `ingest.store`), so a rerun gives the uninterrupted dataset;
- memory per worker is bounded: OCT volumes stream frame by frame, and a local worker
  whose resident memory passes `max_worker_rss` after a file is replaced by a fresh one.

`LocalExecutor` (the default without a cluster address) forks its workers from a
forkserver that imported the conversion code once, so a run starts converting within
about a second and stops at once. `RayExecutor` is used with `--ray-address` /
`RAY_ADDRESS`, or with `--executor ray`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import types
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest import gpu_decode

if TYPE_CHECKING:
    from ingest.run import IngestSettings

log = logging.getLogger(__name__)

# imported once by the forkserver, so every worker forks with them loaded (an import that
# fails is skipped by multiprocessing: the worker then imports what it needs itself)
_PRELOAD = [
    "ingest.convert",
    "pydicom.pixels.decoders.pylibjpeg",
    "pydicom.pixels.decoders.pyjpegls",
    "pydicom.pixels.decoders.rle",
    "openjpeg",
    "jpeg_ls",
    "libjpeg",
    "rle",
]


def worker_lost(path: str, cause: str) -> dict[str, Any]:
    """The result of a file whose worker died twice while converting it."""
    return {
        "path": path,
        "outcome": "quarantined",
        "reason": "worker_lost",
        "detail": f"the worker converting it died ({cause}), twice; run the ingest again, "
        "with fewer --workers if it was killed for memory.",
        "sha256": None,
    }


def _status_bytes(field_name: str) -> int:
    """A VmRSS / VmHWM figure of this process, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _work(
    conn: Connection,
    dataset: str,
    secret: bytes,
    max_decoded_bytes: int,
    max_rss: int,
    gpu_mode: gpu_decode.Mode,
) -> None:
    """A local worker: convert the paths the driver sends, one at a time, until told to
    stop (None) or the driver is gone; exits after a file that left it above `max_rss`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    handler = logging.StreamHandler()  # stderr: the run's log file under the CLI
    handler.setFormatter(
        logging.Formatter(f"ingest worker {os.getpid()}: %(levelname)s %(message)s")
    )
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    from ingest.convert import convert_file
    from ingest.keys import HubKey

    gpu_decode.configure(gpu_mode)
    key = HubKey(secret)
    while True:
        try:
            path = conn.recv()
        except (EOFError, OSError):
            return  # the driver is gone: nothing to report to
        if path is None:
            return
        measured = _reset_peak_rss()
        before = _status_bytes("VmRSS")
        started = time.time()
        result = convert_file(Path(path), Path(dataset), key, max_decoded_bytes)
        result["seconds"] = time.time() - started
        result["started"] = started
        rss = _status_bytes("VmRSS")
        if measured:
            result["rss_growth"] = max(0, _status_bytes("VmHWM") - before)
        result["rss"] = rss
        recycle = rss > max_rss
        result["recycled"] = recycle
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return
        if recycle:
            return


@dataclass
class _Slot:
    process: Any
    conn: Connection
    path: str | None = None


@dataclass
class ExecutorStats:
    """What the executor saw, for the summary and the benchmark."""

    workers_started: int = 0
    workers_lost: int = 0
    workers_recycled: int = 0
    peak_worker_rss: int = 0  # the largest RSS a worker reported after a file
    peak_file_growth: int = 0  # the most one file raised its worker's RSS
    first_file_started: float | None = None  # time.time() when a worker began the first file
    converting_seconds: float = 0.0  # summed over files: the workers' own time on them
    nodes: set[str] = field(default_factory=set)

    def record(self, result: dict[str, Any]) -> None:
        self.peak_worker_rss = max(self.peak_worker_rss, int(result.pop("rss", 0)))
        self.peak_file_growth = max(self.peak_file_growth, int(result.pop("rss_growth", 0)))
        self.converting_seconds += float(result.pop("seconds", 0.0))
        started = result.pop("started", None)
        if started is not None and (
            self.first_file_started is None or started < self.first_file_started
        ):
            self.first_file_started = started
        if result.pop("recycled", False):
            self.workers_recycled += 1
        node = result.pop("node", None)
        if node:
            self.nodes.add(node)


def _context() -> Any:
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # pragma: no cover - platforms without fork (Windows)
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class LocalExecutor:
    """`workers` processes on this machine, each given one file at a time."""

    def __init__(self, dataset: Path, secret: bytes, settings: IngestSettings) -> None:
        self.workers = settings.workers
        self.args = (
            str(dataset),
            secret,
            settings.max_decoded_bytes,
            settings.max_worker_rss,
            settings.gpu_decode,
        )
        self.stats = ExecutorStats()
        self._ctx = _context()
        self._slots: list[_Slot] = []

    def _start(self) -> _Slot:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_work, args=(child, *self.args), name="eyehub-ingest-worker", daemon=True
        )
        # multiprocessing re-runs the caller's __main__ in a new process so that functions
        # defined there unpickle; the worker needs nothing from it (its target lives here),
        # and re-running a script or pytest there would be slow or worse: hide it
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            process.start()
        finally:
            sys.modules["__main__"] = main
        child.close()
        self.stats.workers_started += 1
        return _Slot(process, parent)

    def worker_pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process.pid is not None]

    def run(self, paths: list[str]) -> Iterator[dict[str, Any]]:
        """Convert `paths` (largest first keeps both workers busy to the end); yield each
        file's result as it finishes."""
        queue: deque[str] = deque(paths)
        attempts: dict[str, int] = {}
        try:
            self._slots = [self._start() for _ in range(min(self.workers, len(paths)))]
            while queue or any(s.path is not None for s in self._slots):
                for index, slot in enumerate(self._slots):
                    if slot.path is None and queue:
                        if not slot.process.is_alive():  # died idle: no file is charged
                            slot.conn.close()
                            slot = self._slots[index] = self._start()
                        self._assign(slot, queue.popleft())
                busy = [s for s in self._slots if s.path is not None]
                waitables: list[Any] = [s.conn for s in busy] + [s.process.sentinel for s in busy]
                ready = set(wait(waitables))
                for index, slot in enumerate(self._slots):
                    if slot.path is None or (
                        slot.conn not in ready and slot.process.sentinel not in ready
                    ):
                        continue
                    result = self._receive(slot)
                    if result is not None:
                        slot.path = None
                        recycled = bool(result.get("recycled"))
                        self.stats.record(result)
                        if recycled:  # it exits after this file: a fresh one takes its place
                            slot.process.join(timeout=5)
                            slot.conn.close()
                            self._slots[index] = self._start()
                        yield result
                        continue
                    # the worker died with a file in hand
                    path = slot.path
                    code = slot.process.exitcode
                    self.stats.workers_lost += 1
                    cause = f"signal {-code}" if code is not None and code < 0 else f"exit {code}"
                    log.warning("an ingest worker died (%s) while converting %s", cause, path)
                    slot.conn.close()
                    fresh = self._slots[index] = self._start()
                    attempts[path] = attempts.get(path, 0) + 1
                    if attempts[path] < 2:
                        self._assign(fresh, path)  # once more, on this fresh worker
                    else:
                        yield worker_lost(path, cause)
        finally:
            self.close()

    @staticmethod
    def _assign(slot: _Slot, path: str) -> None:
        slot.path = path
        # a worker that dies before reading it is seen through its sentinel
        with contextlib.suppress(BrokenPipeError, OSError):
            slot.conn.send(path)

    def _receive(self, slot: _Slot) -> dict[str, Any] | None:
        """The finished file's result, or None when the worker died before sending one."""
        try:
            if slot.conn.poll():
                result: dict[str, Any] = slot.conn.recv()
                return result
        except (EOFError, OSError):
            pass
        slot.process.join(timeout=5)
        return None

    def close(self) -> None:
        """Stop every worker: idle ones at once, busy ones (an interrupted run) by signal."""
        for slot in self._slots:
            with contextlib.suppress(OSError):
                if slot.path is None:
                    slot.conn.send(None)
        deadline = time.monotonic() + 5
        for slot in self._slots:
            if slot.path is not None:
                slot.process.terminate()
            slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
        self._slots = []


def _convert_batch_task(
    paths: list[str],
    dataset: str,
    secret: bytes,
    max_decoded_bytes: int,
    gpu_mode: gpu_decode.Mode,
) -> tuple[str, list[dict[str, Any]]]:
    """The Ray task: the plain kernel over a few files, plus which node ran it. (Ray hides
    the GPUs from a task that reserves none, so these decode on the CPU.)"""
    import ray

    from ingest.convert import convert_batch

    gpu_decode.configure(gpu_mode)
    node = ray.get_runtime_context().get_node_id()
    started = time.time()
    results = convert_batch(paths, dataset, secret, max_decoded_bytes)
    if results:
        results[0]["started"] = started
        results[0]["seconds"] = time.time() - started
    return node, results


class RayExecutor:
    """Ray tasks of a few files each (amortising the per-task cost on small files), at
    most `2 x workers` in flight so memory stays bounded whatever the cohort size."""

    def __init__(self, dataset: Path, secret: bytes, settings: IngestSettings) -> None:
        self.workers = settings.workers
        self.args = (str(dataset), secret, settings.max_decoded_bytes, settings.gpu_decode)
        self.batch_files = settings.batch_files
        self.batch_bytes = settings.batch_bytes
        self.stats = ExecutorStats()

    def batches(self, paths: list[str]) -> list[list[str]]:
        out: list[list[str]] = []
        current: list[str] = []
        size = 0
        for p in paths:
            fsize = os.path.getsize(p)
            if current and (len(current) >= self.batch_files or size + fsize > self.batch_bytes):
                out.append(current)
                current, size = [], 0
            current.append(p)
            size += fsize
        if current:
            out.append(current)
        return out

    def run(self, paths: list[str]) -> Iterator[dict[str, Any]]:
        import ray

        task = ray.remote(num_cpus=1, max_retries=1)(_convert_batch_task)
        alone = ray.remote(num_cpus=1, max_retries=0)(_convert_batch_task)
        queue: deque[tuple[list[str], bool]] = deque((b, False) for b in self.batches(paths))
        pending: dict[Any, tuple[list[str], bool]] = {}
        while queue or pending:
            while queue and len(pending) < 2 * self.workers:
                batch, single = queue.popleft()
                ref = (alone if single else task).remote(batch, *self.args)
                pending[ref] = (batch, single)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                batch, single = pending.pop(ref)
                try:
                    node, results = ray.get(ref)
                except Exception as exc:  # its worker died, twice (max_retries=1)
                    self.stats.workers_lost += 1
                    log.warning("a Ray ingest task died (%s)", type(exc).__name__)
                    if single:
                        yield worker_lost(batch[0], type(exc).__name__)
                    else:  # only the file that kills its worker may be lost: one by one
                        for path in reversed(batch):
                            queue.appendleft(([path], True))
                    continue
                for result in results:
                    result["node"] = node
                    self.stats.record(result)
                    yield result
