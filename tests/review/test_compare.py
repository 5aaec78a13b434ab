"""`eyehub compare`: a planted difference comes out with the right sign and an interval that
excludes 0; runs tested on other samples are compared on the shared ones, with a warning;
the HTML report renders offline in a real browser; md and json say the same."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from sklearn.metrics import roc_auc_score

from eyehub.errors import NotFoundError, UsageError
from inference.compare import (
    Comparison,
    client_for,
    compare_runs,
    jsonable,
    render_markdown,
    resolve_reference,
    write_report,
)
from tests.cli import run_eyehub
from tests.review.runs import MODEL_NAME, Store
from tests.tools import need_tool

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def version(n: int) -> str:
    return f"models:/{MODEL_NAME}/{n}"


@pytest.fixture(scope="module")
def strong_vs_weak(review_store: Store) -> Comparison:
    """Version 1 (strong) against version 2 (weak), on the very same samples."""
    return compare_runs([version(1), version(2)], review_store.uri())


@pytest.fixture(scope="module")
def other_samples(review_store: Store) -> Comparison:
    """Version 1 against version 3, tested on another dataset: 30 of 40 patients shared."""
    return compare_runs([version(1), version(3)], review_store.uri())


def task(comparison: Comparison, name: str) -> dict[str, Any]:
    (found,) = [t for t in comparison.content["tasks"] if t["task"] == name]
    return found


def difference(entry: dict[str, Any], metric: str, pair: tuple[str, str] = ("A", "B")) -> Any:
    (found,) = [
        c
        for c in entry["comparisons"]
        if c["metric"] == metric and (c["first"], c["second"]) == pair
    ]
    return found


def test_a_planted_difference_has_the_right_sign_and_an_interval_excluding_zero(
    strong_vs_weak: Comparison, review_store: Store
) -> None:
    content = strong_vs_weak.content
    assert content["same_dataset"] and content["same_samples"] and content["warnings"] == []
    referable = task(strong_vs_weak, "referable_dr")
    assert referable["primary"] and content["tasks"][0] is referable  # the primary task first
    assert referable["samples"] == {
        "shared": 80,
        "shared_patients": 40,
        "only": {"A": 0, "B": 0},
        "disagreeing": 0,
        "same": True,
    }
    auroc = difference(referable, "auroc")  # B (weak) - A (strong)
    assert auroc["difference"] < -0.05
    assert auroc["ci_low"] < auroc["difference"] < auroc["ci_high"] < 0
    assert auroc["significant"] and auroc["p_value"] < 0.05 and auroc["better"] == "A"
    # each run's figure is the one its training run logged: the same samples, the same metric
    strong = client_for(review_store.uri()).get_run(review_store.runs["strong"].run_id)
    logged = strong.data.metrics["test/referable_dr/auroc"]
    assert referable["metrics"]["A"]["auroc"]["estimate"] == pytest.approx(logged)
    assert auroc["first_value"] == pytest.approx(logged)
    # DeLong's test of the same AUROCs agrees on the difference and finds it too
    (delong,) = referable["delong"]
    assert delong["difference"] == pytest.approx(auroc["difference"])
    assert delong["p_value"] < 0.01 and delong["significant"]
    # lower is better for an error: the weak model's larger MAE makes A the better one
    mae = difference(task(strong_vs_weak, "age"), "mae")
    assert mae["difference"] > 0 and mae["ci_low"] > 0 and mae["better"] == "A"
    assert not mae["higher_is_better"]
    # the ordinal task: QWK and DeLong on the referral AUROC
    grade = task(strong_vs_weak, "dr_grade")
    assert difference(grade, "qwk")["ci_high"] < 0
    assert grade["delong"][0]["metric"] == "referral_auroc"
    # what differs between the two resolved configs: the learning rate, and nothing else
    assert content["config_differences"] == [
        {"key": "training.lr", "values": {"A": "0.002", "B": "0.0001"}}
    ]


def test_subgroups_are_side_by_side_with_significant_differences_marked(
    strong_vs_weak: Comparison,
) -> None:
    subgroups = task(strong_vs_weak, "referable_dr")["subgroups"]
    groups = {(s["group"], s["value"]): s for s in subgroups}
    assert {("sex", "F"), ("sex", "M")} <= set(groups)
    for s in subgroups:
        if s["status"] == "too_small":  # shown as such, with no number and no test
            assert "too small" in s["reason"]
            assert s["values"] == {"A": None, "B": None} and s["comparisons"] == []
        else:
            assert set(s["values"]) == {"A", "B"}
            (c,) = s["comparisons"]
            assert c["significant"] == (c["p_value"] < 0.05)
    assert any(s["status"] == "too_small" for s in subgroups)  # 10 samples aged 75 and over
    assert groups[("sex", "M")]["comparisons"][0]["significant"]
    text = render_markdown(strong_vs_weak)
    assert re.search(r"\| sex \| M \| 40 \(20\) \|.*\*\*-0\.\d+ \([^)]*\) \*\*\*", text)


def test_identical_models_show_no_difference(review_store: Store) -> None:
    same = compare_runs([version(1), version(4)], review_store.uri(), tasks=["referable_dr"])
    (entry,) = same.content["tasks"]
    for c in entry["comparisons"]:
        assert c["difference"] == 0 and c["p_value"] == 1 and not c["significant"]


def test_runs_on_other_samples_are_compared_on_the_shared_ones_with_a_warning(
    other_samples: Comparison, review_store: Store
) -> None:
    content = other_samples.content
    assert not content["same_dataset"] and not content["same_samples"]
    referable = task(other_samples, "referable_dr")
    assert referable["samples"] == {
        "shared": 60,
        "shared_patients": 30,
        "only": {"A": 20, "B": 20},
        "disagreeing": 0,
        "same": False,
    }
    warnings = content["warnings"]
    assert any("different datasets" in w for w in warnings)
    assert any(
        "not tested on the same samples (20 only in A, 20 only in B)" in w
        and "restricted to the 60 samples (30 patients)" in w
        for w in warnings
    )
    # the figures are the shared samples' (patients 10-39), not either run's whole test set
    strong = review_store.runs["strong"].predictions
    rows = strong[(strong.split == "test") & (strong.task == "referable_dr")]
    shared = rows[rows.patient_id.str[-4:].astype(int).between(10, 39)]
    expected = roc_auc_score(shared.label, shared.calibrated)
    assert referable["metrics"]["A"]["auroc"]["estimate"] == pytest.approx(expected)


def test_a_run_is_named_by_id_version_or_alias(review_store: Store) -> None:
    client = client_for(review_store.uri())
    same = review_store.runs["same"]
    by_id, mv = resolve_reference(client, same.run_id)
    assert (by_id, mv) == (same.run_id, None)
    by_version, mv = resolve_reference(client, version(int(same.version)))
    by_alias, mv_alias = resolve_reference(client, f"models:/{MODEL_NAME}@candidate")
    assert by_version == by_alias == same.run_id  # the last registered is the candidate
    assert str(mv_alias.version) == same.version
    with pytest.raises(UsageError, match="neither an MLflow run id"):
        resolve_reference(client, "not-a-run")
    with pytest.raises(NotFoundError, match="no registered model"):
        resolve_reference(client, f"models:/{MODEL_NAME}@nobody")
    with pytest.raises(UsageError, match="at least two runs"):
        compare_runs([version(1)], review_store.uri())
    with pytest.raises(UsageError, match="no task 'glaucoma'"):
        compare_runs([version(1), version(2)], review_store.uri(), tasks=["glaucoma"])


def test_md_and_json_hold_the_same_content(strong_vs_weak: Comparison, tmp_path: Path) -> None:
    path = write_report(strong_vs_weak, tmp_path / "report.json")
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(jsonable(strong_vs_weak.content)))
    assert data["schema"] == "eyehub.compare/1"
    md = write_report(strong_vs_weak, tmp_path / "report.md").read_text()
    auroc = difference(data["tasks"][0], "auroc")
    shown = f"{auroc['difference']:+.3f} ({auroc['ci_low']:+.3f} to {auroc['ci_high']:+.3f})"
    assert f"| B - A | auroc | **{shown}** |" in md
    for entry in data["tasks"]:
        assert f"## Task {entry['task']} ({entry['kind']}" in md
    assert "| training.lr | 0.002 | 0.0001 |" in md
    assert "data:image" not in md and "pseudo-" not in md and "scan-0" not in md


def test_the_html_report_is_self_contained_and_renders_offline(
    other_samples: Comparison, tmp_path: Path
) -> None:
    need_tool("chromium")
    from playwright.sync_api import Route, sync_playwright

    path = write_report(other_samples, tmp_path / "report.html")
    text = path.read_text()
    # nothing the page could fetch: no remote src/href, no script, no stylesheet link
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert not re.search(r"<(script|link|iframe|object|embed)\b", text, re.I)
    assert "@import" not in text and "url(" not in text
    assert "pseudo-" not in text and "scan-0" not in text  # counts only, no pseudonyms
    requested: list[str] = []

    def refuse(route: Route) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            requested.append(url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            context = browser.new_context(offline=True)
            context.route("**/*", refuse)
            page = context.new_page()
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.complete, i.naturalWidth])"
            )
            alerts = page.locator("[role=alert]")
            alert_texts = alerts.all_inner_texts()
            visible = alerts.first.is_visible()
            headings = page.locator("h2").all_inner_texts()
        finally:
            browser.close()
    assert requested == []
    # ROC and reliability for the two yes/no tasks, a scatter for age: all drawn
    assert len(images) == 5 and all(done and width > 0 for done, width in images)
    assert visible and any("restricted to the 60 samples (30 patients)" in t for t in alert_texts)
    assert {"Summary", "Runs", "Task referable_dr (binary, primary)", "Methods"} <= set(headings)


def test_the_command_writes_the_report_and_prints_the_table(
    review_store: Store, tmp_path: Path
) -> None:
    env = {"MLFLOW_TRACKING_URI": review_store.uri(), "EYEHUB_HOME": str(tmp_path / "home")}
    out = tmp_path / "report.json"
    done = run_eyehub(
        "compare",
        version(2),
        version(1),
        "--task",
        "referable_dr",
        "--out",
        str(out),
        extra_env=env,
    )
    assert done.returncode == 0, done.stderr
    assert f"report (json): {out}" in done.stdout
    row = next(line for line in done.stdout.splitlines() if "referable_dr (primary)" in line)
    data = json.loads(out.read_text())
    auroc = difference(data["tasks"][0], "auroc")
    assert auroc["difference"] > 0 and auroc["better"] == "B"  # B is now the strong one
    assert f"{auroc['difference']:+.3f}" in row
    bad = run_eyehub(
        "compare", version(1), version(2), "--out", "x.pdf", "--format", "pdf", extra_env=env
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: --format must be one of html, md, json (got 'pdf')"
    ]
    assert math.isfinite(auroc["p_value"])
