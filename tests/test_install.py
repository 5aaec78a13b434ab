"""A non-editable install (`pip install .`, as a service image does it) has every package and
every shipped config, and runs the demo without the source tree (docs/architecture.md,
"Configuration"); that demo run (a small cohort, no training: the training tests train)
is also the test of `eyehub demo` end to end and of its terminal output.

Nothing is downloaded: a fresh venv sees this environment's dependencies through a folder
of links to its site-packages (eyehub's own editable install and its .pth hooks left out),
and pip builds eyehub from a copy of the tree with the setuptools found there. The copy is
deleted before anything runs, and the runs start in an empty folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("eyehub", "ingest", "preprocess", "models", "training", "inference")
NOT_SOURCE = (".git", ".venv", ".eyehub", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")

# Installed into the test venv only: every Python process started there (the demo, Ray's
# workers) writes the files of the modules it imported, so the test can see where they came
# from.
RECORD_MODULES = """\
import atexit, json, os, sys
_out = os.environ.get("EYEHUB_TEST_MODULES")
if _out:
    def _record():
        modules = list(sys.modules.values())
        files = sorted({str(getattr(m, "__file__", None) or "") for m in modules})
        with open(os.path.join(_out, f"{os.getpid()}.json"), "w") as f:
            json.dump(files, f)
    atexit.register(_record)
"""

CHECK = """\
import json, sys
from eyehub.configs import config_kinds, resolve_config, shipped_configs
import eyehub.cli, ingest, preprocess, models, training, inference
print(json.dumps({
    kind: {name: str(resolve_config(kind, name)) for name in shipped_configs(kind)}
    for kind in config_kinds()
}))
"""


def test_pyproject_lists_every_package_and_config_folder() -> None:
    """setuptools is given the list (it cannot discover `eyehub_configs`, which is configs/
    renamed): a package missing from it would be missing from an installed eyehub."""
    with (REPO / "pyproject.toml").open("rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    packages = {
        ".".join(p.parent.relative_to(REPO).parts)
        for top in TOP_LEVEL
        for p in (REPO / top).rglob("__init__.py")
    }
    configs = {"eyehub_configs"} | {
        f"eyehub_configs.{d.name}" for d in (REPO / "configs").iterdir() if d.is_dir()
    }
    assert sorted(packages | configs) == sorted(listed)


def test_a_config_is_named_or_given_by_path(tmp_path: Path) -> None:
    from eyehub.configs import resolve_config, shipped_configs
    from eyehub.errors import NotFoundError

    assert {"default", "small"} <= set(shipped_configs("preprocess"))
    assert shipped_configs("no-such-kind") == []
    small = resolve_config("preprocess", "small")
    assert small.read_text(encoding="utf-8") == (
        REPO / "configs" / "preprocess" / "small.yaml"
    ).read_text(encoding="utf-8")
    assert resolve_config("preprocess", "small.yaml") == small
    mine = tmp_path / "small"  # an existing file is used as is, even named like a shipped one
    mine.write_text("name: mine\n", encoding="utf-8")
    assert resolve_config("preprocess", mine) == mine
    with pytest.raises(NotFoundError, match=r"shipped preprocess configs: .*small"):
        resolve_config("preprocess", "tiny")
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve_config("preprocess", tmp_path / "missing.yaml")


def _site_packages(venv: Path) -> Path:
    found = list(venv.glob("lib/python3*/site-packages"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A venv with eyehub installed non-editable from a copy of the tree (then deleted), and
    the environment to run it in."""
    base = tmp_path_factory.mktemp("install")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    deps = base / "deps"
    deps.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if entry.suffix == ".pth" or entry.name.startswith(("__editable__", "eyehub")):
            continue  # eyehub's editable finder and metadata, and .pth hooks
        (deps / entry.name).symlink_to(entry)
    site = _site_packages(venv)
    (site / "eyehub_test_deps.pth").write_text(f"{deps}\n", encoding="utf-8")
    source = base / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "EYEHUB_KEY_FILE", "EYEHUB_HOME", "RAY_ADDRESS", "VIRTUAL_ENV")
    }
    env.update({"COLUMNS": "200", "NO_COLOR": "1", "PIP_NO_INDEX": "1"})
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps"]
    built = subprocess.run(
        [*pip, "--no-build-isolation", "--no-index", str(source)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=base,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    shutil.rmtree(source)
    (site / "sitecustomize.py").write_text(RECORD_MODULES, encoding="utf-8")
    return venv, env


def _check_modules(records: Path, site: Path) -> None:
    """The recorded processes loaded eyehub from the install, nothing from the source tree."""
    files = {f for rec in records.glob("*.json") for f in json.loads(rec.read_text())}
    assert str(site / "eyehub" / "cli.py") in files, f"no record of eyehub.cli in {records}"
    from_tree = sorted(f for f in files if f.startswith(f"{REPO}{os.sep}") or "__editable__" in f)
    assert from_tree == []


@pytest.mark.slow
def test_every_package_and_config_of_the_tree_is_installed(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    venv, env = installed
    site = _site_packages(venv)
    packages = {
        p.parent.relative_to(REPO) for top in TOP_LEVEL for p in (REPO / top).rglob("__init__.py")
    }
    missing = sorted(str(p) for p in packages if not (site / p / "__init__.py").is_file())
    assert not missing, f"packages left out of the install (pyproject.toml `packages`): {missing}"
    # the scoring page and the report's style sheet are package data
    static = sorted(p.relative_to(REPO) for p in (REPO / "inference" / "static").iterdir())
    assert static and all((site / p).is_file() for p in static), static

    records = tmp_path / "modules"
    records.mkdir()
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", CHECK],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**env, "EYEHUB_TEST_MODULES": str(records)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    resolved: dict[str, dict[str, str]] = json.loads(run.stdout)
    shipped = {
        (p.parent.name, p.stem): p.read_text(encoding="utf-8")
        for p in (REPO / "configs").glob("*/*.yaml")
    }
    assert {(kind, name) for kind in resolved for name in resolved[kind]} == set(shipped)
    for (kind, name), text in shipped.items():
        path = Path(resolved[kind][name])
        assert path.is_relative_to(site / "eyehub_configs"), path
        assert path.read_text(encoding="utf-8") == text
    _check_modules(records, site)


@pytest.mark.slow
def test_installed_demo_runs_without_the_source_tree(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    venv, env = installed
    records = tmp_path / "modules"
    records.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    home = tmp_path / "home"
    out = subprocess.run(
        [
            str(venv / "bin" / "eyehub"),
            "demo",
            "--home",
            str(home),
            "--patients",
            "2",
            "--no-train",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        cwd=cwd,
        env={**env, "EYEHUB_TEST_MODULES": str(records)},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    _check_modules(records, _site_packages(venv))
    assert list(cwd.iterdir()) == []
    # the demo itself: every file ingested with its labels, a private key, the prepared
    # tensors; eyehub's steps on the terminal and the libraries' chatter in the log file
    root = home / "demo"
    assert "created a demo pseudonymisation key" in out.stdout
    assert "demo outputs are under" in out.stdout
    assert str(root.resolve()) in out.stdout.replace("\n", "")
    catalog = pd.read_parquet(root / "dataset" / "catalog.parquet")
    files = [p for p in (root / "cohort" / "dicom").rglob("*") if p.is_file()]
    assert len(catalog) == len(files) > 0
    assert catalog.dr_grade.notna().mean() > 0.7  # labels joined
    assert (root / "hub.key").stat().st_mode & 0o077 == 0
    assert any((root / "dataset" / "prepared").glob("*.parquet"))
    terminal = out.stdout + out.stderr
    for chatter in ("core_worker", "Ray instance", "Token authentication", "INFO", "Warning"):
        assert chatter not in terminal, terminal
    log_line = next(line for line in out.stdout.splitlines() if "log of this run:" in line)
    log_file = Path(log_line.split("log of this run:", 1)[1].strip())
    assert log_file.parent == home / "logs"
    assert "Started a local Ray instance" in log_file.read_text(encoding="utf-8")
