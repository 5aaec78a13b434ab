"""Samples and splits: which prepared scans train, validate and test a model.

Splits are made at patient level (both eyes and every visit of a patient on one side),
stratified on the primary task, and deterministic from the seed and the pseudonyms alone:
the same dataset and seed give the same split on any machine, and adding patients never
moves the others. Checks that run before any worker starts refuse a split in which one
patient is on two sides, tasks without labels, and a validation split that cannot
calibrate a yes/no task.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from eyehub.errors import DatasetError
from eyehub.labels import label_spec
from training.config import SplitSpec, TrainConfig

SPLITS = ("train", "val", "test")


def _order_key(seed: int, patient_id: str) -> str:
    return hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()


def assign_splits(strata: pd.Series, spec: SplitSpec) -> pd.Series:
    """`strata`: one value per patient (index = patient_id; NaN for unlabelled). Returns
    the split of each patient. Within each stratum patients are ordered by a keyed hash
    of their pseudonym; the first `test` share goes to test, the next `val` share to
    validation (with `folds`: every k-th of the non-test patients, fold `fold`)."""
    split = pd.Series("train", index=strata.index, dtype=object)
    groups = strata.astype(object).where(strata.notna(), "missing")
    for _, members in groups.groupby(groups, sort=True):
        ordered = sorted(members.index, key=lambda p: _order_key(spec.seed, str(p)))
        n = len(ordered)
        rest = []
        for i, patient in enumerate(ordered):
            position = (i + 0.5) / n
            if position < spec.test:
                split[patient] = "test"
            else:
                rest.append(patient)
        for j, patient in enumerate(rest):
            if spec.folds is not None:
                is_val = j % spec.folds == spec.fold
            else:
                is_val = (j + 0.5) / len(rest) < spec.val / (1 - spec.test)
            if is_val:
                split[patient] = "val"
    return split


@dataclass
class SplitReport:
    """Per split: patients, samples used, ungradable samples left out."""

    patients: dict[str, int]
    samples: dict[str, int]
    ungradable: dict[str, int]


def samples_for(config: TrainConfig, index: pd.DataFrame) -> pd.DataFrame:
    """One row per training sample from the prepared index: the scan(s) the model reads
    (`fundus_row`, `oct_row`), its patient, eye, labels, quality and subgroup columns.
    Fusion samples pair an OCT with the fundus photograph it references (same eye and
    visit)."""
    spec = config.model
    fundus = index[index.modality == "fundus"]
    octs = index[index.modality == "oct"]
    if spec.input == "fundus":
        samples = fundus.assign(fundus_row=fundus["row"].astype("int64"), oct_row=-1)
    elif spec.input == "oct":
        samples = octs.assign(oct_row=octs["row"].astype("int64"), fundus_row=-1)
    else:
        by_id = fundus.set_index("scan_id")
        pairs = []
        for r in octs.itertuples():
            refs = r.linked_scan_ids if r.linked_scan_ids is not None else []
            linked = [s for s in refs if s in by_id.index]
            if linked:
                f = by_id.loc[linked[0]]
                pairs.append((r.Index, int(f["row"]), bool(f["gradable"])))
        if not pairs:
            raise DatasetError(
                "input=fusion needs OCT volumes linked to a fundus photograph of the same eye "
                "and visit; this dataset has none"
            )
        idx = [p[0] for p in pairs]
        samples = octs.loc[idx].assign(
            oct_row=octs.loc[idx, "row"].astype("int64").values,
            fundus_row=[p[1] for p in pairs],
            gradable=octs.loc[idx, "gradable"].values & np.array([p[2] for p in pairs]),
        )
    if samples.empty:
        raise DatasetError(f"the dataset has no {spec.input} scans prepared to train on")
    return samples.reset_index(drop=True)


def split_samples(config: TrainConfig, samples: pd.DataFrame) -> tuple[pd.DataFrame, SplitReport]:
    """Add a `split` column (patient level, stratified, deterministic), drop ungradable
    samples, check the result; returns the samples and what was left out."""
    stratify = config.stratify
    encoded = pd.Series(label_spec(stratify).encode(samples[stratify]), index=samples.index)
    per_patient = encoded.groupby(samples.patient_id).max()  # NaN when none is labelled
    if label_spec(stratify).kind == "regression":  # stratify on quartiles of the value
        per_patient = pd.qcut(per_patient, 4, labels=False, duplicates="drop")
    split = assign_splits(per_patient, config.split)
    samples = samples.assign(split=samples.patient_id.map(split))
    ungradable = samples[~samples.gradable.astype(bool)]
    used = samples[samples.gradable.astype(bool)].reset_index(drop=True)
    report = SplitReport(
        patients={s: int(used.patient_id[used.split == s].nunique()) for s in SPLITS},
        samples={s: int((used.split == s).sum()) for s in SPLITS},
        ungradable={s: int((ungradable.split == s).sum()) for s in SPLITS},
    )
    check_split(config, used)
    return used, report


def check_split(config: TrainConfig, samples: pd.DataFrame) -> None:
    """Refuse what would make the run meaningless; each message names what to change."""
    sides = samples.groupby("patient_id").split.nunique()
    leaked = sides[sides > 1]
    if len(leaked):
        raise DatasetError(
            f"{len(leaked)} patient(s) appear in more than one split (e.g. "
            f"{', '.join(map(str, leaked.index[:3]))}): a leak; splits must be by patient"
        )
    for s in SPLITS:
        if not (samples.split == s).any():
            raise DatasetError(
                f"the {s} split is empty: the dataset has too few patients for split.val "
                f"{config.split.val} and split.test {config.split.test}"
            )
    labelled = {t.name: samples[t.name].notna() for t in config.model.tasks}
    if not any(bool(v.any()) for v in labelled.values()):
        raise DatasetError(
            "every label of the configured tasks is missing in this dataset: ingest it with "
            "--labels, or choose tasks that have labels"
        )
    for task in config.model.tasks:
        if not bool(labelled[task.name][samples.split == "train"].any()):
            raise DatasetError(
                f"model.tasks: '{task.name}' has no label in the training split; remove the "
                "task or add labels"
            )
        if task.decides:
            y = label_spec(task.name).encode(samples.loc[samples.split == "val", task.name])
            if task.kind == "ordinal":
                y = np.where(np.isnan(y), np.nan, (y >= (task.refer_from or 1)).astype(float))
            y = y[~np.isnan(y)]
            if y.size == 0 or y.min() == y.max():
                raise DatasetError(
                    f"model.tasks: '{task.name}' needs both classes in the validation split to "
                    "calibrate its probability and threshold; raise split.val or add patients"
                )
