"""The scoring kernel: model references, exams, calibrated decisions, heat maps on the
scan, and the `eyehub score` command on files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from eyehub.errors import InputError, NotFoundError, UsageError
from inference.heatmap import (
    attention_to_source,
    fundus_to_source,
    oct_bscan_to_source,
    source_bscan,
)
from inference.registry import load_model, parse_model_ref
from inference.score import Scorer
from ingest import HubKey
from models.model import model_inputs
from preprocess.fundus import FieldOfView, crop_to_fov
from preprocess.kernel import prepare_scans
from preprocess.oct import resample
from preprocess.recipe import OctRecipe
from tests.cli import run_eyehub
from tests.inference.models import Registered


def _first(files: pd.DataFrame, kind: str, export: str | None = None) -> Path:
    rows = files[files.kind == kind]
    if export is not None:
        rows = rows[rows.export == export]
    return Path(rows.file.iloc[0])


def _scorer(reg: Registered, key: HubKey, cache: Path, ref: str | None = None) -> Scorer:
    loaded = load_model(ref or f"models:/{reg.name}@champion", reg.tracking_uri, cache)
    return Scorer(loaded, key)


# -- model references --------------------------------------------------------------------


def test_model_references_parse_and_bad_ones_say_what_is_expected() -> None:
    alias = parse_model_ref("models:/eyehub-fundus_demo@champion")
    assert (alias.name, alias.alias, alias.version) == ("eyehub-fundus_demo", "champion", None)
    version = parse_model_ref("models:/eyehub-oct_demo/3")
    assert (version.name, version.version, version.registered) == ("eyehub-oct_demo", "3", True)
    assert not parse_model_ref("/some/model").registered
    with pytest.raises(UsageError, match="models:/eyehub-<name>@<alias>"):
        parse_model_ref("models:/eyehub-x@")


def test_a_model_loads_by_alias_version_or_directory_with_its_own_calibration(
    fundus_model: Registered, tmp_path: Path
) -> None:
    by_alias = load_model(
        f"models:/{fundus_model.name}@champion", fundus_model.tracking_uri, tmp_path
    )
    by_version = load_model(
        f"models:/{fundus_model.name}/{fundus_model.version}", fundus_model.tracking_uri, tmp_path
    )
    local = load_model(str(fundus_model.model_dir), fundus_model.tracking_uri, tmp_path)
    assert by_alias.version == by_version.version == fundus_model.version
    assert by_alias.describe()["alias"] == "champion" and local.version is None
    assert by_alias.run_id == fundus_model.run_id
    for loaded in (by_version, local):
        assert loaded.model.thresholds == by_alias.model.thresholds
        assert loaded.model.temperatures == by_alias.model.temperatures
        assert loaded.model.recipe_id == by_alias.model.recipe_id
    # the download is cached per version
    assert (tmp_path / fundus_model.name / fundus_model.version).is_dir()


def test_an_unknown_alias_is_a_clear_not_found(fundus_model: Registered, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no registered model 'eyehub-fundus_demo' with alias"):
        load_model("models:/eyehub-fundus_demo@nobody", fundus_model.tracking_uri, tmp_path)
    with pytest.raises(NotFoundError, match="eyehub-nothing"):
        load_model("models:/eyehub-nothing/1", fundus_model.tracking_uri, tmp_path)


# -- the kernel ----------------------------------------------------------------------------


def test_a_fundus_scan_gets_calibrated_figures_decisions_at_the_stored_thresholds_and_a_map(
    fundus_model: Registered, cohort_files: pd.DataFrame, hub_key: HubKey, tmp_path: Path
) -> None:
    scorer = _scorer(fundus_model, hub_key, tmp_path)
    path = _first(cohort_files, "fundus", "op")
    (result,) = scorer.score_files([path])
    model = scorer.loaded.model
    ds = pydicom.dcmread(path)
    assert result.status == "scored" and result.scan == hub_key.scan_id(ds.SOPInstanceUID)

    # the same figures as the model on the kernel-prepared tensor, decided at its thresholds
    pixels = result.images[0].scan.pixels
    (prepared,) = prepare_scans([pixels], model.recipe)
    expected = model.predict(model_inputs(model.spec, fundus=prepared.tensor[None]))
    by_task = {t.task: t for t in result.tasks}
    assert "null_control" not in by_task  # a control is no finding for a clinician
    for name in ("referable_dr", "amd", "glaucoma", "dme"):
        t = by_task[name]
        assert t.probability == pytest.approx(float(expected[name]["probability"][0]), abs=1e-5)
        assert t.threshold == pytest.approx(model.thresholds[name].value, abs=1e-5)
        assert t.decision == ("refer" if t.probability >= t.threshold else "routine")
    assert by_task["dr_grade"].grade == int(expected["dr_grade"]["grade"][0])
    assert sum(by_task["dr_grade"].grade_probabilities or []) == pytest.approx(1.0, abs=1e-3)
    assert by_task["age"].unit == "years" and by_task["sex"].decision is None

    # the heat map is at the scan's resolution, on the photograph inside its field of view
    image = result.images[0]
    assert image.heatmap is not None and image.heatmap.shape == pixels.pixels.shape[1:]
    assert image.heatmap.max() == pytest.approx(1.0, abs=1e-3) and image.heatmap.min() >= 0
    assert image.overlay().shape == (*pixels.pixels.shape[1:], 3)

    body = result.to_json()
    assert body["decision"] == ("refer" if result.refer else "routine")
    assert body["model"] == {
        "name": fundus_model.name,
        "version": fundus_model.version,
        "alias": "champion",
    }
    assert body["images"][0]["heatmap"]["shape"] == list(pixels.pixels.shape[1:])
    text = json.dumps(body)
    for value in (str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID)):
        assert value not in text


def test_an_oct_volume_gets_the_bscan_that_mattered_and_attention_over_its_own_bscans(
    oct_model: Registered, cohort_files: pd.DataFrame, hub_key: HubKey, tmp_path: Path
) -> None:
    scorer = _scorer(oct_model, hub_key, tmp_path)
    (result,) = scorer.score_files([_first(cohort_files, "oct")])
    image = result.images[0]
    depth, rows, cols = image.scan.pixels.pixels.shape
    assert result.status == "scored" and result.tasks
    assert image.bscan is not None and 0 <= image.bscan < depth
    assert image.heatmap is not None and image.heatmap.shape == (rows, cols)
    assert image.attention is not None and image.attention.shape == (depth,)
    assert image.attention.sum() == pytest.approx(1.0) and (image.attention >= 0).all()
    assert image.display().shape == (rows, cols, 3)


def test_a_scan_the_model_cannot_take_is_refused_with_the_reason(
    fundus_model: Registered, cohort_files: pd.DataFrame, hub_key: HubKey, tmp_path: Path
) -> None:
    scorer = _scorer(fundus_model, hub_key, tmp_path)
    with pytest.raises(InputError, match="scores fundus photographs") as caught:
        scorer.score_files([_first(cohort_files, "oct")])
    assert caught.value.reason == "wrong_modality"
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not an image")
    with pytest.raises(InputError) as caught:
        scorer.score_files([not_dicom])
    assert caught.value.reason == "not_dicom"


def test_a_dark_photograph_is_ungradable_with_its_reason_and_no_figures(
    fundus_model: Registered, cohort_files: pd.DataFrame, hub_key: HubKey, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(_first(cohort_files, "fundus", "op"))
    ds.decompress()
    ds.PixelData = (ds.pixel_array // 12).astype(np.uint8).tobytes()
    ds.save_as(tmp_path / "dark.dcm", enforce_file_format=True)
    (result,) = _scorer(fundus_model, hub_key, tmp_path / "cache").score_files(
        [tmp_path / "dark.dcm"]
    )
    body = result.to_json()
    assert body["status"] == body["decision"] == "ungradable"
    assert body["reason"] == "too_dark" and "brightness" in body["reason_text"]
    assert body["tasks"] == [] and "heatmap" not in body["images"][0]
    assert "no risk figures" in body["headline"] and "too dark" in body["headline"]


def test_every_ungradable_reason_has_advice_for_the_clinician() -> None:
    from eyehub.reasons import UNGRADABLE_REASONS
    from inference.score import UNGRADABLE_ADVICE

    assert set(UNGRADABLE_ADVICE) == set(UNGRADABLE_REASONS)


# -- heat-map geometry: the inverse of the preparation's ------------------------------------


def test_a_point_of_the_prepared_photograph_maps_back_where_preparation_took_it_from() -> None:
    height, width, size = 300, 360, 64
    fov = FieldOfView(*(torch.tensor([v]) for v in (190.0, 140.0, 120.0)), torch.tensor([True]))
    u, v = 40, 20  # a prepared pixel
    heat = np.zeros((size, size), np.float32)
    heat[v, u] = 1.0
    source = fundus_to_source(heat, 190.0, 140.0, 120.0, height, width)
    y, x = np.unravel_index(source.argmax(), source.shape)
    # where crop_to_fov samples prepared pixel (u, v) from
    marker = torch.zeros(1, 1, height, width)
    marker[0, 0, y, x] = 1.0
    assert crop_to_fov(marker, fov, size)[0, 0].argmax().item() in {
        v * size + u,
        v * size + u + 1,
        (v + 1) * size + u,
        (v + 1) * size + u + 1,
        v * size + u - 1,
        (v - 1) * size + u,
    }
    assert source[0, 0] == 0  # outside the field of view


def test_oct_maps_follow_the_recipe_extent_centred_on_the_volume() -> None:
    recipe = OctRecipe(shape=(8, 32, 32), extent_mm=(4.0, 2.0, 4.0))
    spacing, shape = (0.25, 0.02, 0.05), (24, 120, 100)  # 6 x 2.4 x 5 mm scanned
    # a bright spot in the source volume lands in the prepared volume; its map comes back
    volume = torch.zeros(shape)
    volume[13, 70, 60] = 1.0
    prepared = resample(volume, spacing, recipe).numpy()
    k, i, j = np.unravel_index(prepared.argmax(), prepared.shape)
    assert abs(source_bscan(int(k), 8, spacing, 24, recipe.extent_mm) - 13) <= 1
    heat = np.zeros((32, 32), np.float32)
    heat[i, j] = 1.0
    back = oct_bscan_to_source(heat, spacing, shape, recipe.extent_mm)
    y, x = np.unravel_index(back.argmax(), back.shape)
    assert abs(y - 70) <= 2 and abs(x - 60) <= 2
    attention = attention_to_source(np.eye(8)[k], spacing, 24, recipe.extent_mm)
    assert abs(int(attention.argmax()) - 13) <= 1 and attention.sum() == pytest.approx(1.0)
    assert attention[0] == 0  # outside the 4 mm the model saw


# -- fusion ----------------------------------------------------------------------------------


def test_a_fusion_model_scores_a_photograph_and_oct_of_one_eye_and_visit_together(
    scoring_home: Path,
    tracking_uri: str,
    cohort_files: pd.DataFrame,
    hub_key: HubKey,
    tmp_path: Path,
) -> None:
    from tests.inference.models import register

    fusion = register("fusion_demo", tracking_uri, scoring_home / "models")
    scorer = _scorer(fusion, hub_key, tmp_path)
    visit = cohort_files[(cohort_files.patient_index == 0) & (cohort_files.visit == 1)]
    paths = [Path(p) for p in visit.file]  # both eyes: two photographs, two OCTs
    results = scorer.score_files(paths)
    assert sorted(r.eye for r in results) == ["L", "R"]
    for r in results:
        assert sorted(i.scan.modality for i in r.images) == ["fundus", "oct"]
        assert {i.scan.pixels.eye for i in r.images} == {r.eye}
        assert all(i.heatmap is not None for i in r.images) and r.tasks
    one_eye = visit[visit.eye == "R"]
    with pytest.raises(InputError, match="fundus photograph and an OCT") as caught:
        scorer.score_files([Path(one_eye[one_eye.kind == "fundus"].file.iloc[0])])
    assert caught.value.reason == "incomplete_exam"


# -- the command line -----------------------------------------------------------------------


def test_eyehub_score_writes_json_and_heat_map_per_scan_and_refuses_bad_files_by_name(
    fundus_model: Registered,
    cohort_files: pd.DataFrame,
    scoring_env: dict[str, str],
    planted_identifiers: list[str],
    hub_key: HubKey,
    tmp_path: Path,
) -> None:
    fundus = [Path(p) for p in cohort_files[cohort_files.kind == "fundus"].file.iloc[:2]]
    oct_file = _first(cohort_files, "oct")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 200)
    out = tmp_path / "out"
    proc = run_eyehub(
        "score",
        *map(str, [*fundus, oct_file, junk]),
        "--model",
        f"models:/{fundus_model.name}@champion",
        "--out",
        str(out),
        extra_env=scoring_env,
    )
    assert proc.returncode == 3, proc.stderr  # scored what it could; two files refused
    assert f"version {fundus_model.version} (alias champion)" in proc.stdout
    assert "wrong_modality" in proc.stdout and "not_dicom" in proc.stdout
    assert "2 exam(s) scored, 2 file(s) refused" in proc.stdout
    for path in fundus:
        scan = hub_key.scan_id(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        body = json.loads((out / f"{scan}.json").read_text())
        assert body["scan"] == scan and body["decision"] in ("refer", "routine")
        assert (out / f"{scan}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert body["headline"].split(":")[0] in proc.stdout
    logs = list((Path(scoring_env["EYEHUB_HOME"]) / "logs").glob("*.log"))
    texts = [proc.stdout, proc.stderr, *(p.read_text() for p in logs)]
    texts += [p.read_text() for p in out.glob("*.json")]
    for text in texts:
        for value in planted_identifiers:
            assert value not in text


def test_the_demo_ends_by_scoring_a_held_out_scan_with_the_champion(
    fundus_model: Registered,
    scoring_home: Path,
    key_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from eyehub import cli
    from eyehub.settings import Environment
    from training.run import TrainSummary

    monkeypatch.setenv("EYEHUB_HOME", str(scoring_home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fundus_model.tracking_uri)
    trained = TrainSummary(
        "run",
        fundus_model.run_id,
        "exp",
        fundus_model.tracking_uri,
        model_name=fundus_model.name,
        model_version=fundus_model.version,
    )
    written = cli._demo_score(tmp_path, trained, key_file, Environment.from_environ())
    out = capsys.readouterr().out
    assert f"champion stays at version {fundus_model.version}" in out
    body = json.loads(written.read_text())
    assert body["model"]["alias"] == "champion" and body["decision"] in ("refer", "routine")
    assert written.with_suffix(".png").is_file()
    report = pydicom.dcmread(written.with_name(written.stem + ".sr.dcm"))
    assert report.Modality == "SR"
    assert len((tmp_path / "api-token").read_text().strip()) >= 24
    assert (tmp_path / "api-token").stat().st_mode & 0o077 == 0  # the token is private
