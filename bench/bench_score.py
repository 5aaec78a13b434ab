"""Benchmark scoring: latency, service throughput, batch scoring (not pass/fail).

(a) Latency p50 / p95 from upload to JSON, heat map included, for a fundus photograph
    with the fundus model and an OCT volume of 49 B-scans with the OCT model: in-process
    (`Scorer.score_files` on the file's bytes, then `json.dumps` of the results) and
    through the HTTP service (`eyehub serve` in its own process; `POST /v1/score`, also
    with `?images=true`, which adds the photograph or B-scan and the heat-map overlay as
    PNGs). The files are realistic-size synthetic DICOM (`eyehub.synth --size realistic`)
    of the NORTHLIGHT device profile: photographs 1934 x 1956, OCT 49 x 496 x 512, with
    the cohort's mix of transfer syntaxes; requests cycle through them.
    Targets (inference issue): fundus p95 <= 300 ms, OCT p95 <= 2 s.
(b) Throughput of the service with 16 concurrent clients for `--duration` seconds:
    requests/s and the errors (any answer but 200, any exception), each counted and shown.
(c) Batch scoring: scans/s of `inference.batch.score_dataset` (Ray Data, as `eyehub
    score --dataset` runs it, Ray start included) against the same model called in a
    plain loop (`EyeModel.predict` on the prepared tensors, one batch at a time, in this
    process), on the same prepared dataset (`eyehub.synth --size small`).
(d) `--device cuda`: the same figures on the GPU.

The models: `--model` (fundus) and `--oct-model` (OCT) with `--tracking-uri` (a trained
demo model: `models:/eyehub-fundus_demo@candidate` in `./.eyehub`); by default the
scoring tests' models (`tests/inference/models.py`: fundus_demo and oct_demo, untrained
but calibrated: the same networks and the same compute as the trained ones) registered in
a temporary MLflow store.

    .venv/bin/python bench/bench_score.py [--duration 60] [--clients 16] [--requests 40]
        [--model REF --oct-model REF --tracking-uri URI] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.inference.models: the scoring tests' models

SECRET = "62656e63682d73636f72652d6b65792d2d6e6f742d666f722d7265616c2d757365"
TOKEN = "bench-score-token"


@dataclass
class ModelUse:
    kind: str  # fundus | oct
    ref: str
    tracking_uri: str


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def _ms(values: list[float]) -> str:
    a = np.asarray(values) * 1000
    return (
        f"p50 {np.percentile(a, 50):7.1f} ms  p95 {np.percentile(a, 95):7.1f} ms  "
        f"max {a.max():7.1f} ms  (n={len(a)})"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- inputs ---------------------------------------------------------------------------------


def latency_files(work: Path, seeds: list[int]) -> dict[str, list[Path]]:
    """Realistic-size files of the NORTHLIGHT profile (the first patient of each seed is
    at that site): fundus photographs and OCT volumes of 49 B-scans."""
    from eyehub.synth import SITES, generate_cohort
    from eyehub.synth.phenotype import make_patient

    files: dict[str, list[Path]] = {"fundus": [], "oct": []}
    for seed in seeds:
        if SITES[make_patient(seed, 0, len(SITES)).site].oct_shape["realistic"][0] != 49:
            continue
        out = work / f"realistic-{seed}"
        generate_cohort(out, patients=1, seed=seed, size="realistic", workers=1)
        truth = pd.read_csv(out / "truth.csv")
        for r in truth.itertuples():
            if r.kind == "oct" and int(r.frames) != 49:
                continue
            files[str(r.kind)].append(out / str(r.path))
    return files


def _syntax(path: Path) -> str:
    import pydicom
    from pydicom.uid import UID

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(UID(ds.file_meta.TransferSyntaxUID).name)


def describe_files(files: list[Path]) -> str:
    import pydicom

    kinds: Counter[str] = Counter()
    shapes = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        kinds[_syntax(f)] += 1
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        shapes.add(
            f"{frames} x {ds.Rows} x {ds.Columns}" if frames > 1 else f"{ds.Rows} x {ds.Columns}"
        )
    mb = sum(f.stat().st_size for f in files) / len(files) / 1e6
    return (
        f"{len(files)} files, {', '.join(sorted(shapes))}, {mb:.1f} MB each on average; "
        + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    )


def models(args: argparse.Namespace, work: Path) -> dict[str, ModelUse]:
    """The models to score with: the given references, else the scoring tests' models
    registered in a temporary MLflow store."""
    from tests.inference.models import register

    given_uri = (
        args.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or (f"sqlite:///{(Path(os.environ.get('EYEHUB_HOME', '.eyehub')) / 'mlflow.db').resolve()}")
    )
    temp_uri = f"sqlite:///{work / 'mlflow.db'}"
    out = {}
    for kind, ref, config in (
        ("fundus", args.model, "fundus_demo"),
        ("oct", args.oct_model, "oct_demo"),
    ):
        if ref:
            out[kind] = ModelUse(kind, ref, given_uri)
        else:
            reg = register(config, temp_uri, work / "models")
            out[kind] = ModelUse(kind, f"models:/{reg.name}@champion", temp_uri)
    return out


# -- (a) in-process latency -----------------------------------------------------------------


def inprocess_latency(
    use: ModelUse, files: list[Path], key: Any, cache: Path, device: str, n: int
) -> None:
    from inference.registry import load_model
    from inference.score import Scorer

    loaded = load_model(use.ref, use.tracking_uri, cache, device=device)
    scorer = Scorer(loaded, key, device=device, heatmaps=True)
    data = [f.read_bytes() for f in files]
    syntax = [_syntax(f) for f in files]
    by_syntax: dict[str, list[float]] = {}
    for d in data[:2]:  # warm-up (first calls allocate)
        json.dumps([r.to_json() for r in scorer.score_files([d])])
    times: list[float] = []
    cpu: list[float] = []
    phases: dict[str, list[float]] = {}
    for i in range(n):
        t, c = time.perf_counter(), time.process_time()
        results = scorer.score_files([data[i % len(data)]])
        body = json.dumps([r.to_json() for r in results])
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        by_syntax.setdefault(syntax[i % len(data)], []).append(times[-1])
        assert results[0].status == "scored" and "heatmap" in body
        for k, v in results[0].latency_ms.items():
            phases.setdefault(k, []).append(v)
    parts = "  ".join(f"{k} {np.median(v):.0f}" for k, v in phases.items())
    print(f"  in-process {use.kind:6s} {_ms(times)}")
    print(
        f"      median ms per step: {parts}; CPU time (all threads) p50 "
        f"{np.median(cpu) * 1000:.0f} ms"
    )
    medians = ", ".join(
        f"{name} {np.median(v) * 1000:.0f} ms (n={len(v)})" for name, v in sorted(by_syntax.items())
    )
    print(f"      median by transfer syntax: {medians}")


# -- (a, b) the HTTP service ----------------------------------------------------------------


class Service:
    """`eyehub serve` in its own process, on a free loopback port, with a bearer token."""

    def __init__(self, use: ModelUse, work: Path, key_file: Path, device: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / f"serve-{use.kind}.log"
        env = {
            **os.environ,
            "EYEHUB_HOME": str(work / "home"),
            "MLFLOW_TRACKING_URI": use.tracking_uri,
            "EYEHUB_API_TOKEN": TOKEN,
            "EYEHUB_KEY_FILE": str(key_file),
        }
        eyehub = Path(sys.executable).parent / "eyehub"
        command = [str(eyehub), "serve", "--model", use.ref, "--port", str(self.port)]
        if device != "cpu":
            command += ["--device", device]
        self.proc = subprocess.Popen(
            command, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 300) -> str | None:
        """None once /readyz answers 200; else why not (the process's last output)."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"it exited with {self.proc.returncode}: {self._tail()}"
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return None
            except requests.RequestException:
                pass
            time.sleep(0.5)
        return f"not ready after {timeout:.0f} s: {self._tail()}"

    def _tail(self) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-4:]) or "(no output)"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _post(session: Any, url: str, data: bytes, images: bool) -> tuple[int, Any]:
    response = session.post(
        f"{url}/v1/score" + ("?images=true" if images else ""),
        files={"file": ("scan.dcm", data, "application/dicom")},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    return response.status_code, response.json() if response.content else None


def http_latency(service: Service, kind: str, files: list[Path], n: int) -> None:
    import requests

    data = [f.read_bytes() for f in files]
    with requests.Session() as session:
        for d in data[:2]:
            _post(session, service.url, d, False)
        for images in (False, True):
            times = []
            for i in range(n):
                t = time.perf_counter()
                status, body = _post(session, service.url, data[i % len(data)], images)
                times.append(time.perf_counter() - t)
                if status != 200 or body[0]["status"] != "scored":
                    raise RuntimeError(f"the service answered {status}: {str(body)[:300]}")
            what = "JSON + PNGs" if images else "JSON"
            print(f"  HTTP {what:11s} {kind:6s} {_ms(times)}")


def throughput(call: Any, data: list[bytes], clients: int, duration: float, label: str) -> None:
    """`clients` threads calling `call(session_or_None, bytes)` back to back for
    `duration` seconds; requests/s and every error, counted."""
    done = Counter[str]()
    errors = Counter[str]()
    lock = threading.Lock()
    deadline = time.monotonic() + duration
    latencies: list[float] = []

    def client(k: int) -> None:
        import requests

        with requests.Session() as session:
            i = k
            while time.monotonic() < deadline:
                t = time.perf_counter()
                try:
                    error = call(session, data[i % len(data)])
                except Exception as exc:  # counted and shown, never hidden
                    error = f"{type(exc).__name__}: {str(exc)[:200]}"
                with lock:
                    if error:
                        errors[error] += 1
                    else:
                        done["ok"] += 1
                        latencies.append(time.perf_counter() - t)
                i += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    total = done["ok"] + sum(errors.values())
    print(
        f"  {label}: {clients} clients, {seconds:.0f} s: {total} requests, "
        f"{done['ok'] / seconds:.2f} requests/s, {sum(errors.values())} errors"
        + (f"; latency under load {_ms(latencies)}" if latencies else "")
    )
    for error, count in errors.most_common():
        print(f"      error x{count}: {error}")


def http_call(service: Service) -> Any:
    def call(session: Any, data: bytes) -> str | None:
        status, body = _post(session, service.url, data, False)
        if status != 200:
            return f"HTTP {status}: {str(body)[:200]}"
        return None

    return call


def inprocess_call(use: ModelUse, key: Any, cache: Path, device: str) -> Any:
    from inference.registry import load_model
    from inference.score import Scorer

    scorer = Scorer(load_model(use.ref, use.tracking_uri, cache, device=device), key, device=device)

    def call(_session: Any, data: bytes) -> str | None:
        json.dumps([r.to_json() for r in scorer.score_files([data])])
        return None

    return call


# -- (c) batch scoring ----------------------------------------------------------------------


def batch_dataset(work: Path, patients: int, key_file: Path) -> Path:
    from eyehub.synth import generate_cohort
    from ingest import load_key, run_ingest
    from ingest.run import IngestSettings

    cohort = work / "small-cohort"
    generate_cohort(cohort, patients=patients, seed=5, size="small", workers=2)
    dataset = work / "dataset"
    run_ingest(
        [cohort / "dicom"],
        dataset,
        load_key(key_file),
        cohort / "labels.csv",
        IngestSettings(workers=2),
    )
    return dataset


def plain_loop(
    use: ModelUse, dataset: Path, cache: Path, device: str, batch_size: int, repeat: int
) -> tuple[int, list[float], float]:
    """(scans, seconds of each pass, seconds of the model's loading) of EyeModel.predict
    over the prepared gradable scans of the model's modality, one batch at a time, in
    this process (reading the tensors from the prepared store included)."""
    import torch
    import zarr

    from inference.registry import load_model
    from models.model import model_inputs

    t0 = time.perf_counter()
    model = load_model(use.ref, use.tracking_uri, cache, device=device).model
    load_s = time.perf_counter() - t0
    rid = model.recipe_id
    index = pd.read_parquet(dataset / "prepared" / f"{rid}.parquet")
    kind = model.spec.input
    rows = index.row[(index.modality == kind) & index.gradable].to_numpy()
    array: Any = zarr.open_group(dataset / "prepared" / f"{rid}.zarr", mode="r")[kind]
    passes = []
    for _ in range(repeat):
        t1 = time.perf_counter()
        for i in range(0, len(rows), batch_size):
            tensors = np.stack([np.asarray(array[int(r)]) for r in rows[i : i + batch_size]])
            inputs = model_inputs(model.spec, **{kind: tensors}, device=device)  # type: ignore[arg-type]
            model.predict(inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        passes.append(time.perf_counter() - t1)
    return len(rows), passes, load_s


def ray_batch(
    use: ModelUse, dataset: Path, cache: Path, args: argparse.Namespace
) -> tuple[int, float, float]:
    """(scans scored, seconds of the whole score_dataset call, scans/s once the first
    batch is back: the actors' steady rate, without Ray's and the actors' start-up)."""
    from inference.batch import score_dataset

    marks: list[tuple[float, int]] = []
    t = time.perf_counter()
    summary = score_dataset(
        dataset,
        use.ref,
        tracking_uri=use.tracking_uri,
        cache=cache,
        workers=args.workers,
        batch_size=args.batch,
        device=args.device,
        on_progress=lambda done, _total: marks.append((time.perf_counter(), done)),
    )
    total_s = time.perf_counter() - t
    scoring = marks[1:]  # the first mark is the ungradable rows, before any batch
    steady = float("nan")
    if len(scoring) >= 2 and scoring[-1][0] > scoring[0][0]:
        steady = (scoring[-1][1] - scoring[0][1]) / (scoring[-1][0] - scoring[0][0])
    return summary.scored, total_s, steady


def batch_scoring(
    uses: dict[str, ModelUse], dataset: Path, cache: Path, args: argparse.Namespace
) -> None:
    from inference.registry import load_model
    from preprocess.run import run_preprocess

    recipe = load_model(uses["fundus"].ref, uses["fundus"].tracking_uri, cache).model.recipe
    t = time.perf_counter()
    prep = run_preprocess(dataset, recipe, args.device, args.workers)
    print(
        f"  dataset: {prep.scans} scans prepared with recipe {prep.recipe_id} in "
        f"{time.perf_counter() - t:.1f} s (not counted below); {_load()}"
    )
    for kind, use in uses.items():
        for run in range(args.repeat):
            n, total_s, steady = ray_batch(use, dataset, cache, args)
            print(
                f"  {kind:6s} score_dataset, run {run + 1} ({args.workers} actors, batch "
                f"{args.batch}): {n} scans in {total_s:5.1f} s = {n / total_s:6.1f} scans/s "
                f"with Ray's and the actors' start-up, {steady:6.1f} scans/s after the "
                f"first batch; {_load()}"
            )
        n, passes, load_s = plain_loop(use, dataset, cache, args.device, args.batch, args.repeat)
        rates = ", ".join(f"{n / s:.1f}" for s in passes)
        print(
            f"  {kind:6s} plain loop, 1 process, batch {args.batch}: {n} scans, {rates} "
            f"scans/s per pass (model loading {load_s:.1f} s, not counted); {_load()}"
        )


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="fundus model (default: the tests' fundus_demo)")
    parser.add_argument("--oct-model", help="OCT model (default: the tests' oct_demo)")
    parser.add_argument("--tracking-uri", help="where --model/--oct-model are registered")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--requests", type=int, default=40, help="timed requests per case")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--patients", type=int, default=48, help="batch: small-cohort size")
    parser.add_argument("--workers", type=int, default=2, help="batch: Ray Data actors")
    parser.add_argument("--batch", type=int, default=16, help="batch: batch size")
    parser.add_argument("--repeat", type=int, default=2, help="batch: runs of each")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="latency files")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["latency", "http", "throughput", "batch"]
    )
    args = parser.parse_args()

    import torch

    from ingest import generate_key_file, load_key

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    device_words = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"scoring benchmark on {args.device} ({device_words}), {os.cpu_count()} CPUs, "
        f"torch {torch.get_num_threads()} threads; {_load()}"
    )
    with tempfile.TemporaryDirectory(prefix="eyehub-bench-score-") as tmp:
        work = Path(tmp)
        key_file = work / "hub.key"
        generate_key_file(key_file)
        key_file.write_text(f"eyehub-key-v1\n{SECRET}\n", encoding="ascii")
        key = load_key(key_file)
        cache = work / "home" / "cache" / "models"
        uses = models(args, work)
        files = latency_files(work, args.seeds)
        for kind, fs in files.items():
            print(f"  {kind} files: {describe_files(fs)}")
        for kind, use in uses.items():
            print(f"  {kind} model: {use.ref}")

        if "latency" not in args.skip:
            print(f"(a) latency, upload to JSON with heat map; {_load()}")
            for kind, use in uses.items():
                inprocess_latency(use, files[kind], key, cache, args.device, args.requests)
            print("    targets: fundus p95 <= 300 ms, OCT p95 <= 2000 ms")

        http_parts = {"latency", "throughput"} - set(args.skip)
        if "http" not in args.skip and http_parts:
            for kind, use in uses.items():
                service = Service(use, work, key_file, args.device)
                try:
                    why = service.wait_ready()
                    if why is not None:
                        print(f"  HTTP {kind}: skipped, the service did not start ({why})")
                        continue
                    if "latency" not in args.skip:
                        http_latency(service, kind, files[kind], args.requests)
                    if "throughput" not in args.skip:
                        print(f"(b) throughput {kind}, {_load()}")
                        data = [f.read_bytes() for f in files[kind]]
                        call = http_call(service)
                        throughput(call, data, args.clients, args.duration, f"HTTP {kind}")
                finally:
                    service.stop()
            print(f"    {_load()}")
        elif "throughput" not in args.skip:
            print(f"(b) throughput in-process (the service is skipped); {_load()}")
            for kind, use in uses.items():
                data = [f.read_bytes() for f in files[kind]]
                call = inprocess_call(use, key, cache, args.device)
                throughput(call, data, args.clients, args.duration, f"in-process {kind}")

        if "batch" not in args.skip:
            print(f"(c) batch scoring, {args.patients} patients (small); {_load()}")
            dataset = batch_dataset(work, args.patients, key_file)
            batch_scoring(uses, dataset, cache, args)
        shutil.rmtree(work / "home", ignore_errors=True)
    print(f"done; {_load()}")


if __name__ == "__main__":
    main()
