"""The DICOM Structured Report of a scored exam (highdicom), for the patient's record.

A clinician's result goes back into the PACS next to the scans it was computed from, so
the report is a Comprehensive SR in the scanned patient's own study: patient and study
attributes are copied from the source headers (identifiers kept on purpose: this file is
the record, not a research export), every source image is referenced, and the model's
name and version are the algorithm and the observer device. Nothing here logs.

The content tree is a TID 1500 Measurement Report with one TID 1501 measurement group
per task the model shows (its control tasks are left out):

- tracking identifier: the task's name (e.g. ``referable_dr``);
- finding type: the task's concept (SNOMED CT, DICOM or LOINC where one exists,
  ``99EYEHUB`` otherwise; see `TASK_CODES`);
- algorithm identification: the model's registry name and version;
- finding site: the retina of the scanned eye (SCT 5665001, with its laterality);
- source images: every scan of the exam (SOP Class and Instance UID);
- qualitative evaluation "Referral decision" (99EYEHUB): refer or routine at the
  model's stored threshold; for an ungradable exam "ungradable", with "Image Quality"
  (DCM 111101) "Unusable" (DCM 111235) and the reason code, and no figures at all;
- measurements: "Probability" (DCM 122157, UCUM "1") calibrated, the decision threshold,
  the grade of an ordinal task (UCUM "{grade}"), the value of a regression task in its
  unit (age in years, UCUM "a").

Codes of the private scheme ``99EYEHUB`` draw warnings from dciodvfy, never errors.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import eyehub
from eyehub.labels import label_spec
from eyehub.reasons import UNGRADABLE_REASONS
from inference.registry import LoadedModel
from inference.score import REFER, ROUTINE, UNGRADABLE, ExamResult, TaskResult

PRIVATE = "99EYEHUB"  # the private coding scheme of eyehub's own concepts
SERIES_NUMBER = 901
SERIES_DESCRIPTION = "eyehub AI findings"
MANUFACTURER = "eyehub"

# A task's concept (finding type; a regression task's measurement name too)
TASK_CODES: dict[str, hd.sr.CodedConcept] = {
    "dr_grade": hd.sr.CodedConcept("4855003", "SCT", "Diabetic retinopathy"),
    "referable_dr": hd.sr.CodedConcept("referable_dr", PRIVATE, "Referable diabetic retinopathy"),
    "amd": hd.sr.CodedConcept("267718000", "SCT", "Age-related macular degeneration"),
    "glaucoma": hd.sr.CodedConcept("23986001", "SCT", "Glaucoma"),
    "dme": hd.sr.CodedConcept("312912001", "SCT", "Diabetic macular edema"),
    "diabetes": hd.sr.CodedConcept("73211009", "SCT", "Diabetes mellitus"),
    "hypertension": hd.sr.CodedConcept("38341003", "SCT", "Hypertension"),
    "cvd_5y": hd.sr.CodedConcept("395112001", "SCT", "Cardiovascular event risk"),
    "dementia": hd.sr.CodedConcept("52448006", "SCT", "Dementia"),
    "age": hd.sr.CodedConcept("121033", "DCM", "Subject Age"),
    "sex": hd.sr.CodedConcept("121032", "DCM", "Subject Sex"),
    "systolic_bp": hd.sr.CodedConcept("271649006", "SCT", "Systolic blood pressure"),
    "hba1c": hd.sr.CodedConcept("4548-4", "LN", "Hemoglobin A1c/Hemoglobin.total in Blood"),
}

# UCUM units of the registry's regression units
UNITS: dict[str, hd.sr.CodedConcept] = {
    "years": hd.sr.CodedConcept("a", "UCUM", "year"),
    "mmHg": hd.sr.CodedConcept("mm[Hg]", "UCUM", "mmHg"),
    "%": hd.sr.CodedConcept("%", "UCUM", "percent"),
}

PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
THRESHOLD = hd.sr.CodedConcept("threshold", PRIVATE, "Referral threshold of probability")
GRADE = hd.sr.CodedConcept("grade", PRIVATE, "Grade")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
GRADE_UNIT = hd.sr.CodedConcept("{grade}", "UCUM", "grade")

DECISION = hd.sr.CodedConcept("decision", PRIVATE, "Referral decision")
DECISIONS: dict[str, hd.sr.CodedConcept] = {
    REFER: hd.sr.CodedConcept(REFER, PRIVATE, "Refer"),
    ROUTINE: hd.sr.CodedConcept(ROUTINE, PRIVATE, "Routine"),
    UNGRADABLE: hd.sr.CodedConcept(UNGRADABLE, PRIVATE, "Ungradable"),
}
IMAGE_QUALITY = hd.sr.CodedConcept("111101", "DCM", "Image Quality")
UNUSABLE = hd.sr.CodedConcept("111235", "DCM", "Unusable - Quality renders image unusable")
UNGRADABLE_REASON = hd.sr.CodedConcept("ungradable_reason", PRIVATE, "Reason ungradable")

RETINA = hd.sr.CodedConcept("5665001", "SCT", "Retina")
LATERALITY = {"R": codes.SCT.Right, "L": codes.SCT.Left}
PROCEDURES = {"fundus": codes.DCM.OphthalmicPhotography, "oct": codes.DCM.OphthalmicTomography}


def build_sr(
    result: ExamResult,
    loaded: LoadedModel,
    *,
    instance_number: int = 1,
    series_uid: str | None = None,
) -> Dataset:
    """A Comprehensive SR (TID 1500 measurement report) of `result`, in the scanned
    patient's own study and patient (identifiers copied from the source header),
    referencing every source image, with the model's name and version as the algorithm
    and observer device. Passes dciodvfy with no Error line.

    The report is a new instance in a new series ("eyehub AI findings", number 901);
    a caller that files several reports of one run together gives them one `series_uid`
    and distinct `instance_number`s."""
    headers = [image.scan.header for image in result.images]
    name = loaded.name
    version = loaded.version or "unregistered"
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version, manufacturer=MANUFACTURER)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["eyehub-model", name, version]),
            name=name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{name} version {version}"[:64],
        ),
    )
    sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(h) for h in headers]
    site = hd.sr.FindingSite(RETINA, laterality=LATERALITY.get(result.eye))
    groups = [_group(result, task, algorithm, site, sources) for task in _tasks(result, loaded)]
    procedures = [PROCEDURES[m] for m in dict.fromkeys(i.scan.modality for i in result.images)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=procedures,
        imaging_measurements=groups,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=headers,
        content=report[0],
        series_instance_uid=series_uid or generate_uid(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # an algorithm's finding, until a clinician verifies it
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
    )
    sr.SeriesDate, sr.SeriesTime = sr.ContentDate, sr.ContentTime
    sr.SoftwareVersions = f"eyehub {eyehub.__version__}"
    sr.ManufacturerModelName = "eyehub"
    charset = headers[0].get("SpecificCharacterSet")
    if charset:
        sr.SpecificCharacterSet = charset
    return sr


def _tasks(result: ExamResult, loaded: LoadedModel) -> Sequence[TaskResult]:
    """The exam's task results; an ungradable exam has none, so its tasks are the ones
    the model would have shown, with no figures."""
    if result.status != UNGRADABLE:
        return result.tasks
    tasks = []
    for t in loaded.model.tasks:
        spec = label_spec(t.name)
        if not spec.control:
            tasks.append(TaskResult(t.name, spec.description, spec.kind))
    return tasks


def task_code(task: TaskResult) -> hd.sr.CodedConcept:
    """The task's concept: a standard code where one exists, else a private one."""
    return TASK_CODES.get(task.task) or hd.sr.CodedConcept(
        task.task, PRIVATE, task.description[:64]
    )


def _group(
    result: ExamResult,
    task: TaskResult,
    algorithm: hd.sr.AlgorithmIdentification,
    site: hd.sr.FindingSite,
    sources: list[hd.sr.SourceImageForMeasurementGroup],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    code = task_code(task)
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    measurements: list[hd.sr.Measurement] = []
    if result.status == UNGRADABLE:
        reason = result.reason or "internal_error"
        text = UNGRADABLE_REASONS.get(reason, reason)
        evaluations = [
            hd.sr.QualitativeEvaluation(DECISION, DECISIONS[UNGRADABLE]),
            hd.sr.QualitativeEvaluation(IMAGE_QUALITY, UNUSABLE),
            hd.sr.QualitativeEvaluation(
                UNGRADABLE_REASON,
                hd.sr.CodedConcept(reason, PRIVATE, text if len(text) <= 64 else reason),
            ),
        ]
    else:
        if task.decision is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(DECISION, DECISIONS[task.decision]))
        if task.probability is not None:
            measurements.append(_measure(_probability(task), task.probability, NO_UNITS))
        if task.threshold is not None:
            measurements.append(_measure(THRESHOLD, task.threshold, NO_UNITS))
        if task.grade is not None:
            measurements.append(_measure(GRADE, task.grade, GRADE_UNIT))
        if task.kind == "regression" and task.value is not None:
            unit = UNITS.get(task.unit or "") or hd.sr.CodedConcept(
                task.unit or "1", "UCUM", task.unit or "no units"
            )
            measurements.append(_measure(code, task.value, unit))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=task.task),
        finding_type=code,
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=sources,
    )


def _probability(task: TaskResult) -> hd.sr.CodedConcept:
    """ "Probability" of the finding; a trait's (sex) names the value it is of."""
    spec = label_spec(task.task)
    if task.decision is None and spec.kind == "binary" and spec.positive != "1":
        return hd.sr.CodedConcept(
            f"probability_{spec.positive}", PRIVATE, f"Probability of {spec.positive}"
        )
    return PROBABILITY


def _measure(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=unit)
