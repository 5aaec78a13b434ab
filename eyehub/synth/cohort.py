"""Write a synthetic cohort: DICOM exports per patient and visit, labels.csv, ground truth.

Output (deterministic for a seed, whatever the number of workers):

- ``dicom/patient_NNNN/visit_N/IM*``: one fundus photograph and one OCT volume per eye and
  visit, as the patient's site exports them (some files have no extension);
- ``labels.csv``: eye-level and patient-level labels keyed by MRN, eye and study date, with
  some cells empty as in real records;
- ``truth.csv``: per file, what was drawn (FOV circle, fovea B-scan, thickness), for tests;
- ``phi.json``: every identifier planted in the files, for privacy tests to search for.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from eyehub.errors import UsageError
from eyehub.synth import dicom_io
from eyehub.synth.dicom_io import Device, OctSpacing, StudyInfo, uid_for
from eyehub.synth.fundus import burn_in_text, render_fundus
from eyehub.synth.oct import OctGeometry, render_oct
from eyehub.synth.phenotype import Patient, make_patient

log = logging.getLogger(__name__)

SIZES = ("small", "realistic")
LABEL_COLUMNS = (
    "dr_grade",
    "referable_dr",
    "amd",
    "glaucoma",
    "dme",
    "age",
    "sex",
    "diabetes",
    "hypertension",
    "systolic_bp",
    "hba1c",
    "cvd_5y",
    "dementia",
    "null_control",
)
TRUTH_COLUMNS = (
    "path",
    "patient_index",
    "visit",
    "eye",
    "kind",
    "export",
    "sop_class_uid",
    "transfer_syntax_uid",
    "manufacturer",
    "model",
    "rows",
    "columns",
    "frames",
    "fov_cx",
    "fov_cy",
    "fov_radius",
    "disc_x",
    "disc_y",
    "macula_x",
    "macula_y",
    "fovea_bscan",
    "central_thickness_mm",
    "mean_rnfl_mm",
    "pixel_spacing_mm",
    "bscan_spacing_mm",
    "depth_spacing_mm",
    "ascan_spacing_mm",
    "illumination",
    "oct_signal",
    "disc_radius",
    "choroid_mm",
)


@dataclass(frozen=True)
class Site:
    """A hospital and its camera/OCT device, with image sizes per size profile."""

    device: Device
    fundus_shape: dict[str, tuple[int, int]]  # (rows, cols)
    fov_scale: float  # FOV radius / image height (> 0.5: circle cut top and bottom)
    fov_degrees: float
    oct_shape: dict[str, tuple[int, int, int]]  # (B-scans, depth, A-scans)
    oct_geometry: OctGeometry
    extensionless: bool


SITES = (
    Site(
        device=Device("SYNTHOPTIX", "RetinaCam 3D", "SX-20391-7", "4.2.1", "RCAM-EAST-01"),
        fundus_shape={"small": (240, 320), "realistic": (1536, 2048)},
        fov_scale=0.55,
        fov_degrees=45.0,
        oct_shape={"small": (16, 96, 64), "realistic": (128, 885, 512)},
        oct_geometry=OctGeometry(6.0, 6.0, 2.3),
        extensionless=False,
    ),
    Site(
        device=Device("NORTHLIGHT MEDICAL", "NL-4000 OCT", "NLM4K-88213", "1.9.0", "NL4K-WEST"),
        fundus_shape={"small": (288, 288), "realistic": (1934, 1956)},
        fov_scale=0.46,
        fov_degrees=50.0,
        oct_shape={"small": (12, 80, 64), "realistic": (49, 496, 512)},
        oct_geometry=OctGeometry(5.8, 5.8, 1.9),
        extensionless=True,
    ),
)

# how fundus photographs reach the hub: mostly OP from the device, some PACS re-exports
_FUNDUS_EXPORTS = (("op", 0.84), ("sc", 0.08), ("vl", 0.08))
_OP_SYNTAXES = (
    (JPEGBaseline8Bit, 0.55),
    (ExplicitVRLittleEndian, 0.15),
    (JPEG2000Lossless, 0.12),
    (JPEGLSLossless, 0.09),
    (RLELossless, 0.09),
)
_EXPORT_SYNTAXES = ((JPEGBaseline8Bit, 0.7), (ExplicitVRLittleEndian, 0.3))
_OCT_SYNTAXES = ((ExplicitVRLittleEndian, 0.6), (JPEG2000Lossless, 0.4))
_LABEL_MISSING_P = 0.06


def _choose(rng: np.random.Generator, options: tuple[tuple[Any, float], ...]) -> Any:
    values = [o[0] for o in options]
    weights = np.array([o[1] for o in options], dtype=float)
    return values[int(rng.choice(len(values), p=weights / weights.sum()))]


@dataclass(frozen=True)
class CohortSummary:
    out_dir: Path
    patients: int
    files: int
    bytes_written: int
    label_rows: int


def _patient_files(
    out_dir: Path, seed: int, index: int, size: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Render and write one patient's files; returns (truth rows, label rows, phi)."""
    patient = make_patient(seed, index, len(SITES))
    site = SITES[patient.site]
    rng = np.random.default_rng([seed, index, 0xD1C0])
    ident = patient.identity
    truth: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] = []
    accessions = []
    folder = out_dir / "dicom" / f"patient_{index:04d}"
    counter = 0

    def next_path(visit_dir: Path) -> Path:
        nonlocal counter
        counter += 1
        name = f"IM{counter:05d}" if site.extensionless else f"IM{counter:05d}.dcm"
        return visit_dir / name

    for v, (date, eyes) in enumerate(patient.visits):
        visit_dir = folder / f"visit_{v + 1}"
        accession = f"ACC{seed % 1000:03d}{index:05d}{v}"
        accessions.append(accession)
        study_time = f"{9 + int(rng.integers(0, 8)):02d}{int(rng.integers(0, 60)):02d}00"
        info = StudyInfo(
            patient_name=ident.patient_name,
            patient_id=ident.mrn,
            other_patient_id=ident.other_id,
            birth_date=ident.birth_date,
            sex=patient.sex,
            address=ident.address,
            institution=ident.institution,
            referring_physician=ident.referring_physician,
            accession=accession,
            study_uid=uid_for(seed, index, v, "study"),
            study_date=date,
            study_time=study_time,
            device=site.device,
        )
        acq = dt.datetime.combine(date, dt.time(int(study_time[:2]), int(study_time[2:4])))
        for ev in eyes:
            eye = ev.eye
            # fundus photograph
            shape = site.fundus_shape[size]
            illumination = 0.45 if rng.random() < 0.05 else float(rng.uniform(0.9, 1.1))
            uneven = float(rng.uniform(0.2, 0.35)) if rng.random() < 0.1 else 0.0
            image, ftruth = render_fundus(
                ev.signs,
                eye,
                patient.identity_seed,
                patient.pigmentation,
                shape[0],
                shape[1],
                site.fov_scale,
                rng,
                illumination=illumination,
                uneven=uneven,
            )
            burn_in_text(image, ftruth, (ident.patient_name, date.strftime("%d/%m/%Y")))
            pixel_mm = 12.4 * site.fov_degrees / 45.0 / (2 * ftruth.fov_radius)
            export = _choose(rng, _FUNDUS_EXPORTS)
            f_uid = uid_for(seed, index, v, eye, "fundus")
            f_series = uid_for(seed, index, v, eye, "fundus-series")
            if export == "op":
                ts = _choose(rng, _OP_SYNTAXES)
                ds = dicom_io.build_fundus_op(
                    info,
                    image,
                    eye,
                    ts,
                    f_uid,
                    f_series,
                    acq,
                    round(pixel_mm, 6),
                    site.fov_degrees,
                )
            elif export == "sc":
                ts = _choose(rng, _EXPORT_SYNTAXES)
                ds = dicom_io.build_fundus_sc(info, image, eye, ts, f_uid, f_series)
            else:
                ts = _choose(rng, _EXPORT_SYNTAXES)
                ds = dicom_io.build_fundus_vl(info, image, eye, ts, f_uid, f_series, acq)
            path = next_path(visit_dir)
            dicom_io.write(ds, path)
            truth.append(
                {
                    "path": str(path.relative_to(out_dir)),
                    "patient_index": index,
                    "visit": v + 1,
                    "eye": eye,
                    "kind": "fundus",
                    "export": export,
                    "sop_class_uid": ds.SOPClassUID,
                    "transfer_syntax_uid": ts,
                    "manufacturer": site.device.manufacturer,
                    "model": site.device.model,
                    "rows": shape[0],
                    "columns": shape[1],
                    "frames": 1,
                    "fov_cx": round(ftruth.fov_cx, 3),
                    "fov_cy": round(ftruth.fov_cy, 3),
                    "fov_radius": round(ftruth.fov_radius, 3),
                    "disc_x": round(ftruth.disc_x, 3),
                    "disc_y": round(ftruth.disc_y, 3),
                    "macula_x": round(ftruth.macula_x, 3),
                    "macula_y": round(ftruth.macula_y, 3),
                    "pixel_spacing_mm": round(pixel_mm, 6),
                    "illumination": round(illumination, 3),
                    "disc_radius": round(ftruth.disc_radius, 3),
                }
            )

            # OCT volume of the same eye and visit, located on the fundus photograph
            oshape = site.oct_shape[size]
            geometry = site.oct_geometry
            signal = 0.5 if rng.random() < 0.05 else float(rng.uniform(0.9, 1.1))
            volume, otruth = render_oct(ev.signs, eye, oshape, geometry, rng, signal=signal)
            spacing = OctSpacing(
                bscan_mm=geometry.scan_height_mm / oshape[0],
                depth_mm=geometry.depth_mm / oshape[1],
                ascan_mm=geometry.scan_width_mm / oshape[2],
            )
            order = list(range(oshape[0]))
            r = rng.random()
            if r < 0.15:
                order.reverse()  # some devices store the raster bottom-up
            elif r < 0.25:
                rng.shuffle(order)
            ts = _choose(rng, _OCT_SYNTAXES)
            o_uid = uid_for(seed, index, v, eye, "oct")
            ds = dicom_io.build_oct_opt(
                info,
                volume,
                eye,
                ts,
                o_uid,
                uid_for(seed, index, v, eye, "oct-series"),
                uid_for(seed, index, v, eye, "frame-of-reference"),
                acq,
                spacing,
                (str(ds.SOPClassUID), f_uid, (round(ftruth.macula_x), round(ftruth.macula_y))),
                pixel_mm,
                order,
            )
            path = next_path(visit_dir)
            dicom_io.write(ds, path)
            truth.append(
                {
                    "path": str(path.relative_to(out_dir)),
                    "patient_index": index,
                    "visit": v + 1,
                    "eye": eye,
                    "kind": "oct",
                    "export": "opt",
                    "sop_class_uid": dicom_io.OPT,
                    "transfer_syntax_uid": ts,
                    "manufacturer": site.device.manufacturer,
                    "model": site.device.model,
                    "rows": oshape[1],
                    "columns": oshape[2],
                    "frames": oshape[0],
                    "fovea_bscan": otruth.fovea_bscan,
                    "central_thickness_mm": round(otruth.central_thickness_mm, 4),
                    "mean_rnfl_mm": round(otruth.mean_rnfl_mm, 4),
                    "bscan_spacing_mm": round(spacing.bscan_mm, 6),
                    "depth_spacing_mm": round(spacing.depth_mm, 6),
                    "ascan_spacing_mm": round(spacing.ascan_mm, 6),
                    "oct_signal": round(signal, 3),
                    "choroid_mm": round(otruth.choroid_mm, 4),
                }
            )
            labels.append(_label_row(rng, patient, ev, date))
    phi = {
        "patient_index": index,
        "patient_name": ident.patient_name,
        "mrn": ident.mrn,
        "other_patient_id": ident.other_id,
        "birth_date": ident.birth_date.strftime("%Y%m%d"),
        "address": ident.address,
        "institution": ident.institution,
        "referring_physician": ident.referring_physician,
        "accession_numbers": accessions,
        "device_serial": site.device.serial,
        "station_name": site.device.station,
        "study_dates": [d.strftime("%Y%m%d") for d, _ in patient.visits],
    }
    return truth, labels, phi


def _label_row(rng: np.random.Generator, p: Patient, ev: Any, date: dt.date) -> dict[str, Any]:
    row: dict[str, Any] = {
        "mrn": p.identity.mrn,
        "eye": ev.eye,
        "study_date": date.isoformat(),
        "dr_grade": ev.dr_grade,
        "referable_dr": ev.referable_dr,
        "amd": ev.amd,
        "glaucoma": ev.glaucoma,
        "dme": ev.dme,
        "age": round(p.age_at(date), 1),
        "sex": p.sex,
        "diabetes": p.diabetes,
        "hypertension": p.hypertension,
        "systolic_bp": p.systolic_bp,
        "hba1c": p.hba1c,
        "cvd_5y": p.cvd_5y,
        "dementia": p.dementia,
        "null_control": p.null_control,
    }
    for col in LABEL_COLUMNS:
        if rng.random() < _LABEL_MISSING_P:
            row[col] = ""
    return row


def _worker(args: tuple[str, int, int, str]) -> tuple[list, list, dict]:
    out_dir, seed, index, size = args
    return _patient_files(Path(out_dir), seed, index, size)


def check_output_dir(out_dir: Path) -> None:
    """Refuse an output directory we cannot create or write, with a one-line reason."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out_dir}: {exc.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {out_dir} is not writable")


def validate_arguments(
    out_dir: Path, patients: int, seed: int, size: str, workers: int | None
) -> None:
    """Check `generate_cohort`'s arguments; raises UsageError with a one-line reason."""
    if patients < 1:
        raise UsageError(f"--patients must be at least 1 (got {patients})")
    if seed < 0:
        raise UsageError(f"--seed must be zero or positive (got {seed})")
    if size not in SIZES:
        raise UsageError(f"--size must be one of {', '.join(SIZES)} (got {size!r})")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {workers})")
    check_output_dir(out_dir)


def generate_cohort(
    out_dir: Path,
    patients: int,
    seed: int,
    size: str = "small",
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CohortSummary:
    """Write a synthetic cohort of `patients` patients under `out_dir`.

    Args:
        workers: processes to render with (default: all CPUs). The output does not depend
            on it: every patient is drawn from its own seed.
        progress: called with the number of patients finished so far.
    """
    validate_arguments(out_dir, patients, seed, size, workers)
    n_workers = max(1, min(workers or os.cpu_count() or 1, patients))

    jobs = [(str(out_dir), seed, i, size) for i in range(patients)]
    results: list[tuple[list, list, dict]] = []
    if n_workers == 1:
        for job in jobs:
            results.append(_worker(job))
            if progress:
                progress(len(results))
    else:
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            for res in pool.map(_worker, jobs, chunksize=1):
                results.append(res)
                if progress:
                    progress(len(results))

    truth_rows = [r for res in results for r in res[0]]
    label_rows = [r for res in results for r in res[1]]
    phi = [res[2] for res in results]
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["mrn", "eye", "study_date", *LABEL_COLUMNS])
        writer.writeheader()
        writer.writerows(label_rows)
    with open(out_dir / "truth.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(TRUTH_COLUMNS), restval="")
        writer.writeheader()
        writer.writerows(truth_rows)
    (out_dir / "phi.json").write_text(json.dumps(phi, indent=1), encoding="utf-8")
    total = sum((out_dir / r["path"]).stat().st_size for r in truth_rows)
    log.debug("wrote %d files (%.1f MB) for %d patients", len(truth_rows), total / 1e6, patients)
    return CohortSummary(out_dir, patients, len(truth_rows), total, len(label_rows))
