"""The scoring kernel: DICOM files of one patient's eye to calibrated risks, decisions in
words, quality, and heat maps at the scan's resolution.

One implementation for every way a clinician scores (the CLI, the service, the page, the
PACS round trip): a file is read by ingest's scan kernel (`ingest.kernel.load_scan`:
decoded, ordered, cleaned outside the field of view), prepared by preprocess's kernel
(`preprocess.kernel.prepare_scans`) with the model's own recipe, and predicted by the
model with its own calibration and thresholds. Nothing here logs a patient identifier:
a scan is named by its keyed pseudonym (`HubKey.scan_id` of its SOP Instance UID), the
same `scan_id` ingest would give it.

An exam is what the model scores at once: one scan for a fundus or an OCT model; a
fundus photograph and an OCT of the same eye and visit (same study, same laterality) for
a fusion model. An exam with an ungradable scan is "ungradable", with the reason, and
carries no risk figures.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset

from eyehub.errors import InputError
from eyehub.labels import label_spec
from eyehub.reasons import SCORING_REASONS, UNGRADABLE_REASONS, check_reason
from inference.heatmap import (
    attention_to_source,
    display_image,
    fundus_to_source,
    oct_bscan_to_source,
    overlay,
    source_bscan,
)
from inference.registry import LoadedModel
from ingest.kernel import DEFAULT_MAX_DECODED_BYTES, ScanPixels, load_scan
from ingest.keys import HubKey
from models.explain import explain, private_copy
from models.model import model_inputs
from preprocess.kernel import PreparedScan, prepare_scans

log = logging.getLogger(__name__)

REFER, ROUTINE, UNGRADABLE = "refer", "routine", "ungradable"

# what an ungradable reason means at the point of care, and what to do about it (the
# reason's definition for a script stays in eyehub.reasons.UNGRADABLE_REASONS)
UNGRADABLE_ADVICE: dict[str, str] = {
    "no_fov": "no retina was found in the photograph; retake it",
    "too_dark": "the photograph is too dark; retake it with more light or a dilated pupil",
    "overexposed": "the photograph is overexposed; retake it with less flash",
    "fov_too_small": "the retina fills too little of the photograph; retake it centred",
    "uneven_illumination": "the photograph is unevenly lit; retake it",
    "blurred": "the photograph is out of focus; retake it",
    "low_signal": "the OCT signal is too weak; repeat the scan",
    "empty_bscans": "too many B-scans hold no signal; repeat the scan",
    "saturated_bscans": "too many B-scans are saturated; repeat the scan",
    "bad_geometry": "the scan's size or spacing is not one the model can use",
    "store_unreadable": "the stored scan could not be read",
    "internal_error": "eyehub failed to prepare the scan (see the log file)",
}


@dataclass
class Scan:
    """One DICOM file read for scoring (identifiers stay in `header`, never in output)."""

    pixels: ScanPixels
    pseudonym: str  # HubKey.scan_id of the SOP Instance UID

    @property
    def modality(self) -> str:
        return self.pixels.modality

    @property
    def header(self) -> Dataset:
        assert self.pixels.header is not None  # load_scan always sets it
        return self.pixels.header

    @property
    def visit(self) -> tuple[str, str]:
        """(study, eye): a fusion exam pairs the fundus and the OCT of one visit's eye."""
        return str(self.header.get("StudyInstanceUID", "")), self.pixels.eye


@dataclass
class ImageResult:
    """What the exam's result says about one of its scans."""

    scan: Scan
    prepared: PreparedScan
    heatmap: np.ndarray | None = None  # (H, W) in [0, 1] at the scan's resolution
    heatmap_task: str | None = None
    bscan: int | None = None  # OCT: the source B-scan the heat map is on
    attention: np.ndarray | None = None  # OCT: weight per source B-scan

    def display(self) -> np.ndarray:
        """The scan image the heat map belongs to, (H, W, 3) uint8: the photograph, or
        the OCT's B-scan that mattered most (the central one when ungradable)."""
        px = self.scan.pixels.pixels
        if self.scan.modality == "fundus":
            return display_image(px)
        index = self.bscan if self.bscan is not None else px.shape[0] // 2
        return display_image(px[index])

    def overlay(self) -> np.ndarray:
        image = self.display()
        return image if self.heatmap is None else overlay(image, self.heatmap)

    def to_json(self) -> dict[str, Any]:
        px = self.scan.pixels
        record = self.prepared.record
        quality = {
            k: v for k, v in record.items() if k not in ("gradable", "reason") and v is not None
        }
        out: dict[str, Any] = {
            "scan": self.scan.pseudonym,
            "modality": px.modality,
            "eye": px.eye,
            "shape": list(px.pixels.shape),
            "gradable": self.prepared.gradable,
            "reason": self.prepared.reason,
            "quality": {k: _plain(v) for k, v in quality.items()},
        }
        if self.heatmap is not None:
            peak = np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape)
            out["heatmap"] = {
                "task": self.heatmap_task,
                "shape": list(self.heatmap.shape),
                "peak_yx": [int(peak[0]), int(peak[1])],
                "bscan": self.bscan,
                "attention": None
                if self.attention is None
                else [round(float(a), 5) for a in self.attention],
            }
        return out


@dataclass
class TaskResult:
    task: str
    description: str
    kind: str
    probability: float | None = None  # calibrated (binary; ordinal: of referral)
    decision: str | None = None  # refer | routine, at the stored threshold
    threshold: float | None = None
    grade: int | None = None
    grade_probabilities: list[float] | None = None
    value: float | None = None  # regression, in `unit`
    unit: str | None = None

    @property
    def name(self) -> str:
        """The description without its parenthesis: "diabetic retinopathy grade"."""
        return self.description.split(" (")[0]

    def words(self) -> str:
        """The result in words: "referable diabetic retinopathy: 87% -> refer (threshold 42%)"."""
        if self.decision is None and self.unit is not None and self.unit.startswith("prob"):
            return f"{self.name}: {self.unit} {self.value:.0%}"
        if self.kind == "regression":
            return f"{self.name}: {self.value:.1f} {self.unit or ''}".rstrip()
        parts = [f"{self.name}:"]
        if self.grade is not None:
            parts.append(f"grade {self.grade},")
            if self.probability is not None:
                parts.append(f"referable {self.probability:.0%}")
        elif self.probability is not None:
            parts.append(f"{self.probability:.0%}")
        if self.decision is not None:
            parts.append(f"-> {self.decision} (threshold {self.threshold:.0%})")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class ExamResult:
    """The result of one exam: per task the calibrated figure and the decision, or
    "ungradable" with the reason and no figures."""

    eye: str
    images: list[ImageResult]
    model: dict[str, Any]
    status: str  # scored | ungradable
    reason: str | None = None
    tasks: list[TaskResult] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def refer(self) -> bool:
        return any(t.decision == REFER for t in self.tasks)

    @property
    def scan(self) -> str:
        """The pseudonym naming the exam: its first scan's."""
        return self.images[0].scan.pseudonym

    def headline(self) -> str:
        """The result in one line of words."""
        if self.status == UNGRADABLE:
            return (
                f"UNGRADABLE: {UNGRADABLE_ADVICE.get(self.reason or '', self.reason)}; "
                "no risk figures are given"
            )
        referred = [t.name for t in self.tasks if t.decision == REFER]
        if referred:
            return "REFER: " + "; ".join(referred)
        return "ROUTINE: no finding above its referral threshold"

    def to_json(self) -> dict[str, Any]:
        return {
            "scan": self.scan,
            "eye": self.eye,
            "status": self.status,
            "reason": self.reason,
            "reason_text": None
            if self.reason is None
            else UNGRADABLE_REASONS.get(self.reason, self.reason),
            "decision": UNGRADABLE
            if self.status == UNGRADABLE
            else (REFER if self.refer else ROUTINE),
            "headline": self.headline(),
            "tasks": [t.to_json() for t in self.tasks],
            "images": [i.to_json() for i in self.images],
            "model": self.model,
            "latency_ms": {k: round(v, 1) for k, v in self.latency_ms.items()},
        }


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float):
        return round(v, 6)
    return v


def _refuse(reason: str, detail: str) -> InputError:
    return InputError(check_reason(reason, SCORING_REASONS), detail)


class Scorer:
    """Scores exams with one loaded model (thread-safe: the model is only read)."""

    def __init__(
        self,
        loaded: LoadedModel,
        key: HubKey,
        *,
        device: torch.device | str = "cpu",
        explain_task: str | None = None,
        heatmaps: bool = True,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    ) -> None:
        self.loaded = loaded
        self.key = key
        self.device = torch.device(device)
        self.heatmaps = heatmaps
        self.max_decoded_bytes = max_decoded_bytes
        model = loaded.model
        self.explain_task = explain_task or self._default_explain_task()
        model.task(self.explain_task)  # an unknown task is a ConfigError now, not later
        self.shown_tasks = [t for t in model.tasks if not label_spec(t.name).control]
        # per thread, a private copy of the network for Grad-CAM: the model's weights never
        # change here, so it is made once instead of at every heat map (65 ms of 180 for
        # DenseNet121 on 2 cores)
        self._explaining = threading.local()

    def _default_explain_task(self) -> str:
        model = self.loaded.model
        primary = model.info.get("primary_task")
        if isinstance(primary, str) and any(t.name == primary for t in model.tasks):
            return primary
        deciding = [t.name for t in model.tasks if t.decides]
        return deciding[0] if deciding else model.tasks[0].name

    # -- reading ------------------------------------------------------------------------

    def read(self, source: Path | bytes) -> Scan:
        """One DICOM file or its bytes; bad input raises InputError with its reason code
        (the codes of ingest's quarantine)."""
        pixels = load_scan(source, self.max_decoded_bytes)
        uid = str(pixels.header.get("SOPInstanceUID", "")) if pixels.header is not None else ""
        return Scan(pixels, self.key.scan_id(uid))

    def exams(self, scans: Sequence[Scan]) -> list[list[Scan]]:
        """The scans grouped as the model scores them; a scan the model cannot take is
        refused (InputError) before anything is computed."""
        exams, refused = self.partition(scans)
        if refused:
            raise refused[0][1]
        return exams

    def partition(
        self, scans: Sequence[Scan]
    ) -> tuple[list[list[Scan]], list[tuple[list[Scan], InputError]]]:
        """The exams the model can score, and the scans it cannot take with the reason
        (a photograph sent to an OCT model; for a fusion model, an eye and visit without
        exactly one photograph and one OCT)."""
        kind = self.loaded.model.spec.input
        exams: list[list[Scan]] = []
        refused: list[tuple[list[Scan], InputError]] = []
        if kind != "fusion":
            for scan in scans:
                if scan.modality == kind:
                    exams.append([scan])
                    continue
                error = _refuse(
                    "wrong_modality",
                    f"this model ({self.loaded.name}) scores {_kind_words(kind)}; "
                    f"the scan sent is {_kind_words(scan.modality, one=True)}",
                )
                refused.append(([scan], error))
            return exams, refused
        groups: dict[tuple[str, str], list[Scan]] = {}
        for scan in scans:
            groups.setdefault(scan.visit, []).append(scan)
        for group in groups.values():
            fundus = [s for s in group if s.modality == "fundus"]
            octs = [s for s in group if s.modality == "oct"]
            if len(fundus) == 1 and len(octs) == 1:
                exams.append([fundus[0], octs[0]])
                continue
            error = _refuse(
                "incomplete_exam",
                f"this fusion model ({self.loaded.name}) scores a fundus photograph and "
                "an OCT of the same eye and visit together; send one of each (found "
                f"{len(fundus)} photograph(s) and {len(octs)} OCT(s) for an eye)",
            )
            refused.append((group, error))
        return exams, refused

    # -- scoring ------------------------------------------------------------------------

    def score_files(self, sources: Sequence[Path | bytes]) -> list[ExamResult]:
        """Read, group and score; the first bad file raises InputError."""
        start = time.perf_counter()
        scans = [self.read(s) for s in sources]
        read_ms = (time.perf_counter() - start) * 1000
        results = self.score(scans)
        for r in results:
            r.latency_ms = {"read": read_ms / max(len(results), 1), **r.latency_ms}
        return results

    def score(self, scans: Sequence[Scan]) -> list[ExamResult]:
        """Score scans already read (see `exams` for how they are grouped)."""
        return self.score_exams(self.exams(scans))

    def score_exams(self, exams: Sequence[Sequence[Scan]]) -> list[ExamResult]:
        """Score exams as `partition` gives them."""
        model = self.loaded.model
        t0 = time.perf_counter()
        flat = [s for exam in exams for s in exam]
        prepared = prepare_scans([s.pixels for s in flat], model.recipe, self.device)
        prepare_ms = (time.perf_counter() - t0) * 1000 / max(len(exams), 1)
        results: list[ExamResult] = []
        at = 0
        for exam in exams:
            part = prepared[at : at + len(exam)]
            images = [ImageResult(s, p) for s, p in zip(exam, part, strict=True)]
            at += len(exam)
            results.append(self._score_exam(images))
            results[-1].latency_ms = {"prepare": prepare_ms, **results[-1].latency_ms}
        return results

    def _score_exam(self, images: list[ImageResult]) -> ExamResult:
        model = self.loaded.model
        describe = {k: self.loaded.describe()[k] for k in ("name", "version", "alias")}
        eye = images[0].scan.pixels.eye
        for image in images:
            if image.prepared.traceback is not None:
                log.error("preparing a scan failed:\n%s", image.prepared.traceback)
            if not image.prepared.gradable:
                return ExamResult(eye, images, describe, UNGRADABLE, image.prepared.reason)
        t0 = time.perf_counter()
        tensors = {i.scan.modality: i.prepared.tensor[None] for i in images}  # type: ignore[index]
        age, sex = _clinical(images[0].scan.header)
        inputs = model_inputs(
            model.spec,
            fundus=tensors.get("fundus"),
            oct=tensors.get("oct"),
            age=[age],
            sex=[sex],
            device=self.device,
        )
        predictions = model.predict(inputs)
        timings = {"predict": (time.perf_counter() - t0) * 1000}
        tasks = [self._task_result(t.name, predictions[t.name]) for t in self.shown_tasks]
        if self.heatmaps:
            t1 = time.perf_counter()
            for image in images:
                self._heatmap(image, inputs)
            timings["explain"] = (time.perf_counter() - t1) * 1000
        return ExamResult(eye, images, describe, "scored", None, tasks, timings)

    def _task_result(self, name: str, entry: dict[str, np.ndarray]) -> TaskResult:
        spec = label_spec(name)
        result = TaskResult(name, spec.description, spec.kind)
        if "value" in entry:
            result.value = round(float(entry["value"][0]), 3)
            result.unit = spec.unit
        if "grades" in entry:
            result.grade = int(entry["grade"][0])
            result.grade_probabilities = [round(float(p), 5) for p in entry["grades"][0]]
        if "probability" in entry:
            result.probability = round(float(entry["probability"][0]), 5)
        threshold = self.loaded.model.thresholds.get(name)
        if spec.kind == "binary" and spec.positive != "1":  # a trait (sex), not a finding
            result.value = result.probability
            result.unit = f"probability of {spec.positive}"
            return result
        if "refer" in entry and threshold is not None:
            result.threshold = round(float(threshold.value), 5)
            result.decision = REFER if bool(entry["refer"][0]) else ROUTINE
        return result

    def _heatmap(self, image: ImageResult, inputs: dict[str, torch.Tensor]) -> None:
        model = self.loaded.model
        modality = image.scan.modality
        net = getattr(self._explaining, "net", None)
        if net is None:
            net = self._explaining.net = private_copy(model.net)
        (exp,) = explain(model, inputs, self.explain_task, modality, net=net)
        image.heatmap_task = self.explain_task
        px = image.scan.pixels
        if modality == "fundus":
            rec = image.prepared.record
            _, h, w = px.pixels.shape
            image.heatmap = fundus_to_source(
                exp.heatmap, rec["fov_cx"], rec["fov_cy"], rec["fov_radius"], h, w
            )
            return
        spacing = tuple(float(s) for s in (px.spacing_mm or (1.0, 1.0, 1.0)))
        sp = (spacing[0], spacing[1], spacing[2])
        recipe = model.recipe.oct
        shape = (int(px.pixels.shape[0]), int(px.pixels.shape[1]), int(px.pixels.shape[2]))
        assert exp.bscan is not None  # every OCT explanation names its B-scan
        image.bscan = source_bscan(exp.bscan, recipe.shape[0], sp, shape[0], recipe.extent_mm)
        image.heatmap = oct_bscan_to_source(exp.heatmap, sp, shape, recipe.extent_mm)
        if exp.attention is not None:
            image.attention = attention_to_source(exp.attention, sp, shape[0], recipe.extent_mm)


def _kind_words(kind: str, one: bool = False) -> str:
    if one:
        return {"fundus": "a fundus photograph", "oct": "an OCT volume"}.get(kind, kind)
    return {"fundus": "fundus photographs", "oct": "OCT volumes"}.get(kind, kind)


def _clinical(ds: Dataset) -> tuple[float | None, str | None]:
    """Age at the visit and sex from the scan's own header (a fusion model with clinical
    inputs takes them; unknown counts as unknown)."""
    sex = str(ds.get("PatientSex", "") or "").strip().upper() or None
    age: float | None = None
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] in "DWMY":
        per_year = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[text[3]]
        age = int(text[:3]) / per_year
    else:
        born = _date(ds.get("PatientBirthDate"))
        seen = _date(ds.get("StudyDate")) or _date(ds.get("AcquisitionDate"))
        if born is not None and seen is not None and seen >= born:
            age = (seen - born).days / 365.25
    return age, sex


def _date(value: Any) -> dt.date | None:
    text = str(value or "").strip()
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None
