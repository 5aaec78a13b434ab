"""The clinician's page in a real browser (Debian's chromium driven by Playwright): enter
the token, choose a DICOM file, read the result in words with the scan and its heat map;
an ungradable photograph and refused requests are said in words too. Screenshots are kept
under the test's tmp dir, and copied to $EYEHUB_TEST_ARTIFACTS when that is set."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
import requests

from inference.service import ServiceSettings, serve_in_thread
from tests.inference.models import Registered
from tests.tools import need_tool

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "page-token-0123456789"
WAIT_MS = 180_000  # scoring on two shared cores; a deadline, not a timing test


@pytest.fixture(scope="module")
def service(
    fundus_model: Registered, key_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    settings = ServiceSettings(
        model=f"models:/{fundus_model.name}@champion",
        tracking_uri=fundus_model.tracking_uri,
        cache=tmp_path_factory.mktemp("page-cache"),
        key_file=key_file,
        port=0,
        token=TOKEN,
    )
    with serve_in_thread(settings) as running:
        deadline = time.monotonic() + WAIT_MS / 1000
        while requests.get(f"{running.url}/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the service did not load its model"
            time.sleep(0.25)
        yield running.url


@pytest.fixture
def page(service: str) -> Iterator[Any]:
    need_tool(CHROMIUM)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            tab = context.new_page()
            external: list[str] = []
            tab.on(
                "request",
                lambda r: (
                    external.append(r.url) if not r.url.startswith((service, "data:")) else None
                ),
            )
            tab.goto(service + "/")
            yield tab
            assert not external, f"the page fetched from elsewhere: {external}"
        finally:
            browser.close()


def _keep(tab: Any, path: Path) -> None:
    tab.screenshot(path=str(path), full_page=True)
    where = os.environ.get("EYEHUB_TEST_ARTIFACTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(where) / path.name)


def _fundus(files: pd.DataFrame) -> Path:
    rows = files[(files.kind == "fundus") & (files.export == "op")]
    return Path(rows.file.iloc[0])


def test_a_clinician_scores_a_photograph_and_reads_the_decisions_with_the_heat_map(
    page: Any, fundus_model: Registered, cohort_files: pd.DataFrame, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page.fill("#token", TOKEN)
    expect(page.locator("#model-name")).to_contain_text(
        f"version {fundus_model.version}", timeout=WAIT_MS
    )
    page.set_input_files("#file", str(_fundus(cohort_files)))
    exam = page.locator("article.exam")
    expect(exam).to_be_visible(timeout=WAIT_MS)
    headline = exam.locator(".headline").inner_text()
    assert headline.startswith(("REFER", "ROUTINE")), headline
    assert f"version {fundus_model.version}" in exam.locator(".model-version").inner_text()
    rows = exam.locator("tbody tr")
    assert rows.count() >= 5
    decisions = {rows.nth(i).locator(".decision").inner_text() for i in range(rows.count())}
    assert decisions & {"refer", "routine"}
    dr = exam.locator('tr[data-task="referable_dr"]')
    assert "referable diabetic retinopathy" in dr.inner_text()
    assert "%" in dr.locator("td").nth(1).inner_text()  # the risk as a percentage
    assert "%" in dr.locator("td").nth(3).inner_text()  # and the threshold
    for image in ("img.scan-image", "img.heatmap-image"):
        assert page.eval_on_selector(image, "img => img.naturalWidth") > 0, image
    scan = page.get_attribute("img.scan-image", "src")
    heat = page.get_attribute("img.heatmap-image", "src")
    assert scan != heat  # the heat map is drawn over the scan, not the scan again
    assert "heat map" in exam.inner_text().lower()
    _keep(page, tmp_path / "page-scored.png")


def test_an_ungradable_photograph_says_so_and_gives_no_risk_figures(
    page: Any, cohort_files: pd.DataFrame, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    ds = pydicom.dcmread(_fundus(cohort_files))
    ds.decompress()  # Explicit VR Little Endian, the pixels as they are
    ds.PixelData = (ds.pixel_array // 12).astype(np.uint8).tobytes()  # far below min_illumination
    dark = tmp_path / "dark.dcm"
    ds.save_as(dark, enforce_file_format=True)

    page.fill("#token", TOKEN)
    page.set_input_files("#file", str(dark))
    note = page.locator(".ungradable-note")
    expect(note).to_be_visible(timeout=WAIT_MS)
    assert "ungradable" in note.inner_text().lower()
    assert "brightness" in note.inner_text()  # the reason in words
    assert "No risk figures" in note.inner_text()
    assert page.locator(".headline.ungradable").count() == 1
    assert page.locator("article.exam table").count() == 0  # no figures at all
    assert page.eval_on_selector("img.scan-image", "img => img.naturalWidth") > 0
    _keep(page, tmp_path / "page-ungradable.png")


def test_refused_requests_are_said_in_words(
    page: Any, cohort_files: pd.DataFrame, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    error = page.locator("#error")
    page.fill("#token", "not-the-token")
    page.set_input_files("#file", str(_fundus(cohort_files)))
    expect(error).to_contain_text("token is missing or wrong", timeout=WAIT_MS)

    page.fill("#token", TOKEN)
    expect(page.locator("#model-name")).to_be_visible(timeout=WAIT_MS)
    letter = tmp_path / "letter.dcm"
    letter.write_text("referral letter, not an image\n")
    page.set_input_files("#file", str(letter))
    expect(error).to_contain_text("The file was refused", timeout=WAIT_MS)
    expect(error).to_contain_text("not_dicom")
    assert page.locator("article.exam").count() == 0
    _keep(page, tmp_path / "page-refused.png")
