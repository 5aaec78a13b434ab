"""Benchmark `eyehub ingest` against the bare decode bound and dcm2niix (not pass/fail).

On the same files (`eyehub synth --size realistic`), measured in one run:

1. eyehub ingest with 2 workers (Ray already started, so start-up is reported apart);
2. the bare decode bound: pydicom dcmread + pixel_array in 2 processes, writing nothing;
3. dcm2niix (Debian package) converting the same files to NIfTI.

Targets (ingest issue): eyehub >= 0.8x the bare decode throughput, faster than dcm2niix in
wall time, peak memory per worker below 2x the largest decoded scan.

    .venv/bin/python bench/bench_ingest.py [--patients 6] [--cohort DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import pydicom


def _decode(path: str) -> tuple[int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            arr = pydicom.dcmread(path).pixel_array
            n = int(arr.nbytes)
        except Exception:
            n = 0
    return n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _file_memory(args: tuple[str, str, bytes]) -> tuple[int, int, int]:
    """Convert one file in this (fresh) process; how far it raised the RSS above what the
    process held before it (Linux: reset the high-water mark through clear_refs), the
    decoded size, and the process's peak RSS."""
    from ingest.convert import convert_file
    from ingest.keys import HubKey

    path, dataset, secret = args
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    before = _status_kib("VmRSS") * 1024
    result = convert_file(Path(path), Path(dataset), HubKey(secret), 2**40)
    growth = _status_kib("VmHWM") * 1024 - before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(0, growth), int(result.get("decoded_bytes", 0)), peak


def _dcm2niix_can_convert(path: str) -> bool:
    """dcm2niix (Debian build) refuses multi-frame JPEG 2000 and JPEG-LS; it says so."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"):
        return False
    return not (
        ts in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
        and int(ds.get("NumberOfFrames", 1) or 1) > 1
    )


def _measure(
    files: list[str], root: Path, work: Path, name: str, workers: int, labels: Path
) -> dict[str, float]:
    """Bare decode, eyehub ingest and dcm2niix on one set of files."""
    import ray

    from ingest import generate_key_file, load_key, run_ingest
    from ingest.run import IngestSettings

    src = work / f"src-{name}"
    for f in files:  # hard links: the same bytes, in a folder of their own
        target = src / Path(f).relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)
    out: dict[str, float] = {"files": len(files)}
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        decoded = pool.map(_decode, files, chunksize=1)
    out["bare_s"] = time.perf_counter() - t
    out["decoded_bytes"] = sum(d[0] for d in decoded)
    out["largest"] = max(d[0] for d in decoded)

    t = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    out["ray_start_s"] = time.perf_counter() - t

    @ray.remote(num_cpus=1)
    def idle_rss() -> int:
        import ingest.convert  # noqa: F401  (what a task imports before any file)

        return _rss_now()

    out["idle_rss"] = max(ray.get([idle_rss.remote() for _ in range(workers * 2)]))
    key = load_key(generate_key_file(work / f"{name}.key"))
    t = time.perf_counter()
    summary = run_ingest(
        [src], work / f"dataset-{name}", key, labels, IngestSettings(workers=workers)
    )
    out["ingest_s"] = time.perf_counter() - t
    ray.shutdown()
    out["converted"] = summary.converted
    # memory, measured here rather than in ingest's own path: the largest files, each
    # converted in a fresh process of its own
    largest = sorted(files, key=os.path.getsize)[-4:]
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        mem = pool.map(
            _file_memory,
            [(f, str(work / f"memory-{name}"), key.secret) for f in largest],
            chunksize=1,
        )
    growth, growth_decoded, _ = max(mem)
    out["peak_rss"] = max(m[2] for m in mem)
    out["file_growth"] = growth
    out["file_growth_decoded"] = growth_decoded

    dcm2niix = shutil.which("dcm2niix")
    if dcm2niix:
        niix = work / f"niix-{name}"
        niix.mkdir()
        t = time.perf_counter()
        subprocess.run(
            [dcm2niix, "-z", "n", "-o", str(niix), "-f", "%p_%s_%r", str(src)],
            capture_output=True,
            check=False,
        )
        out["niix_s"] = time.perf_counter() - t
        out["niix_files"] = len(list(niix.glob("*.nii")))
    return out


def _report(name: str, m: dict[str, float], workers: int) -> None:
    mb = m["decoded_bytes"] / 1e6
    print(f"\n[{name}] {int(m['files'])} files, {mb:.0f} MB decoded")
    print(
        f"  bare decode (dcmread + pixel_array, {workers} processes): {m['bare_s']:6.1f} s  "
        f"{m['files'] / m['bare_s']:5.2f} files/s  {mb / m['bare_s']:6.1f} MB/s"
    )
    print(
        f"  eyehub ingest ({workers} workers, Ray up):                {m['ingest_s']:6.1f} s  "
        f"{m['files'] / m['ingest_s']:5.2f} files/s  {mb / m['ingest_s']:6.1f} MB/s  -> "
        f"{m['bare_s'] / m['ingest_s']:.2f}x the bare decode bound (target >= 0.8x); "
        f"{int(m['converted'])} converted; Ray start-up {m['ray_start_s']:.1f} s apart"
    )
    if "niix_s" in m:
        print(
            f"  dcm2niix (1 process, NIfTI out, no compression):   {m['niix_s']:6.1f} s  "
            f"({int(m['niix_files'])} NIfTI written) -> eyehub "
            f"{m['niix_s'] / m['ingest_s']:.2f}x its speed (target > 1x)"
        )
    print(
        f"  memory (4 largest files, each alone in a fresh process): peak RSS "
        f"{m['peak_rss'] / 1e6:.0f} MB; an idle Ray worker (Python, "
        f"Ray, libraries) {m['idle_rss'] / 1e6:.0f} MB; the most one file raised its worker's "
        f"RSS: {m['file_growth'] / 1e6:.0f} MB (for a {m['file_growth_decoded'] / 1e6:.0f} MB "
        f"scan) = {m['file_growth'] / m['largest']:.2f}x the largest decoded scan "
        f"({m['largest'] / 1e6:.0f} MB; target < 2x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cohort", type=Path, help="reuse (or create) a realistic cohort here")
    args = parser.parse_args()

    from eyehub.synth import generate_cohort

    work = Path(tempfile.mkdtemp(prefix="eyehub-bench-ingest-"))
    try:
        cohort = args.cohort or work / "cohort"
        if not (cohort / "labels.csv").exists():
            t = time.perf_counter()
            generate_cohort(cohort, args.patients, args.seed, "realistic", args.workers)
            print(
                f"synth --size realistic: {args.patients} patients in "
                f"{time.perf_counter() - t:.0f} s"
            )
        root = cohort / "dicom"
        files = sorted(str(p) for p in root.rglob("*") if p.is_file())
        total_bytes = sum(os.path.getsize(f) for f in files)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {len(files)} files, "
            f"{total_bytes / 1e6:.0f} MB of DICOM"
        )
        subset = [f for f in files if _dcm2niix_can_convert(f)]
        _report(
            "all files",
            _measure(files, root, work, "all", args.workers, cohort / "labels.csv"),
            args.workers,
        )
        _report(
            "the files dcm2niix converts (no multi-frame JPEG 2000, no JPEG-LS)",
            _measure(subset, root, work, "subset", args.workers, cohort / "labels.csv"),
            args.workers,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
