"""Model cards: every section, the metrics with the intervals the run logged, "trained on
synthetic data" when it was, stored with the version and shown as its description."""

from __future__ import annotations

import re
from pathlib import Path

from inference.card import DESCRIPTION_LIMIT, synthetic_reason, write_model_card
from inference.compare import client_for, load_run
from tests.review.runs import MODEL_NAME, Store

SECTIONS = (
    "Intended use and users",
    "Data",
    "Tasks",
    "Metrics on the test set (95% intervals)",
    "Subgroup performance",
    "Calibration",
    "Operating points",
    "Quality gate",
    "Limitations",
    "Preprocessing recipe",
)


def test_the_card_has_every_section_and_the_logged_figures(
    review_store: Store, store_uri: str, tmp_path: Path
) -> None:
    md_path, html_path = write_model_card(MODEL_NAME, "1", store_uri, tmp_path)
    assert (md_path.name, html_path.name) == (f"{MODEL_NAME}-v1.md", f"{MODEL_NAME}-v1.html")
    md = md_path.read_text()
    headings = re.findall(r"^## (.+)$", md, re.M)
    assert headings == list(SECTIONS)
    client = client_for(store_uri)
    run = review_store.runs["strong"]
    metrics = client.get_run(run.run_id).data.metrics
    for task, metric, name in (
        ("referable_dr", "auroc", "AUROC"),
        ("referable_dr", "sensitivity", "sensitivity"),
        ("dr_grade", "qwk", "quadratic-weighted kappa"),
        ("age", "mae", "MAE"),
    ):
        key = f"test/{task}/{metric}"
        shown = (
            f"| {task} | {name} | {metrics[key]:.3f} ({metrics[key + '/ci_low']:.3f} to "
            f"{metrics[key + '/ci_high']:.3f}) | 80 (40) |"
        )
        assert shown in md
    # data: digest, label prevalence from the test rows, devices, the split
    test = run.predictions[(run.predictions.split == "test")]
    referable = test[test.task == "referable_dr"].label
    assert f"{int(referable.sum())} of 80 ({100 * referable.mean():.1f}%)" in md
    assert f"Dataset digest (SHA-256 of catalog.parquet): {'d1' * 32}" in md
    assert "| SYNTHOPTIX RetinaCam 3D |" in md and "| NORTHLIGHT MEDICAL NL-4000 OCT |" in md
    assert "train 60 (120), val 20 (40), test 40 (80)" in md
    # operating point, calibration, quality gate, recipe, too-small subgroups
    assert re.search(r"\| referable_dr \| called positive \| 0\.500 \| [\d.]+ \(", md)
    assert re.search(r"\| referable_dr \| 0\.\d{3} \(0\.\d{3} to 0\.\d{3}\) \|", md)  # ECE
    assert "| fundus | min_sharpness | 0.0002 |" in md
    assert "min_fov_fraction: 0.2" in md
    assert "| referable_dr | age_band | ge75 | 10 (5) | AUROC | too small: 10 samples < 20 |" in md
    # limitations: synthetic data, first of all
    limitations = md.split("## Limitations", 1)[1]
    assert limitations.lstrip().startswith("- Trained and tested on synthetic data")
    assert "pseudo-" not in md and "scan-0" not in md  # counts only, no pseudonyms
    # the HTML twin: self-contained, the primary task's curves embedded
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == 2
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "Trained and tested on synthetic data" in html
    # stored with the version: artifacts of its run, and its description
    stored = {f.path for f in client.list_artifacts(run.run_id, "model_card")}
    assert {f"model_card/{MODEL_NAME}-v1.md", f"model_card/{MODEL_NAME}-v1.html"} <= stored
    description = client.get_model_version(MODEL_NAME, "1").description
    assert description.startswith(f"# Model card: {MODEL_NAME} version 1")
    assert len(description) <= DESCRIPTION_LIMIT
    assert "synthetic data" in description and f"model_card/{MODEL_NAME}-v1.md" in description


def test_only_the_generator_s_devices_or_the_tag_make_a_run_synthetic(store_uri: str) -> None:
    record = load_run(client_for(store_uri), f"models:/{MODEL_NAME}/1")
    assert synthetic_reason(record) is not None
    real = load_run(client_for(store_uri), f"models:/{MODEL_NAME}/1")
    for frame in (real.test, real.val):
        assert frame is not None
        frame.loc[frame.index[::2], "manufacturer"] = "Topcon"
    assert synthetic_reason(real) is None
    real.tags["eyehub.synthetic"] = "true"
    assert synthetic_reason(real) == "the run's tag eyehub.synthetic says so"
