"""The command line: help on every verb, one-line errors and exit codes, no tracebacks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cli import run_eyehub


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Log files (one per command) go under this test's folder, not ./.eyehub."""
    monkeypatch.setenv("EYEHUB_HOME", str(tmp_path / "home"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_eyehub(*args, timeout=300)


@pytest.mark.parametrize("verb", ["synth", "keygen", "ingest", "preprocess", "demo"])
def test_every_verb_has_help(verb: str) -> None:
    out = run(verb, "--help")
    assert out.returncode == 0
    assert "Usage" in out.stdout and verb in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--patients", "-3"], "--patients must be at least 1"),
        (["--patients", "0"], "--patients must be at least 1"),
        (["--seed", "-1"], "--seed must be zero or positive"),
        (["--size", "huge"], "--size must be one of small, realistic"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_synth_arguments_give_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = run("synth", str(tmp_path / "out"), *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr + out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "out" / "dicom").exists()


def test_unwritable_output_directory_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = run("synth", str(blocker / "cohort"), "--patients", "2")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot create output directory" in lines[0]


def test_non_numeric_count_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    out = run("synth", str(tmp_path), "--patients", "many")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "--patients" in out.stderr


def test_synth_writes_a_cohort_and_says_where(tmp_path: Path) -> None:
    out = run("synth", str(tmp_path / "c"), "--patients", "2", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "c" / "labels.csv") in out.stdout.replace("\n", "")
    assert (tmp_path / "c" / "labels.csv").is_file()
    assert any((tmp_path / "c" / "dicom").rglob("IM*"))


def test_unknown_recipe_is_one_line_listing_the_shipped_ones(tmp_path: Path) -> None:
    out = run("preprocess", str(tmp_path / "ds"), "--recipe", "tiny")
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "'tiny'" in lines[0]
    assert "shipped preprocess configs: default, retfound, small" in lines[0]


def test_recipe_path_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    out = run("preprocess", str(tmp_path / "ds"), "--recipe", str(tmp_path / "mine.yaml"))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{tmp_path / 'mine.yaml'} does not exist" in lines[0]


def test_recipe_by_shipped_name_or_by_path_reaches_the_dataset_check(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: mine\nfundus: {size: 64}\n", encoding="utf-8")
    for given in ("small", str(recipe)):
        out = run("preprocess", str(tmp_path / "ds"), "--recipe", given)
        assert out.returncode == 2, out.stderr
        assert "has no catalog.parquet" in out.stderr, (given, out.stderr)
