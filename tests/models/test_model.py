"""The model as one unit: networks, tasks, calibration, thresholds and recipe saved and
loaded together, predicting the same afterwards."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from eyehub.errors import ConfigError, ModelError, NotFoundError
from models.model import EyeModel, ModelSpec, model_inputs
from preprocess.recipe import FundusRecipe, OctRecipe, Recipe, recipe_id

RECIPE = Recipe(name="tiny", fundus=FundusRecipe(size=32), oct=OctRecipe(shape=(3, 32, 32)))
SPEC = {
    "input": "fusion",
    "fundus_network": "densenet121",
    "oct_network": "bscan-attention",
    "features": 16,
    "clinical": ["age", "sex"],
    "tasks": [
        {"name": "dr_grade", "kind": "ordinal", "classes": 5, "refer_from": 2, "weight": 2.0},
        {"name": "glaucoma", "kind": "binary", "pos_weight": 4.0},
        {"name": "systolic_bp", "kind": "regression", "mean": 130.0, "std": 15.0},
    ],
}


def _inputs(spec: ModelSpec, n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    fundus = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    oct_ = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    ages = [55.0, None, 71.5, 40.0, 66.0, math.nan][:n]
    sexes = ["F", "M", None, "m", "F", "X"][:n]
    return model_inputs(spec, fundus, oct_, age=ages, sex=sexes)


def _calibrated_model() -> EyeModel:
    torch.manual_seed(0)
    model = EyeModel.create(ModelSpec.from_dict(SPEC), RECIPE)
    model.info["run_id"] = "abc123"
    rng = np.random.default_rng(0)
    n = 200
    grades = rng.integers(0, 5, n).astype(float)
    glaucoma = rng.integers(0, 2, n).astype(float)
    outputs = {
        "dr_grade": torch.tensor(
            (grades[:, None] - np.arange(4)[None, :] - 0.5) * 3 + rng.normal(0, 1, (n, 4))
        ),
        "glaucoma": torch.tensor((glaucoma * 2 - 1)[:, None] * 2 + rng.normal(0, 1.5, (n, 1))),
    }
    grades[::10] = np.nan
    model.calibrate(outputs, {"dr_grade": grades, "glaucoma": glaucoma})
    return model


def test_save_and_load_give_the_same_model(tmp_path: Path) -> None:
    model = _calibrated_model()
    assert set(model.temperatures) == {"dr_grade", "glaucoma"}  # regression makes no decision
    x = _inputs(model.spec)
    before = model.predict(x)
    path = model.save(tmp_path / "model")
    loaded = EyeModel.load(path)
    after = loaded.predict(x)
    for task, entry in before.items():
        for key, value in entry.items():
            assert np.array_equal(value, after[task][key]), (task, key)
    assert loaded.spec == model.spec
    assert loaded.recipe == RECIPE and loaded.recipe_id == recipe_id(RECIPE)
    assert loaded.temperatures == model.temperatures
    assert loaded.thresholds == model.thresholds
    assert loaded.info == {"run_id": "abc123"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left


def test_predictions_are_calibrated_distributions_with_decisions() -> None:
    model = _calibrated_model()
    p = model.predict(_inputs(model.spec))
    grades = p["dr_grade"]["grades"]
    assert grades.shape == (6, 5) and np.allclose(grades.sum(axis=1), 1.0, atol=1e-6)
    # referral probability is the probability of grade 2 or worse
    assert np.allclose(p["dr_grade"]["probability"], grades[:, 2:].sum(axis=1), atol=1e-6)
    for task in ("dr_grade", "glaucoma"):
        threshold = model.thresholds[task].value
        assert np.array_equal(p[task]["refer"], p[task]["probability"] >= threshold)
        assert model.thresholds[task].sensitivity >= 0.9
    assert "refer" not in p["systolic_bp"] and p["systolic_bp"]["value"].shape == (6,)


def test_saving_over_a_model_replaces_it_whole(tmp_path: Path) -> None:
    model = _calibrated_model()
    path = model.save(tmp_path / "model")
    model.thresholds.clear()
    model.temperatures["glaucoma"] = 2.5
    model.save(path)
    loaded = EyeModel.load(path)
    assert loaded.thresholds == {} and loaded.temperatures["glaucoma"] == 2.5


def test_damaged_or_foreign_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no eyehub model"):
        EyeModel.load(tmp_path / "nothing")
    path = _calibrated_model().save(tmp_path / "model")
    manifest_path = path / "eyehub-model.json"
    good = json.loads(manifest_path.read_text())

    def load_with(manifest: object) -> None:
        manifest_path.write_text(json.dumps(manifest))
        EyeModel.load(path)

    with pytest.raises(ModelError, match="format version 99"):
        load_with({**good, "version": 99})
    with pytest.raises(ModelError, match="not an eyehub model"):
        load_with({**good, "format": "onnx"})
    with pytest.raises(ModelError, match="not an eyehub model"):
        load_with([good])
    with pytest.raises(ModelError, match="damaged"):
        load_with({k: v for k, v in good.items() if k != "recipe"})
    with pytest.raises(ModelError, match="damaged"):
        load_with({**good, "spec": {**good["spec"], "features": "wide"}})
    # a spec that does not describe the saved weights (the digest covers the weights only)
    with pytest.raises(ModelError, match=r"does not fit the network.*damaged"):
        load_with({**good, "spec": {**good["spec"], "features": 32}})
    manifest_path.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        EyeModel.load(path)
    manifest_path.write_text(json.dumps(good))
    with (path / "weights.pt").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="does not match"):
        EyeModel.load(path)


def test_the_weights_digest_is_the_files_sha256(tmp_path: Path) -> None:
    path = _calibrated_model().save(tmp_path / "model")
    manifest = json.loads((path / "eyehub-model.json").read_text())
    data = (path / "weights.pt").read_bytes()
    assert manifest["weights_sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_predict_leaves_the_network_in_the_mode_it_found(mode: str) -> None:
    model = _calibrated_model()
    x = _inputs(model.spec)
    model.net.train(mode == "train")
    buffers = {k: v.clone() for k, v in model.net.state_dict().items()}
    first = model.predict(x)
    assert model.net.training == (mode == "train")
    assert {m.training for m in model.net.modules()} == {mode == "train"}
    # predicted in eval mode: batch-norm statistics untouched, the same answer twice
    after = model.net.state_dict()
    assert [k for k, v in buffers.items() if not torch.equal(v, after[k])] == []
    second = model.predict(x)
    for task, entry in first.items():
        for key, value in entry.items():
            assert np.array_equal(value, second[task][key]), (task, key)


def test_inputs_are_normalised_the_same_way_everywhere() -> None:
    spec = ModelSpec.from_dict(SPEC)
    x = _inputs(spec)
    assert x["fundus"].dtype == torch.float32 and x["fundus"].shape == (6, 3, 32, 32)
    assert x["oct"].shape == (6, 1, 3, 32, 32)
    assert float(x["oct"].min()) >= -1.0 and float(x["oct"].max()) <= 1.0
    age, sex = x["clinical"][:, 0].tolist(), x["clinical"][:, 1].tolist()
    assert age[1] == 0.0 and age[5] == 0.0  # missing age: the mean
    assert age[2] == pytest.approx((71.5 - 60) / 15)
    assert sex == [0.0, 1.0, 0.5, 1.0, 0.0, 0.5]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": [{"name": "a", "kind": "binary"}, {"name": "a", "kind": "binary"}]}, "unique"),
        ({"input": "fundus", "oct_pretrained": "x.pt"}, "oct_pretrained applies"),
        ({"tasks": [{"name": "a", "kind": "binary", "refer_from": 1}]}, "refer_from applies"),
        ({"tasks": [{"name": "a", "kind": "ordinal", "classes": 3, "refer_from": 3}]}, "below"),
        ({"tasks": []}, "tasks"),
        ({"clinical": ["bmi"]}, "clinical"),
        ({"netwrok": "x"}, "unknown key 'netwrok'"),
    ],
)
def test_spec_errors_name_what_is_wrong(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelSpec.from_dict({**SPEC, **change})


def test_a_task_the_model_lacks_is_named() -> None:
    model = EyeModel(ModelSpec.from_dict(SPEC), RECIPE)
    with pytest.raises(ConfigError, match="no task 'amd'; it has dr_grade, glaucoma"):
        model.task("amd")


def test_the_shipped_model_configs_are_valid() -> None:
    configs = sorted(Path(__file__).parents[2].joinpath("configs", "model").glob("*.yaml"))
    assert configs
    for path in configs:
        spec = ModelSpec.from_dict(yaml.safe_load(path.read_text()))
        assert spec.tasks, path


def test_clinical_inputs_default_to_unknown_and_must_match_the_batch() -> None:
    spec = ModelSpec.from_dict(SPEC)
    fundus = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    oct_ = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    x = model_inputs(spec, fundus, oct_)
    assert x["clinical"].tolist() == [[0.0, 0.5]] * 3
    with pytest.raises(ModelError, match="age has 2 values for a batch of 3"):
        model_inputs(spec, fundus, oct_, age=[50.0, 60.0])
