"""Batch scoring (`inference.batch.score_dataset`) of the small cohort with the registered
test models, on local Ray (started once for the module), real MLflow and real Zarr.

The dataset is a copy of the ingested cohort, not prepared yet, with one fundus
photograph and one OCT volume blackened in the store: the first scoring prepares it with
the model's recipe, and those two scans come out ungradable. The figures are checked
against `EyeModel.predict` on the prepared tensors read directly, and against the
single-file kernel (`Scorer.score_files`) on the original DICOM files: one kernel.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr

from eyehub.errors import DatasetError, NotFoundError
from eyehub.reasons import UNGRADABLE_REASONS
from inference.batch import BatchSummary, figure_columns, score_dataset
from inference.registry import load_model
from inference.score import Scorer
from ingest import HubKey
from ingest.run import IngestSummary
from models.model import EyeModel, model_inputs
from tests.inference.models import Registered, build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def batch_dataset(
    ingested: tuple[Path, IngestSummary], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, str]]:
    """A copy of the ingested cohort (not prepared) with one fundus photograph and one OCT
    volume blackened in the store; returns it and the blackened scan_id per modality."""
    dataset = tmp_path_factory.mktemp("batch") / "ds"
    shutil.copytree(ingested[0], dataset)
    shutil.rmtree(dataset / "prepared", ignore_errors=True)
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    black = {}
    for modality in ("fundus", "oct"):
        scan_id = sorted(catalog.scan_id[catalog.modality == modality])[0]
        array = zarr.open_array(dataset / "scans.zarr" / scan_id / "0", mode="r+")
        array[...] = 0
        black[modality] = scan_id
    return dataset, black


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module's scoring runs (score_dataset reuses a running Ray
    and leaves it running)."""
    import ray

    from eyehub.compute import start_ray

    started = start_ray(2, None)
    yield
    if started:
        ray.shutdown()


def _score(
    dataset: Path,
    model: str,
    tracking_uri: str,
    home: Path,
    progress: list | None = None,
    out: Path | None = None,
) -> BatchSummary:
    return score_dataset(
        dataset,
        model,
        tracking_uri=tracking_uri,
        cache=home / "cache" / "models",
        out=out,
        workers=2,
        batch_size=8,
        device="cpu",
        on_progress=None if progress is None else lambda d, t: progress.append((d, t)),
    )


@pytest.fixture(scope="module")
def fundus_run(
    batch_dataset: tuple[Path, dict[str, str]],
    fundus_model: Registered,
    tracking_uri: str,
    scoring_home: Path,
    local_ray: None,
) -> tuple[BatchSummary, list[tuple[int, int | None]]]:
    progress: list[tuple[int, int | None]] = []
    ref = f"models:/{fundus_model.name}@champion"
    summary = _score(batch_dataset[0], ref, tracking_uri, scoring_home, progress)
    return summary, progress


@pytest.fixture(scope="module")
def oct_run(
    batch_dataset: tuple[Path, dict[str, str]],
    oct_model: Registered,
    tracking_uri: str,
    scoring_home: Path,
    fundus_run: tuple[BatchSummary, list],  # after it: the dataset is prepared by then
) -> BatchSummary:
    ref = f"models:/{oct_model.name}/{oct_model.version}"
    return _score(batch_dataset[0], ref, tracking_uri, scoring_home)


def _prepared(dataset: Path, model: EyeModel) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The prepared index of the model's recipe and its arrays by modality."""
    rid = model.recipe_id
    index = pd.read_parquet(dataset / "prepared" / f"{rid}.parquet")
    root = zarr.open_group(dataset / "prepared" / f"{rid}.zarr", mode="r")
    return index, {m: root[m] for m in ("fundus", "oct")}


def _direct_predictions(
    model: EyeModel,
    tensors: dict[str, np.ndarray],
    age: list[float | None] | None = None,
    sex: list[str | None] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    inputs = model_inputs(
        model.spec, fundus=tensors.get("fundus"), oct=tensors.get("oct"), age=age, sex=sex
    )
    return model.predict(inputs)


def _check_against(
    table: pd.DataFrame, model: EyeModel, predictions: dict[str, dict[str, np.ndarray]]
) -> None:
    """Every figure column of `table` (rows in the predictions' order) equals them."""
    checked = 0
    for column in figure_columns(model):
        task, what = column.split("/")
        entry = predictions[task]
        got = table[column]
        if what == "decision":
            want = np.where(entry["refer"], "refer", "routine")
            assert list(got) == list(want), column
        elif what == "grade":
            assert list(got.astype(int)) == list(entry["grade"]), column
        elif what.startswith("p_grade_"):
            k = int(what.removeprefix("p_grade_"))
            np.testing.assert_allclose(got, entry["grades"][:, k], atol=1e-5, err_msg=column)
        else:
            np.testing.assert_allclose(got, entry[what], atol=1e-5, err_msg=column)
        checked += 1
    assert checked >= 10  # probabilities, decisions, grades and a value were compared


def test_fundus_predictions_have_one_row_per_fundus_scan_of_the_catalog(
    batch_dataset: tuple[Path, dict[str, str]],
    fundus_run: tuple[BatchSummary, list[tuple[int, int | None]]],
    fundus_model: Registered,
) -> None:
    dataset, _ = batch_dataset
    summary, progress = fundus_run
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    fundus = catalog[catalog.modality == "fundus"].set_index("scan_id")
    table = pd.read_parquet(summary.path)
    model = EyeModel.load(fundus_model.model_dir)
    # the default path names the model, its version and its recipe
    assert summary.path == (
        dataset / "predictions" / f"{fundus_model.name}-v{fundus_model.version}-"
        f"{model.recipe_id}.parquet"
    )
    assert summary.prepared  # the dataset had not been prepared: it was, with the recipe
    assert (dataset / "prepared" / f"{model.recipe_id}.parquet").is_file()
    assert table.scan_id.is_unique
    assert set(table.scan_id) == set(fundus.index)
    assert (table.modality == "fundus").all()
    assert list(table.patient_id) == list(fundus.loc[table.scan_id, "patient_id"])
    assert list(table.eye) == list(fundus.loc[table.scan_id, "eye"])
    assert (table.model_name == fundus_model.name).all()
    assert (table.model_version == fundus_model.version).all()
    assert summary.scans == len(table) == len(fundus)
    assert summary.scored + summary.ungradable == summary.scans
    # controls are not shown, as in a clinician's result; every other task is
    assert "null_control/probability" not in table
    assert {"referable_dr/decision", "dr_grade/p_grade_4", "age/value"} <= set(table)
    # progress counts rows and ends at the total
    assert progress[-1] == (len(table), len(table))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_batch_figures_equal_predict_on_the_prepared_tensors(
    batch_dataset: tuple[Path, dict[str, str]],
    fundus_run: tuple[BatchSummary, list],
    fundus_model: Registered,
) -> None:
    dataset, _ = batch_dataset
    table = pd.read_parquet(fundus_run[0].path)
    table = table[table.gradable].reset_index(drop=True)
    model = EyeModel.load(fundus_model.model_dir)
    index, store = _prepared(dataset, model)
    rows = index.set_index("scan_id").loc[table.scan_id, "row"]
    tensors = np.stack([np.asarray(store["fundus"][int(r)]) for r in rows])
    predictions = _direct_predictions(model, {"fundus": tensors})
    _check_against(table, model, predictions)


def _file_scan_ids(dataset: Path, files: pd.DataFrame) -> pd.DataFrame:
    """The cohort's files joined to the catalog through the SHA-256 of their bytes."""
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    digest = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files.file]
    joined = files.assign(source_sha256=digest).merge(
        catalog[["source_sha256", "scan_id"]], on="source_sha256"
    )
    return joined


@pytest.mark.parametrize("modality", ["fundus", "oct"])
def test_batch_figures_equal_the_single_file_kernel_on_the_dicom_file(
    modality: str,
    batch_dataset: tuple[Path, dict[str, str]],
    fundus_run: tuple[BatchSummary, list],
    oct_run: BatchSummary,
    fundus_model: Registered,
    oct_model: Registered,
    cohort_files: pd.DataFrame,
    hub_key: HubKey,
    tracking_uri: str,
    scoring_home: Path,
) -> None:
    dataset, black = batch_dataset
    registered, summary = (
        (fundus_model, fundus_run[0]) if modality == "fundus" else (oct_model, oct_run)
    )
    table = pd.read_parquet(summary.path).set_index("scan_id")
    loaded = load_model(
        f"models:/{registered.name}/{registered.version}",
        tracking_uri,
        scoring_home / "cache" / "models",
    )
    scorer = Scorer(loaded, hub_key, heatmaps=False)
    files = cohort_files[cohort_files.kind == modality]
    # one file per transfer syntax (and export kind): each decoder path is covered
    files = files.drop_duplicates(["transfer_syntax_uid", "export"])
    joined = _file_scan_ids(dataset, files)
    joined = joined[joined.scan_id != black[modality]]
    assert len(joined) >= 2
    for file, scan_id in zip(joined.file, joined.scan_id, strict=True):
        (exam,) = scorer.score_files([Path(file)])
        assert exam.scan == scan_id  # HubKey.scan_id of the SOP Instance UID
        assert exam.status == "scored"
        row = table.loc[scan_id]
        for task in exam.tasks:
            if task.probability is not None:  # the kernel rounds to 5 decimals
                got = row[f"{task.task}/probability"]
                assert got == pytest.approx(task.probability, abs=1.5e-5), task.task
            if task.decision is not None:
                assert row[f"{task.task}/decision"] == task.decision, task.task
            if task.grade is not None:
                assert row[f"{task.task}/grade"] == task.grade, task.task
                assert task.grade_probabilities is not None
                for k, p in enumerate(task.grade_probabilities):
                    assert row[f"{task.task}/p_grade_{k}"] == pytest.approx(p, abs=1.5e-5)
            if task.kind == "regression":  # the kernel rounds values to 3 decimals
                assert row[f"{task.task}/value"] == pytest.approx(task.value, abs=1e-3)


def test_ungradable_scans_have_their_reason_and_no_figures(
    batch_dataset: tuple[Path, dict[str, str]],
    fundus_run: tuple[BatchSummary, list],
    oct_run: BatchSummary,
    fundus_model: Registered,
) -> None:
    dataset, black = batch_dataset
    index, _ = _prepared(dataset, EyeModel.load(fundus_model.model_dir))
    index = index.set_index("scan_id")
    for modality, summary in (("fundus", fundus_run[0]), ("oct", oct_run)):
        table = pd.read_parquet(summary.path).set_index("scan_id")
        row = table.loc[black[modality]]
        assert not row["gradable"]
        assert row["reason"] == index.loc[black[modality], "reason"]
        assert row["reason"] in UNGRADABLE_REASONS
        figures = [c for c in table if "/" in c]
        assert row[figures].isna().all()
        # every other scan of the small cohort is gradable, and has every figure
        scored = table.drop(index=black[modality])
        assert scored.gradable.all() and scored.reason.isna().all()
        assert scored[figures].notna().all().all()
        assert summary.reasons == {row["reason"]: 1}
        assert summary.ungradable == 1 and summary.scored == len(table) - 1


def test_oct_model_scores_every_oct_volume_on_the_prepared_dataset(
    batch_dataset: tuple[Path, dict[str, str]], oct_run: BatchSummary, oct_model: Registered
) -> None:
    dataset, _ = batch_dataset
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    table = pd.read_parquet(oct_run.path)
    assert not oct_run.prepared  # the OCT demo shares the fundus demo's recipe: reused
    assert table.scan_id.is_unique
    assert set(table.scan_id) == set(catalog.scan_id[catalog.modality == "oct"])
    assert (table.modality == "oct").all()
    model = EyeModel.load(oct_model.model_dir)
    table = table[table.gradable].reset_index(drop=True)
    index, store = _prepared(dataset, model)
    rows = index.set_index("scan_id").loc[table.scan_id, "row"]
    tensors = np.stack([np.asarray(store["oct"][int(r)]) for r in rows])
    _check_against(table, model, _direct_predictions(model, {"oct": tensors}))


def test_a_rerun_writes_the_same_table(
    batch_dataset: tuple[Path, dict[str, str]],
    oct_run: BatchSummary,
    oct_model: Registered,
    tracking_uri: str,
    scoring_home: Path,
) -> None:
    import ray

    first = pd.read_parquet(oct_run.path)
    ref = f"models:/{oct_model.name}/{oct_model.version}"
    # `out` a directory: the default file name in it, so the same file as the first run
    again = _score(batch_dataset[0], ref, tracking_uri, scoring_home, out=oct_run.path.parent)
    assert again.path == oct_run.path and not again.prepared
    pd.testing.assert_frame_equal(pd.read_parquet(again.path), first)
    assert not list(again.path.parent.glob(".*"))  # no temporary file left beside it
    assert ray.is_initialized()  # the caller's Ray is left running


def test_a_fusion_model_directory_scores_each_oct_with_its_fundus_photograph(
    batch_dataset: tuple[Path, dict[str, str]],
    oct_run: BatchSummary,  # after it: the dataset is prepared by then
    tmp_path: Path,
    tracking_uri: str,
    scoring_home: Path,
) -> None:
    from training.config import load_train_config

    dataset, black = batch_dataset
    model = build_model(load_train_config("fusion_demo"))
    folder = model.save(tmp_path / "fusion-model")
    out = tmp_path / "fusion.parquet"
    summary = score_dataset(
        dataset,
        str(folder),
        tracking_uri=tracking_uri,
        cache=scoring_home / "cache" / "models",
        out=out,
        batch_size=8,
        device="cpu",
    )
    assert summary.path == out and summary.model_version is None
    catalog = pd.read_parquet(dataset / "catalog.parquet").set_index("scan_id")
    table = pd.read_parquet(out)
    octs = catalog[(catalog.modality == "oct") & (catalog.linked_scan_ids.map(len) > 0)]
    # one row per OCT and the photograph it references, keyed by the photograph
    assert set(table.oct_scan_id) == set(octs.index)
    assert list(table.scan_id) == [octs.linked_scan_ids[o][0] for o in table.oct_scan_id]
    assert (catalog.loc[table.scan_id, "modality"] == "fundus").all()
    assert (table.modality == "fusion").all()
    assert summary.unpaired == int((catalog.modality == "oct").sum()) - len(octs)
    # a pair with a blackened scan is ungradable, with that scan's reason
    bad = table.scan_id.eq(black["fundus"]) | table.oct_scan_id.eq(black["oct"])
    assert (~table.gradable[bad]).all() and table.reason[bad].notna().all()
    assert table.gradable[~bad].all()
    # the figures are predict's on the pair's tensors, with age and sex from the labels
    scored = table[~bad].reset_index(drop=True)
    index, store = _prepared(dataset, model)
    index = index.set_index("scan_id")
    f_rows = index.loc[scored.scan_id, "row"]
    o_rows = index.loc[scored.oct_scan_id, "row"]
    tensors = {
        "fundus": np.stack([np.asarray(store["fundus"][int(r)]) for r in f_rows]),
        "oct": np.stack([np.asarray(store["oct"][int(r)]) for r in o_rows]),
    }
    labels = index.loc[scored.oct_scan_id]
    age = [None if pd.isna(a) else float(a) for a in labels["age"]]
    sex = [None if pd.isna(s) else str(s) for s in labels["sex"]]
    _check_against(scored, model, _direct_predictions(model, tensors, age, sex))


def test_clear_errors_for_a_missing_dataset_model_or_modality(
    batch_dataset: tuple[Path, dict[str, str]],
    oct_model: Registered,
    tracking_uri: str,
    scoring_home: Path,
    tmp_path: Path,
) -> None:
    dataset, _ = batch_dataset
    ref = f"models:/{oct_model.name}@champion"
    with pytest.raises(NotFoundError, match="no dataset at"):
        _score(tmp_path / "nowhere", ref, tracking_uri, scoring_home)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="run `eyehub ingest` first"):
        _score(tmp_path / "empty", ref, tracking_uri, scoring_home)
    with pytest.raises(NotFoundError, match="no registered model"):
        _score(dataset, "models:/eyehub-nothing@champion", tracking_uri, scoring_home)
    # an OCT model on a dataset of photographs only: refused before any work
    photographs = tmp_path / "photographs"
    photographs.mkdir()
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    catalog[catalog.modality == "fundus"].to_parquet(photographs / "catalog.parquet")
    with pytest.raises(DatasetError, match=r"scores OCT volumes.*has no OCT volumes"):
        _score(photographs, ref, tracking_uri, scoring_home)
    assert not (photographs / "prepared").exists()
    assert not (photographs / "predictions").exists()
