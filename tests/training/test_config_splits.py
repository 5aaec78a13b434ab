"""Training configs refuse what cannot work, naming the key; splits are by patient,
stratified, deterministic, and checked for leakage before any worker starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eyehub.configs import shipped_configs
from eyehub.errors import DatasetError, EyehubError
from training.config import SplitSpec, load_train_config, resolve_train_config
from training.splits import assign_splits, check_split, split_samples

BASE = {
    "name": "t",
    "preprocess": "small",
    "primary_task": "referable_dr",
    "model": {"input": "fundus", "tasks": ["referable_dr", "age", "sex"]},
}


def _with(**changes: object) -> dict[str, object]:
    return {**BASE, **changes}


def test_every_shipped_training_config_validates() -> None:
    names = shipped_configs("train")
    assert "fundus_demo" in names
    for name in names:
        config = load_train_config(name)
        assert config.name == name


def test_tasks_are_completed_from_the_label_registry() -> None:
    config = resolve_train_config(
        _with(model={"input": "fundus", "tasks": ["referable_dr", "dr_grade", "age"]})
    )
    kinds = {t.name: (t.kind, t.classes) for t in config.model.tasks}
    assert kinds["dr_grade"] == ("ordinal", 5)
    assert kinds["age"][0] == "regression"
    assert config.early_stopping_metric == "val/referable_dr/auroc"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(epochs=3), "unknown key 'epochs'"),
        (_with(training={"epcohs": 3}), "unknown key 'training.epcohs'"),
        (_with(model={"input": "fundus", "tasks": ["smoker"]}), "unknown label 'smoker'"),
        (
            _with(model={"input": "fundus", "tasks": [{"name": "age", "kind": "binary"}]}),
            "'age' is a regression label",
        ),
        (_with(primary_task="amd"), "primary_task 'amd' is not one of the tasks"),
        (
            _with(model={"input": "fundus", "clinical": ["age"], "tasks": ["referable_dr", "age"]}),
            "also clinical inputs",
        ),
        (_with(controls=["null_control"]), "control 'null_control' must also be a task"),
        (_with(augmentation=[{"name": "RandWarpDrive"}]), "MONAI has no transform"),
        (_with(preprocess="no-such-recipe"), "no-such-recipe"),
    ],
)
def test_a_bad_config_is_refused_naming_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(EyehubError, match=message):
        resolve_train_config(data)


def _cohort(patients: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        positive = int(rng.random() < 0.3)
        for eye in ("R", "L"):
            for visit in range(int(rng.integers(1, 3))):
                rows.append(
                    {
                        "scan_id": f"S{p}{eye}{visit}",
                        "patient_id": f"P{p:04d}",
                        "eye": eye,
                        "referable_dr": positive,
                        "age": 50.0 + p % 30,
                        "sex": "MF"[p % 2],
                        "gradable": bool(rng.random() > 0.05),
                        "fundus_row": len(rows),
                        "oct_row": -1,
                    }
                )
    return pd.DataFrame(rows)


def test_splits_are_by_patient_stratified_and_deterministic() -> None:
    config = resolve_train_config(BASE)
    samples, report = split_samples(config, _cohort(200))
    assert samples.groupby("patient_id").split.nunique().max() == 1
    shares = samples.groupby("split").patient_id.nunique() / samples.patient_id.nunique()
    assert abs(shares["test"] - 0.2) < 0.03 and abs(shares["val"] - 0.2) < 0.03
    prevalence = samples.groupby("split").referable_dr.mean()
    assert prevalence.max() - prevalence.min() < 0.08  # stratified on the primary task
    assert sum(report.ungradable.values()) > 0 and samples.gradable.all()
    again, _ = split_samples(config, _cohort(200))
    pd.testing.assert_series_equal(samples.split, again.split)
    # a new patient never moves the others
    more, _ = split_samples(config, _cohort(201))
    before = samples.groupby("patient_id").split.first()
    after = more.groupby("patient_id").split.first()
    moved = (before != after.loc[before.index]).sum()
    assert moved <= 0.02 * len(before)


def test_k_folds_cover_every_non_test_patient_once() -> None:
    strata = pd.Series(np.arange(100) % 2, index=[f"P{i}" for i in range(100)], dtype=float)
    folds = [assign_splits(strata, SplitSpec(folds=5, fold=k, test=0.2)) for k in range(5)]
    test = {p for p, s in folds[0].items() if s == "test"}
    assert all({p for p, s in f.items() if s == "test"} == test for f in folds)
    val_sets = [{p for p, s in f.items() if s == "val"} for f in folds]
    assert set().union(*val_sets) == set(strata.index) - test
    assert sum(len(v) for v in val_sets) == len(set(strata.index) - test)


def test_a_patient_on_two_sides_is_refused() -> None:
    config = resolve_train_config(BASE)
    samples, _ = split_samples(config, _cohort(60))
    leak = samples.copy()
    counts = leak.patient_id.value_counts()
    moved = leak.index[leak.patient_id == counts.index[0]][:1]  # one of 2+ rows
    assert counts.iloc[0] >= 2
    leak.loc[moved, "split"] = "test" if leak.loc[moved[0], "split"] != "test" else "train"
    with pytest.raises(DatasetError, match="more than one split"):
        check_split(config, leak)


def test_labels_all_missing_or_missing_in_training_are_refused() -> None:
    config = resolve_train_config(BASE)
    samples, _ = split_samples(config, _cohort(60))
    empty = samples.assign(referable_dr=np.nan, age=np.nan, sex=None)
    with pytest.raises(DatasetError, match="every label of the configured tasks is missing"):
        check_split(config, empty)
    no_age = samples.assign(age=np.where(samples.split == "train", np.nan, samples.age))
    with pytest.raises(DatasetError, match="'age' has no label in the training split"):
        check_split(config, no_age)


def test_the_config_keys_are_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    for key in ("primary_task", "controls", "split.val", "training.epochs", "augmentation"):
        assert f"`{key}" in doc, key


def test_layer_wise_decay_scales_each_vit_block_as_retfound_does() -> None:
    from models.model import EyeNet
    from training.config import TrainingSpec
    from training.loop import build_optimizer

    config = resolve_train_config(
        _with(
            model={"input": "fundus", "fundus_network": "vit-b16", "tasks": ["referable_dr"]},
            preprocess={"fundus": {"size": 32}},
        )
    )
    net = EyeNet(config.model, config.preprocess)
    spec = TrainingSpec(lr=1.0, layer_decay=0.5)
    optimizer = build_optimizer(net, spec)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(net.named_parameters())
    blocks = 12
    assert lr_of[id(named["fundus.vit.cls_token"])] == 0.5 ** (blocks + 1)
    assert lr_of[id(named["fundus.vit.blocks.0.mlp.linear1.weight"])] == 0.5**blocks
    assert lr_of[id(named["fundus.vit.blocks.11.mlp.linear1.weight"])] == 0.5
    head = next(n for n in named if n.startswith("heads."))
    assert lr_of[id(named[head])] == 1.0
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(named["fundus.vit.cls_token"])] == 0.0
    assert decay_of[id(named["fundus.vit.blocks.0.mlp.linear1.weight"])] == spec.weight_decay
    plain = build_optimizer(net, TrainingSpec(lr=1.0))
    assert {g["lr"] for g in plain.param_groups} == {1.0}


def test_retfound_finetune_names_its_local_checkpoint_and_refuses_a_missing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eyehub.errors import NotFoundError
    from training.run import resolve_pretrained

    config = load_train_config("retfound_finetune")
    assert config.model.fundus_network == "vit-l16" and config.preprocess.fundus.size == 224
    assert config.training.layer_decay == 0.65
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotFoundError, match=r"model.pretrained: no checkpoint at .*--set"):
        resolve_pretrained(config)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "RETFound_cfp_weights.pth").write_bytes(b"x")
    resolved = resolve_pretrained(config)
    assert resolved.model.pretrained == tmp_path / "weights" / "RETFound_cfp_weights.pth"
