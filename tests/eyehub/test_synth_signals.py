"""Every label but `null_control` has a cause a simple pixel statistic can measure.

The statistics here are what a reader would compute by hand (dark-red spots near the
macula, yellow deposits, the pale cup inside the disc, ILM-to-RPE thickness, the blue/red
balance of the lens, the size of the bright disc, the fine choroidal pattern outside the
macula, the depth of the choroid); bars sit below what the planted signal gives on 240
patients and far above what chance gives. `null_control` must show no relation to any of
them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, grey_closing, uniform_filter
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from eyehub.synth.fundus import FundusTruth, render_fundus
from eyehub.synth.oct import OctGeometry, render_oct
from eyehub.synth.phenotype import make_patient

N_PATIENTS = 240
SHAPE = (240, 320)


def fundus_statistics(image: np.ndarray, truth: FundusTruth) -> dict[str, float]:
    f = image.astype(np.float32) / 255.0
    red, green, blue = f[..., 0], f[..., 1], f[..., 2]
    yy, xx = np.mgrid[: f.shape[0], : f.shape[1]]
    fov = np.hypot(xx - truth.fov_cx, yy - truth.fov_cy) < 0.95 * truth.fov_radius
    macula = np.hypot(xx - truth.macula_x, yy - truth.macula_y) < 0.35 * truth.fov_radius
    d_disc = np.hypot(xx - truth.disc_x, yy - truth.disc_y)
    away_from_disc = d_disc > 1.5 * truth.disc_radius
    disc = d_disc < 1.05 * truth.disc_radius
    background = uniform_filter(red, 25)
    green_background = uniform_filter(green, 25)
    # outside the macula, away from the disc and the retinal vessels (dark in green)
    vessels = binary_dilation(green < 0.85 * green_background)
    d_macula = np.hypot(xx - truth.macula_x, yy - truth.macula_y)
    d_centre = np.hypot(xx - truth.fov_cx, yy - truth.fov_cy)
    outer = (
        (d_macula > 0.5 * truth.fov_radius)
        & (d_centre < 0.9 * truth.fov_radius)
        & (d_disc > 2 * truth.disc_radius)
        & ~vessels
    )
    fine_red = red - uniform_filter(red, 9)
    # the bright disc: pixels nearer the disc's green than the surround's, within 2 radii
    near = d_disc < 2 * truth.disc_radius
    level = 0.5 * (np.percentile(green[near], 99) + np.median(green[near & ~disc]))
    return {
        # microaneurysms and haemorrhages: dark-red spots around the macula
        "dark_spots": float(((red < 0.72 * background) & macula).sum() / macula.sum()),
        # drusen and exudates: yellow deposits around the macula
        "yellow": float(
            ((green > 0.55 * red) & (red > 0.5) & macula & away_from_disc).sum() / macula.sum()
        ),
        # the pale cup inside the optic disc
        "cup_fraction": float(((green / np.maximum(red, 1e-3)) > 0.8)[disc].mean()),
        # vessel area: vessels have most contrast in the green channel
        "vessel_fraction": float(((green < 0.75 * green_background) & fov).sum() / fov.sum()),
        # the ageing lens filters blue
        "blue_red": float(blue[fov].mean() / red[fov].mean()),
        "brightness": float(f[fov].mean()),
        # choroidal tessellation: fine red texture outside the macula (relative)
        "tessellation": float(fine_red[outer].std() / red[outer].mean()),
        # optic disc radius (bright pixels) and disc-fovea distance (drawn centres), in FOV radii
        "disc_radius": float(np.sqrt((near & (green > level)).sum() / np.pi) / truth.fov_radius),
        "disc_fovea": float(
            np.hypot(truth.disc_x - truth.macula_x, truth.disc_y - truth.macula_y)
            / truth.fov_radius
        ),
    }


def central_thickness_rows(volume: np.ndarray) -> float:
    smooth = uniform_filter(volume.astype(np.float32), size=(1, 3, 5))
    above = smooth > 0.45 * np.percentile(smooth, 99.5)
    ilm = np.argmax(above, axis=1)
    rpe = smooth.shape[1] - 1 - np.argmax(above[:, ::-1, :], axis=1)
    n_z, n_x = ilm.shape
    centre = (rpe - ilm)[n_z // 2 - 2 : n_z // 2 + 2, n_x // 2 - 4 : n_x // 2 + 4]
    return float(np.median(centre))


def choroid_rows(volume: np.ndarray) -> float:
    """Rows from the RPE (the brightest row of each A-scan) down to the dark sclera, at the
    centre of the scan: where the smoothed choroid falls half-way to the sclera's level."""
    smooth = uniform_filter(volume.astype(np.float32), size=(3, 3, 5))
    n_z, n_y, n_x = smooth.shape
    centre = smooth[n_z // 2 - 3 : n_z // 2 + 3, :, n_x // 2 - 12 : n_x // 2 + 12]
    rpe = centre.argmax(axis=1)  # (B-scans, A-scans)
    depth = np.arange(n_y)[None, :, None]
    below = depth > rpe[:, None, :] + 2
    sclera = np.median(centre[:, -8:, :])
    choroid = np.take_along_axis(centre, np.minimum(rpe + 3, n_y - 1)[:, None, :], axis=1)
    dark = below & (centre < 0.5 * (choroid + sclera))
    return float(np.median(dark.argmax(axis=1) - rpe))


@pytest.fixture(scope="module")
def cohort_stats() -> dict[str, np.ndarray]:
    rows = []
    for i in range(N_PATIENTS):
        p = make_patient(3, i, 2)
        date, eyes = p.visits[0]
        ev = eyes[0]
        rng = np.random.default_rng(i)
        image, truth = render_fundus(
            ev.signs, ev.eye, p.identity_seed, p.pigmentation, *SHAPE, 0.55, rng
        )
        volume, _ = render_oct(ev.signs, ev.eye, (16, 96, 64), OctGeometry(6, 6, 2.3), rng)
        rows.append(
            {
                **fundus_statistics(image, truth),
                "central_thickness": central_thickness_rows(volume),
                "choroid": choroid_rows(volume),
                "male": int(p.sex == "M"),
                "dr_grade": ev.dr_grade,
                "amd": ev.amd,
                "glaucoma": ev.glaucoma,
                "dme": ev.dme,
                "systolic_bp": p.systolic_bp,
                "age": p.age_at(date),
                "cvd_5y": p.cvd_5y,
                "dementia": p.dementia,
                "null_control": p.null_control,
            }
        )
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def test_dr_grade_shows_as_dark_red_lesions(cohort_stats: dict[str, np.ndarray]) -> None:
    rho = spearmanr(cohort_stats["dr_grade"], cohort_stats["dark_spots"]).statistic
    assert rho > 0.5  # about 0.7 with the planted lesions; about 0 without


def test_amd_shows_as_yellow_macular_deposits(cohort_stats: dict[str, np.ndarray]) -> None:
    assert roc_auc_score(cohort_stats["amd"], cohort_stats["yellow"]) > 0.8


def test_glaucoma_shows_as_a_large_cup(cohort_stats: dict[str, np.ndarray]) -> None:
    assert roc_auc_score(cohort_stats["glaucoma"], cohort_stats["cup_fraction"]) > 0.9


def test_dme_shows_as_central_thickening_on_oct(cohort_stats: dict[str, np.ndarray]) -> None:
    assert cohort_stats["dme"].sum() >= 5
    assert roc_auc_score(cohort_stats["dme"], cohort_stats["central_thickness"]) > 0.9


def test_age_shows_as_lens_yellowing(cohort_stats: dict[str, np.ndarray]) -> None:
    assert spearmanr(cohort_stats["age"], cohort_stats["blue_red"]).statistic < -0.55


def test_systemic_risks_are_visible_through_age_and_vessels(
    cohort_stats: dict[str, np.ndarray],
) -> None:
    aged = -cohort_stats["blue_red"]
    assert roc_auc_score(cohort_stats["cvd_5y"], aged) > 0.6
    assert roc_auc_score(cohort_stats["dementia"], aged) > 0.6
    # arteriolar narrowing: higher pressure, less vessel area (identity patterns add noise)
    assert spearmanr(cohort_stats["systolic_bp"], cohort_stats["vessel_fraction"]).statistic < -0.1


def test_hypertension_narrows_arterioles_in_the_same_eye() -> None:
    p = make_patient(3, 7, 2)
    ev = p.visits[0][1][0]
    areas = []
    for calibre in (1.0, 0.6):
        signs = dataclasses.replace(ev.signs, arteriole_calibre=calibre)
        image, truth = render_fundus(
            signs, "R", p.identity_seed, p.pigmentation, *SHAPE, 0.55, np.random.default_rng(0)
        )
        areas.append(fundus_statistics(image, truth)["vessel_fraction"])
    assert areas[1] < 0.93 * areas[0]


SEX_SIGNS = ("tessellation", "disc_radius", "disc_fovea", "choroid")
OTHER_CAUSES = (
    "dark_spots",
    "yellow",
    "cup_fraction",
    "vessel_fraction",
    "blue_red",
    "central_thickness",
)


def test_sex_shows_in_disc_choroid_and_tessellation(cohort_stats: dict[str, np.ndarray]) -> None:
    male = cohort_stats["male"]
    assert 0.35 < male.mean() < 0.65
    # AUC on these 240 patients: tessellation 0.91, disc radius 0.85, disc-fovea distance
    # 0.89, choroid depth 0.75; about 0.5 with nothing planted
    bars = {"tessellation": 0.75, "disc_radius": 0.75, "disc_fovea": 0.75, "choroid": 0.65}
    for name, bar in bars.items():
        auc = roc_auc_score(male, cohort_stats[name])
        assert bar < auc < 0.97, f"sex shows in {name} with AUC {auc:.2f}"
    # no global statistic gives sex away, and no other label's cause carries it
    for name in ("brightness", *OTHER_CAUSES):
        auc = roc_auc_score(male, cohort_stats[name])
        assert 0.38 < auc < 0.62, f"sex predicted by {name} (AUC {auc:.2f})"


def test_null_control_has_no_cause_in_any_image(cohort_stats: dict[str, np.ndarray]) -> None:
    y = cohort_stats["null_control"]
    assert 0.3 < y.mean() < 0.7
    for name in (*OTHER_CAUSES, "brightness", *SEX_SIGNS):
        auc = roc_auc_score(y, cohort_stats[name])
        assert 0.38 < auc < 0.62, f"null_control predicted by {name} (AUC {auc:.2f})"


def _vessel_map(seed: int, index: int, visit: int) -> np.ndarray:
    """Thin dark structures (black top-hat of green), re-centred on the optic disc."""
    p = make_patient(seed, index, 2)
    ev = p.visits[min(visit, len(p.visits) - 1)][1][0]
    image, truth = render_fundus(
        ev.signs,
        ev.eye,
        p.identity_seed,
        p.pigmentation,
        *SHAPE,
        0.55,
        np.random.default_rng([index, visit]),
    )
    green = image[..., 1].astype(np.float32)
    vessels = grey_closing(green, size=(7, 7)) - green > 0.12 * np.percentile(green, 99)
    dy, dx = round(SHAPE[0] / 2 - truth.disc_y), round(SHAPE[1] / 2 - truth.disc_x)
    return np.roll(vessels, (dy, dx), axis=(0, 1))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of each map's vessel pixels within 2 px of the other's (symmetric mean)."""
    near_a, near_b = binary_dilation(a, iterations=2), binary_dilation(b, iterations=2)
    return 0.5 * float((a & near_b).sum() / a.sum() + (b & near_a).sum() / b.sum())


def test_each_patient_has_an_identity_vessel_pattern() -> None:
    for index in range(6):
        same = _agreement(_vessel_map(3, index, 0), _vessel_map(3, index, 1))
        other = _agreement(_vessel_map(3, index, 0), _vessel_map(3, index + 10, 0))
        assert same > 0.85 and other < 0.65, (same, other)
