"""The dataset contract: one catalog row type, one label registry, closed reason codes,
one default recipe (docs/architecture.md, "The dataset directory")."""

from __future__ import annotations

import ast
import dataclasses
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from eyehub.errors import ConfigError, DatasetError, UsageError
from eyehub.labels import LABELS, label_spec
from eyehub.reasons import QUARANTINE_REASONS, SCORING_REASONS, UNGRADABLE_REASONS
from eyehub.settings import load_settings
from eyehub.synth.cohort import LABEL_COLUMNS
from ingest import HubKey
from ingest.catalog import CATALOG_COLUMNS, CATALOG_SCHEMA, CatalogRow
from ingest.labels import read_labels
from ingest.run import IngestSummary
from ingest.store import iter_scans
from preprocess import Recipe, recipe_id, run_preprocess

ROOT = Path(__file__).resolve().parents[1]


def test_the_catalog_schema_is_the_row_type() -> None:
    assert list(CATALOG_COLUMNS) == [f.name for f in dataclasses.fields(CatalogRow)]
    assert str(CATALOG_SCHEMA.field("shape").type) == "list<item: int64>"
    assert str(CATALOG_SCHEMA.field("study_date").type) == "date32[day]"
    assert str(CATALOG_SCHEMA.field("lossy").type) == "bool"


def test_an_ingested_catalog_has_the_row_columns_then_registered_labels(
    ingested: tuple[Path, IngestSummary],
) -> None:
    dataset, _ = ingested
    schema = pq.read_schema(dataset / "catalog.parquet")
    names = schema.names
    assert names[: len(CATALOG_COLUMNS)] == list(CATALOG_COLUMNS)
    for name in CATALOG_COLUMNS:
        assert schema.field(name).type == CATALOG_SCHEMA.field(name).type, name
    assert names[len(CATALOG_COLUMNS) :] == list(LABEL_COLUMNS)
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    fundus = catalog[catalog.modality == "fundus"]
    assert fundus.fov_mask_fraction.between(0.3, 1.0).all()
    assert catalog[catalog.modality == "oct"].fov_mask_fraction.isna().all()
    # the row each scan carries in the store reads back as the typed record, unchanged
    for _, attrs in iter_scans(dataset):
        stored = attrs["eyehub"]["catalog"]
        assert CatalogRow.from_stored(stored).to_stored() == stored


def test_the_registry_knows_every_label_the_cohort_writes_and_how_to_read_it() -> None:
    assert set(LABEL_COLUMNS) <= set(LABELS)
    assert label_spec("dr_grade").classes == 5
    assert label_spec("age").unit == "years"
    assert label_spec("null_control").control
    assert list(label_spec("sex").encode(["M", "F", None, " m "])[[0, 1, 3]]) == [1.0, 0.0, 1.0]
    assert list(label_spec("referable_dr").encode([1, 0, "1"])) == [1.0, 0.0, 1.0]
    with pytest.raises(DatasetError, match="dr_grade"):
        label_spec("dr_grade").encode([0, 5])
    with pytest.raises(ConfigError, match="smoker"):
        label_spec("smoker")


def _labels_with(src: Path, dst: Path, column: str, value: str) -> Path:
    table = pd.read_csv(src, dtype=str, keep_default_na=False)
    table[column] = value
    table.to_csv(dst, index=False)
    return dst


def test_a_labels_file_with_an_unknown_column_is_refused_by_name(
    small_cohort: Path, hub_key: HubKey, tmp_path: Path
) -> None:
    bad = _labels_with(small_cohort / "labels.csv", tmp_path / "l.csv", "smoker", "1")
    with pytest.raises(UsageError, match=r"'smoker'.*label registry"):
        read_labels(bad, hub_key)


def test_a_label_value_its_kind_cannot_take_is_refused(
    small_cohort: Path, hub_key: HubKey, tmp_path: Path
) -> None:
    bad = _labels_with(small_cohort / "labels.csv", tmp_path / "l.csv", "dr_grade", "7")
    with pytest.raises(UsageError, match=r"'dr_grade'.*integer grades 0 to 4"):
        read_labels(bad, hub_key)
    good = read_labels(small_cohort / "labels.csv", hub_key)
    assert set(good.sex.dropna()) == {"M", "F"}


def test_preprocess_refuses_a_catalog_column_the_registry_does_not_know(
    ingested: tuple[Path, IngestSummary], tmp_path: Path
) -> None:
    dataset = tmp_path / "ds"
    shutil.copytree(ingested[0], dataset)
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    catalog["smoker"] = 1
    catalog.to_parquet(dataset / "catalog.parquet", index=False)
    with pytest.raises(DatasetError, match="'smoker'"):
        run_preprocess(dataset, Recipe(), workers=1)
    assert not (dataset / "prepared").exists()  # refused before any work


# -- reason codes ------------------------------------------------------------------------

_CODE = r"([a-z][a-z_]+)"
_WRITERS = [
    re.compile(r"InputError\(\s*\"" + _CODE + '"'),
    re.compile(r"_fail\(\s*\"" + _CODE + '"'),
    re.compile(r"reason[\"']?\s*[=:]\s*\"" + _CODE + '"'),
    re.compile(r"reason=\"" + _CODE + '"'),
    re.compile(r"_failed\([^,()]+,\s*\"" + _CODE + '"'),
    re.compile(r"_refuse\(\s*\"" + _CODE + '"'),
]


def _written_codes(package: str) -> set[str]:
    codes: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in _WRITERS:
            codes |= set(pattern.findall(text))
        # reasons returned by name: `reasons.append("too_dark")`, `reason = "low_signal"`
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "append":
                owner = node.func.value  # type: ignore[attr-defined]
                if getattr(owner, "id", "") == "reasons":
                    codes |= {a.value for a in node.args if isinstance(a, ast.Constant)}
            if isinstance(node, ast.Assign | ast.AnnAssign):
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                value = node.value
                if getattr(target, "id", "") == "reason" and isinstance(value, ast.Constant):
                    codes.add(value.value)
    return {c for c in codes if isinstance(c, str)}


def test_every_reason_code_written_is_in_its_closed_set() -> None:
    ingest_codes = _written_codes("ingest")
    preprocess_codes = _written_codes("preprocess")
    assert {"corrupt_pixel_data", "internal_error", "duplicate_instance"} <= ingest_codes
    assert {"too_dark", "low_signal"} <= preprocess_codes  # the scan finds them
    assert ingest_codes <= set(QUARANTINE_REASONS), ingest_codes - set(QUARANTINE_REASONS)
    assert preprocess_codes <= set(UNGRADABLE_REASONS), preprocess_codes - set(UNGRADABLE_REASONS)
    # scoring refuses with its own codes, or ingest's for a bad file
    scoring_codes = _written_codes("inference")
    assert {"wrong_modality", "incomplete_exam"} <= scoring_codes
    allowed = set(SCORING_REASONS) | set(QUARANTINE_REASONS)
    assert scoring_codes <= allowed, scoring_codes - allowed


@pytest.mark.parametrize(
    ("doc", "codes"),
    [
        ("docs/ingest.md", QUARANTINE_REASONS),
        ("docs/preprocess.md", UNGRADABLE_REASONS),
        ("docs/inference.md", SCORING_REASONS),
    ],
)
def test_every_reason_code_is_documented(doc: str, codes: dict[str, str]) -> None:
    text = (ROOT / doc).read_text(encoding="utf-8")
    missing = [c for c in codes if f"`{c}`" not in text]
    assert not missing, f"{doc} does not document {missing}"


def test_the_shipped_default_recipe_is_the_code_default() -> None:
    shipped = load_settings(Recipe, ROOT / "configs" / "preprocess" / "default.yaml")
    assert recipe_id(shipped) == recipe_id(Recipe())
    assert shipped == Recipe()
