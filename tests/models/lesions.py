"""Synthetic fundus photographs with one planted lesion cluster, for explanation tests.

Each image is a healthy fundus rendered by the synthetic cohort's renderer (no lesions of
its own); a positive image also gets one tight cluster of bright yellow exudate-like spots
at a random place inside the field of view, away from the optic disc. `lesion_masks`
marks the cluster's disc (its spots and the gaps between them)."""

from __future__ import annotations

import cv2
import numpy as np

from eyehub.synth.fundus import render_fundus
from eyehub.synth.phenotype import EyeSigns

HEALTHY = EyeSigns(
    cup_disc_ratio=0.3,
    microaneurysms=0,
    haemorrhages=0,
    exudates=0,
    cotton_wool_spots=0,
    neovascularisation=False,
    drusen=0,
    macular_fluid=False,
    central_thickening_mm=0.0,
    rnfl_factor=1.0,
    arteriole_calibre=1.0,
    venule_calibre=1.0,
    yellowing=0.0,
)


def lesion_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [n, 3, S, S] uint8, labels [n] 0/1 alternating, masks [n, S, S] bool)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 3, size, size), np.uint8)
    masks = np.zeros((n, size, size), bool)
    labels = np.arange(n) % 2
    for i in range(n):
        eye = "R" if rng.random() < 0.5 else "L"
        image, truth = render_fundus(
            HEALTHY, eye, int(rng.integers(1 << 30)), (0.85, 0.38, 0.16), size, size, 0.46, rng
        )
        if labels[i]:
            r = truth.fov_radius
            while True:  # a centre well inside the FOV and clear of the disc
                angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.6) * r
                cx = truth.fov_cx + dist * np.cos(angle)
                cy = truth.fov_cy + dist * np.sin(angle)
                if np.hypot(cx - truth.disc_x, cy - truth.disc_y) > 2.5 * truth.disc_radius:
                    break
            spread, spot_radius = 0.07 * size, max(1, round(0.016 * size))
            spots = np.zeros((size, size), np.uint8)
            for _ in range(9):
                px, py = rng.normal(0, spread / 2.5, 2)
                cv2.circle(spots, (round(cx + px), round(cy + py)), spot_radius, 1, -1)
            spot = spots.astype(bool)
            image[spot] = (255, 238, 120)
            yy, xx = np.mgrid[0:size, 0:size]
            masks[i] = (np.hypot(xx - cx, yy - cy) <= spread) | spot
        images[i] = image.transpose(2, 0, 1)
    return images, labels, masks
