"""Fundus preparation kernels (issue: preprocess, "Checks")."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.uid import JPEGBaseline8Bit
from skimage import data

from eyehub.synth import dicom_io
from eyehub.synth.dicom_io import uid_for
from eyehub.synth.fundus import render_fundus
from eyehub.synth.phenotype import make_patient
from ingest import read_scan
from preprocess.fundus import circle_mask, detect_fov, prepare_fundus
from preprocess.recipe import FundusRecipe
from tests.ingest.bad_inputs import study

CASES = [  # (rows, cols, FOV radius / height, illumination, uneven)
    (240, 320, 0.55, 1.0, 0.0),  # 4:3, FOV cut at top and bottom
    (288, 288, 0.46, 1.0, 0.0),
    (480, 640, 0.55, 0.45, 0.0),  # dark exposure
    (288, 288, 0.46, 1.0, 0.35),  # uneven light
    (1536, 2048, 0.55, 1.0, 0.0),  # device size
]


@pytest.mark.parametrize(("rows", "cols", "scale", "light", "uneven"), CASES)
def test_fov_centre_and_radius_within_one_percent_of_the_diameter(
    rows: int, cols: int, scale: float, light: float, uneven: float
) -> None:
    for i in range(4):
        p = make_patient(2, i, 2)
        ev = p.visits[0][1][i % 2]
        image, truth = render_fundus(
            ev.signs,
            ev.eye,
            p.identity_seed,
            p.pigmentation,
            rows,
            cols,
            scale,
            np.random.default_rng(i),
            illumination=light,
            uneven=uneven,
        )
        fov = detect_fov(torch.from_numpy(image).permute(2, 0, 1)[None])
        diameter = 2 * truth.fov_radius
        assert bool(fov.found[0])
        # truth is in pixel-index coordinates; the fit in continuous coordinates (+0.5)
        assert abs(float(fov.cx[0]) - 0.5 - truth.fov_cx) < 0.01 * diameter
        assert abs(float(fov.cy[0]) - 0.5 - truth.fov_cy) < 0.01 * diameter
        assert abs(float(fov.radius[0]) - truth.fov_radius) < 0.01 * diameter


def test_real_photograph_fov_matches_the_visible_retina(tmp_path: Path) -> None:
    # scikit-image's retina (a real fundus photograph, 1411 x 1411), wrapped in an OP
    # DICOM by the synth builder and read back by ingest's reader
    photo = data.retina()
    ds = dicom_io.build_fundus_op(
        study(),
        photo,
        "L",
        JPEGBaseline8Bit,
        uid_for(70),
        uid_for(71),
        dt.datetime(2021, 1, 1),
        0.01,
        45.0,
    )
    dicom_io.write(ds, tmp_path / "retina")
    image = torch.from_numpy(read_scan(tmp_path / "retina").pixels)[None]
    # the visible retina, measured independently: pixels clearly brighter than the surround
    lit = photo.max(axis=2) > 40
    ys, xs = np.nonzero(lit)
    visible_d = ((xs.max() - xs.min()) + (ys.max() - ys.min())) / 2 + 1
    visible_c = ((xs.max() + xs.min() + 1) / 2, (ys.max() + ys.min() + 1) / 2)
    fov = detect_fov(image)
    assert abs(2 * float(fov.radius[0]) - visible_d) < 0.02 * visible_d
    assert abs(float(fov.cx[0]) - visible_c[0]) < 0.02 * visible_d
    assert abs(float(fov.cy[0]) - visible_c[1]) < 0.02 * visible_d
    prepared = prepare_fundus(image, FundusRecipe(size=256, normalise="none"))
    out = prepared.images[0].float().amax(dim=0)
    inside = circle_mask(256, out.device, margin=4)
    assert (out[inside] > 20).float().mean() > 0.97  # the retina fills the frame
    assert prepared.reasons == [None]


def test_batches_mix_sizes_and_bad_images_without_stopping() -> None:
    p = make_patient(2, 1, 2)
    ev = p.visits[0][1][0]
    good, _ = render_fundus(
        ev.signs, "R", p.identity_seed, p.pigmentation, 288, 288, 0.46, np.random.default_rng(0)
    )
    black = np.zeros_like(good)
    blurred = np.ascontiguousarray(good)
    import cv2

    blurred = cv2.GaussianBlur(good, (0, 0), 6)
    batch = torch.from_numpy(np.stack([good, black, blurred])).permute(0, 3, 1, 2)
    out = prepare_fundus(batch, FundusRecipe(size=128))
    assert out.images.shape == (3, 3, 128, 128) and out.images.dtype == torch.uint8
    assert out.reasons[0] is None
    assert out.reasons[1] == "no_fov" and int(out.images[1].max()) == 0
    assert out.reasons[2] == "blurred"


def test_graham_normalisation_has_no_bright_rim() -> None:
    p = make_patient(2, 2, 2)
    ev = p.visits[0][1][0]
    image, _ = render_fundus(
        ev.signs, "R", p.identity_seed, p.pigmentation, 288, 288, 0.46, np.random.default_rng(0)
    )
    out = (
        prepare_fundus(torch.from_numpy(image).permute(2, 0, 1)[None], FundusRecipe(size=256))
        .images[0]
        .float()
        .mean(dim=0)
    )
    c = torch.arange(256).float() + 0.5 - 128
    r = torch.sqrt(c[None, :] ** 2 + c[:, None] ** 2)
    rim = out[(r > 110) & (r < 125)].mean()
    centre = out[r < 80].mean()
    assert abs(float(rim) - 128) < 25 and abs(float(centre) - 128) < 25


def test_clahe_raises_local_contrast_inside_the_fov() -> None:
    p = make_patient(2, 4, 2)
    ev = p.visits[0][1][0]
    image, _ = render_fundus(
        ev.signs,
        "R",
        p.identity_seed,
        p.pigmentation,
        288,
        288,
        0.46,
        np.random.default_rng(0),
        illumination=0.6,
    )
    batch = torch.from_numpy(image).permute(2, 0, 1)[None]
    plain = prepare_fundus(batch, FundusRecipe(size=256, normalise="none")).images[0].float()
    eq = prepare_fundus(batch, FundusRecipe(size=256, normalise="clahe")).images[0].float()
    inside = circle_mask(256, plain.device, margin=20)
    assert eq.mean(dim=0)[inside].std() > 1.2 * plain.mean(dim=0)[inside].std()
    assert int(eq[:, ~circle_mask(256, plain.device)].max()) == 0  # still masked
