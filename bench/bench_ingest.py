"""Benchmark `eyehub ingest` against the decode bound and dcm2niix (prints figures; not pass/fail).

All in one run, on the same machine:

1. realistic cohort (`eyehub synth --size realistic`), 2 workers, medians of --repeats:
   eyehub end to end (local executor, in a fresh process each time, so the worker start-up
   is paid every run) against the bare decode bound (pydicom dcmread + pixel_array in a
   2-process pool, writing nothing); the Ray executor once, for comparison. Targets:
   eyehub >= 0.9x the bare decode throughput; every lossless pixel as pydicom decodes it.
2. the fixed cost of a run on one machine: one small file, run time minus the worker's
   own time on the file (start-up to the first file converting, plus shutdown and the
   catalog). Target <= 1.5 s.
3. scale: --scale small synthetic files (clones of a small cohort with new identifiers,
   2% not DICOM so the quarantine is written too) in one run, files/s, and the driver's
   per-file bookkeeping and catalog costs at a quarter of the size and at full size
   (linear: the same ms per file).
4. dcm2niix (Debian package) on the files it converts: eyehub's time / dcm2niix's time
   (target < 3x; dcm2niix writes uncompressed NIfTI and neither hashes nor de-identifies).
5. GPU decoding (nvImageCodec, `ingest/gpu_decode.py`): every JPEG 2000 and JPEG file of
   the cohort decoded in one process by the CPU path and by nvImageCodec (lossless files
   compared pixel for pixel), then end to end with `gpu_decode` auto against off. Where
   there is no CUDA device the decode comparison runs on nvImageCodec's CPU backends, as a
   check of the path (not a GPU figure), and the end-to-end comparison is skipped.

    .venv/bin/python bench/bench_ingest.py [--patients 6] [--cohort DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

SECRET = bytes(range(32))


def _decode(path: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return int(pydicom.dcmread(path).pixel_array.nbytes)
        except Exception:
            return 0


def _bare_decode(files: list[str], workers: int) -> tuple[float, int]:
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        decoded = pool.map(_decode, files, chunksize=1)
    return time.perf_counter() - t, sum(decoded)


def _ingest_child(queue: Any, args: tuple[list[str], str, str, int, str, str]) -> None:
    """One ingest in this fresh process (nothing started yet): its summary's figures."""
    import logging

    logging.basicConfig(handlers=[logging.NullHandler()])  # quarantine lines: counted below
    from ingest import HubKey, run_ingest
    from ingest.run import IngestSettings

    sources, dataset, executor, workers, labels, gpu = args
    t = time.perf_counter()
    started = time.time()
    summary = run_ingest(
        [Path(s) for s in sources],
        Path(dataset),
        HubKey(SECRET),
        Path(labels) if labels else None,
        IngestSettings(workers=workers, executor=executor, gpu_decode=gpu),  # type: ignore[arg-type]
    )
    wall = time.perf_counter() - t
    first = summary.stats.first_file_started
    queue.put(
        {
            "wall": wall,
            "converted": summary.converted,
            "quarantined": summary.quarantined_total,
            "to_first_file": (first - started) if first else float("nan"),
            "converting": summary.stats.converting_seconds,
            "peak_rss": summary.stats.peak_worker_rss,
            "file_growth": summary.stats.peak_file_growth,
            "phases": summary.phases,
            "decoded_bytes": summary.decoded_bytes,
            "nvimgcodec": dict(summary.nvimgcodec),
        }
    )


def _ingest(
    sources: list[Path],
    dataset: Path,
    executor: str,
    workers: int,
    labels: Path | None = None,
    gpu: str = "off",
) -> dict[str, Any]:
    # a process of its own (not a pool's: a daemonic process may not start workers)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    args = ([str(s) for s in sources], str(dataset), executor, workers, str(labels or ""), gpu)
    process = ctx.Process(target=_ingest_child, args=(queue, args))
    process.start()
    result: dict[str, Any] = queue.get()
    process.join()
    return result


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


def _link_tree(files: list[str], root: Path, dest: Path) -> Path:
    for f in files:  # hard links: the same bytes, in a folder of their own
        target = dest / Path(f).relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)
    return dest


def _lossless_unchanged(files: list[str], dataset: Path) -> tuple[int, int]:
    """(lossless files, of which stored exactly as pydicom's own decode, after the same
    field-of-view clearing for photographs and anatomical ordering for OCT)."""
    from ingest import HubKey
    from ingest.pixels import clear_outside_fov
    from ingest.reader import inspect_scan, read_header
    from ingest.store import read_pixels

    checked = same = 0
    scan_id = HubKey(SECRET).scan_id
    for f in files:
        ds = pydicom.dcmread(f)
        if str(ds.get("LossyImageCompression", "00")) == "01":
            continue
        checked += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = ds.pixel_array
        info = inspect_scan(read_header(Path(f), True))
        if info.modality == "oct":
            assert info.order is not None
            reference = reference[info.order]
        else:
            planes = reference[..., None] if reference.ndim == 2 else reference
            reference, _ = clear_outside_fov(np.ascontiguousarray(np.moveaxis(planes, -1, 0)))
        stored = read_pixels(dataset, scan_id(str(ds.SOPInstanceUID)))
        same += int(stored.shape == reference.shape and np.array_equal(stored, reference))
    return checked, same


def _clone_cohort(small: Path, out: Path, n: int) -> list[Path]:
    """n files: the small cohort's files again and again under new identifiers; every
    50th a text file (not DICOM), so the quarantine is written as well."""
    from pydicom.uid import generate_uid

    originals = sorted(p for p in (small / "dicom").rglob("*") if p.is_file())
    datasets = [pydicom.dcmread(p) for p in originals]
    out.mkdir(parents=True)
    files = []
    for i in range(n):
        path = out / f"f{i:05d}"
        if i % 50 == 49:
            path.write_text("not an image\n")
        else:
            ds = datasets[i % len(datasets)]
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.PatientID = f"SCALE{i // 4:05d}"
            ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _gpu_decode(files: list[str], src: Path, work: Path, workers: int, repeats: int) -> None:
    """Section 5: nvImageCodec against the CPU path, decode alone and end to end."""
    from ingest import gpu_decode, reader

    print(f"\n5. GPU decoding: {gpu_decode.describe()}")
    if gpu_decode.installed() is None:
        return
    on_gpu = gpu_decode.available("gpu")
    mode = "auto" if on_gpu else "nvimgcodec-cpu"
    syntaxes = reader.J2K_SYNTAXES | reader.JPEG8_SYNTAXES
    chosen = []
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:
                continue
        if ds.file_meta.get("TransferSyntaxUID") in syntaxes:
            chosen.append((f, ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless))

    def decode(path: str) -> np.ndarray:
        info = reader.inspect_scan(reader.read_header(path, defer_pixels=True))
        if info.modality == "oct":
            return np.stack(list(reader.iter_oct_frames(path, info)))
        return reader.decode_fundus(info)

    seconds = {"off": 0.0, mode: 0.0}
    exact = lossless = 0
    worst = 0
    nbytes = 0
    for path, is_lossless in chosen:
        out = {}
        for m in ("off", mode):
            gpu_decode.configure(m)  # type: ignore[arg-type]
            decode(path)  # warm: file cache, the decoder's start-up
            t = time.perf_counter()
            out[m] = decode(path)
            seconds[m] += time.perf_counter() - t
        gpu_decode.configure("off")
        nbytes += out["off"].nbytes
        if is_lossless:
            lossless += 1
            exact += bool(np.array_equal(out["off"], out[mode]))
        else:
            worst = max(worst, int(np.abs(out["off"].astype(int) - out[mode].astype(int)).max()))
    what = "on the GPU" if on_gpu else "'s CPU backends (a check of the path, not a GPU figure)"
    mb = nbytes / 1e6
    print(
        f"  decode only, one process, {len(chosen)} JPEG 2000 / JPEG files ({mb:.0f} MB): "
        f"CPU path {seconds['off']:.2f} s, nvImageCodec{what if not on_gpu else ' ' + what} "
        f"{seconds[mode]:.2f} s -> "
        f"{seconds['off'] / seconds[mode]:.2f}x"
    )
    print(
        f"  lossless JPEG 2000 files bit-exact with the CPU path: {exact} of {lossless}; lossy "
        f"files (JPEG, JPEG 2000): at most {worst} grey levels apart"
    )
    if not on_gpu:
        print("  end to end with the GPU: skipped (no CUDA device)")
        return
    walls: dict[str, list[float]] = {"off": [], "auto": []}
    used = {}
    for r in range(repeats):
        for m in ("off", "auto"):
            res = _ingest([src], work / f"gpu-{m}-{r}", "local", workers, gpu=m)
            walls[m].append(res["wall"])
            used[m] = res["nvimgcodec"].get("gpu", 0)
    off, auto = statistics.median(walls["off"]), statistics.median(walls["auto"])
    print(
        f"  end to end, {workers} workers (medians of {repeats}): gpu_decode off {off:.1f} s, "
        f"auto {auto:.1f} s ({used['auto']} files decoded on the GPU) -> {off / auto:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=2000)
    parser.add_argument("--cohort", type=Path, help="reuse (or create) a realistic cohort here")
    args = parser.parse_args()

    from eyehub.synth import generate_cohort

    work = Path(tempfile.mkdtemp(prefix="eyehub-bench-ingest-"))
    w = args.workers
    try:
        cohort = args.cohort or work / "cohort"
        if not (cohort / "labels.csv").exists():
            t = time.perf_counter()
            generate_cohort(cohort, args.patients, args.seed, "realistic", w)
            print(
                f"synth --size realistic: {args.patients} patients in "
                f"{time.perf_counter() - t:.0f} s"
            )
        root = cohort / "dicom"
        files = sorted(str(p) for p in root.rglob("*") if p.is_file())
        total = sum(os.path.getsize(f) for f in files)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}; {len(files)} files, {total / 1e6:.0f} MB of DICOM; "
            f"{w} workers"
        )

        # 1. end to end against the bare decode bound
        src = _link_tree(files, root, work / "src")
        bare, ours = [], []
        run: dict[str, Any] = {}
        decoded = 0
        for r in range(args.repeats):
            seconds, decoded = _bare_decode(files, w)
            bare.append(seconds)
            run = _ingest([src], work / f"ds-{r}", "local", w, cohort / "labels.csv")
            ours.append(run["wall"])
        ray_run = _ingest([src], work / "ds-ray", "ray", w, cohort / "labels.csv")
        b, o = statistics.median(bare), statistics.median(ours)
        mb = decoded / 1e6
        print(
            f"\n1. realistic cohort, {len(files)} files, {mb:.0f} MB decoded "
            f"(medians of {args.repeats}; all runs: bare {_fmt(bare)}, eyehub {_fmt(ours)})"
        )
        print(
            f"  bare decode (dcmread + pixel_array, {w} processes): {b:6.1f} s  "
            f"{len(files) / b:5.2f} files/s  {mb / b:6.1f} MB/s"
        )
        print(
            f"  eyehub ingest, end to end (local executor):         {o:6.1f} s  "
            f"{len(files) / o:5.2f} files/s  {mb / o:6.1f} MB/s  -> {b / o:.2f}x the bare "
            f"decode throughput (target >= 0.9x); {run['converted']} converted"
        )
        print(
            f"  eyehub ingest, end to end (Ray executor, for comparison): "
            f"{ray_run['wall']:6.1f} s  -> {b / ray_run['wall']:.2f}x"
        )
        checked, same = _lossless_unchanged(files, work / "ds-0")
        print(f"  lossless files stored exactly as pydicom decodes them: {same} of {checked}")
        print(
            f"  memory: peak worker RSS {run['peak_rss'] / 1e6:.0f} MB; the most one file "
            f"raised its worker's RSS: {run['file_growth'] / 1e6:.0f} MB"
        )

        # 2. fixed cost
        small = work / "small"
        generate_cohort(small, 4, 3, "small", w)
        one = sorted(
            (small / "dicom").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 1 << 60
        )[0]
        print(
            "\n2. fixed cost of a run on one machine (one small file; run time minus the "
            "worker's own time on it)"
        )
        for executor in ("local", "ray"):
            costs = []
            for r in range(args.repeats):
                single = _ingest([one], work / f"one-{executor}-{r}", executor, w)
                costs.append((single["wall"] - single["converting"], single["to_first_file"]))
            fixed = statistics.median(c[0] for c in costs)
            first = statistics.median(c[1] for c in costs)
            target = " (target <= 1.5 s)" if executor == "local" else ""
            print(
                f"  {executor:5s}: {fixed:5.2f} s{target}; start to first file converting "
                f"{first:5.2f} s"
            )

        # 3. scale
        clones = _clone_cohort(small, work / "scale", args.scale)
        print(f"\n3. {args.scale} small synthetic files in one run ({args.scale // 50} not DICOM)")
        for n in (args.scale // 4, args.scale):
            res = _ingest(clones[:n], work / f"scale-{n}", "local", w)
            ph = res["phases"]
            print(
                f"  {n:5d} files: {res['wall']:6.1f} s, {n / res['wall']:6.1f} files/s; "
                f"{res['converted']} converted, {res['quarantined']} quarantined; per file: "
                f"bookkeeping {1000 * ph.get('records', 0) / n:.2f} ms, catalog + quarantine "
                f"tables {1000 * ph.get('catalog', 0) / n:.2f} ms, sources "
                f"{1000 * ph.get('sources', 0) / n:.2f} ms"
            )

        # 4. dcm2niix
        subset = [f for f in files if _dcm2niix_can_convert(f)]
        sub = _link_tree(subset, root, work / "src-subset")
        dcm2niix = shutil.which("dcm2niix")
        print(
            f"\n4. the {len(subset)} files dcm2niix converts (no multi-frame JPEG 2000, no JPEG-LS)"
        )
        niix_s, ours_s = [], []
        for r in range(args.repeats):
            ours_s.append(_ingest([sub], work / f"sub-{r}", "local", w)["wall"])
            if dcm2niix:
                niix = work / f"niix-{r}"
                niix.mkdir()
                t = time.perf_counter()
                subprocess.run(
                    [dcm2niix, "-z", "n", "-o", str(niix), "-f", "%p_%s_%r", str(sub)],
                    capture_output=True,
                    check=False,
                )
                niix_s.append(time.perf_counter() - t)
        os_ = statistics.median(ours_s)
        if niix_s:
            ns = statistics.median(niix_s)
            print(
                f"  dcm2niix (1 process, uncompressed NIfTI): {ns:5.1f} s; eyehub ({w} workers, "
                f"end to end): {os_:5.1f} s -> eyehub takes {os_ / ns:.2f}x dcm2niix's time "
                "(target < 3x)"
            )
        else:
            print(f"  dcm2niix not installed; eyehub {os_:5.1f} s")

        _gpu_decode(files, src, work, w, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
