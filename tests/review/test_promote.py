"""`eyehub promote`: the guard refuses a worse version and one tested on other samples,
promotes a better or equal one, needs a reason to be forced, records who, when, why and
the comparison on the version, and keeps the previous champion as @previous."""

from __future__ import annotations

import datetime as dt
import getpass
import json
from pathlib import Path
from typing import Any

import pytest

from eyehub.errors import UsageError
from inference.compare import client_for, load_run
from inference.promote import (
    PromotionRefusedError,
    compare_versions,
    promote,
)
from tests.cli import run_eyehub
from tests.review.runs import MODEL_NAME


def aliases(uri: str) -> dict[str, str]:
    """alias -> version of the review model."""
    model = client_for(uri).get_registered_model(MODEL_NAME)
    return {alias: str(v) for alias, v in model.aliases.items()}


def tags(uri: str, version: str) -> dict[str, str]:
    return dict(client_for(uri).get_model_version(MODEL_NAME, version).tags)


def crown(uri: str, version: str) -> None:
    """Make `version` the champion without the guard (the state a test starts from)."""
    client_for(uri).set_registered_model_alias(MODEL_NAME, "champion", version)


def test_the_first_promotion_needs_no_comparison_and_says_so(store_uri: str) -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    result = promote(MODEL_NAME, "2", store_uri)
    assert aliases(store_uri) == {"champion": "2", "candidate": "4"}  # no @previous: none was
    assert result.previous is None and result.comparison is None and not result.forced
    recorded = tags(store_uri, "2")
    assert recorded["eyehub.promoted_by"] == getpass.getuser()
    assert before <= dt.datetime.fromisoformat(recorded["eyehub.promoted_at"])
    assert recorded["eyehub.forced"] == "false"
    assert json.loads(recorded["eyehub.promotion_comparison"])["first"] is True
    assert "the first" in result.summary()


def test_a_worse_version_is_refused_and_nothing_changes(store_uri: str) -> None:
    crown(store_uri, "1")
    with pytest.raises(PromotionRefusedError) as refused:
        promote(MODEL_NAME, "2", store_uri)
    assert refused.value.exit_code == 4
    message = str(refused.value)
    assert message.startswith("refused: version 2 is worse than @champion (version 1)")
    assert "test/referable_dr/auroc" in message and "--force --reason" in message
    comparison = refused.value.comparison
    assert comparison is not None and comparison["difference"] < -0.01
    assert comparison["worse_by_more_than_margin"] and comparison["same_samples"]
    assert aliases(store_uri) == {"champion": "1", "candidate": "4"}
    assert not any(key.startswith("eyehub.promot") for key in tags(store_uri, "2"))


def test_a_better_version_is_promoted_and_the_champion_kept_as_previous(
    store_uri: str, tmp_path: Path
) -> None:
    crown(store_uri, "2")
    result = promote(MODEL_NAME, "1", store_uri, reason="better referable AUROC", card_dir=tmp_path)
    assert aliases(store_uri) == {"champion": "1", "previous": "2", "candidate": "4"}
    assert (result.previous, result.previous_alias, result.forced) == ("2", "previous", False)
    recorded = tags(store_uri, "1")
    assert recorded["eyehub.promotion_reason"] == "better referable AUROC"
    assert recorded["eyehub.promoted_from"] == "2"
    assert recorded["eyehub.forced"] == "false"
    comparison = json.loads(recorded["eyehub.promotion_comparison"])
    assert comparison["metric"] == "test/referable_dr/auroc"
    assert comparison["candidate_version"] == "1" and comparison["champion_version"] == "2"
    assert comparison["ci_low"] > 0 < comparison["difference"] and comparison["p_value"] < 0.05
    assert comparison["samples"]["shared"] == 80 and comparison["samples"]["same"]
    # the card of the promoted version, with its promotion, beside its description
    assert result.card is not None
    card = result.card[0].read_text()
    assert "## Promotion" in card and "better referable AUROC" in card
    assert "@champion" in card


def test_an_equal_version_passes_even_with_no_margin(store_uri: str) -> None:
    crown(store_uri, "1")
    result = promote(MODEL_NAME, "4", store_uri, margin=0.0)
    assert aliases(store_uri)["champion"] == "4" and aliases(store_uri)["previous"] == "1"
    assert result.comparison is not None and result.comparison["difference"] == 0


def _strong_vs_weak(store_uri: str, margin: float) -> dict[str, Any]:
    client = client_for(store_uri)
    weak = load_run(client, f"models:/{MODEL_NAME}/2")
    strong = load_run(client, f"models:/{MODEL_NAME}/1")
    return compare_versions(weak, strong, "referable_dr", "auroc", margin)


def test_the_margin_is_held_against_the_measured_difference(store_uri: str) -> None:
    """Both sides of the rule: a version measured worse by more than the margin is refused,
    one measured worse by less is promoted, with the note that its interval reaches
    beyond the margin (non-inferiority not shown)."""
    crown(store_uri, "1")
    worse_by = -_strong_vs_weak(store_uri, 0.0)["difference"]
    assert worse_by > 0.05
    with pytest.raises(PromotionRefusedError):
        promote(MODEL_NAME, "2", store_uri, margin=worse_by - 0.02)
    within = worse_by + 0.02
    comparison = _strong_vs_weak(store_uri, within)
    assert not comparison["worse_by_more_than_margin"]
    result = promote(MODEL_NAME, "2", store_uri, margin=within)
    assert aliases(store_uri)["champion"] == "2"
    shown = comparison["ci_low"] >= -within
    assert comparison["non_inferiority_shown"] == shown
    assert any("non-inferiority is not shown" in n for n in result.notes) == (not shown)


def test_other_samples_are_refused_unless_forced_with_a_reason(store_uri: str) -> None:
    crown(store_uri, "1")
    with pytest.raises(PromotionRefusedError, match="tested on different datasets"):
        promote(MODEL_NAME, "3", store_uri)
    with pytest.raises(UsageError, match="--force needs --reason"):
        promote(MODEL_NAME, "3", store_uri, force=True)
    with pytest.raises(UsageError, match="--force needs --reason"):
        promote(MODEL_NAME, "3", store_uri, force=True, reason="   ")
    assert aliases(store_uri)["champion"] == "1"
    result = promote(MODEL_NAME, "3", store_uri, force=True, reason="new test split agreed")
    assert result.forced and aliases(store_uri)["champion"] == "3"
    assert aliases(store_uri)["previous"] == "1"
    recorded = tags(store_uri, "3")
    assert recorded["eyehub.forced"] == "true"
    assert recorded["eyehub.promotion_reason"] == "new test split agreed"
    comparison = json.loads(recorded["eyehub.promotion_comparison"])
    assert "different datasets" in comparison["overridden"]
    assert comparison["samples"]["shared"] == 60 and not comparison["same_samples"]


def test_promote_refuses_arguments_that_cannot_work(store_uri: str) -> None:
    with pytest.raises(UsageError, match="margin"):
        promote(MODEL_NAME, "1", store_uri, margin=-0.1)
    with pytest.raises(UsageError, match="kept by eyehub"):
        promote(MODEL_NAME, "1", store_uri, alias="previous")
    with pytest.raises(UsageError, match="test/<task>/<metric>"):
        crown(store_uri, "2")
        promote(MODEL_NAME, "1", store_uri, metric="auroc")


def test_the_command_says_what_it_did_or_why_it_refused(store_uri: str, tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": store_uri, "EYEHUB_HOME": str(tmp_path / "home")}
    crown(store_uri, "1")
    refused = run_eyehub("promote", MODEL_NAME, "--version", "2", extra_env=env)
    assert refused.returncode == 4
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: refused: version 2 is worse than @champion (version 1)")
    assert "difference -0." in line and "95% CI" in line
    assert aliases(store_uri)["champion"] == "1"
    done = run_eyehub(
        "promote",
        MODEL_NAME,
        "--version",
        "4",
        "--margin",
        "0",
        "--reason",
        "same model",
        extra_env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        f"promoted {MODEL_NAME} version 4 to @champion (the guard passed); version 1 is now "
        "@previous"
    )
    assert lines[1].strip().startswith("test/referable_dr/auroc: version 4")
    card = tmp_path / "home" / "model_cards" / f"{MODEL_NAME}-v4.md"
    assert f"model card: {card}" in done.stdout and card.is_file()
