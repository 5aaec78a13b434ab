"""`eyehub demo`: the main job end to end with embedded defaults (small cohort here); the
terminal shows eyehub's steps and results, the run's log file the rest (docs/architecture.md,
"Errors and output")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end_and_says_where_its_outputs_are(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("EYEHUB_KEY_FILE", "RAY_ADDRESS")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "eyehub.cli",
            "demo",
            "--home",
            str(tmp_path),
            "--patients",
            "4",
            "--no-train",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**env, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    root = tmp_path / "demo"
    assert "created a demo pseudonymisation key" in out.stdout
    assert str(root.resolve()) in out.stdout.replace("\n", "")
    catalog = pd.read_parquet(root / "dataset" / "catalog.parquet")
    files = [p for p in (root / "cohort" / "dicom").rglob("*") if p.is_file()]
    assert len(catalog) == len(files) > 0
    assert catalog.dr_grade.notna().mean() > 0.8  # labels joined
    assert (root / "hub.key").stat().st_mode & 0o077 == 0
    terminal = out.stdout + out.stderr
    for chatter in ("core_worker", "Ray instance", "Token authentication", "INFO", "Warning"):
        assert chatter not in terminal, terminal
    log_line = next(line for line in out.stdout.splitlines() if "log of this run:" in line)
    log_file = Path(log_line.split("log of this run:", 1)[1].strip())
    assert log_file.parent == tmp_path / "logs"
    assert "Started a local Ray instance" in log_file.read_text(encoding="utf-8")
