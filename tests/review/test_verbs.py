"""The review verbs are on the command line with their help."""

from __future__ import annotations

import pytest

from tests.cli import run_eyehub


@pytest.mark.parametrize(
    ("verb", "says"),
    [
        ("compare", "paired differences"),
        ("promote", "4 refused, nothing"),
        ("card", "model card"),
        ("ui", "MLflow's UI on the project's tracking store"),
    ],
)
def test_every_review_verb_has_help(verb: str, says: str) -> None:
    out = run_eyehub(verb, "--help", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout and verb in out.stdout
    assert says in " ".join(out.stdout.split())
