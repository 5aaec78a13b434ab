"""Clean Pixel Data for fundus photographs: clear everything outside the field of view.

Cameras burn the patient's name and the date into the black corners around the circular
field of view (FOV). PS3.15 E.3.1 (Clean Pixel Data Option) asks for such text to be
removed; the retina itself carries none, so clearing outside the FOV removes it without
touching a pixel a model needs.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.measure import label
from skimage.morphology import convex_hull_image

_WORK_SIZE = 256  # the mask is found at about this size, then scaled up


def fundus_fov_mask(image: np.ndarray) -> np.ndarray:
    """Boolean (y, x) mask of the illuminated retina in a (c, y, x) fundus image.

    The brightest channel is thresholded relative to the image's own bright level (so dark
    exposures work), the largest connected region is kept (burned-in text is separate from
    the FOV) and its convex hull taken (dark vessels or lesions near the edge stay inside;
    FOVs cut at the top and bottom stay whole). An image with no bright region gives an
    all-false mask.
    """
    if image.ndim != 3:
        raise ValueError("expected a (c, y, x) image")
    h, w = image.shape[1:]
    brightest = image.max(axis=0).astype(np.float32)
    if image.dtype != np.uint8:
        brightest *= 255.0 / max(float(np.iinfo(image.dtype).max), 1.0)
    factor = max(1, min(h, w) // _WORK_SIZE)
    small = cv2.resize(brightest, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 1.0)
    bright = float(np.percentile(small, 99))
    if bright < 8.0:
        return np.zeros((h, w), dtype=bool)
    mask = small > max(6.0, 0.12 * bright)
    labels = label(mask, connectivity=2)
    if labels.max() == 0:
        return np.zeros((h, w), dtype=bool)
    largest = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    hull = convex_hull_image(largest).astype(np.uint8)
    # one working pixel of margin keeps the anti-aliased rim of the FOV
    hull = cv2.dilate(hull, np.ones((3, 3), np.uint8))
    full = cv2.resize(hull, (w, h), interpolation=cv2.INTER_NEAREST)
    return full.astype(bool)


def clear_outside_fov(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Zero the pixels outside the FOV of a (c, y, x) image; returns (image, FOV fraction)."""
    mask = fundus_fov_mask(image)
    cleared = image * mask[None].astype(image.dtype)
    return cleared, float(mask.mean())
