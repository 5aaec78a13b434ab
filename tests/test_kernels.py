"""The scan kernels training and scoring share: a file through ingest -> store -> preprocess
and the same file through `ingest.kernel.load_scan` and `preprocess.kernel.prepare_scans`
give the same pixels, the same prepared tensor and the same quality record."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from eyehub.failures import internal_traceback
from eyehub.settings import load_settings
from ingest.convert import convert_file
from ingest.kernel import load_scan
from ingest.run import IngestSummary
from ingest.store import read_pixels
from preprocess import Recipe, recipe_id, run_preprocess
from preprocess.kernel import prepare_scans

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "preprocess" / "small.yaml"


@pytest.fixture(scope="module")
def prepared(
    ingested: tuple[Path, IngestSummary], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Recipe]:
    dataset = tmp_path_factory.mktemp("kernels") / "ds"
    shutil.copytree(ingested[0], dataset)
    recipe = load_settings(Recipe, SMALL)
    run_preprocess(dataset, recipe, workers=2)
    return dataset, recipe


def _one_file_per_kind(cohort: Path) -> list[Path]:
    """A file of every export kind and transfer syntax the cohort has."""
    truth = pd.read_csv(cohort / "truth.csv")
    picked = truth.groupby(["kind", "export", "transfer_syntax_uid"]).head(1)
    return [cohort / p for p in picked.path]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_ingest_then_preprocess_equals_the_direct_kernels(
    small_cohort: Path, prepared: tuple[Path, Recipe]
) -> None:
    dataset, recipe = prepared
    rid = recipe_id(recipe)
    catalog = pd.read_parquet(dataset / "catalog.parquet").set_index("source_sha256")
    index = pd.read_parquet(dataset / "prepared" / f"{rid}.parquet").set_index("scan_id")
    arrays = zarr.open_group(dataset / "prepared" / f"{rid}.zarr", mode="r")
    files = _one_file_per_kind(small_cohort)
    assert len(files) >= 8  # fundus in 5 syntaxes + 2 exports, OCT in 2 syntaxes
    scans = [load_scan(f) for f in files]
    direct = prepare_scans(scans, recipe)  # one batch, mixed sizes and modalities
    for path, scan, result in zip(files, scans, direct, strict=True):
        entry = catalog.loc[_sha(path)]
        stored = read_pixels(dataset, entry.scan_id)
        np.testing.assert_array_equal(scan.pixels, stored, err_msg=str(path))
        if scan.modality == "fundus":
            assert scan.fov_mask_fraction == pytest.approx(entry.fov_mask_fraction)
        row = index.loc[entry.scan_id]
        through_store = np.asarray(arrays[scan.modality][int(row.row)])
        assert result.tensor is not None
        diff = np.abs(result.tensor.astype(int) - through_store.astype(int)).max()
        assert diff <= 1, f"{path.name}: prepared tensors differ by {diff} grey levels"
        for key, value in result.record.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (path.name, key)
            else:
                assert row[key] == value or (value is None and pd.isna(row[key])), key


def test_bytes_and_path_give_the_same_scan(small_cohort: Path) -> None:
    for path in _one_file_per_kind(small_cohort):
        from_path = load_scan(path)
        from_bytes = load_scan(path.read_bytes())
        np.testing.assert_array_equal(from_path.pixels, from_bytes.pixels)
        assert (from_path.modality, from_path.eye, from_path.spacing_mm) == (
            from_bytes.modality,
            from_bytes.eye,
            from_bytes.spacing_mm,
        )


def test_load_scan_clears_burned_in_text_outside_the_field_of_view(small_cohort: Path) -> None:
    truth = pd.read_csv(small_cohort / "truth.csv")
    row = truth[(truth.kind == "fundus") & (truth.export == "op")].iloc[0]
    scan = load_scan(small_cohort / row.path)
    _, h, w = scan.pixels.shape
    yy, xx = np.mgrid[:h, :w]
    outside = (xx - row.fov_cx) ** 2 + (yy - row.fov_cy) ** 2 > (1.1 * row.fov_radius) ** 2
    assert outside.any() and scan.pixels[:, outside].max() == 0  # the corners held text


PLANTED = "Jane Doe 1962-03-04"  # what a library's message could quote


class _BrokenScan:
    """A scan whose pixels cannot be produced: stands for a bug inside the kernel."""

    modality = "fundus"
    spacing_mm = None

    @property
    def pixels(self) -> np.ndarray:
        raise RuntimeError(PLANTED)


def test_an_unexpected_error_is_internal_error_with_a_traceback_that_quotes_no_value(
    small_cohort: Path,
) -> None:
    good = load_scan(_one_file_per_kind(small_cohort)[0])
    results = prepare_scans([_BrokenScan(), good], Recipe())  # type: ignore[list-item]
    assert results[0].reason == "internal_error" and not results[0].gradable
    assert results[0].traceback and "RuntimeError" in results[0].traceback
    assert "Jane" not in results[0].traceback and "1962" not in results[0].traceback
    assert results[1].tensor is not None  # the other scan is prepared


def test_a_bug_while_converting_quarantines_the_file_as_internal_error(
    small_cohort: Path, tmp_path: Path
) -> None:
    path = _one_file_per_kind(small_cohort)[0]
    result = convert_file(path, tmp_path / "ds", None, 2**30)  # type: ignore[arg-type]
    assert result["outcome"] == "quarantined" and result["reason"] == "internal_error"
    assert "AttributeError" in result["traceback"] and "log file" in result["detail"]
    assert path.exists()


def test_internal_traceback_keeps_frames_and_type_only() -> None:
    try:
        {}["PatientName=Doe^Jane"]
    except KeyError as exc:
        text = internal_traceback(exc)
    assert "test_internal_traceback_keeps_frames_and_type_only" in text
    assert "KeyError" in text and "Doe" not in text.split("\n")[-2]
